"""The TriAttention compaction policy: when to prune a sequence, and what survives.

Modes: ``per_head`` (layers combined into one keep-set per KV head, shared by all layers) and
``per_layer_per_head`` (``keep_idx [L, H_kv, keep]``). Survivors slide forward in token order
(:func:`flashmem.offload.compaction.compact_sequence`), so whole tail blocks return to the pool.

Rope scaling: keys in the cache are post-RoPE and carry any magnitude factor YaRN folds into cos/sin;
that scales every score of a layer by the same constant and leaves rankings and z-scores unchanged.
"""

from __future__ import annotations

import torch

from ..kernels.checks import check_int, device_tensor_bytes, resolve_backend
from ..kernels.triattention_score import zscore
from .compaction import compact_sequence
from .paged_cache import PagedKVCache
from .triattention_select import protected_mask, score_layer, select_keep
from .triattention_stats import TriAttentionStats

TRIATTENTION_MODES = ("per_head", "per_layer_per_head")
LAYER_REDUCTIONS = ("sum", "max")


class TriAttentionPolicy:
    """Prune a sequence back to ``budget_tokens`` slots per KV head once it holds
    ``budget_tokens + compaction_interval``; survivors slide forward and tail blocks are freed.

    stats: calibration of the model (layer/head geometry must match the cache's pool), or None for
    statistics that arrive later (:meth:`set_stats`; the exact prefill derives them from the prompt's
    own queries and scores each layer with that layer's, see :meth:`key_scores`); a policy without
    stats refuses to :meth:`select`;
    mode: "per_head" (one keep-set per KV head for all layers; layer scores z-scored and combined
    with ``layer_reduce`` "sum" or "max") or "per_layer_per_head"; protect_prompt: never evict slots
    whose position is below ``prompt_len``; keys_rotated: the cache holds post-RoPE keys (as written
    by Hugging Face models); score_backend / compaction_backend: "auto" | "triton" | "torch"
    ("auto": triton on CUDA, torch elsewhere); backend: sets both; fingerprint: the fingerprint of
    the model the policy serves (``flashmem.hf_compat.model_fingerprint``), checked against the stats'
    once, here.
    """

    def __init__(
        self,
        stats: TriAttentionStats | None,
        *,
        budget_tokens: int,
        compaction_interval: int = 128,
        recent_tokens: int = 128,
        sink_tokens: int = 4,
        mode: str = "per_head",
        protect_prompt: bool = False,
        layer_reduce: str = "sum",
        keys_rotated: bool = True,
        score_backend: str = "auto",
        compaction_backend: str = "auto",
        backend: str | None = None,
        fingerprint: dict | None = None,
    ) -> None:
        if backend is not None:
            score_backend = compaction_backend = backend
        for name, value, minimum in (
            ("budget_tokens", budget_tokens, 1),
            ("compaction_interval", compaction_interval, 1),
            ("recent_tokens", recent_tokens, 0),
            ("sink_tokens", sink_tokens, 0),
        ):
            check_int("TriAttentionPolicy", name, value, minimum)
        if budget_tokens < sink_tokens + recent_tokens:
            raise ValueError(
                f"budget_tokens ({budget_tokens}) must be at least sink_tokens + recent_tokens "
                f"({sink_tokens} + {recent_tokens}); raise the budget or shrink the window"
            )
        if mode not in TRIATTENTION_MODES:
            raise ValueError(f"mode must be one of {TRIATTENTION_MODES}, got {mode!r}")
        if layer_reduce not in LAYER_REDUCTIONS:
            raise ValueError(f"layer_reduce must be one of {LAYER_REDUCTIONS}, got {layer_reduce!r}")
        for value in (score_backend, compaction_backend):
            resolve_backend(value, "cpu")  # validates the name
        self.fingerprint = fingerprint
        self.stats: TriAttentionStats | None = None
        self._stats_device: dict[torch.device, TriAttentionStats] = {}
        self.set_stats(stats)
        self.budget_tokens = budget_tokens
        self.compaction_interval = compaction_interval
        self.recent_tokens = recent_tokens
        self.sink_tokens = sink_tokens
        self.mode = mode
        self.protect_prompt = bool(protect_prompt)
        self.layer_reduce = layer_reduce
        self.keys_rotated = bool(keys_rotated)
        self.score_backend = score_backend
        self.compaction_backend = compaction_backend

    def set_stats(self, stats: TriAttentionStats | None) -> None:
        """Score with ``stats`` from now on (None: no stats until the next call); a stats fingerprint
        that differs from the policy's ``fingerprint`` is refused, naming the fields."""
        if stats is not None and not isinstance(stats, TriAttentionStats):
            raise TypeError(f"stats must be TriAttentionStats or None, got {type(stats).__name__}")
        if stats is not None and self.fingerprint is not None and stats.fingerprint:
            stats.check_fingerprint(self.fingerprint)
        self.stats = stats
        self._stats_device = {}

    def _require_stats(self) -> TriAttentionStats:
        if self.stats is None:
            raise RuntimeError(
                "this TriAttentionPolicy has no statistics yet: give them to set_stats() (the exact prefill "
                "derives them from the prompt), or build it with calibrated stats"
            )
        return self.stats

    def device_bytes(self, device: torch.device | str) -> int:
        """Bytes of the statistics this policy holds on ``device`` (the copy it scores with)."""
        tensors = []
        if self.stats is not None:
            s = self.stats
            tensors += [s.q_mean_real, s.q_mean_imag, s.q_abs_mean, s.omega]
        for stats in self._stats_device.values():
            tensors += [stats.q_mean_real, stats.q_mean_imag, stats.q_abs_mean, stats.omega]
        return device_tensor_bytes(tensors, device)

    def should_compact(self, num_slots: int) -> bool:
        """True once the sequence holds ``budget_tokens + compaction_interval`` slots (host counter)."""
        return num_slots >= self.budget_tokens + self.compaction_interval

    def _stats_on(self, device: torch.device) -> TriAttentionStats:
        if device not in self._stats_device:
            self._stats_device[device] = self._require_stats().to(device)
        return self._stats_device[device]

    def _check_cache(self, cache: PagedKVCache) -> None:
        pool = cache.pool
        stats = self._require_stats()
        if (pool.num_layers, pool.head_dim) != (stats.num_layers, stats.head_dim) or (
            stats.num_q_heads % pool.num_kv_heads
        ):
            raise ValueError(
                f"stats (L={stats.num_layers}, H_q={stats.num_q_heads}, D={stats.head_dim}) do not fit the "
                f"cache (L={pool.num_layers}, H_kv={pool.num_kv_heads}, D={pool.head_dim})"
            )

    def key_scores(
        self,
        keys: torch.Tensor,
        layer: int,
        step_position: int,
        layer_stats: TriAttentionStats | None = None,
    ) -> torch.Tensor:
        """Aggregated scores ``[N, H_kv]`` fp32 of one layer's keys ``[N, H_kv, D]`` (post-RoPE, as the
        cache holds them) at step ``step_position``. layer_stats: one layer's statistics
        (``[1, H_q, F]``, :meth:`QueryStatsAccumulator.layer_stats`) to score with instead of the
        policy's layer ``layer`` (the prompt-derived stats while later layers are still unseen)."""
        if not self.keys_rotated:
            raise ValueError(
                "key_scores scores post-RoPE keys; this policy was built with keys_rotated=False"
            )
        if layer_stats is not None:
            if layer_stats.num_layers != 1:
                raise ValueError(f"layer_stats must hold one layer, got {layer_stats.num_layers}")
            return score_layer(
                keys, None, layer_stats, 0, step_position, rotated=True, backend=self.score_backend
            )
        stats = self._stats_on(keys.device)
        return score_layer(keys, None, stats, layer, step_position, rotated=True, backend=self.score_backend)

    def accumulate(self, combined: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        """Fold one layer's scores ``[N, H_kv]`` into the ``per_head`` keep score: z-scored per KV head,
        summed (``layer_reduce="sum"``) or maxed over layers. ``combined`` None starts the fold."""
        z = zscore(scores, dim=0)
        if combined is None:
            return z
        return combined + z if self.layer_reduce == "sum" else torch.maximum(combined, z)

    def keep_from_scores(
        self,
        scores: torch.Tensor,
        keep: int,
        *,
        positions: torch.Tensor | None = None,
        prompt_len: int | None = None,
        extra_protected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``keep`` survivors per KV head from scores ``[N, H_kv]`` (slot order): sinks, the recent
        window, ``extra_protected`` ([N] or [N, H_kv] bool) and, with ``protect_prompt``, the slots
        whose ``positions`` ``[N, H_kv]`` fall below ``prompt_len`` always survive. Returns keep_idx
        ``[H_kv, keep]`` int64, sorted."""
        num_slots = scores.shape[0]
        protect = self.protect_prompt and prompt_len is not None and positions is not None
        mask = protected_mask(
            num_slots,
            sink_tokens=self.sink_tokens,
            recent_tokens=self.recent_tokens,
            positions=positions if protect else None,
            prompt_len=prompt_len if protect else None,
            device=scores.device,
        )
        if extra_protected is not None:
            extra = extra_protected.to(device=scores.device, dtype=torch.bool)
            if mask.dim() == 1 and extra.dim() == 2:
                mask = mask[:, None]
            elif mask.dim() == 2 and extra.dim() == 1:
                extra = extra[:, None]
            mask = mask | extra
        # sinks + window (+ the prompt when protected) bound the protected slots per head on the host
        bound = None
        if extra_protected is None:
            prompt = (prompt_len or 0) if protect else 0
            bound = min(num_slots, self.sink_tokens + self.recent_tokens + prompt)
        return select_keep(scores, keep, mask, protected_bound=bound)

    def select(
        self,
        cache: PagedKVCache,
        seq_id: int,
        step_position: int | None = None,
        *,
        prompt_len: int | None = None,
        extra_protected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Choose ``min(budget, num_slots)`` survivors per KV head of a sequence in the cache.

        step_position: position of the scoring step (default: the sequence's logical length);
        prompt_len: prompt length (protected when ``protect_prompt``); extra_protected: [N] or
        [N, H_kv] bool slots the caller pins (e.g. recalled chunks). Scoring needs no rotary
        embedding: cache keys are post-RoPE and the rotation folds into the phase. Returns keep_idx
        [H_kv, keep] ("per_head") or [L, H_kv, keep] ("per_layer_per_head"), int64 sorted slot indices.
        """
        self._check_cache(cache)
        num_slots = cache.num_slots(seq_id)
        if step_position is None:
            step_position = cache.logical_length(seq_id)
        if extra_protected is not None and (
            not isinstance(extra_protected, torch.Tensor) or extra_protected.shape[0] != num_slots
        ):
            raise ValueError(f"extra_protected must be a bool tensor [N] or [N, H_kv] with N = {num_slots}")
        keep = min(self.budget_tokens, num_slots)
        pool = cache.pool
        if keep == num_slots:
            idx = torch.arange(num_slots, device=pool.device).expand(pool.num_kv_heads, num_slots)
            if self.mode == "per_layer_per_head":
                idx = idx.expand(pool.num_layers, pool.num_kv_heads, num_slots)
            return idx.contiguous()
        slot_index = cache.slot_indices(seq_id)
        combined, keeps = None, []
        for layer in range(pool.num_layers):
            keys, _, positions = cache.gather(seq_id, layer, slot_index=slot_index)
            if self.keys_rotated:
                scores = self.key_scores(keys, layer, step_position)
            else:
                stats = self._stats_on(keys.device)
                scores = score_layer(
                    keys, positions, stats, layer, step_position, rotated=False, backend=self.score_backend
                )
            if self.mode == "per_head":
                combined = self.accumulate(combined, scores)
                if layer == 0:
                    first_positions = positions
            else:
                keeps.append(
                    self.keep_from_scores(
                        scores,
                        keep,
                        positions=positions,
                        prompt_len=prompt_len,
                        extra_protected=extra_protected,
                    )
                )
        if self.mode == "per_head":
            return self.keep_from_scores(
                combined,
                keep,
                positions=first_positions,
                prompt_len=prompt_len,
                extra_protected=extra_protected,
            )
        return torch.stack(keeps)  # [L, H_kv, keep]

    def compact(
        self,
        cache: PagedKVCache,
        seq_id: int,
        t: int | None = None,
        *,
        prompt_len: int | None = None,
        extra_protected: torch.Tensor | None = None,
    ) -> int:
        """Score the sequence's slots at step ``t`` (default: its logical length), keep ``budget``
        per KV head and compact (see :meth:`select` for the arguments). Returns the blocks freed, as
        counted by the allocator (0 when the sequence fits the budget)."""
        num_slots = cache.num_slots(seq_id)
        if num_slots <= self.budget_tokens:
            return 0
        keep_idx = self.select(cache, seq_id, t, prompt_len=prompt_len, extra_protected=extra_protected)
        return compact_sequence(cache, seq_id, keep_idx, backend=self.compaction_backend, validate=False)
