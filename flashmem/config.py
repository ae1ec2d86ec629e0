"""User-facing configuration: one validated dataclass."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

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
    chunk_size / chunk_budget / lookahead / indexer / index_backend / prefill /
    prefill_chunk_tokens: host-mirror recall settings (see the README).
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
    chunk_size: int = 64
    chunk_budget: int | None = None
    lookahead: int = 64
    indexer: str = "none"
    index_backend: str = "torch"
    prefill: str = "exact"
    prefill_chunk_tokens: int = 4096
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        _check_int("budget_tokens", self.budget_tokens, 1, allow_none=True)
        _check_int("block_size", self.block_size, 1)
        _check_int("max_context_tokens", self.max_context_tokens, 1)
        _check_int("compaction_interval", self.compaction_interval, 1)
        _check_int("window_tokens", self.window_tokens, 0)
        _check_int("sink_tokens", self.sink_tokens, 0)
        _check_int("chunk_size", self.chunk_size, 1)
        _check_int("chunk_budget", self.chunk_budget, 1, allow_none=True)
        _check_int("lookahead", self.lookahead, 1)
        _check_int("prefill_chunk_tokens", self.prefill_chunk_tokens, 1)
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

    @property
    def device_token_cap(self) -> int | None:
        """Most tokens per KV head the device ever holds (None: unbounded)."""
        if self.budget_tokens is None:
            return None
        return self.budget_tokens + self.compaction_interval
