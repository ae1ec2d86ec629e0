"""``FlashMemCache``: a transformers ``Cache`` whose storage is a paged device cache.

The decode loop (:mod:`flashmem.wrapper`) drives one step at a time:

    cache.begin_step(positions, start)  # reserve slots for the T new tokens (positions: [T] int64)
    model(input_ids, position_ids=..., cache=cache)   # every layer: update() writes, attend() reads
    cache.end_step()                 # commit host-side counters

``update`` stores the layer's new post-RoPE keys/values in the reserved slots, and the attention,
routed to this cache for the call (``hf_compat.attention_runner``), calls :meth:`attend`, which
reads only the paged cache: a single-token step goes through the paged decode kernel, a
multi-token step (the sparse prefill) through SDPA over the gathered slots with a causal mask built
from each slot's true position (so compacted and recalled slots are handled exactly), the queries
grouped per KV head and tiled so that no mask exceeds ``attend_scratch_elements``; the first chunk of
an empty cache through SDPA's own causal path (``is_causal``, ``enable_gqa``). During the
exact, layer-major prefill (:mod:`flashmem.prefill`) ``update`` hands the tiles to that pass instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers.cache_utils import Cache, CacheLayerMixin

from flashmem.kernels.checks import device_tensor_bytes
from flashmem.kernels.paged_decode import paged_decode_attention, reference_paged_decode_attention
from flashmem.offload.paged_cache import PagedKVCache


class _PagedLayerView(CacheLayerMixin):
    """Per-layer facade transformers' mask utilities query for sizes; storage lives in the pool."""

    is_compileable = False
    is_sliding = False

    def __init__(self, owner: FlashMemCache, layer_idx: int) -> None:
        super().__init__()
        self._owner = owner
        self._layer_idx = layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        return self._owner.update(key_states, value_states, self._layer_idx)

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self._owner.num_slots + query_length, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self._owner.logical_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        return None


class FlashMemCache(Cache):
    """Paged KV storage for one sequence (batch size 1).

    keys/values per layer live in ``paged.pool`` as ``[num_blocks, block_size, H_kv, D]``.

    ``attend_scratch_elements`` bounds the multi-token attention's transient tensors (see
    :meth:`_attend_gathered`): queries go through SDPA in tiles of ``t`` tokens with
    ``H_q x t x S <= attend_scratch_elements`` (``S``: the slots attended), so no mask or logits tensor
    has more than ``max(attend_scratch_elements, H_q x S)`` elements, and K/V are never copied per
    query head.
    """

    attend_scratch_elements: int = 1 << 22

    def __init__(
        self,
        paged: PagedKVCache,
        num_q_heads: int,
        attention_backend: str = "torch",
        *,
        mirror=None,
        recall=None,
        offload=None,
        table_blocks: tuple[int, int] = (0, 0),
        flush_tokens: int = 1,
    ) -> None:
        pool = paged.pool
        super().__init__(layers=[_PagedLayerView(self, i) for i in range(pool.num_layers)])
        self.paged = paged
        self.seq_id = paged.add_sequence()
        self.num_q_heads = num_q_heads
        self.attention_backend = attention_backend
        self.mirror = mirror
        self.recall = recall
        self.offload = offload
        self.prefill_runner = None  # the layer-major prefill in flight (flashmem.prefill), if any
        self.transient_peak_bytes = 0
        self.step_scratch_bytes = 0  # the multi-token attend's largest transient in the step in flight
        self.scratch_peak_bytes = 0
        self._positions: torch.Tensor | None = None
        self._slot_index: torch.Tensor | None = None
        self._start = 0
        self._fresh = False
        self._new: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._block_tables: torch.Tensor | None = None
        self._block_valid: torch.Tensor | None = None
        self._read_index: torch.Tensor | None = None
        self._valid_template: torch.Tensor | None = None
        # the decode step's static tables (one token per forward; see begin_decode_step)
        self._work_capacity, self._recall_capacity = table_blocks
        self._table: torch.Tensor | None = None  # [1, M] int32 block ids: working blocks, then recalled
        self._valid: torch.Tensor | None = None  # [1, M] int32 valid slots per entry (0: unused)
        self._dev_work: list[int] = []  # working block ids as written in _table
        self._dev_work_version = -1
        self._dev_recall: tuple[list[int], list[int]] = ([], [])
        self._dev_recall_version = -1
        self._gather_index: torch.Tensor | None = None  # [M * bs] int64 flat slots of the table (torch)
        self._gather_mask: torch.Tensor | None = None  # [M * bs, 1] bool: entry slot < valid (torch)
        self._gather_fill: tuple[torch.Tensor, torch.Tensor] | None = None  # 0 and -inf, pool dtype
        self._gather_stale = True
        self._step_slot: torch.Tensor | None = None  # [1] int64 flat slot of the decoded token
        self._step_pos: torch.Tensor | None = None  # [1, 1] int64 its position (the model's position_ids)
        self._step_pos32: torch.Tensor | None = None  # [1, H_kv] int32 the same, as stored per slot
        self._decoding = False
        self.note_query = True  # hand this step's queries to recall (the wrapper clears it when unused)
        # decode tokens written to the pool but not yet to the host mirror and the chunk summaries:
        # they are the sequence's last `unflushed` slots, copied in one batch every `flush_tokens`
        # tokens, before a compaction moves slots, before recall reads the mirror, and at the end
        self.flush_tokens = max(1, int(flush_tokens))
        self.unflushed = 0

    # ---- counters (host side) ----------------------------------------------------------------
    @property
    def logical_length(self) -> int:
        return self.paged.logical_length(self.seq_id)

    @property
    def num_slots(self) -> int:
        return self.paged.num_slots(self.seq_id)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.logical_length

    def device_bytes(self) -> int:
        """Bytes of the step metadata this cache holds on the pool's device: block tables, valid
        counts, slot indices and positions of the step in flight, the valid-count template, the
        decode step's static tables (block ids, valid counts, gather index and mask, token slot and
        positions) and the paged cache's cached block table."""
        tensors = [
            self._valid_template,
            self._block_tables,
            self._block_valid,
            self._read_index,
            self._positions,
            self._slot_index,
            self._table,
            self._valid,
            self._gather_index,
            self._gather_mask,
            *(self._gather_fill or ()),
            self._step_slot,
            self._step_pos,
            self._step_pos32,
        ]
        return device_tensor_bytes(tensors, self.paged.pool.device) + self.paged.device_bytes()

    def _note_scratch(self, nbytes: int) -> None:
        self.step_scratch_bytes = max(self.step_scratch_bytes, nbytes)
        self.scratch_peak_bytes = max(self.scratch_peak_bytes, nbytes)

    def note_transient(self, device_bytes: int) -> None:
        """Record a transient device KV figure (pool + prefill buffers) for the peak report."""
        self.transient_peak_bytes = max(self.transient_peak_bytes, device_bytes)

    # ---- step protocol -----------------------------------------------------------------------
    def begin_step(self, positions: torch.Tensor, start: int) -> None:
        """Reserve slots for the tokens at ``positions`` ``[T]`` (= ``start .. start + T - 1``, true
        positions on the pool's device; ``start`` is the host-side copy)."""
        num_new = int(positions.shape[0])
        paged = self.paged
        self.flush()
        self._decoding = False
        self._fresh = paged.num_slots(self.seq_id) == 0 and self._recalled() is None
        paged.begin_append(self.seq_id, num_new)
        self._positions = positions
        self._start = start
        self.step_scratch_bytes = 0
        self._slot_index = paged.pending_slot_indices(self.seq_id)
        self._new = {}
        if self.recall is not None:
            self.recall.begin_step(positions)
        self._block_tables = self._block_valid = self._read_index = None
        if num_new == 1:
            total = paged.num_slots(self.seq_id) + 1
            table = paged.block_table_tensor(self.seq_id)
            nb = table.shape[0]
            bs = paged.block_size
            valid = self._full_blocks_valid(nb, table.device).clone()
            valid[nb - 1] = total - bs * (nb - 1)  # a scalar fill on the device, no read-back
            recalled = self._recalled()
            if recalled is not None:
                table = torch.cat([table, recalled[0]])
                valid = torch.cat([valid, recalled[1]])
            self._block_tables = table.view(1, -1)
            self._block_valid = valid.view(1, -1)
        elif not self._fresh:
            index = paged.slot_indices(self.seq_id, include_pending=True)
            recalled = self._recalled()
            if recalled is not None:
                blocks, valid = recalled
                bs = paged.block_size
                offsets = torch.arange(bs, device=blocks.device)
                slots = blocks.long()[:, None] * bs + offsets[None, :]
                index = torch.cat([index, slots[offsets[None, :] < valid[:, None]]])
            self._read_index = index

    # ---- the decode step: static tables, nothing made from Python data ----------------------------
    def _ensure_tables(self) -> None:
        """Allocate the static tables (once; grown only when a direct user gave no capacity)."""
        paged = self.paged
        device = paged.pool.device
        work = max(self._work_capacity, len(paged.block_ids(self.seq_id)[1]))
        recall = max(self._recall_capacity, len(self._dev_recall[0]))
        if self.offload is not None:
            recall = max(recall, len(self.offload.resident_block_lists()[1]))
        if self._table is not None and work <= self._work_capacity and recall <= self._recall_capacity:
            return
        if self._table is not None:  # grown (no capacity given): everything is written anew
            work, recall = max(work, 2 * self._work_capacity), max(recall, 2 * self._recall_capacity)
        self._work_capacity, self._recall_capacity = work, recall
        total = work + recall
        self._table = torch.zeros((1, total), dtype=torch.int32, device=device)
        self._valid = torch.zeros((1, total), dtype=torch.int32, device=device)
        self._dev_work, self._dev_work_version = [], -1
        self._dev_recall, self._dev_recall_version = ([], []), -1
        self._gather_stale = True
        h = paged.pool.num_kv_heads
        if self._step_slot is None:
            self._step_slot = torch.zeros(1, dtype=torch.int64, device=device)
            self._step_pos = torch.zeros((1, 1), dtype=torch.int64, device=device)
            self._step_pos32 = torch.zeros((1, h), dtype=torch.int32, device=device)

    @staticmethod
    def _write_entries(dst: torch.Tensor, start: int, values: list[int]) -> None:
        """``dst[start : start + len(values)] = values`` without a tensor made from Python data: runs of
        equal values are slice fills, runs of consecutive values an ``arange`` copy (scalars travel
        as kernel arguments, so no host-device copy and no host wait)."""
        i, n = 0, len(values)
        while i < n:
            j = i + 1
            if j < n and values[j] == values[i]:
                while j < n and values[j] == values[i]:
                    j += 1
                dst[start + i : start + j].fill_(values[i])
            elif j < n and values[j] == values[i] + 1:
                while j < n and values[j] == values[j - 1] + 1:
                    j += 1
                dst[start + i : start + j].copy_(
                    torch.arange(values[i], values[i] + (j - i), dtype=dst.dtype, device=dst.device)
                )
            else:
                dst[start + i].fill_(values[i])
            i = j

    def _sync_tables(self) -> None:
        """Bring the static tables up to the host's block lists (only the entries that changed)."""
        paged = self.paged
        bs = paged.block_size
        table, valid = self._table[0], self._valid[0]
        version, work = paged.block_ids(self.seq_id)
        if version != self._dev_work_version:
            old = self._dev_work
            same = 0
            limit = min(len(old), len(work))
            while same < limit and old[same] == work[same]:
                same += 1
            if len(work) > same:
                self._write_entries(table, same, work[same:])
                valid[same : len(work)].fill_(bs)  # the slots past the last token hold position -1
            if len(old) > len(work):
                valid[len(work) : len(old)].fill_(0)
            self._dev_work, self._dev_work_version = list(work), version
            self._gather_stale = True
        if self.offload is not None:
            version, blocks, counts = self.offload.resident_block_lists()
            if version != self._dev_recall_version:
                base = self._work_capacity
                old_blocks, old_counts = self._dev_recall
                if blocks != old_blocks or counts != old_counts:
                    self._write_entries(table, base, blocks)
                    self._write_entries(valid, base, counts)
                    if len(old_blocks) > len(blocks):
                        valid[base + len(blocks) : base + len(old_blocks)].fill_(0)
                    self._dev_recall = (list(blocks), list(counts))
                    self._gather_stale = True
                self._dev_recall_version = version
        if self._gather_stale and self.attention_backend != "triton":
            offsets = torch.arange(bs, device=table.device)
            index = (table.long()[:, None] * bs + offsets[None, :]).reshape(-1)
            mask = (offsets[None, :] < valid[:, None]).reshape(-1, 1)
            if self._gather_fill is None:
                dtype = self.paged.pool.dtype
                self._gather_fill = (
                    torch.zeros((), dtype=dtype, device=table.device),
                    torch.full((), float("-inf"), dtype=dtype, device=table.device),
                )
            if self._gather_index is None or self._gather_index.shape != index.shape:
                self._gather_index, self._gather_mask = index, mask
            else:  # in place: a captured graph keeps reading these buffers
                self._gather_index.copy_(index)
                self._gather_mask.copy_(mask)
        self._gather_stale = False

    def begin_decode_step(self) -> torch.Tensor:
        """Reserve the slot of one new token (the decode step) and update the static tables; returns
        its position ``[1, 1]`` int64 on the pool's device (a persistent buffer: the model's
        ``position_ids``). Nothing is read back from the device and no tensor is made from Python
        data: the slot and position are scalar fills, the tables change only where the host's block
        lists did."""
        paged = self.paged
        self._fresh = False
        paged.begin_append(self.seq_id, 1)
        try:
            self._ensure_tables()
            self._sync_tables()
        except BaseException:
            paged.abort_append(self.seq_id)
            raise
        slots = paged.num_slots(self.seq_id)
        position = paged.logical_length(self.seq_id)
        self._step_slot.fill_(paged.slot_of(self.seq_id, slots))
        self._step_pos.fill_(position)
        self._step_pos32.fill_(position)
        self._positions = self._step_pos[0]
        self._start = position
        self._decoding = True
        self.step_scratch_bytes = 0
        return self._step_pos

    def flush(self) -> None:
        """Copy the journaled decode tokens (the last :attr:`unflushed` slots) to the host mirror and
        the chunk summaries in one batch per layer, then commit them in the mirror."""
        n = self.unflushed
        if n == 0:
            return
        paged = self.paged
        bs = paged.block_size
        end = paged.num_slots(self.seq_id)
        length = paged.logical_length(self.seq_id)
        device = paged.pool.device
        slots = torch.arange(end - n, end, device=device)
        table = self._table[0].long()
        index = table[slots // bs] * bs + slots % bs  # [n] flat slots of the journaled tokens
        if self.recall is not None:
            self.recall.begin_step(torch.arange(length - n, length, device=device))
        for layer in range(paged.pool.num_layers):
            k_flat, v_flat, _ = paged.flat_views(layer)
            k = k_flat.index_select(0, index)
            v = v_flat.index_select(0, index)
            if self.mirror is not None:
                self.mirror.append(layer, k, v)
            if self.recall is not None:
                self.recall.on_keys(layer, k)
        if self.mirror is not None:
            self.mirror.commit(n)
        self.unflushed = 0

    def _full_blocks_valid(self, nb: int, device: torch.device) -> torch.Tensor:
        """``[>= nb]`` int32 filled with block_size, cached (grown by doubling) across steps."""
        cached = self._valid_template
        if cached is None or cached.shape[0] < nb:
            size = max(nb, 2 * (cached.shape[0] if cached is not None else 16))
            self._valid_template = torch.full(
                (size,), self.paged.block_size, dtype=torch.int32, device=device
            )
        return self._valid_template[:nb]

    def _recalled(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Blocks and valid counts of the ready recalled chunks, or None."""
        if self.offload is None:
            return None
        blocks, valid = self.offload.resident_blocks()
        return (blocks, valid) if blocks.numel() else None

    def end_step(self) -> None:
        n = self._positions.shape[0]
        self.paged.end_append(self.seq_id)
        if self._decoding:
            self._decoding = False
            if self.mirror is not None or self.recall is not None:
                self.unflushed += 1
                if self.unflushed >= self.flush_tokens:
                    self.flush()
        elif self.mirror is not None:
            self.mirror.commit(n)
        self._positions = self._slot_index = None
        self._new = {}
        self._block_tables = self._block_valid = self._read_index = None

    def abort_step(self) -> None:
        self._decoding = False
        self.paged.abort_append(self.seq_id)
        if self.mirror is not None:
            self.mirror.rollback()
        self._positions = self._slot_index = None
        self._new = {}

    # ---- transformers hooks ------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the step's keys/values ``[1, H_kv, T, D]`` (post-RoPE) in the reserved slots."""
        if self._decoding:
            h, d = key_states.shape[1], key_states.shape[3]
            self.paged.write_one(
                self.seq_id,
                layer_idx,
                key_states.view(1, h, d),
                value_states.view(1, h, d),
                self._step_slot,
                self._step_pos32,
            )
            return key_states, value_states
        if self.prefill_runner is not None:
            return self.prefill_runner.update(key_states, value_states, layer_idx)
        if self._positions is None:
            raise RuntimeError("FlashMemCache.update outside begin_step/end_step")
        if key_states.shape[0] != 1:
            raise ValueError(f"FlashMemCache holds one sequence; got batch size {key_states.shape[0]}")
        k = key_states[0].transpose(0, 1)
        v = value_states[0].transpose(0, 1)
        self.paged.write(self.seq_id, layer_idx, k, v, self._positions, slot_index=self._slot_index)
        if self.mirror is not None:
            self.mirror.append(layer_idx, k, v)
        if self.recall is not None:
            self.recall.on_keys(layer_idx, k)
        if self._fresh:
            self._new[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Attention of ``query`` ``[1, H_q, T, D]`` over the sequence's slots -> ``[1, T, H_q, D]``."""
        if self._decoding:
            return self._attend_decode(layer_idx, query, scaling)
        num_q = query.shape[2]
        pool = self.paged.pool
        if self.recall is not None:
            self.recall.on_query(layer_idx, query[0, :, -1, :])
        if num_q == 1:
            attention = (
                paged_decode_attention
                if self.attention_backend == "triton"
                else reference_paged_decode_attention
            )
            out, _ = attention(
                query[:, :, 0, :],
                pool.keys[layer_idx],
                pool.values[layer_idx],
                self._block_tables,
                self._block_valid,
                slot_positions=pool.positions[layer_idx],
                scale=scaling,
            )
            return out.unsqueeze(1)
        if self._fresh:
            k, v = self._new[layer_idx]
            return self._attend_new_tokens(query, k.to(query.dtype), v.to(query.dtype), scaling)
        k, v, pos = self.paged.gather(self.seq_id, layer_idx, slot_index=self._read_index)
        # scratch of this call: the gathered K/V/positions and one query tile's bool mask
        h_q, slots = query.shape[1], k.shape[0]
        mask = h_q * self._query_tile(num_q, h_q, slots) * slots
        self._note_scratch(sum(t.numel() * t.element_size() for t in (k, v, pos)) + mask)
        return self._attend_gathered(query, k, v, pos, scaling)

    def _attend_decode(self, layer_idx: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """One token's attention ``query [1, H_q, 1, D] -> [1, 1, H_q, D]`` over the static tables.

        triton: the paged decode kernel. torch: the table's slots gathered once per layer (K, V and
        positions, ``[M * bs, ...]``), masked where a slot is past its entry's valid count or holds
        position -1, and one SDPA call with the query heads grouped per KV head (no K/V copies per
        query head)."""
        if self.note_query and self.recall is not None:
            self.recall.on_query(layer_idx, query[0, :, 0, :])
        if self.attention_backend == "triton":
            pool = self.paged.pool
            out, _ = paged_decode_attention(
                query[:, :, 0, :],
                pool.keys[layer_idx],
                pool.values[layer_idx],
                self._table,
                self._valid,
                slot_positions=pool.positions[layer_idx],
                scale=scaling,
            )
            return out.unsqueeze(1)
        h_q, d = query.shape[1], query.shape[3]
        k_flat, v_flat, p_flat = self.paged.flat_views(layer_idx)
        index = self._gather_index
        n = index.shape[0]
        h_kv = k_flat.shape[1]
        # slots attended: within an entry's valid count (precomputed per table) and holding a position
        # >= 0 for that KV head; the others are zeroed (a slot never written may hold any bits) and
        # get an additive -inf
        ok = (p_flat.index_select(0, index) >= 0) & self._gather_mask  # [N, H_kv]
        zero, neg_inf = self._gather_fill
        ok3 = ok.unsqueeze(-1)
        k = torch.where(ok3, k_flat.index_select(0, index), zero)  # [N, H_kv, D]
        v = torch.where(ok3, v_flat.index_select(0, index), zero)
        bias = torch.where(ok, zero, neg_inf)  # [N, H_kv]
        # [1, H_kv, N, D] / [1, H_kv, 1, N] views of the gathered rows (one op each, no copies)
        kk = k.as_strided((1, h_kv, n, d), (n * h_kv * d, d, h_kv * d, 1))
        vv = v.as_strided((1, h_kv, n, d), (n * h_kv * d, d, h_kv * d, 1))
        mask = bias.as_strided((1, h_kv, 1, n), (n * h_kv, 1, n * h_kv, h_kv))
        q = query.view(1, h_kv, h_q // h_kv, d)  # [1, H_kv, G, D]: query head h reads KV head h // G
        out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=scaling)  # [1, H_kv, G, D]
        return out.view(1, 1, h_q, d)

    def _query_tile(self, num_queries: int, num_q_heads: int, num_keys: int) -> int:
        """Queries per SDPA call: ``num_q_heads x tile x num_keys <= attend_scratch_elements`` (at least 1)."""
        return max(1, min(num_queries, self.attend_scratch_elements // max(1, num_q_heads * num_keys)))

    def _attend_new_tokens(
        self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float | None
    ) -> torch.Tensor:
        """First chunk of an empty cache: causal attention over the new tokens only.

        query: [1, H_q, T, D]; k, v: [1, H_kv, T, D] (GQA by ``enable_gqa``, no per-head copies)
        -> [1, T, H_q, D]. Query tiles after the first use a lower-right causal mask (never a tensor)."""
        num_q, h_q = query.shape[2], query.shape[1]
        tile = self._query_tile(num_q, h_q, num_q)
        if tile >= num_q:
            out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling, enable_gqa=True)
            return out.transpose(1, 2)
        out = query.new_empty(1, num_q, h_q, query.shape[-1])
        for a in range(0, num_q, tile):
            b = min(num_q, a + tile)
            kk, vv = k[:, :, :b], v[:, :, :b]
            if a == 0:
                part = F.scaled_dot_product_attention(
                    query[:, :, :b], kk, vv, is_causal=True, scale=scaling, enable_gqa=True
                )
            else:
                part = F.scaled_dot_product_attention(
                    query[:, :, a:b],
                    kk,
                    vv,
                    attn_mask=causal_lower_right(b - a, b),
                    scale=scaling,
                    enable_gqa=True,
                )
            out[:, a:b] = part.transpose(1, 2)
        return out

    def _attend_gathered(
        self,
        query: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pos: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        """Multi-token attention over gathered slots whose positions differ per KV head (compacted and
        recalled slots): slot ``s`` of KV head ``g`` is visible to a query at position ``p`` when
        ``0 <= pos[s, g] <= p``.

        query: [1, H_q, T, D]; k, v: [S, H_kv, D]; pos: [S, H_kv] -> [1, T, H_q, D].

        The queries of each KV head are grouped, ``[1, H_kv, G x t, D]`` (query head ``h = g G + j`` reads
        KV head ``g``), so K/V enter SDPA once per KV head, as views (no per-head copies), and the mask
        ``[1, H_kv, G x t, S]`` follows each KV head's positions. Queries go in tiles of ``t`` tokens with
        ``H_q x t x S <= attend_scratch_elements`` (``t >= 1``): the scratch of one call is a bool mask of
        ``H_q x t x S`` elements plus ``[H_kv, t, S]`` for its construction (a non-fused SDPA backend adds
        fp32 logits and a float mask of the same ``H_q x t x S`` elements), i.e. at most
        ``max(attend_scratch_elements, H_q x S)`` elements per tensor, never ``H_q x T x S``."""
        num_q, h_q, d = query.shape[2], query.shape[1], query.shape[3]
        h_kv = k.shape[1]
        group = h_q // h_kv
        kk = k.permute(1, 0, 2).unsqueeze(0).to(query.dtype)  # [1, H_kv, S, D]
        vv = v.permute(1, 0, 2).unsqueeze(0).to(query.dtype)
        kpos = pos.T  # [H_kv, S]
        qpos = self._positions.to(pos.device)
        num_keys = kpos.shape[1]
        tile = self._query_tile(num_q, h_q, num_keys)
        out = query.new_empty(1, num_q, h_q, d)
        for a in range(0, num_q, tile):
            b = min(num_q, a + tile)
            t = b - a
            q = query[0, :, a:b].reshape(h_kv, group * t, d).unsqueeze(0)  # [1, H_kv, G*t, D]
            allowed = (kpos[:, None, :] <= qpos[a:b][None, :, None]) & (kpos[:, None, :] >= 0)  # [H_kv, t, S]
            mask = allowed[:, None].expand(h_kv, group, t, num_keys).reshape(1, h_kv, group * t, num_keys)
            part = F.scaled_dot_product_attention(
                q, kk, vv, attn_mask=mask, scale=scaling
            )  # [1, H_kv, G*t, D]
            out[0, a:b] = part[0].reshape(h_q, t, d).transpose(0, 1)
        return out
