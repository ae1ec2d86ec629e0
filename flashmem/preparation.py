"""``flashmem prepare``: the per-model files a budget and recall use, made once and stored in the user
cache (:func:`flashmem.files.prepared_dir`: ``$FLASHMEM_CACHE_DIR`` or ``~/.cache/flashmem``, then the
sha256 of the model fingerprint's JSON), where ``stats_path=None`` and ``indexer="auto"`` look first
(stats: prepared > shipped > derived from the prompt; indexer: prepared > quest).

Set-up code: it runs the model over local text (:mod:`flashmem.calibration`) and, on request, trains
the lookahead indexer (:mod:`flashmem.indexer_training`); nothing is downloaded.
"""

from __future__ import annotations

import json
import time

import torch

from .calibration import calibrate, local_text_token_ids
from .files import PREPARED_INDEXER_NAME, PREPARED_STATS_NAME, prepared_dir
from .hf_compat import model_fingerprint, validate_model


def prepare(
    model: torch.nn.Module,
    tokenizer,
    *,
    text: str | None = None,
    max_tokens: int = 32768,
    tokens_per_forward: int = 2048,
    train_indexer: bool = False,
    indexer_options: dict | None = None,
    progress: bool = True,
) -> dict:
    """Calibrate TriAttention stats (on ``text``, else local text of installed packages) and, with
    ``train_indexer``, train a lookahead indexer (``indexer_options`` go to
    :func:`flashmem.indexer_training.train_indexer`); store them in the model's cache directory.
    Returns a report: the directory, the files written and the seconds each part took."""
    validate_model(model)
    fingerprint = model_fingerprint(model)
    directory = prepared_dir(fingerprint)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "fingerprint.json").write_text(json.dumps(fingerprint, sort_keys=True, indent=1))
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    if text is not None:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:max_tokens]
        source = "prepare --text"
    else:
        ids, source = local_text_token_ids(tokenizer, max_tokens)
    stats = calibrate(
        model,
        ids.to(device),
        max_tokens=max_tokens,
        tokens_per_forward=tokens_per_forward,
        progress=progress,
        source=source,
    )
    stats_path = directory / PREPARED_STATS_NAME
    stats.save(stats_path)
    report = {
        "directory": str(directory),
        "stats": str(stats_path),
        "stats_tokens": stats.num_tokens,
        "stats_seconds": round(time.perf_counter() - t0, 2),
    }
    if train_indexer:
        from .indexer_training import train_indexer as train

        t1 = time.perf_counter()
        out = directory / PREPARED_INDEXER_NAME
        train(model, tokenizer, out, progress=progress, **(indexer_options or {}))
        report["indexer"] = str(out)
        report["indexer_seconds"] = round(time.perf_counter() - t1, 2)
    return report
