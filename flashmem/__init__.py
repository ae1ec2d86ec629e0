"""flashmem: long-context decoding with a small, bounded device KV cache.

Inference: :func:`wrap` a Hugging Face causal LM with a :class:`FlashMemConfig`, then
``generate``. Set-up work that runs a model (TriAttention calibration, indexer records and training)
is reached through the names below too, but loaded only on first use.
"""

from .config import FlashMemConfig
from .files import load_indexer, load_stats, load_stats_for_model
from .hf_compat import model_fingerprint
from .models import (
    DEFAULT_MODEL_NAME,
    default_model_path,
    load_default_model,
    load_default_tokenizer,
    load_gguf,
    load_model,
)
from .wrapper import FlashMemModel, format_bytes, wrap

_LAZY = {
    "calibrate": "calibration",
    "calibration_text_files": "calibration",
    "local_text_token_ids": "calibration",
    "build_records": "indexer_data",
    "extract_document": "indexer_data",
    "train_indexer": "indexer_training",
    "prepare": "preparation",
}

__all__ = [
    "DEFAULT_MODEL_NAME",
    "FlashMemConfig",
    "FlashMemModel",
    "default_model_path",
    "format_bytes",
    "load_default_model",
    "load_gguf",
    "load_default_tokenizer",
    "load_indexer",
    "load_model",
    "load_stats",
    "load_stats_for_model",
    "model_fingerprint",
    "wrap",
    *_LAZY,
]
__version__ = "0.2.6"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
