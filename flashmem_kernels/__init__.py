"""Triton kernels, each beside its pure-torch reference (``reference_<name>``), and the argument
checks every layer shares. Imports nothing else of flashmem's."""

from .checks import BACKENDS, check_int, resolve_backend
from .compaction import compaction, reference_compaction
from .paged_decode import (
    block_valid_from_num_slots,
    merge_attention_states,
    paged_decode_attention,
    reference_paged_decode_attention,
)
from .triattention_score import (
    aggregate_scores,
    reference_triattention_score,
    torch_triattention_score,
    triattention_score,
    zscore,
)

__all__ = [
    "BACKENDS",
    "aggregate_scores",
    "block_valid_from_num_slots",
    "check_int",
    "compaction",
    "merge_attention_states",
    "paged_decode_attention",
    "reference_compaction",
    "reference_paged_decode_attention",
    "reference_triattention_score",
    "resolve_backend",
    "torch_triattention_score",
    "triattention_score",
    "zscore",
]
