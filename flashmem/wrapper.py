"""``flashmem.wrap(model, config) -> FlashMemModel``: long-context generation over a paged device cache.

One decode loop: the prompt is prefilled in chunks into the paged cache, then tokens are decoded
one at a time; under a token budget the TriAttention policy compacts the cache every
``compaction_interval`` tokens so whole blocks return to the pool. Every byte figure in
:meth:`FlashMemModel.memory_report` comes from the block allocator.
"""

from __future__ import annotations

import math
import numbers
import os
import threading
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from flashmem.indexer.heuristics import HEURISTICS, INDEXERS
from flashmem.kernels.checks import device_tensor_bytes, resolve_backend
from flashmem.offload.block_pool import BlockPool, BlockPoolExhausted
from flashmem.offload.head_window import HeadRecallWindow
from flashmem.offload.host_mirror import HostMirror
from flashmem.offload.offload_manager import OffloadManager
from flashmem.offload.paged_cache import PagedKVCache
from flashmem.offload.triattention_policy import TriAttentionPolicy

from . import hf_compat
from .cache import FlashMemCache
from .config import FlashMemConfig
from .files import PROMPT_STATS, find_stats_for_model
from .prefill import LayerMajorPrefill
from .recall import RecallController, resolve_indexer

_GENERATE_KWARGS = {
    "eos_token_id",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "progress",
    "collect_logits",
    "stream",
    "forced_tokens",
}


_BUSY = (
    "this FlashMemModel is already generating (in another thread, or re-entered from a stream "
    "callback): one wrapper decodes one sequence at a time and its state belongs to that call. Give "
    "each thread its own flashmem.wrap(model, config); wrappers of one model may decode concurrently"
)


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_indexer_runs(name: str) -> None:
    """FlashMemConfig accepts every registered indexer name; decoding runs the heuristics, learned
    checkpoints and the keywords, but not an evaluation-only indexer such as "oracle" (it scores chunks
    by the true attention mass, which decoding does not have: it failed at the first refresh)."""
    if name in INDEXERS and name not in HEURISTICS:
        raise ValueError(
            f"indexer {name!r} is for evaluation only (it needs the true attention mass, which decoding "
            f"does not have): choose 'auto', 'none', 'lookahead', one of {list(HEURISTICS)}, or the path "
            "of a lookahead indexer checkpoint"
        )


def _int_ids(value, what: str) -> list[int]:
    """``value`` (an int, a sequence of ints or an integer tensor) as a list of Python ints."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(f"{what} must hold integer token ids, got a {value.dtype} tensor")
        value = value.reshape(-1).tolist()
    iterable = hasattr(value, "__iter__") and not isinstance(value, (str, bytes))
    items = list(value) if iterable else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, numbers.Integral):
            raise TypeError(f"{what} must be token ids (ints), got {item!r} ({type(item).__name__})")
    return [int(item) for item in items]


class FlashMemModel:
    """A Hugging Face causal LM decoding through flashmem's paged device cache (batch size 1).

    Attributes after :meth:`generate`: ``step_logits`` (``[N, vocab]`` fp32 when
    ``collect_logits=True``), ``last_logits`` (``[vocab]``, logits of the last step).
    """

    def __init__(self, model: torch.nn.Module, config: FlashMemConfig) -> None:
        if not isinstance(config, FlashMemConfig):
            raise TypeError(f"config must be a FlashMemConfig, got {type(config).__name__}")
        hf_compat.validate_model(model, config.max_context_tokens)
        _check_indexer_runs(config.indexer)
        self.model = model
        self.config = config
        self.num_layers, self.num_q_heads, self.num_kv_heads, self.head_dim = hf_compat.kv_geometry(model)
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        self.attention_backend = resolve_backend(config.attention_backend, self.device)
        self.stats_source: str | None = None  # "prompt" | "shipped" | a path (with a budget)
        if self.attention_backend == "triton" and self.device.type != "cuda" and not _triton_interpreting():
            raise ValueError(
                f"FlashMemConfig.attention_backend='triton' runs Triton kernels, which need the model on a "
                f"CUDA device (this one is on {self.device}; TRITON_INTERPRET=1, set before triton is "
                "imported, runs them on a CPU for testing): use 'auto' or 'torch'"
            )
        if config.cuda_graph and self.device.type != "cuda":
            raise ValueError(
                f"FlashMemConfig.cuda_graph=True captures the decode step in a CUDA graph, which needs the "
                f"model on a CUDA device (this one is on {self.device}): set cuda_graph=False"
            )
        self.policy = self._make_policy() if config.budget_tokens is not None else None
        self.indexer_name, self._indexers = None, None
        if config.recall_enabled:
            self.indexer_name, self._indexers = resolve_indexer(
                config.indexer, model, self.num_layers, config.chunk_size
            )
        self.mirror = None
        self.offload = None
        self.recall = None
        self.cache: FlashMemCache | None = None
        self.pool: BlockPool | None = None
        self.step_logits: torch.Tensor | None = None
        self.last_logits: torch.Tensor | None = None
        self._share_sum = 0.0
        self._share_steps = 0
        self._decode_steps = 0
        self._compactions = 0
        self._prompt_len = 0
        self._timings: dict[str, float] = {}
        self._max_pool_blocks = 0
        self._windows_reached = 1  # recall windows the pool holds room for (see _ensure_pool)
        self._report_ready = False  # True while the state describes a generate() that did not fail
        self._lock = threading.Lock()  # held for the whole of generate(): one call at a time
        self._generating_thread: int | None = None

    # ---- construction helpers ----------------------------------------------------------------
    def _make_policy(self):
        c = self.config
        stats, self.stats_source = find_stats_for_model(self.model, c.stats_path)
        if stats is None and c.prefill == "sparse":
            raise ValueError(
                "prefill='sparse' needs TriAttention stats for this model before the prompt is read (no "
                "stats_path was given and the shipped stats are for another model): use prefill='exact', "
                "which derives the stats from the prompt's own queries, or give stats_path (from "
                "'flashmem calibrate' or 'flashmem prepare')"
            )
        return TriAttentionPolicy(
            stats,
            budget_tokens=c.budget_tokens,
            compaction_interval=c.compaction_interval,
            recent_tokens=c.recent_tokens,
            sink_tokens=c.sink_tokens,
            mode=c.triattention_mode,
            protect_prompt=c.protect_prompt,
            backend=self.attention_backend,
        )

    def _pool_blocks(self, tokens: int, windows: int | None = None) -> int:
        """Most blocks one sequence of ``tokens`` tokens (prompt + fed so far) can hold at once: the
        bound of the policy, derived here once; the pool is grown to it before every forward, so an
        allocation can never fail.

        Working slots: without a budget every token stays, ``ceil(tokens / block_size)`` blocks. Under
        a budget, the exact prefill writes its keep-set (at most budget tokens) at once; after that,
        compaction runs after every forward once the slots reach budget + interval and cuts them to
        exactly budget, so before a forward at most budget + interval - 1 slots are held, and the
        forward adds one decode token, or (sparse prefill) one token chunk of
        ``effective_prefill_chunk`` tokens: at most budget + interval - 1 + step slots, packed from the
        front of the sequence's blocks (compaction slides survivors forward and frees the tail), and
        never more blocks than the tokens fill.
        Recalled chunks: ``chunk_size / block_size`` blocks each, at most ``chunk_budget`` per window
        held (2 windows while a prefetch overlaps the current one; ``windows`` counts fewer, for a
        run that has not prefetched yet), and never more than the chunks recall can choose from:
        closed chunks that begin before the recent window, at most
        ``min(tokens // chunk_size, ceil((tokens - recent_tokens) / chunk_size))``.
        """
        c = self.config
        full = math.ceil(tokens / c.block_size)
        if c.budget_tokens is None:
            return full
        # the sparse prefill adds a token chunk per forward; the exact prefill writes its keep-set
        # (at most budget tokens) at once, then every decode forward adds one token
        step = c.effective_prefill_chunk if c.prefill == "sparse" else 1
        peak_slots = c.budget_tokens + c.compaction_interval - 1 + step
        working = min(full, math.ceil(peak_slots / c.block_size))
        recallable = self._recallable_chunks(tokens)
        recall = min(self._recall_chunks_held(windows), recallable) * (c.chunk_size // c.block_size)
        return working + recall

    def _table_blocks(self, tokens: int) -> tuple[int, int]:
        """Entries of the decode step's static block table for a run of ``tokens`` tokens: (working
        blocks, recalled blocks), the two parts of :meth:`_pool_blocks`' bound."""
        c = self.config
        recall = self._recall_chunks_held() * (c.chunk_size // c.block_size)
        return max(1, self._pool_blocks(tokens) - self._pool_blocks_recall(tokens)), recall

    def _recallable_chunks(self, tokens: int) -> int:
        """Most chunks recall can choose from in a run of ``tokens`` tokens (``RecallController.
        candidates``): closed chunks that begin before the recent window (the one the window starts
        in only when the prefill's attention ranks them)."""
        c = self.config
        return min(tokens // c.chunk_size, -(-max(0, tokens - c.recent_tokens) // c.chunk_size))

    def _pool_blocks_recall(self, tokens: int) -> int:
        c = self.config
        if c.budget_tokens is None:
            return 0
        recallable = self._recallable_chunks(tokens)
        return min(self._recall_chunks_held(), recallable) * (c.chunk_size // c.block_size)

    def _ensure_pool(self, tokens: int) -> None:
        """Grow the pool (block-aligned, geometrically: amortised O(1) copying per token) so that it
        holds :meth:`_pool_blocks` for ``tokens``; never beyond the bound for prompt + max_new_tokens.
        Generation that stops early never reserved what it did not reach, and the second recall
        window's blocks are reserved when the first prefetch is issued, not before."""
        need = self._pool_blocks(tokens, self._windows_reached)
        pool = self.pool
        if need > pool.num_blocks:
            pool.grow(min(self._max_pool_blocks, max(need, pool.num_blocks + pool.num_blocks // 4)))

    def _recall_chunks_held(self, windows: int | None = None) -> int:
        """Most recalled chunks on the device at once (resident + in flight), with ``windows`` recall
        windows held (default: the most the config can hold)."""
        c = self.config
        held = c.recall_windows_held if windows is None else min(windows, c.recall_windows_held)
        return c.effective_chunk_budget * held if c.recall_enabled else 0

    # ---- input checks (all before any work) --------------------------------------------------
    def _check_inputs(self, input_ids, max_new_tokens: int, kwargs: dict) -> torch.Tensor:
        unknown = set(kwargs) - _GENERATE_KWARGS
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments {sorted(unknown)}")
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a LongTensor [1, T], got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [1, T], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] != 1:
            raise ValueError(
                f"flashmem decodes one sequence at a time (batch size 1); got batch size {input_ids.shape[0]}"
            )
        if input_ids.shape[1] < 1:
            raise ValueError("input_ids is empty; give at least one prompt token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        total = input_ids.shape[1] + max_new_tokens
        if total > self.config.max_context_tokens:
            raise ValueError(
                f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                f"max_context_tokens ({self.config.max_context_tokens}); raise FlashMemConfig.max_context_tokens"
            )
        vocab = hf_compat.text_config(self.model).vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
        c = self.config
        if c.mirror_enabled:
            self._mirror_for(total).check_capacity(total)
        if (
            c.budget_tokens is not None
            and c.protect_prompt
            and input_ids.shape[1] + c.recent_tokens > c.budget_tokens
        ):
            raise ValueError(
                f"protect_prompt keeps all {input_ids.shape[1]} prompt tokens, more than budget_tokens "
                f"({c.budget_tokens}) allows with a {c.recent_tokens}-token window"
            )
        return input_ids.to(self.device)

    # ---- the loop ----------------------------------------------------------------------------
    def _mirror_for(self, total_tokens: int, reserve: bool = False):
        return HostMirror(
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            chunk_size=self.config.chunk_size,
            dtype=self.dtype,
            capacity_tokens=total_tokens if reserve else 0,
            max_host_bytes=self.config.max_host_bytes,
        )

    def _discard_state(self) -> None:
        """Drop the per-sequence state (frees its device and host memory)."""
        self._report_ready = False
        if self.offload is not None:
            self.offload.close()
        self.cache = self.pool = self.mirror = self.offload = self.recall = None

    def _new_cache(self, prompt_tokens: int, total_tokens: int) -> None:
        c = self.config
        self._discard_state()
        # sized for the prompt; grown before each decode step, never past the bound of the whole run
        # (the last generated token is never fed back)
        self._max_pool_blocks = self._pool_blocks(max(prompt_tokens, total_tokens - 1))
        self._windows_reached = 1  # recall windows held so far: 2 from the first prefetch on
        # a captured decode step reads the pool at fixed addresses: reserve its bound up front
        self.pool = BlockPool(
            self.num_layers,
            self._max_pool_blocks if c.cuda_graph else self._pool_blocks(prompt_tokens, 1),
            self.num_kv_heads,
            self.head_dim,
            block_size=self.config.block_size,
            dtype=self.dtype,
            device=self.device,
        )
        if c.mirror_enabled:
            self.mirror = self._mirror_for(total_tokens, reserve=True)
        if c.recall_enabled:
            if c.recall_mode == "shared":
                self.offload = OffloadManager(self.mirror, self.pool, max_chunks=self._recall_chunks_held())
            else:
                self.offload = HeadRecallWindow(self.mirror, self.pool, max_slots=c.effective_chunk_budget)
            self.recall = RecallController(
                self.model,
                self._indexers,
                num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim,
                chunk_size=c.chunk_size,
                chunk_budget=c.effective_chunk_budget,
                sink_tokens=c.sink_tokens,
                recent_tokens=c.recent_tokens,
                device=self.device,
                index_backend=c.index_backend,
                index_candidates=c.index_candidates,
                capacity_tokens=total_tokens,  # summaries sized once, no doubling slack
                per_head=c.recall_mode != "shared",
            )
        # decode tokens reach the mirror and the summaries in batches: never more than the recent
        # window (recall only reads chunks before it), so a refresh always finds them there
        flush = c.chunk_size if not c.recall_enabled else max(1, min(c.chunk_size, c.recent_tokens))
        self.cache = FlashMemCache(
            PagedKVCache(self.pool),
            self.num_q_heads,
            self.attention_backend,
            mirror=self.mirror,
            recall=self.recall,
            offload=self.offload,
            table_blocks=self._table_blocks(max(prompt_tokens, total_tokens - 1)),
            flush_tokens=flush,
        )
        # the forward's keyword arguments (cache argument name, empty 4D mask), made once per call
        self._forward_kwargs = hf_compat.paged_forward_kwargs(self.model, self.cache, self.device)
        self._graph = None  # the captured decode step of this call (cuda_graph)
        self._graph_io: tuple[torch.Tensor, torch.Tensor] | None = None  # its input ids, logits
        self._device_trace = []
        self._total_trace = []
        self._share_sum = 0.0
        self._kv_share_sum = 0.0
        self._share_steps = 0
        self._peak_total = 0
        self._staging_peak = 0
        self._scratch_peak = 0
        self._traffic_after_prefill = {"h2d_bytes": 0, "d2h_bytes": 0}
        self._decode_token_bytes = 0
        self.last_logits = self.step_logits = None
        self._decode_steps = 0
        self._compactions = 0
        self._timings = {"prefill_s": 0.0, "decode_s": 0.0, "compaction_s": 0.0, "recall_s": 0.0}
        self._report_ready = True

    def _forward(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """Run ``ids`` ``[1, T]`` at positions ``start ..``; returns logits of the last token ``[vocab]``."""
        cache = self.cache
        self._ensure_pool(start + ids.shape[1])
        positions = torch.arange(start, start + ids.shape[1], device=self.device)
        cache.begin_step(positions, start)
        try:
            logits = self._model_logits(ids, positions.unsqueeze(0))
        except BaseException:
            cache.abort_step()
            raise
        cache.end_step()
        return logits

    def _model_logits(self, ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The model's forward over ``ids`` ``[1, T]`` at ``position_ids`` ``[1, T]``, its attention
        routed to the cache for this call in this thread only (the model and its config are never
        modified); the last token's logits ``[vocab]`` fp32."""
        with hf_compat.attention_runner(self.model, self.cache):
            out = self.model(
                input_ids=ids, position_ids=position_ids, logits_to_keep=1, **self._forward_kwargs
            )
        return out.logits[0, -1].float()

    def _decode_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """One decode step: ``ids`` ``[1, 1]`` (on the device) at the next position; returns the
        logits ``[vocab]``. The slot, position and tables are updated in place (static shapes, no
        host sync, no tensor made from Python data). With ``cuda_graph`` the step is captured once
        (after an eager run of the same step) and replayed; a step that hands its queries to recall
        runs eagerly."""
        cache = self.cache
        self._ensure_pool(cache.logical_length + 1)
        position = cache.begin_decode_step()
        if self.config.cuda_graph and not cache.note_query:
            return self._graph_step(ids, position)
        try:
            logits = self._model_logits(ids, position)
        except BaseException:
            cache.abort_step()
            raise
        cache.end_step()
        return logits

    def _graph_step(self, ids: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The decode step through the captured graph (the slot, position and tables were updated in
        place by ``begin_decode_step``, outside the graph)."""
        cache = self.cache
        try:
            if self._graph is None:
                # run this step eagerly on a side stream (it also warms up kernels and libraries), then
                # capture the same step: its writes are idempotent (same slot, same K/V)
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                static_ids = ids.clone()
                with torch.cuda.stream(stream):
                    eager = self._model_logits(static_ids, position)
                torch.cuda.current_stream(self.device).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = self._model_logits(static_ids, position)
                self._graph, self._graph_io = graph, (static_ids, logits)
                out = eager
            else:
                static_ids, logits = self._graph_io
                static_ids.copy_(ids)
                self._graph.replay()
                out = logits.clone()  # the graph's output buffer is rewritten by the next replay
        except BaseException:
            cache.abort_step()
            raise
        cache.paged.mark_written(cache.seq_id)
        cache.end_step()
        return out

    def _maybe_compact(self) -> None:
        if self.policy is None:
            return
        cache = self.cache
        if self.policy.should_compact(cache.num_slots):
            t0 = time.perf_counter()
            cache.flush()  # the journaled tokens reach the mirror before their slots move
            self.policy.compact(cache.paged, cache.seq_id, cache.logical_length, prompt_len=self._prompt_len)
            self._compactions += 1
            if isinstance(self.offload, HeadRecallWindow):
                self.offload.refresh_positions(self._working_table())
            elif self.offload is not None and len(self.offload.resident):
                # ready chunks get new duplicate masks now; a pending prefetch's are marked outdated
                # and rewritten at the window swap
                self.offload.refresh_positions(self._working_positions(on_device=True))
            self._timings["compaction_s"] += time.perf_counter() - t0

    def _working_positions(self, on_device: bool = False) -> list[torch.Tensor]:
        """Positions held by the working slots, per KV head: host tensors (read back from the
        device: called at compaction and recall refreshes only, never per decode step), or with
        ``on_device`` tensors on the pool's device (no read-back)."""
        pos = self._working_table()[0]  # shared recall runs with one keep-set for every layer
        if not on_device:
            pos = pos.cpu()
        return [pos[:, h] for h in range(self.num_kv_heads)]

    def _working_table(self) -> torch.Tensor:
        """Positions held by the working slots on the pool's device, no read-back: ``[1, n, H_kv]``
        when every layer keeps the same tokens (``triattention_mode='per_head'``), else ``[L, n,
        H_kv]`` (each layer its own keep-set)."""
        cache = self.cache
        per_layer = self.policy is not None and self.policy.mode == "per_layer_per_head"
        return cache.paged.positions(cache.seq_id, None if per_layer else range(1))

    def _refresh_recall(self) -> None:
        """Pick the chunks for the next ``lookahead`` steps and make them resident now (the copies
        are asynchronous on CUDA, and waited for before the next kernel)."""
        if self.recall is None:
            return
        t0 = time.perf_counter()
        position = self.cache.logical_length
        if isinstance(self.offload, HeadRecallWindow):
            assign = self.recall.select_heads(position)
            if assign is not None:
                # copies on the current stream: the kernels queued after them read the new rows
                self.offload.load(assign, self._working_table())
            self._timings["recall_s"] += time.perf_counter() - t0
            return
        chunk_ids = self.recall.select(position)
        if self.config.prefetch_steps == 0:
            self.offload.release_window()
            if chunk_ids:
                self.offload.request(chunk_ids, resident_per_head=self._working_positions(on_device=True))
                self.offload.ensure_ready(chunk_ids)
        else:
            # the same outcome as a prefetch swapped in at once: exactly these chunks are the window
            self.offload.cancel_prefetch()
            if len(self.offload.resident):
                self._hold_two_windows()  # the new window's chunks land beside the current one's
            self.offload.load_window(chunk_ids, resident_per_head=self._working_positions(on_device=True))
        self._timings["recall_s"] += time.perf_counter() - t0

    def _hold_two_windows(self) -> None:
        """From now on the pool holds room for two recall windows (a window being loaded beside the
        current one); reserved on the first need, not up front."""
        if self._windows_reached < 2:
            self._windows_reached = 2
            self._ensure_pool(self.cache.logical_length + 1)

    def _prefetch_recall(self) -> None:
        """``prefetch_steps`` steps before a window boundary: pick the next window's chunks and issue
        their copies; the current window stays what the kernel reads until :meth:`_swap_recall`."""
        if self.recall is None:
            return
        t0 = time.perf_counter()
        self._hold_two_windows()
        chunk_ids = self.recall.select(self.cache.logical_length)
        self.offload.prefetch(chunk_ids, resident_per_head=self._working_positions(on_device=True))
        self._timings["recall_s"] += time.perf_counter() - t0

    def _swap_recall(self) -> None:
        """At a window boundary: the prefetched window replaces the current one (the compute stream
        waits on its copies here; a stall only if a copy has not landed yet)."""
        if self.offload is None or self.offload.pending_prefetch is None:
            return
        t0 = time.perf_counter()
        outdated = self.offload.prefetch_masks_outdated
        self.offload.swap_window(
            resident_per_head=self._working_positions(on_device=True) if outdated else None
        )
        self._timings["recall_s"] += time.perf_counter() - t0

    def _held_device_bytes(self) -> dict[str, int]:
        """What this wrapper holds on its device now, by part (bytes, counted from the tensors held):
        ``kv`` (blocks in use), ``kv_reserved`` (the pool's tensors: K, V and positions of every
        block, in use or free), ``index`` (recall's summaries, chunk index, queries and block tables,
        the learned indexer's weights, the TriAttention stats, the decode step's tables), ``staging``
        (device-side copies of recall batches in flight: 0 between steps), ``outputs`` (the logits
        kept for the caller)."""
        device = self.device
        index = self.cache.device_bytes()
        if self.recall is not None:
            index += self.recall.device_bytes()
        if self.offload is not None:
            index += self.offload.device_bytes()
        if self.policy is not None:
            index += self.policy.device_bytes(device)
        outputs = device_tensor_bytes([self.last_logits, self.step_logits], device)
        return {
            "kv": self.pool.device_kv_bytes,
            "kv_reserved": self.pool.reserved_bytes,
            "index": index,
            "staging": 0,
            "outputs": outputs,
        }

    def _sample_device_total(self, scratch: int = 0) -> int:
        """Sum of what is held now (+ ``scratch``, + the largest recall batch copied since the last
        sample, whose device copy lived inside the step); updates the peak; returns the sum."""
        held = self._held_device_bytes()
        total = held["kv_reserved"] + held["index"] + held["staging"] + held["outputs"]
        if self.offload is not None:
            staged = self.offload.take_staging_mark()
            self._staging_peak = max(self._staging_peak, staged)
            total_then = total + staged
        else:
            total_then = total
        self._peak_total = max(self._peak_total, total_then + scratch)
        return total

    def _record_share(self) -> None:
        full = self.cache.logical_length * self.pool.kv_bytes_per_token
        total = self._sample_device_total()
        self._share_sum += total / full
        self._kv_share_sum += self.pool.device_kv_bytes / full
        self._share_steps += 1
        self._device_trace.append(self.pool.device_kv_bytes)
        self._total_trace.append(total)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, **kwargs) -> torch.Tensor:
        """Greedy (or sampled) generation; returns ``[1, T + N]`` token ids (N <= max_new_tokens,
        fewer when an end-of-sequence token is produced).

        kwargs: ``eos_token_id`` (int or list of ints; default from the model's generation config,
        ``None`` disables stopping), ``do_sample`` (False), ``temperature`` (1.0), ``top_k``, ``top_p``,
        ``seed``, ``progress`` (show a prefill progress bar; default True for prompts over 8K tokens),
        ``collect_logits`` (keep every step's logits in ``self.step_logits``), ``stream`` (a callable
        receiving each new token id), ``forced_tokens`` (teacher forcing: a sequence of at least
        ``max_new_tokens`` ids fed instead of the model's choices, e.g. to compare next-token
        distributions with another run step by step).

        Every argument is checked before any work; a refused call leaves the wrapper as it was. One
        wrapper runs one generate() at a time: a second call while one is running (from another
        thread, or from its own stream callback) raises RuntimeError. Several wrappers of one model
        may generate concurrently from several threads; the model itself is never modified.
        """
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(_BUSY)
        self._generating_thread = threading.get_ident()
        try:
            return self._generate(input_ids, max_new_tokens, kwargs)
        finally:
            self._generating_thread = None
            self._lock.release()

    @torch.no_grad()
    def _generate(self, input_ids: torch.Tensor, max_new_tokens: int, kwargs: dict) -> torch.Tensor:
        input_ids = self._check_inputs(input_ids, max_new_tokens, kwargs)
        vocab = hf_compat.text_config(self.model).vocab_size
        eos = kwargs["eos_token_id"] if "eos_token_id" in kwargs else self._default_eos()
        eos_set = set() if eos is None else set(_int_ids(eos, "eos_token_id"))
        sampler = _Sampler(
            kwargs.get("do_sample", False),
            kwargs.get("temperature", 1.0),
            kwargs.get("top_k"),
            kwargs.get("top_p"),
            kwargs.get("seed"),
            self.device,
        )
        forced = kwargs.get("forced_tokens")
        if forced is not None:
            forced = _int_ids(forced, "forced_tokens")
            if len(forced) < max_new_tokens:
                raise ValueError(
                    f"forced_tokens holds {len(forced)} ids, max_new_tokens={max_new_tokens} needed"
                )
            bad = [t for t in forced[:max_new_tokens] if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"forced_tokens hold ids outside the vocabulary [0, {vocab}): {bad[:8]}")
        collect = bool(kwargs.get("collect_logits", False))
        stream: Callable[[int], None] | None = kwargs.get("stream")
        if stream is not None and not callable(stream):
            raise TypeError(
                f"stream must be a callable taking each new token id, got {type(stream).__name__}"
            )
        prompt_len = input_ids.shape[1]
        try:
            return self._run(input_ids, max_new_tokens, eos_set, sampler, forced, collect, stream, kwargs)
        except BlockPoolExhausted as exc:
            self._discard_state()
            raise BlockPoolExhausted(
                f"flashmem sized the block pool from the bound of its policy (at most "
                f"{self._max_pool_blocks} blocks for {prompt_len} + {max_new_tokens} tokens) and the "
                f"sequence needed more: a flashmem bug, please report it with the FlashMemConfig ({exc})"
            ) from exc
        except BaseException:
            self._discard_state()  # nothing half-done is reported or kept on the device
            raise

    def _run(self, input_ids, max_new_tokens, eos_set, sampler, forced, collect, stream, kwargs):
        prompt_len = input_ids.shape[1]
        self._prompt_len = prompt_len
        self._new_cache(prompt_len, prompt_len + max_new_tokens)

        logits = self._prefill(input_ids, kwargs.get("progress"))
        generated: list[int] = []
        step_logits = []
        lookahead, ahead = self.config.lookahead, self.config.prefetch_steps
        cache = self.cache
        # the sampled id stays on the device and is the next step's input; the host reads it once per
        # step where it must (an end-of-sequence check or a stream), else once at the end
        read_each = bool(eos_set) or stream is not None
        pending: list[torch.Tensor] = []
        forced_ids = None
        if forced is not None:  # copied to the device once, not one id per step
            forced_ids = torch.tensor(forced[:max_new_tokens], dtype=torch.int64, device=self.device)
        t0 = time.perf_counter()
        for step in range(max_new_tokens):
            if collect:
                step_logits.append(logits)
            if forced is None:
                token_ids = sampler.sample(logits).view(1, 1)  # [1, 1] on the device
                if read_each:
                    token = int(token_ids)  # the step's one host sync
                    generated.append(token)
                    if stream is not None:
                        stream(token)
                    if token in eos_set:
                        break
                else:
                    pending.append(token_ids)
            else:
                token = forced[step]
                token_ids = forced_ids[step : step + 1].view(1, 1)
                generated.append(token)
                if stream is not None:
                    stream(token)
                if token in eos_set:
                    break
            if step == max_new_tokens - 1:
                break
            if step == 0 or (step % lookahead == 0 and not ahead):
                self._refresh_recall()  # the first window uses the prompt's measured attention
            elif step % lookahead == 0:
                self._swap_recall()
            elif ahead and (step + ahead) % lookahead == 0:
                self._prefetch_recall()
            # recall reads the queries of the step before a refresh or prefetch only
            cache.note_query = self._selects_after(step + 1)
            logits = self._decode_forward(token_ids)
            self._decode_steps += 1
            self._record_share()
            self._maybe_compact()
        cache.note_query = True
        cache.flush()  # the mirror and the summaries hold every token again
        if self.offload is not None:
            self.offload.cancel_prefetch()  # generation ended inside a window: its successor is unused
        if pending:
            generated = torch.cat(pending).view(-1).tolist()  # one read for the whole run
        self._timings["decode_s"] += time.perf_counter() - t0
        self.last_logits = logits
        self.step_logits = torch.stack(step_logits) if collect and step_logits else None
        new = torch.tensor([generated], dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids, new], dim=1)

    def _selects_after(self, step: int) -> bool:
        """Whether the decode loop asks recall for chunks at ``step`` (a refresh or a prefetch), so
        the forward before it must hand its queries to recall."""
        if self.recall is None:
            return False
        lookahead, ahead = self.config.lookahead, self.config.prefetch_steps
        if step % lookahead == 0:
            return not ahead
        return bool(ahead) and (step + ahead) % lookahead == 0

    def _prefill(self, input_ids: torch.Tensor, progress: bool | None) -> torch.Tensor:
        """Prefill the prompt ``[1, T]``: exact and layer by layer (:mod:`flashmem.prefill`), or the
        sparse, token-chunked pass; returns the last token's logits ``[vocab]``."""
        total = input_ids.shape[1]
        show = progress if progress is not None else total > 8192
        t0 = time.perf_counter()
        if self.config.prefill == "exact":
            runner = LayerMajorPrefill(
                self.model,
                self.cache,
                self.policy,
                tile_tokens=self.config.effective_prefill_chunk,
                observe_tokens=self.config.observe_tokens,
                progress=show,
                held_bytes=self._sample_device_total,
                derive_stats=self.stats_source == PROMPT_STATS,
            )
            logits = runner.run(input_ids)
            if runner.derived_stats is not None:
                self.policy.set_stats(runner.derived_stats)  # every later compaction scores with them
            self._compactions += int(runner.evicted)
            self._scratch_peak = runner.scratch_peak_bytes
            self._peak_total = max(self._peak_total, runner.peak_total_bytes)
        else:
            logits = self._sparse_prefill(input_ids, show)
        self._scratch_peak = max(self._scratch_peak, self.cache.scratch_peak_bytes)
        self._timings["prefill_s"] += time.perf_counter() - t0
        self._record_share()
        self._traffic_after_prefill = self._traffic()
        return logits

    def _traffic(self) -> dict[str, int]:
        """Cumulative host<->device bytes of this call: the mirror's writes and reads, recall's copies
        and tables (offload manager), and the sampled tokens (one id up, one down per decode step)."""
        if self.offload is not None:
            t = self.offload.traffic()
        elif self.mirror is not None:
            t = self.mirror.traffic()
        else:
            t = {"h2d_bytes": 0, "d2h_bytes": 0}
        return {"h2d_bytes": t["h2d_bytes"], "d2h_bytes": t["d2h_bytes"]}

    def _sparse_prefill(self, input_ids: torch.Tensor, show: bool) -> torch.Tensor:
        """Token chunks attending to the device-resident tokens only, compacting as they go."""
        total = input_ids.shape[1]
        chunk = self.config.effective_prefill_chunk
        bar = tqdm(total=total, unit="tok", desc="prefill", disable=not show, leave=False)
        logits = None
        for start in range(0, total, chunk):
            ids = input_ids[:, start : start + chunk]
            if start > 0:
                self._refresh_recall()
            logits = self._forward(ids, start)
            self._sample_device_total(scratch=self.cache.step_scratch_bytes)
            self._maybe_compact()
            bar.update(ids.shape[1])
            host = self.mirror.host_kv_bytes if self.mirror is not None else 0
            bar.set_postfix(
                device_kv=format_bytes(self.pool.device_kv_bytes), host_kv=format_bytes(host), refresh=False
            )
        bar.close()
        return logits

    def _default_eos(self):
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(hf_compat.text_config(self.model), "eos_token_id", None)
        return eos

    # ---- reporting ---------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Device and host figures of the last :meth:`generate` call.

        ``device_bytes`` (counted from the tensors this wrapper holds on its device, the model's own
        weights and activations aside): ``kv`` (KV blocks in use), ``kv_reserved`` (the block pool's
        K, V and positions, in use or free), ``index`` (recall's summaries, chunk index, queries and
        block tables, the learned indexer's weights, the TriAttention stats, the decode step's
        tables), ``staging`` (recall batches in flight now) and ``staging_peak`` (the largest),
        ``outputs`` (logits kept for the caller), ``scratch_peak`` (the largest transient: the exact
        prefill's layer K/V and hidden states, the sparse prefill's gathered slots and mask tile),
        ``total`` (now: kv_reserved + index + staging + outputs) and ``peak_total`` (the largest
        total over the call, scratch and staging included). ``device_share``, ``peak_device_share``
        and ``avg_device_share`` are ``total`` / ``peak_total`` / the per-step mean of the total over
        the full KV of a dense cache of the same tokens (``full_kv_bytes``); the ``*_kv_*`` figures
        count KV alone (``device_kv_share``: blocks in use; ``peak_device_kv_share``: the pool's peak
        or, if larger, pool + the exact prefill's layer K/V).

        ``traffic``: ``prefill_h2d_bytes``, ``prefill_d2h_bytes``, ``decode_h2d_bytes``,
        ``decode_d2h_bytes``: every host<->device copy, counted where it is issued (host mirror,
        recall loads and tables, and the token id of each decode step up and down).

        Also: device_kv_bytes, peak_device_kv_bytes, peak_pool_kv_bytes, full_kv_bytes,
        host_kv_bytes, blocks_in_use, blocks_freed, blocks_allocated, peak_blocks_in_use,
        pool_blocks, pool_capacity_bytes, kv_block_bytes, kv_bytes_per_token, block_size,
        logical_tokens, device_slots, compactions, decode_steps, budget_tokens, triattention_stats
        (where the compaction's query statistics came from: "prompt" (derived from the prompt by the
        exact prefill), "shipped", or the stats file's path; None without a budget), timings,
        device_kv_trace and device_total_trace (after prefill, then after each decode step), and with
        recall ``offload``: the transfer
        engine's and resident set's counters (:meth:`OffloadManager.stats`: ``stall_time_s``,
        ``prefetches_issued``, ``chunks_prefetched``, ``chunks_loaded_on_demand``, ...) plus
        ``stall_fraction`` = stall_time_s / timings["decode_s"] (time the compute stream waited on
        recall copies per second of decoding; 0.0 off CUDA, where copies are synchronous and never
        waited on; None before any decode step).
        """
        owner = self._generating_thread
        if self._lock.locked() and owner != threading.get_ident():
            raise RuntimeError(
                "memory_report() was called while another thread runs generate() on this wrapper; "
                "call it from that thread (e.g. its stream callback) or after generate() returns"
            )
        if not self._report_ready or self.pool is None or self.cache is None:
            raise RuntimeError(
                "memory_report() is available after generate(): it describes the last generate() that did "
                "not fail, and there is none (no generate() has run yet, or the last one raised)"
            )
        pool, cache = self.pool, self.cache
        full = cache.logical_length * pool.kv_bytes_per_token
        peak_full = full  # the dense cache is largest at the end
        peak_kv = max(pool.peak_device_kv_bytes, cache.transient_peak_bytes)
        held = self._held_device_bytes()
        total = held["kv_reserved"] + held["index"] + held["staging"] + held["outputs"]
        peak_total = max(self._peak_total, total)
        device_bytes = {
            **held,
            "staging_peak": self._staging_peak,
            "scratch_peak": self._scratch_peak,
            "total": total,
            "peak_total": peak_total,
        }
        traffic_end = self._traffic()
        prefill = self._traffic_after_prefill
        traffic = {
            "prefill_h2d_bytes": prefill["h2d_bytes"],
            "prefill_d2h_bytes": prefill["d2h_bytes"],
            # one token id up and one down per decode step
            "decode_h2d_bytes": traffic_end["h2d_bytes"] - prefill["h2d_bytes"] + 8 * self._decode_steps,
            "decode_d2h_bytes": traffic_end["d2h_bytes"] - prefill["d2h_bytes"] + 8 * self._decode_steps,
        }
        steps = self._share_steps
        report = {
            "device_bytes": device_bytes,
            "traffic": traffic,
            "device_share": total / full if full else 0.0,
            "peak_device_share": peak_total / peak_full if peak_full else 0.0,
            "avg_device_share": self._share_sum / steps if steps else 0.0,
            "device_kv_share": pool.device_kv_bytes / full if full else 0.0,
            "peak_device_kv_share": peak_kv / peak_full if peak_full else 0.0,
            "avg_device_kv_share": self._kv_share_sum / steps if steps else 0.0,
            "device_kv_bytes": pool.device_kv_bytes,
            "peak_device_kv_bytes": peak_kv,
            "peak_pool_kv_bytes": pool.peak_device_kv_bytes,
            "full_kv_bytes": full,
            "host_kv_bytes": self.mirror.host_kv_bytes if self.mirror is not None else 0,
            "blocks_in_use": pool.blocks_in_use,
            "blocks_freed": pool.blocks_freed_total,
            "blocks_allocated": pool.blocks_allocated_total,
            "peak_blocks_in_use": pool.peak_blocks_in_use,
            "pool_blocks": pool.num_blocks,
            "pool_capacity_bytes": pool.capacity_bytes,
            "kv_block_bytes": pool.kv_block_bytes,
            "kv_bytes_per_token": pool.kv_bytes_per_token,
            "block_size": pool.block_size,
            "logical_tokens": cache.logical_length,
            "device_slots": cache.num_slots,
            "compactions": self._compactions,
            "decode_steps": self._decode_steps,
            "budget_tokens": self.config.budget_tokens,
            "triattention_stats": self.stats_source,
            "timings": dict(self._timings),
            "device_kv_trace": list(self._device_trace),
            "device_total_trace": list(self._total_trace),
            "indexer": self.indexer_name,
            "recall_refreshes": self.recall.refreshes if self.recall is not None else 0,
            "recall_from_prefill_attention": self.recall.observed_refreshes if self.recall is not None else 0,
        }
        if self.offload is not None:
            offload = self.offload.stats(sync=True)  # after generate: resolve every timing event
            decode_s = self._timings.get("decode_s", 0.0)
            offload["stall_fraction"] = offload["stall_time_s"] / decode_s if decode_s > 0 else None
            report["offload"] = offload
        return report


class _Sampler:
    """Greedy by default; temperature / top-k / top-p sampling when ``do_sample``."""

    def __init__(self, do_sample, temperature, top_k, top_p, seed, device) -> None:
        def real(x) -> bool:
            return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

        if temperature is not None and (not real(temperature) or temperature <= 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1
        ):
            raise ValueError(f"top_k must be a positive int, got {top_k!r}")
        if top_p is not None and (not real(top_p) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {seed!r}")
        top_k = None if top_k is None else int(top_k)
        self.do_sample = bool(do_sample)
        self.temperature = float(temperature or 1.0)
        self.top_k = top_k
        self.top_p = top_p
        self.generator = None
        if self.do_sample:
            self.generator = torch.Generator(device=device)
            if seed is not None:
                self.generator.manual_seed(int(seed))

    def __call__(self, logits: torch.Tensor) -> int:
        return int(self.sample(logits))

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token id of ``logits`` ``[vocab]`` as a ``[1]`` int64 tensor on their device (no
        host sync)."""
        if not self.do_sample:
            return logits.argmax().view(1)
        logits = logits / self.temperature
        if self.top_k is not None:
            kth = torch.topk(logits, min(self.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if self.top_p is not None:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p > self.top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
        return torch.multinomial(probs, 1, generator=self.generator)


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.50 KiB"`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def wrap(model: torch.nn.Module, config: FlashMemConfig | None = None) -> FlashMemModel:
    """Wrap a Hugging Face causal LM (``hf_compat.SUPPORTED_MODEL_TYPES``: Llama, Mistral, Qwen2, Qwen3,
    Phi-3, OLMo-2, Granite, Gemma) for flashmem decoding; others are refused with the reason."""
    return FlashMemModel(model, config if config is not None else FlashMemConfig())
