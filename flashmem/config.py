"""User-facing configuration: one validated dataclass."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

ATTENTION_BACKENDS = ("auto", "triton", "torch")
TRIATTENTION_MODES = ("per_head", "per_layer_per_head")
INDEX_BACKENDS = ("torch", "faiss")
PREFILL_MODES = ("exact", "sparse")


def _check_int(name: str, value, minimum: int, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"FlashMemConfig.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"FlashMemConfig.{name} must be >= {minimum}, got {value}")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"FlashMemConfig.{name} must be one of {choices}, got {value!r}")


@dataclass
class FlashMemConfig:
    """How the device KV cache is sized and managed.

    budget_tokens: device tokens kept per KV head after each compaction (None keeps everything,
        which makes decoding exactly equal to dense attention).
    block_size: tokens per device block (paged cache granularity).
    max_context_tokens: longest prompt + generation accepted; longer input is refused up front.
    compaction_interval: prune when the device holds budget_tokens + compaction_interval tokens.
    window_tokens / sink_tokens: the most recent / the first tokens, never evicted.
    protect_prompt: never evict prompt tokens (only generated tokens compete for the budget).
    triattention_mode: "per_head" (one keep-set per KV head shared by all layers) or
        "per_layer_per_head".
    stats_path: TriAttention calibration stats (safetensors); None uses the stats shipped for the
        embedded default model, and is an error for any other model when budget_tokens is set.
    attention_backend: decode attention implementation: "triton", "torch" (the reference) or
        "auto" (triton on CUDA, torch elsewhere).
    host_mirror: keep a lossless host copy of every token's K/V (None: on when budget_tokens is set).
    max_host_bytes: cap on the host mirror (None: the machine's available memory); checked up front.
    chunk_size: tokens per recall chunk (host mirror granularity).
    chunk_budget: chunks recalled to the device per lookahead window (None: budget_tokens // (2 *
        chunk_size) when an indexer is active; 0 disables recall).
    lookahead: decode steps between indexer refreshes (tau).
    prefetch_steps: decode steps before each window boundary at which the next window's chunks are
        selected and their copies issued (on a side stream on CUDA), so decoding overlaps the
        transfer; at the boundary the new window replaces the old one. While both windows are held
        the device may hold up to 2 x chunk_budget recalled chunks (the pool is sized for it).
        0: select, copy and wait at the boundary. Must be < lookahead.
    indexer: "auto" (the shipped learned indexer when it matches the model, else "quest"), a
        heuristic ("quest", "mean_key", "mean_key_prerope", "recency"), "lookahead", a checkpoint
        path, or "none" (no recall).
    index_backend / index_candidates: with index_candidates > 0, each layer keeps a chunk index
        (backend "torch", or "faiss" with flashmem[faiss]) of mean post-RoPE keys, retrieves that
        many candidates by inner product at every refresh, and only the union of the candidates is
        scored by the indexer (0: the indexer scores every chunk).
    prefill: "exact" (layer by layer: each layer attends causally to its whole prompt KV, which is
        on the device for that layer only; see flashmem.prefill) or "sparse" (token chunks attending
        to the device-resident tokens only: approximate, compacting as it goes).
    prefill_chunk_tokens: prompt tokens per forward: the exact prefill's tile (None: 8192) or the
        sparse prefill's chunk (None: compaction_interval).
    observe_tokens: exact prefill measures the attention mass of the prompt's last observe_tokens
        queries on every chunk; the first recall after the prompt uses it instead of the indexer
        (0: always ask the indexer).
    """

    budget_tokens: int | None = None
    block_size: int = 16
    max_context_tokens: int = 524_288
    compaction_interval: int = 128
    window_tokens: int = 128
    sink_tokens: int = 4
    protect_prompt: bool = False
    triattention_mode: str = "per_head"
    stats_path: str | None = None
    attention_backend: str = "auto"
    host_mirror: bool | None = None
    max_host_bytes: int | None = None
    chunk_size: int = 64
    chunk_budget: int | None = None
    lookahead: int = 64
    prefetch_steps: int = 0
    indexer: str = "auto"
    index_backend: str = "torch"
    index_candidates: int = 0
    prefill: str = "exact"
    prefill_chunk_tokens: int | None = None
    observe_tokens: int = 16

    def __post_init__(self) -> None:
        _check_int("budget_tokens", self.budget_tokens, 1, allow_none=True)
        _check_int("block_size", self.block_size, 1)
        _check_int("max_context_tokens", self.max_context_tokens, 1)
        _check_int("compaction_interval", self.compaction_interval, 1)
        _check_int("window_tokens", self.window_tokens, 0)
        _check_int("sink_tokens", self.sink_tokens, 0)
        _check_int("chunk_size", self.chunk_size, 1)
        _check_int("chunk_budget", self.chunk_budget, 0, allow_none=True)
        _check_int("lookahead", self.lookahead, 1)
        _check_int("prefetch_steps", self.prefetch_steps, 0)
        if self.prefetch_steps >= self.lookahead:
            raise ValueError(
                f"FlashMemConfig.prefetch_steps ({self.prefetch_steps}) must be < lookahead ({self.lookahead}): "
                "the next window is prefetched that many steps before the boundary; lower prefetch_steps "
                "(0 disables prefetching) or raise lookahead"
            )
        _check_int("prefill_chunk_tokens", self.prefill_chunk_tokens, 1, allow_none=True)
        _check_int("observe_tokens", self.observe_tokens, 0)
        _check_int("index_candidates", self.index_candidates, 0)
        if self.index_backend == "faiss" and not self.index_candidates:
            raise ValueError(
                "index_backend='faiss' is used for candidate retrieval: set index_candidates > 0"
            )
        _check_int("max_host_bytes", self.max_host_bytes, 1, allow_none=True)
        if self.host_mirror is not None and not isinstance(self.host_mirror, bool):
            raise TypeError(f"FlashMemConfig.host_mirror must be a bool or None, got {self.host_mirror!r}")
        if not isinstance(self.indexer, str) or not self.indexer:
            raise TypeError(f"FlashMemConfig.indexer must be a non-empty string, got {self.indexer!r}")
        if not isinstance(self.protect_prompt, bool):
            raise TypeError(f"FlashMemConfig.protect_prompt must be a bool, got {self.protect_prompt!r}")
        _check_choice("triattention_mode", self.triattention_mode, TRIATTENTION_MODES)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("index_backend", self.index_backend, INDEX_BACKENDS)
        _check_choice("prefill", self.prefill, PREFILL_MODES)
        if self.budget_tokens is not None and self.budget_tokens < self.sink_tokens + self.window_tokens:
            raise ValueError(
                f"FlashMemConfig.budget_tokens ({self.budget_tokens}) must be at least sink_tokens + "
                f"window_tokens ({self.sink_tokens} + {self.window_tokens}); raise the budget or shrink "
                "the window"
            )
        if self.budget_tokens is not None and self.budget_tokens > self.max_context_tokens:
            raise ValueError(
                f"FlashMemConfig.budget_tokens ({self.budget_tokens}) exceeds max_context_tokens "
                f"({self.max_context_tokens})"
            )

        if self.recall_enabled and self.chunk_size % self.block_size:
            raise ValueError(
                f"FlashMemConfig.chunk_size ({self.chunk_size}) must be a multiple of block_size ({self.block_size})"
            )
        if self.recall_enabled and not self.mirror_enabled:
            raise ValueError("recall needs the host mirror: set host_mirror=True (or indexer='none')")
        if self.recall_enabled and self.triattention_mode != "per_head":
            raise ValueError(
                "recall de-duplicates tokens per KV head, shared by all layers: use triattention_mode='per_head' "
                "with an indexer, or indexer='none' with 'per_layer_per_head'"
            )
        if (
            self.prefill == "exact"
            and self.budget_tokens is not None
            and self.triattention_mode == "per_head"
            and not self.mirror_enabled
        ):
            raise ValueError(
                "the exact prefill under a budget picks one keep-set per KV head from every layer's scores "
                "and reads the survivors back from the host mirror: keep host_mirror on, or use "
                "triattention_mode='per_layer_per_head' or prefill='sparse'"
            )
        if self.prefill == "sparse" and self.budget_tokens is None:
            raise ValueError(
                "prefill='sparse' needs budget_tokens (without a budget every token stays resident)"
            )

    @property
    def mirror_enabled(self) -> bool:
        return self.budget_tokens is not None if self.host_mirror is None else self.host_mirror

    @property
    def recall_enabled(self) -> bool:
        return self.budget_tokens is not None and self.indexer != "none" and self.effective_chunk_budget > 0

    @property
    def effective_chunk_budget(self) -> int:
        if self.chunk_budget is not None:
            return self.chunk_budget
        if self.budget_tokens is None:
            return 0
        return max(1, self.budget_tokens // (2 * self.chunk_size))

    @property
    def recall_windows_held(self) -> int:
        """Recall windows the device may hold at once: 2 while a prefetch overlaps the current
        window (prefetch_steps > 0), else 1."""
        return 2 if self.prefetch_steps > 0 else 1

    @property
    def effective_prefill_chunk(self) -> int:
        if self.prefill_chunk_tokens is not None:
            return self.prefill_chunk_tokens
        return self.compaction_interval if self.prefill == "sparse" else 8192
