"""flashmem: long-context decoding with a small, bounded device KV cache."""

from .config import FlashMemConfig
from .models import load_default_model, load_model
from .wrapper import FlashMemModel, wrap

__all__ = ["FlashMemConfig", "FlashMemModel", "load_default_model", "load_model", "wrap"]
__version__ = "0.1.0"
