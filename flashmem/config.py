"""User-facing configuration: one validated dataclass."""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path

ATTENTION_BACKENDS = ("auto", "triton", "torch")
TRIATTENTION_MODES = ("per_head", "per_layer_per_head")
INDEX_BACKENDS = ("torch", "faiss")
PREFILL_MODES = ("exact", "sparse")
RECALL_MODES = ("per_layer_per_head", "shared")
INDEXER_KEYWORDS = ("auto", "lookahead", "none")
CHECKPOINT_SUFFIXES = (".safetensors", ".json")


def _type_name(value) -> str:
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _int_hint(value) -> str:
    """What to pass instead of a non-int ``value``."""
    if isinstance(value, bool):
        return "pass an int (True/False are not counts)"
    if isinstance(value, float) and value.is_integer():
        return f"pass the int {int(value)}"
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return f"pass the int {int(value)}, not a string"
    return "pass a plain int"


def _int_field(name: str, value, minimum: int, *, allow_none: bool = False) -> int | None:
    """``value`` as a plain ``int`` (numpy and other ``numbers.Integral`` types are converted, so the
    field works everywhere downstream), or None where allowed. bool, float and str are refused."""
    if value is None and allow_none:
        return None
    kind = "an int or None" if allow_none else "an int"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"FlashMemConfig.{name} must be {kind}, got {_type_name(value)} ({value!r}); {_int_hint(value)}"
        )
    value = int(value)
    if value < minimum:
        raise ValueError(
            f"FlashMemConfig.{name} must be >= {minimum}, got {value}; set it to {minimum} or more"
        )
    return value


def _bool_field(name: str, value, *, allow_none: bool = False) -> bool | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        kind = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"FlashMemConfig.{name} must be {kind}, got {_type_name(value)} ({value!r})")
    return value


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(
            f"FlashMemConfig.{name} must be a string, one of {choices}, got {_type_name(value)} ({value!r})"
        )
    if value not in choices:
        raise ValueError(f"FlashMemConfig.{name} must be one of {choices}, got {value!r}")


def _path_field(name: str, value) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise TypeError(
            f"FlashMemConfig.{name} must be a non-empty path (str or os.PathLike), "
            f"got {_type_name(value)} ({value!r})"
        )
    return value


def known_indexers() -> tuple[str, ...]:
    """Indexer names the config accepts besides a checkpoint path: the keywords and the registry."""
    from flashmem.indexer.heuristics import INDEXERS

    return tuple(sorted(set(INDEXER_KEYWORDS) | set(INDEXERS)))


@dataclass
class FlashMemConfig:
    """How the device KV cache is sized and managed.

    budget_tokens: device tokens kept per KV head after each compaction (None keeps everything,
        which makes decoding exactly equal to dense attention).
    block_size: tokens per device block (paged cache granularity).
    max_context_tokens: longest prompt + generation accepted; longer input is refused up front.
    compaction_interval: prune when the device holds budget_tokens + compaction_interval tokens
        (the pool keeps room for them, so at an equal device share a shorter interval keeps more
        tokens: 64, the default since 0.2.4, decodes closer to full attention than 128 did at the
        same share, for about 0.3 ms more compaction per step on CPU; ``bench/results/
        fidelity_interval*.json``).
    recent_tokens / sink_tokens: the most recent / the first tokens, never evicted.
    protect_prompt: never evict prompt tokens (only generated tokens compete for the budget).
    triattention_mode: "per_layer_per_head" (each layer keeps its own tokens per KV head) or
        "per_head" (one keep-set per KV head shared by all layers); None (the default): the first, or
        "per_head" under ``recall_mode="shared"``, which needs one keep-set for every layer. Since
        0.2.6 the default keeps per layer: at the same device share it decodes closer to full
        attention (code at 11.2%: mean KL 0.227 against 0.275; ``bench/results/fidelity*.json``).
    stats_path: TriAttention calibration stats (safetensors); "prompt" derives them from the prompt's
        own queries during the exact prefill; None uses the stats `flashmem prepare` stored for the
        model, else those shipped for the embedded default model when they fit it, else "prompt" (``prefill="sparse"`` then refuses: it compacts before
        the prompt has been read). ``memory_report()["triattention_stats"]`` says which was used.
    attention_backend: decode attention implementation: "triton", "torch" (the reference) or
        "auto" (triton on CUDA, torch elsewhere).
    host_mirror: keep a lossless host copy of every token's K/V (None: on when budget_tokens is set).
    max_host_bytes: cap on the host mirror (None: the machine's available memory); checked up front.
    chunk_size: tokens per recall chunk (host mirror granularity).
    chunk_budget: chunks recalled to the device per lookahead window (None: budget_tokens // (2 *
        chunk_size), at least 2 (a passage and the chunk after it), when an indexer is active; 0
        disables recall).
    lookahead: decode steps between indexer refreshes (one recall window).
    prefetch_steps: decode steps before each window boundary at which the next window's chunks are
        selected and their copies issued (on a side stream on CUDA), so decoding overlaps the
        transfer; at the boundary the new window replaces the old one. While both windows are held
        the device may hold up to 2 x chunk_budget recalled chunks (the pool is sized for it from
        the first prefetch on). 0 (the default): select, copy and wait at the boundary, one window
        on the device: at equal device share that decodes better than a second window held for the
        overlap (``bench/results/fidelity*.json``); the price is a wait for the new window's copies
        once per window. Must be < lookahead.
    indexer: "auto" (a learned indexer trained for this model by ``flashmem prepare --train-indexer``,
        else "quest"), a heuristic ("quest", "mean_key", "mean_key_prerope", "recency"), "lookahead"
        (the shipped learned checkpoint), a checkpoint path, or "none" (no recall).
    index_backend / index_candidates: with index_candidates > 0, each layer keeps a chunk index
        (backend "torch", or "faiss" with flashmem[faiss]) of mean post-RoPE keys, retrieves that
        many candidates by inner product at every refresh, and only the union of the candidates is
        scored by the indexer (0: the indexer scores every chunk).
    prefill: "exact" (layer by layer: each layer attends causally to its whole prompt KV, which is
        on the device for that layer only; see flashmem.prefill) or "sparse" (token chunks attending
        to the device-resident tokens only: approximate, compacting as it goes).
    prefill_chunk_tokens: prompt tokens per forward: the exact prefill's tile (None: 8192) or the
        sparse prefill's chunk (None: compaction_interval).
    cuda_graph: capture the decode step (one token through every layer) in a CUDA graph and replay
        it (recall refreshes, compaction and the table updates run outside the graph); needs the
        model on a CUDA device (refused elsewhere when the model is wrapped). The block pool is then
        reserved at its bound for the whole call up front (a graph reads fixed addresses).
    recall_mode: "per_layer_per_head": every layer and KV head recalls its own ``chunk_budget``
        chunks (ranked by that head's prompt-tail attention, then by the indexer's score for that head's
        query group); the device holds the same number of recalled slots as with one shared set, each
        layer and head filling them with what it attends to. "shared": one set of chunks for every
        layer and head (the top of the summed layer scores); the only mode that prefetches.
    observe_tokens: exact prefill measures the peak attention (largest share of one query head's
        attention, sinks left out) of the prompt's last observe_tokens queries on every chunk; the
        first recall after the prompt ranks chunks by it instead of asking the indexer (0: always ask
        the indexer).

    Integer fields take any ``numbers.Integral`` (numpy integers included) and store it as a plain
    int; bool, float and str are refused with TypeError. ``stats_path`` and an indexer checkpoint
    path must name existing files, and ``index_backend="faiss"`` needs faiss to import, all checked
    here, before any model is touched.
    """

    budget_tokens: int | None = None
    block_size: int = 16
    max_context_tokens: int = 524_288
    compaction_interval: int = 64
    recent_tokens: int = 128
    sink_tokens: int = 4
    protect_prompt: bool = False
    triattention_mode: str | None = None
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
    cuda_graph: bool = False
    recall_mode: str = "per_layer_per_head"

    def __post_init__(self) -> None:
        # Types first, converting numpy integers (and other numbers.Integral) to plain int, so that a
        # config that passes here works in every component it reaches.
        self.budget_tokens = _int_field("budget_tokens", self.budget_tokens, 1, allow_none=True)
        self.block_size = _int_field("block_size", self.block_size, 1)
        self.max_context_tokens = _int_field("max_context_tokens", self.max_context_tokens, 1)
        self.compaction_interval = _int_field("compaction_interval", self.compaction_interval, 1)
        self.recent_tokens = _int_field("recent_tokens", self.recent_tokens, 0)
        self.sink_tokens = _int_field("sink_tokens", self.sink_tokens, 0)
        self.max_host_bytes = _int_field("max_host_bytes", self.max_host_bytes, 1, allow_none=True)
        self.chunk_size = _int_field("chunk_size", self.chunk_size, 1)
        self.chunk_budget = _int_field("chunk_budget", self.chunk_budget, 0, allow_none=True)
        self.lookahead = _int_field("lookahead", self.lookahead, 1)
        self.prefetch_steps = _int_field("prefetch_steps", self.prefetch_steps, 0)
        self.index_candidates = _int_field("index_candidates", self.index_candidates, 0)
        self.prefill_chunk_tokens = _int_field(
            "prefill_chunk_tokens", self.prefill_chunk_tokens, 1, allow_none=True
        )
        self.observe_tokens = _int_field("observe_tokens", self.observe_tokens, 0)
        self.protect_prompt = _bool_field("protect_prompt", self.protect_prompt)
        self.host_mirror = _bool_field("host_mirror", self.host_mirror, allow_none=True)
        self.cuda_graph = _bool_field("cuda_graph", self.cuda_graph)
        if self.triattention_mode is None:  # recall_mode's type is checked below; == is safe on any value
            self.triattention_mode = "per_head" if self.recall_mode == "shared" else "per_layer_per_head"
        _check_choice("triattention_mode", self.triattention_mode, TRIATTENTION_MODES)
        _check_choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _check_choice("index_backend", self.index_backend, INDEX_BACKENDS)
        _check_choice("prefill", self.prefill, PREFILL_MODES)
        _check_choice("recall_mode", self.recall_mode, RECALL_MODES)
        if self.stats_path is not None and self.stats_path != "prompt":
            self.stats_path = _path_field("stats_path", self.stats_path)
            if not Path(self.stats_path).is_file():
                raise ValueError(
                    f"FlashMemConfig.stats_path {self.stats_path!r} is not a file; give the .safetensors "
                    "written by 'flashmem calibrate', 'prompt' (derive them from the prompt), or None"
                )
        if self.stats_path == "prompt" and self.budget_tokens is not None and self.prefill == "sparse":
            raise ValueError(
                "stats_path='prompt' derives the TriAttention statistics during the exact prefill; the sparse "
                "prefill compacts before the prompt has been read: use prefill='exact' or a stats file"
            )
        self.indexer = _path_field("indexer", self.indexer)
        self._check_indexer()

        if self.prefetch_steps >= self.lookahead:
            raise ValueError(
                f"FlashMemConfig.prefetch_steps ({self.prefetch_steps}) must be < lookahead ({self.lookahead}): "
                "the next window is prefetched that many steps before the boundary; lower prefetch_steps "
                "(0 disables prefetching) or raise lookahead"
            )
        if self.prefetch_steps and self.recall_mode != "shared":
            raise ValueError(
                f"FlashMemConfig.prefetch_steps ({self.prefetch_steps}) overlaps the next window's copies with "
                f"decoding, which recall_mode={self.recall_mode!r} does not do (it loads each window at its "
                "boundary): set prefetch_steps=0, or recall_mode='shared'"
            )
        if self.index_backend == "faiss" and not self.index_candidates:
            raise ValueError(
                "index_backend='faiss' is used for candidate retrieval: set index_candidates > 0"
            )
        if self.index_backend == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError as exc:
                raise ValueError(
                    f"index_backend='faiss' needs the faiss package, which does not import here ({exc}): "
                    "pip install 'flashmem[faiss]', or use index_backend='torch' (same results)"
                ) from None
        if self.budget_tokens is not None and self.budget_tokens < self.sink_tokens + self.recent_tokens:
            raise ValueError(
                f"FlashMemConfig.budget_tokens ({self.budget_tokens}) must be at least sink_tokens + "
                f"recent_tokens ({self.sink_tokens} + {self.recent_tokens}); raise the budget or shrink "
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
        if self.recall_enabled and self.recall_mode == "shared" and self.triattention_mode != "per_head":
            raise ValueError(
                "shared recall de-duplicates tokens per KV head, shared by all layers: use "
                "triattention_mode='per_head' with recall_mode='shared', or recall_mode='per_layer_per_head'"
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

    def _check_indexer(self) -> None:
        name = self.indexer
        if name in INDEXER_KEYWORDS or Path(name).is_file():
            return
        if name.endswith(CHECKPOINT_SUFFIXES) or "/" in name or os.sep in name:
            raise ValueError(
                f"FlashMemConfig.indexer: checkpoint {name!r} is not a file; give a checkpoint written by "
                "'flashmem train-indexer', or an indexer name"
            )
        names = known_indexers()
        if name not in names:
            raise ValueError(
                f"FlashMemConfig.indexer: unknown indexer {name!r}; choose one of {names} or give a "
                "checkpoint path"
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
        return max(2, self.budget_tokens // (2 * self.chunk_size))

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
