"""TriAttention calibration: query statistics from a model run over plain text.

Per layer, query head and complex pair, the mean pre-RoPE query and its mean magnitude
(:class:`flashmem.offload.TriAttentionStats`). Rope scaling: ``inv_freq`` is read from the model's own
rotary embedding, so frequency rescaling (linear, llama3, YaRN) is what the model really applies.
Queries are un-rotated with the model's own cos/sin (:func:`flashmem.hf_compat.unrotate` divides by
``cos^2 + sin^2``), so a magnitude factor that YaRN folds into cos/sin does not leak into the
statistics. "dynamic" rope types that change ``inv_freq`` with the sequence length are scored with the
frequencies seen at calibration (approximate past the calibration length).

Also here: the local calibration text
(:func:`local_text_token_ids`: documentation and source of installed packages, nothing downloaded).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flashmem.indexer.synthetic import local_text_files
from flashmem.kernels.checks import check_int
from flashmem.offload.triattention_stats import QueryStatsAccumulator, TriAttentionStats

from .hf_compat import (
    capture_attention_inputs,
    kv_geometry,
    model_fingerprint,
    rope_omega,
    rotary_cos_sin,
    unrotate,
    validate_model,
)

CALIBRATION_PACKAGES = ("transformers", "torch")
CALIBRATION_SUFFIXES = (".md", ".txt", ".py")
CALIBRATION_MIN_BYTES = 20_000


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    *,
    max_tokens: int = 32768,
    tokens_per_forward: int = 2048,
    progress: bool = True,
    source: str = "",
) -> TriAttentionStats:
    """Calibrate query statistics on plain text.

    token_ids: [N] int64 (a 2-D [1, N] tensor is flattened). The first ``min(N, max_tokens)`` tokens
    run through the model ``tokens_per_forward`` at a time (positions restart at 0 in each forward);
    post-RoPE queries are captured, un-rotated at their true positions with the model's own cos/sin
    and accumulated. Returns :class:`TriAttentionStats` (fingerprint of ``model``, omega from
    ``model.model.rotary_emb.inv_freq``); ``source`` is recorded in the stats' metadata.
    """
    validate_model(model)
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("token_ids must be an integer tensor [N]")
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise ValueError(f"token_ids must be a non-empty [N] tensor, got shape {tuple(token_ids.shape)}")
    for name, value in (("max_tokens", max_tokens), ("tokens_per_forward", tokens_per_forward)):
        check_int("calibrate", name, value, 1)
    num_layers, num_q, _, head_dim = kv_geometry(model)
    device = next(model.parameters()).device
    tokens = token_ids[:max_tokens].to(device=device, dtype=torch.long)
    acc = QueryStatsAccumulator(num_layers, num_q, head_dim)
    starts = list(range(0, tokens.numel(), tokens_per_forward))
    state: dict = {}

    def on_attention(layer_idx, query, key, value):
        # query: [B=1, H_q, T, D] post-RoPE at positions 0..T-1
        q = unrotate(query[0].float(), state["cos"], state["sin"])  # [H_q, T, D]
        acc.update(layer_idx, q.transpose(0, 1))

    iterator = tqdm(starts, desc="TriAttention calibration", unit="forward", disable=not progress)
    was_training = model.training
    model.eval()
    try:
        for start in iterator:
            chunk = tokens[start : start + tokens_per_forward]
            positions = torch.arange(chunk.numel(), device=device)
            state["cos"], state["sin"] = rotary_cos_sin(model, positions, torch.float32)  # [T, D]
            with capture_attention_inputs(model, on_attention):
                model(input_ids=chunk[None], use_cache=False)
    finally:
        model.train(was_training)
    return acc.finalize(rope_omega(model), model_fingerprint(model), source)


def calibration_text_files() -> list[Path]:
    """Long plain-text files (.md, then .txt, then .py; at least 20 KB) of the installed transformers
    and torch packages, sorted by path within each: real text on any machine that runs flashmem."""
    files: list[Path] = []
    for package in CALIBRATION_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        for suffix in CALIBRATION_SUFFIXES:
            files.extend(local_text_files([root], (suffix,), min_bytes=CALIBRATION_MIN_BYTES))
    return files


def local_text_token_ids(tokenizer, num_tokens: int, *, skip_files: int = 0) -> tuple[torch.Tensor, str]:
    """``[num_tokens]`` int64 ids of concatenated local text (see :func:`calibration_text_files`) and
    a description of the files used. ``skip_files`` starts further down the list (held-out text)."""
    files = calibration_text_files()[skip_files:]
    ids: list[int] = []
    used: list[str] = []
    for path in files:
        if len(ids) >= num_tokens:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        used.append(f"{path.parent.name}/{path.name}")
    if len(ids) < num_tokens:
        raise ValueError(f"only {len(ids)} tokens of local text found, {num_tokens} requested")
    return torch.tensor(ids[:num_tokens], dtype=torch.long), ", ".join(used)
