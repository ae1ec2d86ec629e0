"""Exact prefill, layer by layer: an exact prompt pass at the cost of a dense prefill.

For each decoder layer ``l``, over the whole prompt in tiles of ``tile_tokens``, the model's own layer
computes the tile's q/k/v; the tile attends causally to layer ``l``'s prompt KV written so far (SDPA
in the model's dtype, GQA without copies; a lower-right causal mask for tiles after the first), and its
k/v go to the layer's prompt buffer ``[H_kv, T, D]`` on the device, to the host mirror (once) and to
the chunk summaries. At the end of the layer its keys are scored by TriAttention at ``t = T`` and the
prompt's last ``observe_tokens`` queries measure their attention mass on every chunk (the first
recall uses it); then the next layer reuses the buffer. After the last layer the final norm and the
LM head run on the last token only.

The working set: without a budget, every layer's buffer is copied into the block pool; under a budget,
the top ``budget_tokens`` per KV head (sinks and the recent window protected) are kept: per layer from
the buffer (``per_layer_per_head``), or, in ``per_head`` mode, whose keep-set combines every layer's
scores, from the host mirror once every layer has been scored (budget x L x H_kv x D x 2 elements:
independent of the prompt length).

TriAttention statistics from the prompt (``derive_stats``, when no calibrated stats fit the model):
every tile's queries reach :meth:`LayerMajorPrefill.attend`; they are un-rotated with the model's own
cos/sin at their true positions and summed per (layer, query head, pair)
(:class:`flashmem.offload.QueryStatsAccumulator`, on the device). Layer ``l``'s keys are scored with
layer ``l``'s statistics over the whole prompt, which are complete when the layer ends; after the last
layer :attr:`LayerMajorPrefill.derived_stats` holds every layer's (the caller gives them to the policy
for the compactions of the decode).

Device memory beyond the pool: one layer's prompt KV (``2 x T x H_kv x D`` elements), the hidden states
``[T, hidden]`` and one tile's activations. Host-to-device traffic: the working set only, never the
history. Compared with the token-chunked pass it replaces, the TriAttention keep-set is chosen once,
from the whole prompt at ``t = T``, instead of by a sequence of compactions every
``compaction_interval`` prompt tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from tqdm.auto import tqdm

from flashmem.offload.triattention_policy import TriAttentionPolicy
from flashmem.offload.triattention_stats import QueryStatsAccumulator, TriAttentionStats

from . import hf_compat


class LayerMajorPrefill:
    """One exact prefill of ``cache``'s (empty) sequence.

    cache: the :class:`flashmem.cache.FlashMemCache` decoding will continue from; policy: the
    TriAttention policy under a budget (None keeps every token); tile_tokens: prompt tokens per
    layer forward; observe_tokens: the prompt's last queries whose attention mass on each chunk is
    handed to recall (0 or no recall: none); held_bytes: returns the device bytes the wrapper holds
    outside this pass (pool, index, staging), sampled after every layer for :attr:`peak_total_bytes`;
    derive_stats: accumulate TriAttention query statistics from the prompt's own queries and score
    each layer's keys with them (the policy's own stats are not used); after :meth:`run`
    ``derived_stats`` holds them (source ``"prompt"``).

    After :meth:`run`: ``scratch_peak_bytes`` (the pass's own device buffers: the layer's prompt K/V,
    the hidden states ``[T, hidden]``, the tail-mass logits) and ``peak_total_bytes`` (the largest
    ``held_bytes() + scratch`` seen). The scratch includes the query-statistics sums with
    ``derive_stats``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cache,
        policy: TriAttentionPolicy | None,
        *,
        tile_tokens: int,
        observe_tokens: int = 0,
        progress: bool = False,
        held_bytes=None,
        derive_stats: bool = False,
    ) -> None:
        if derive_stats and policy is None:
            raise ValueError("derive_stats needs a policy (statistics serve the budget's compactions)")
        self.model = model
        self.cache = cache
        self.policy = policy
        self.tile_tokens = tile_tokens
        self.observe_tokens = observe_tokens if cache.recall is not None else 0
        self.progress = progress
        pool = cache.paged.pool
        self.num_layers = pool.num_layers
        self.num_kv_heads = pool.num_kv_heads
        self.device = pool.device
        self.dtype = pool.dtype
        self.held_bytes = held_bytes
        self.buffer_bytes = 0
        self.scratch_peak_bytes = 0
        self.peak_total_bytes = 0
        self._hidden_bytes = 0
        self._tail_bytes = 0
        self.evicted = False  # the prompt did not fit the budget: a keep-set was chosen
        self._keys: torch.Tensor | None = None  # [H_kv, T, D]
        self._values: torch.Tensor | None = None
        self._layer = -1
        self._start = 0
        self._end = 0
        self._total = 0
        self._combined: torch.Tensor | None = None  # [T, H_kv] per_head keep scores
        self.derive_stats = derive_stats
        self.derived_stats: TriAttentionStats | None = None
        self._query_stats: QueryStatsAccumulator | None = None
        self._stats_bytes = 0

    # ---- the pass ----------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prefill ``input_ids`` ``[1, T]``; returns the last token's logits ``[vocab]`` fp32."""
        cache, model = self.cache, self.model
        total = input_ids.shape[1]
        self._total = total
        pool = cache.paged.pool
        head_dim = pool.head_dim
        self._keys = torch.empty(self.num_kv_heads, total, head_dim, dtype=self.dtype, device=self.device)
        self._values = torch.empty_like(self._keys)
        self.buffer_bytes = 2 * self._keys.numel() * self._keys.element_size()
        if self.derive_stats:
            _, num_q, _, _ = hf_compat.kv_geometry(model)
            self._query_stats = QueryStatsAccumulator(self.num_layers, num_q, head_dim, device=self.device)
            self._stats_bytes = self._query_stats.device_bytes
        keep = self._keep_count(total)
        self.evicted = keep < total
        from_buffer = self._fill_from_buffer(total, keep)
        if from_buffer:
            cache.paged.begin_append(cache.seq_id, keep)
        layers = hf_compat.decoder_layers(model)
        positions = torch.arange(total, device=self.device)
        hidden = hf_compat.embed_tokens(model, input_ids)  # [1, T, hidden]
        self._hidden_bytes = hidden.numel() * hidden.element_size()
        self._sample()
        bar = tqdm(
            total=self.num_layers, unit="layer", desc="prefill", disable=not self.progress, leave=False
        )
        cache.prefill_runner = self
        try:
            with hf_compat.attention_runner(model, self):
                self._layers(layers, hidden, positions, keep, from_buffer, bar)
            logits = hf_compat.lm_logits(model, hidden[:, -1:])[0, -1].float()
            if self._query_stats is not None:
                self.derived_stats = self._query_stats.finalize(
                    hf_compat.rope_omega(model), hf_compat.model_fingerprint(model), "prompt"
                )
            if cache.mirror is not None:
                cache.mirror.commit(total)
            if from_buffer:
                cache.paged.end_append(cache.seq_id, logical_tokens=total)
            else:
                self._fill_from_mirror(total, keep)
            self._sample()  # the working set is in the pool while the last layer's buffers still exist
        except BaseException:
            if cache.paged.pending(cache.seq_id):
                cache.paged.abort_append(cache.seq_id)
            if cache.mirror is not None:
                cache.mirror.rollback()
            raise
        finally:
            cache.prefill_runner = None
            bar.close()
            self._keys = self._values = None
            self._query_stats = None
        return logits

    def _layers(self, layers, hidden, positions, keep: int, from_buffer: bool, bar=None) -> None:
        """Every decoder layer over every tile; ``hidden`` ``[1, T, hidden]`` is updated in place."""
        cache, model, total = self.cache, self.model, self._total
        pool = cache.paged.pool
        for layer_idx, layer in enumerate(layers):
            self._layer = layer_idx
            for start in range(0, total, self.tile_tokens):
                end = min(total, start + self.tile_tokens)
                self._start, self._end = start, end
                tile_positions = positions[start:end]
                if cache.recall is not None:
                    cache.recall.begin_step(tile_positions)
                hidden[:, start:end] = hf_compat.run_decoder_layer(
                    model, layer, hidden[:, start:end], tile_positions, cache
                )
            self._finish_layer(layer_idx, keep, from_buffer)
            cache.note_transient(pool.device_kv_bytes + self.buffer_bytes)
            self._sample()
            if bar is not None:
                bar.update(1)

    def _sample(self) -> None:
        """Record the pass's scratch now and the wrapper's total beside it."""
        scratch = self.buffer_bytes + self._hidden_bytes + self._tail_bytes + self._stats_bytes
        self.scratch_peak_bytes = max(self.scratch_peak_bytes, scratch)
        held = self.held_bytes() if self.held_bytes is not None else 0
        self.peak_total_bytes = max(self.peak_total_bytes, held + scratch)

    def _keep_count(self, total: int) -> int:
        return total if self.policy is None else min(self.policy.budget_tokens, total)

    def _fill_from_buffer(self, total: int, keep: int) -> bool:
        """True when every layer's survivors are known when the layer ends (no budget, the budget
        covers the prompt, or one keep-set per layer)."""
        return self.policy is None or keep == total or self.policy.mode == "per_layer_per_head"

    # ---- called by the model's layers (through the cache and the attention function) -------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int):
        """Store the tile's post-RoPE k/v ``[1, H_kv, t, D]``; return the layer's prompt KV so far
        ``[1, H_kv, end, D]`` (views of the buffer)."""
        start, end = self._start, self._end
        self._keys[:, start:end] = key_states[0]
        self._values[:, start:end] = value_states[0]
        cache = self.cache
        k = key_states[0].transpose(0, 1)  # [t, H_kv, D]
        v = value_states[0].transpose(0, 1)
        if cache.mirror is not None:
            cache.mirror.append(layer_idx, k, v)
        if cache.recall is not None:
            cache.recall.on_keys(layer_idx, k)
        return self._keys[None, :, :end], self._values[None, :, :end]

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Causal attention of the tile's queries ``[1, H_q, t, D]`` over the layer's prompt KV so far
        -> ``[1, t, H_q, D]``."""
        end = self._end
        keys = self._keys[None, :, :end]
        values = self._values[None, :, :end]
        t = query.shape[2]
        q = query.to(self.dtype)
        if t == end:
            out = F.scaled_dot_product_attention(
                q, keys, values, is_causal=True, scale=scaling, enable_gqa=True
            )
        else:
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=causal_lower_right(t, end), scale=scaling, enable_gqa=True
            )
        if self._query_stats is not None:
            self._add_queries(layer_idx, query[0])
        recall = self.cache.recall
        if recall is not None:
            recall.on_query(layer_idx, query[0, :, -1, :])
            if self.observe_tokens and end == self._total:
                recall.observe_mass(layer_idx, self._tail_mass(query[0], scaling))
        return out.transpose(1, 2).to(query.dtype)

    def _add_queries(self, layer_idx: int, query: torch.Tensor) -> None:
        """Fold the tile's post-RoPE queries ``[H_q, t, D]`` into the statistics, un-rotated with the
        model's own cos/sin at their true positions (fp32)."""
        positions = torch.arange(self._start, self._end, device=self.device)
        cos, sin = hf_compat.rotary_cos_sin(self.model, positions, torch.float32)  # [t, D]
        pre = hf_compat.unrotate(query.float(), cos, sin)  # [H_q, t, D]
        self._query_stats.update(layer_idx, pre.transpose(0, 1))

    def _tail_mass(self, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Peak attention mass of the prompt's last ``observe_tokens`` queries on every chunk, per KV
        head: for each chunk, the largest share of one query's attention (over the head's query group
        and the queries) that falls on it, the always-resident tokens' share (sinks, recent window)
        left out: ``[H_kv, ceil(T / chunk_size)]`` fp32. query: ``[H_q, t, D]`` (the last tile).

        The peak, not the sum: a few retrieval heads look hard at the chunk a question is about, while
        the sum over all heads is dominated by broad attention to nearby text. Sinks and the recent
        window are always resident, so their mass must not make the chunk holding them look worth
        recalling (the chunk the window's start falls inside is a candidate for its older part). Keys
        are read in segments of whole chunks, so the fp32 logits stay ``[H_q, W, segment]``."""
        total = self._total
        cs = self.cache.recall.chunk_size
        sinks = min(self.cache.recall.sink_tokens, total)
        recent_start = max(0, total - self.cache.recall.recent_tokens)
        h_kv = self.num_kv_heads
        w = min(self.observe_tokens, query.shape[1])
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        group = query.shape[0] // h_kv
        q = query[:, -w:].float().reshape(h_kv, group * w, -1)  # [H_kv, G*W, D] (query heads grouped)
        qpos = torch.arange(total - w, total, device=self.device).repeat(group)  # [G*W]
        seg = max(cs, self.tile_tokens // cs * cs)
        every, others = [], []  # per-chunk log-sum-exp over all keys / over the keys but the sinks
        for s in range(0, total, seg):
            e = min(total, s + seg)
            logits = torch.matmul(q, self._keys[:, s:e].float().transpose(1, 2)) * scale  # [H_kv, G*W, S]
            kpos = torch.arange(s, e, device=self.device)
            if e > total - w:
                logits = logits.masked_fill(kpos[None, None, :] > qpos[None, :, None], float("-inf"))
            pad = (-(e - s)) % cs
            if pad:
                logits = F.pad(logits, (0, pad), value=float("-inf"))
            self._tail_bytes = max(self._tail_bytes, 2 * logits.numel() * logits.element_size())
            every.append(torch.logsumexp(logits.unflatten(-1, (-1, cs)), dim=-1))  # [H_kv, G*W, n]
            if s < sinks or e > recent_start:
                resident = F.pad((kpos < sinks) | (kpos >= recent_start), (0, pad), value=True)
                logits = logits.masked_fill(resident[None, None, :], float("-inf"))
                others.append(torch.logsumexp(logits.unflatten(-1, (-1, cs)), dim=-1))
            else:
                others.append(every[-1])
        lse = torch.logsumexp(torch.cat(every, dim=-1), dim=-1, keepdim=True)  # [H_kv, G*W, 1]
        mass = torch.exp(torch.cat(others, dim=-1) - lse)  # [H_kv, G*W, n]: each query's share per chunk
        return mass.amax(dim=1)

    # ---- the working set ---------------------------------------------------------------------
    def _finish_layer(self, layer: int, keep: int, from_buffer: bool) -> None:
        policy, total = self.policy, self._total
        layer_stats = None
        if self._query_stats is not None and keep < total:
            layer_stats = self._query_stats.layer_stats(layer, hf_compat.rope_omega(self.model))
        keys = self._keys.transpose(0, 1)  # [T, H_kv, D]
        values = self._values.transpose(0, 1)
        if policy is None or keep == total:
            self._write(
                layer,
                keys,
                values,
                torch.arange(total, device=self.device)[:, None].expand(-1, self.num_kv_heads),
            )
            return
        scores = policy.key_scores(keys, layer, total, layer_stats=layer_stats)  # [T, H_kv]
        if policy.mode == "per_layer_per_head":
            rows = self._select(scores, keep)  # [keep, H_kv]
            heads = torch.arange(self.num_kv_heads, device=self.device)
            self._write(layer, keys[rows, heads], values[rows, heads], rows)
        else:
            self._combined = policy.accumulate(self._combined, scores)

    def _select(self, scores: torch.Tensor, keep: int) -> torch.Tensor:
        """Token rows ``[keep, H_kv]`` (ascending per head) of the prompt's survivors."""
        total = self._total
        positions = torch.arange(total, device=self.device)[:, None].expand(-1, self.num_kv_heads)
        keep_idx = self.policy.keep_from_scores(scores, keep, positions=positions, prompt_len=total)
        return keep_idx.t()

    def _write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> None:
        """Write the layer's survivors ``[keep, H_kv, D]`` (true positions ``rows [keep, H_kv]``)."""
        cache = self.cache
        cache.paged.write(cache.seq_id, layer, keys, values, rows.to(torch.int32))

    def _fill_from_mirror(self, total: int, keep: int) -> None:
        """``per_head`` under a budget: the keep-set of every KV head, from all layers' scores; the
        survivors' rows come back from the host mirror (counted in its ``h2d_bytes``)."""
        cache = self.cache
        rows = self._select(self._combined, keep)  # [keep, H_kv]
        self._combined = None
        rows_host = rows.cpu()
        paged = cache.paged
        paged.begin_append(cache.seq_id, keep)
        for layer in range(self.num_layers):
            k, v = cache.mirror.rows_to_device(layer, rows_host, self.device)  # [keep, H_kv, D]
            self._write(layer, k, v, rows)
        paged.end_append(cache.seq_id, logical_tokens=total)
