"""flashmem: long-context decoding with a small, bounded device KV cache."""

from .config import FlashMemConfig

__all__ = ["FlashMemConfig"]
__version__ = "0.1.0"
