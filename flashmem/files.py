"""Every file flashmem reads goes through here: one checked reader that names the path.

Files are safetensors (tensors, no pickled code) with JSON metadata, in the file itself (TriAttention
stats) or beside it (indexer checkpoints, ``.json``). A missing, empty, truncated or corrupted file, a
directory, or a file whose tensors do not fit its own description is refused with an error that
names the path, before any work. The formats are the lower packages' own
(:class:`flashmem.offload.TriAttentionStats`, :class:`flashmem.indexer.LookaheadIndexer`); this
module only reads bytes and hands them over.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from flashmem.indexer.lookahead import LookaheadIndexer
from flashmem.offload.triattention_stats import DEFAULT_STATS_PATH, TriAttentionStats, fingerprint_diff

from .hf_compat import model_fingerprint


def _check_file(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} file not found: {p}")
    if not p.is_file():
        raise ValueError(f"{what} path {p} is not a regular file (a directory?); give the file itself")
    if p.stat().st_size == 0:
        raise ValueError(f"{what} file {p} is empty")
    return p


def read_safetensors(path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; ``what`` ("TriAttention stats", ...) names the
    kind of file in errors. Raises FileNotFoundError / ValueError naming ``path``."""
    p = _check_file(path, what)
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # SafetensorError and friends: the file is not what it claims
        raise ValueError(f"{what} file {p} is not a readable safetensors file ({err})") from None
    return tensors, metadata


def read_json(path, what: str) -> dict:
    """A JSON object from ``path``; errors name the path."""
    p = _check_file(path, what)
    try:
        value = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what} file {p} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} file {p} must hold a JSON object, found {type(value).__name__}")
    return value


def load_stats(path, expected_fingerprint: dict | None = None) -> TriAttentionStats:
    """TriAttention stats from ``path`` (checked); a fingerprint that differs from
    ``expected_fingerprint`` raises ValueError naming the differing fields."""
    tensors, metadata = read_safetensors(path, "TriAttention stats")
    stats = TriAttentionStats.from_tensors(tensors, metadata, origin=str(path))
    if expected_fingerprint is not None:
        stats.check_fingerprint(expected_fingerprint)
    return stats


def load_indexer(
    path, expected_fingerprint: dict | None = None, device: torch.device | str = "cpu"
) -> LookaheadIndexer:
    """A lookahead indexer checkpoint (``path`` .safetensors + its .json); with
    ``expected_fingerprint``, one trained for another model is refused."""
    path = Path(path).with_suffix(".safetensors")
    meta = read_json(path.with_suffix(".json"), "indexer checkpoint metadata")
    tensors, _ = read_safetensors(path, "indexer checkpoint")
    indexer = LookaheadIndexer.from_checkpoint(tensors, meta, origin=str(path))
    saved = indexer.fingerprint
    if expected_fingerprint is not None and saved != expected_fingerprint:
        diff = sorted(
            k
            for k in set(saved or {}) | set(expected_fingerprint)
            if (saved or {}).get(k) != expected_fingerprint.get(k)
        )
        raise ValueError(
            f"indexer checkpoint {path.name} was trained for another model (differs in {diff}); "
            "train one for this model with `flashmem train-indexer`"
        )
    return indexer.to(device)


CACHE_ENV = "FLASHMEM_CACHE_DIR"
PREPARED_STATS_NAME = "triattention_stats.safetensors"
PREPARED_INDEXER_NAME = "indexer.safetensors"


def cache_root() -> Path:
    """Where ``flashmem prepare`` stores per-model files: ``$FLASHMEM_CACHE_DIR``, else
    ``~/.cache/flashmem``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flashmem"


def prepared_dir(fingerprint: dict) -> Path:
    """The cache directory of one model: ``cache_root() / sha256(fingerprint JSON, sorted keys)``."""
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode("utf-8")).hexdigest()
    return cache_root() / key


def prepared_stats_path(model: torch.nn.Module) -> Path:
    return prepared_dir(model_fingerprint(model)) / PREPARED_STATS_NAME


def prepared_indexer_path(model: torch.nn.Module) -> Path:
    return prepared_dir(model_fingerprint(model)) / PREPARED_INDEXER_NAME


PROMPT_STATS = "prompt"
SHIPPED_STATS = "shipped"


def find_stats_for_model(model: torch.nn.Module, stats_path=None) -> tuple[TriAttentionStats | None, str]:
    """``(stats, source)`` for ``model``: ``stats_path="prompt"``: ``(None, "prompt")``; the file at
    ``stats_path`` (fingerprint checked; source: the path), else the stats ``flashmem prepare`` stored for this model (:func:`prepared_stats_path`;
    source: that path), else the stats shipped for the embedded default model when they were made for
    this model (``"shipped"``), else ``(None, "prompt")``: none exist, and the exact prefill derives
    them from the prompt's own queries."""
    fingerprint = model_fingerprint(model)
    if stats_path == PROMPT_STATS:
        return None, PROMPT_STATS
    if stats_path is not None:
        return load_stats(stats_path, expected_fingerprint=fingerprint), str(stats_path)
    prepared = prepared_dir(fingerprint) / PREPARED_STATS_NAME
    if prepared.is_file():
        return load_stats(prepared, expected_fingerprint=fingerprint), str(prepared)
    if DEFAULT_STATS_PATH.is_file():
        stats = load_stats(DEFAULT_STATS_PATH)
        if not fingerprint_diff(fingerprint, stats.fingerprint):
            return stats, SHIPPED_STATS
    return None, PROMPT_STATS


def load_stats_for_model(model: torch.nn.Module, stats_path=None) -> TriAttentionStats:
    """Stats for ``model``: from ``stats_path`` (fingerprint checked), or, when it is None, the stats
    shipped for the embedded default model (an error for any other model: calibrate it first, or let
    the exact prefill derive them from the prompt, :func:`find_stats_for_model`)."""
    stats, _ = find_stats_for_model(model, stats_path)
    if stats is not None:
        return stats
    if not DEFAULT_STATS_PATH.is_file():
        raise FileNotFoundError(
            f"no shipped TriAttention stats at {DEFAULT_STATS_PATH}; calibrate with "
            "'flashmem calibrate --model default --text DIR --out PATH' and pass stats_path"
        )
    diffs = fingerprint_diff(model_fingerprint(model), load_stats(DEFAULT_STATS_PATH).fingerprint)
    raise ValueError(
        "no TriAttention stats calibrated for this model: the shipped stats are for the embedded default "
        f"model ({'; '.join(diffs)}). Calibrate with "
        "'flashmem calibrate --model PATH --text DIR --out stats.safetensors' and set stats_path."
    )
