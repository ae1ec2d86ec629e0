"""Device block pool and paged cache, host mirror, offload manager, TriAttention compaction.

Takes tensors and model fingerprints, never a model: running a model (calibration) is
:mod:`flashmem.calibration`'s job.
"""

from .block_pool import BlockPool, BlockPoolExhausted
from .compaction import compact_sequence
from .head_window import HeadRecallWindow, dedupe_heads
from .host_mirror import HostMirror
from .offload_manager import OffloadManager
from .paged_cache import PagedKVCache
from .resident_set import ResidentSet, dedupe_positions
from .transfer import TransferEngine
from .triattention_policy import TRIATTENTION_MODES, TriAttentionPolicy
from .triattention_select import protected_mask, score_layer, select_keep
from .triattention_stats import DEFAULT_STATS_PATH, QueryStatsAccumulator, TriAttentionStats

__all__ = [
    "DEFAULT_STATS_PATH",
    "TRIATTENTION_MODES",
    "BlockPool",
    "BlockPoolExhausted",
    "HeadRecallWindow",
    "HostMirror",
    "OffloadManager",
    "PagedKVCache",
    "QueryStatsAccumulator",
    "ResidentSet",
    "TransferEngine",
    "TriAttentionPolicy",
    "TriAttentionStats",
    "compact_sequence",
    "dedupe_heads",
    "dedupe_positions",
    "protected_mask",
    "score_layer",
    "select_keep",
]
