"""Device block pool and paged cache, host mirror, offload manager, TriAttention compaction."""

from .block_pool import BlockPool, BlockPoolExhausted
from .compaction import compact_sequence
from .host_mirror import HostMirror
from .offload_manager import OffloadManager
from .paged_cache import PagedKVCache
from .resident_set import ResidentSet, dedupe_positions
from .transfer import TransferEngine
from .triattention import (
    EVICTION_POLICIES,
    TriAttentionPolicy,
    TriAttentionStats,
    calibrate,
    load_stats_for_model,
)

__all__ = [
    "EVICTION_POLICIES",
    "BlockPool",
    "BlockPoolExhausted",
    "HostMirror",
    "OffloadManager",
    "PagedKVCache",
    "ResidentSet",
    "TransferEngine",
    "TriAttentionPolicy",
    "TriAttentionStats",
    "calibrate",
    "compact_sequence",
    "dedupe_positions",
    "load_stats_for_model",
]
