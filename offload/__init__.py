"""Device block pool and paged cache, host mirror, offload manager, TriAttention compaction."""

from .block_pool import BlockPool, BlockPoolExhausted
from .paged_cache import PagedKVCache

__all__ = ["BlockPool", "BlockPoolExhausted", "PagedKVCache"]
