"""Paged device KV cache: block tables and host-side length counters over a :class:`BlockPool`.

A sequence's slots are numbered ``0 .. num_slots - 1``; slot ``s`` lives in block
``block_table[s // block_size]`` at offset ``s % block_size``. Slots are always a dense prefix
(compaction slides survivors forward), so only the last block of a sequence can be partial.

Two counters per sequence, kept on the host and never read back from tensors. Positions come from
one and slot counts from the other, and they part once compaction drops tokens
(docs/architecture.md, invariant 4):
    logical_length: tokens the sequence has seen (the next token's position),
    num_slots:      slots occupied on the device (after compaction, <= logical_length).

Appending is done in three steps so that all layers of one forward pass write the same slots:
``begin_append(seq, n)`` reserves slots and blocks, ``write(seq, layer, k, v, positions)`` once per
layer, ``end_append(seq)`` commits the counters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..kernels.checks import device_tensor_bytes
from .block_pool import BlockPool, id_runs


@dataclass
class SequenceState:
    """Host-side bookkeeping of one sequence. ``block_table`` lists block ids in slot order."""

    block_table: list[int] = field(default_factory=list)
    num_slots: int = 0
    logical_length: int = 0
    pending: int = 0
    pending_written: set[int] = field(default_factory=set)
    table_tensor: torch.Tensor | None = None
    table_version: int = 0  # bumped whenever block_table changes


class PagedKVCache:
    """Per-sequence block tables over a shared pool. Shapes: see :mod:`flashmem.offload.block_pool`."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self._seqs: dict[int, SequenceState] = {}
        self._next_id = 0
        self._flat: list[tuple | None] = [None] * pool.num_layers

    # ---- sequences ---------------------------------------------------------------------------
    def add_sequence(self) -> int:
        seq_id = self._next_id
        self._next_id += 1
        self._seqs[seq_id] = SequenceState()
        return seq_id

    def free_sequence(self, seq_id: int) -> None:
        state = self._state(seq_id)
        self.pool.free(state.block_table)
        del self._seqs[seq_id]

    def _state(self, seq_id: int) -> SequenceState:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence id {seq_id}") from None

    @property
    def sequences(self) -> list[int]:
        return list(self._seqs)

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def num_slots(self, seq_id: int) -> int:
        return self._state(seq_id).num_slots

    def logical_length(self, seq_id: int) -> int:
        return self._state(seq_id).logical_length

    def pending(self, seq_id: int) -> int:
        """Slots reserved by :meth:`begin_append` and not yet committed (0 between steps)."""
        return self._state(seq_id).pending

    def block_table(self, seq_id: int) -> list[int]:
        """Block ids of the sequence in slot order (a copy)."""
        return list(self._state(seq_id).block_table)

    def device_bytes(self) -> int:
        """Bytes of the cached block-table tensors on the pool's device (the K/V live in the pool)."""
        return device_tensor_bytes((st.table_tensor for st in self._seqs.values()), self.pool.device)

    def block_ids(self, seq_id: int) -> tuple[int, list[int]]:
        """``(version, block ids in slot order)``: the live list (not a copy; do not modify it) and a
        counter that changes whenever it does."""
        state = self._state(seq_id)
        return state.table_version, state.block_table

    def slot_of(self, seq_id: int, slot: int) -> int:
        """Flat pool slot index (``block_id * block_size + offset``) of the sequence's slot ``slot``."""
        bs = self.block_size
        return self._state(seq_id).block_table[slot // bs] * bs + slot % bs

    def flat_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``[num_blocks * block_size, H_kv, D]`` and positions ``[num_blocks * block_size,
        H_kv]`` of ``layer`` as flat-slot views of the pool (made once per pool size, not per call)."""
        pool = self.pool
        cached = self._flat[layer]
        if cached is None or cached[0] is not pool.keys[layer]:
            flat = pool.num_blocks * pool.block_size
            views = (
                pool.keys[layer].view(flat, pool.num_kv_heads, pool.head_dim),
                pool.values[layer].view(flat, pool.num_kv_heads, pool.head_dim),
                pool.positions[layer].view(flat, pool.num_kv_heads),
            )
            cached = self._flat[layer] = (pool.keys[layer], *views)
        return cached[1], cached[2], cached[3]

    def write_one(self, seq_id: int, layer: int, keys: torch.Tensor, values: torch.Tensor, slot, positions):
        """The decode step's write of one layer: ``keys, values [1, H_kv, D]`` (the pool's dtype) at the
        flat slot ``slot`` (``[1]`` int64 on the pool's device) with ``positions`` ``[1, H_kv]`` int32;
        no checks beyond :meth:`write`'s contract (three index copies, nothing else)."""
        k_flat, v_flat, p_flat = self.flat_views(layer)
        k_flat.index_copy_(0, slot, keys)
        v_flat.index_copy_(0, slot, values)
        p_flat.index_copy_(0, slot, positions)
        self._seqs[seq_id].pending_written.add(layer)

    def mark_written(self, seq_id: int) -> None:
        """Record that every layer wrote the pending slots (a replayed CUDA graph wrote them; no
        Python ran per layer)."""
        self._state(seq_id).pending_written = set(range(self.pool.num_layers))

    def block_table_tensor(self, seq_id: int) -> torch.Tensor:
        """``[num_blocks_of_seq]`` int32 on the pool's device; cached until the table changes."""
        state = self._state(seq_id)
        if state.table_tensor is None:  # from ranges of consecutive ids: no tensor from Python data
            device = self.pool.device
            parts = [
                torch.arange(a, b, dtype=torch.int32, device=device) for a, b in id_runs(state.block_table)
            ]
            state.table_tensor = (
                torch.cat(parts)
                if len(parts) > 1
                else parts[0]
                if parts
                else torch.empty(0, dtype=torch.int32, device=device)
            )
        return state.table_tensor

    def blocks_needed(self, num_slots: int) -> int:
        return math.ceil(num_slots / self.block_size)

    # ---- append ------------------------------------------------------------------------------
    def begin_append(self, seq_id: int, n: int) -> None:
        """Reserve ``n`` slots (allocating blocks as needed) for the next forward pass."""
        state = self._state(seq_id)
        if state.pending:
            raise RuntimeError(f"sequence {seq_id} already has {state.pending} slots pending")
        if n < 1:
            raise ValueError(f"append needs at least one token, got {n}")
        extra = self.blocks_needed(state.num_slots + n) - len(state.block_table)
        if extra > 0:
            state.block_table.extend(self.pool.allocate(extra))
            state.table_tensor = None
            state.table_version += 1
        state.pending = n
        state.pending_written = set()

    def pending_slot_indices(self, seq_id: int) -> torch.Tensor:
        """Flat pool slot indices (``block_id * block_size + offset``) of the pending slots, ``[n]`` int64."""
        state = self._state(seq_id)
        slots = torch.arange(state.num_slots, state.num_slots + state.pending, device=self.pool.device)
        table = self.block_table_tensor(seq_id).long()
        return table[slots // self.block_size] * self.block_size + slots % self.block_size

    def write(
        self,
        seq_id: int,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        slot_index: torch.Tensor | None = None,
    ) -> None:
        """Write the pending slots of one layer.

        keys, values: [n, H_kv, D]; positions: [n] or [n, H_kv] (int); slot_index: optional
        precomputed :meth:`pending_slot_indices` (shared by all layers of a step).
        """
        state = self._state(seq_id)
        n = state.pending
        pool = self.pool
        expected = (n, pool.num_kv_heads, pool.head_dim)
        if tuple(keys.shape) != expected or tuple(values.shape) != expected:
            raise ValueError(
                f"write expects keys/values of shape {expected}, got {tuple(keys.shape)} / {tuple(values.shape)}"
            )
        if not 0 <= layer < pool.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {pool.num_layers})")
        if positions.dim() == 1:
            positions = positions[:, None].expand(n, pool.num_kv_heads)
        if tuple(positions.shape) != (n, pool.num_kv_heads):
            raise ValueError(f"positions must be [n] or [n, H_kv], got {tuple(positions.shape)}")
        if slot_index is None:
            slot_index = self.pending_slot_indices(seq_id)
        flat = pool.num_blocks * pool.block_size
        pool.keys[layer].view(flat, pool.num_kv_heads, pool.head_dim).index_copy_(
            0, slot_index, keys.to(pool.dtype)
        )
        pool.values[layer].view(flat, pool.num_kv_heads, pool.head_dim).index_copy_(
            0, slot_index, values.to(pool.dtype)
        )
        pool.positions[layer].view(flat, pool.num_kv_heads).index_copy_(
            0, slot_index, positions.to(torch.int32)
        )
        state.pending_written.add(layer)

    def end_append(self, seq_id: int, logical_tokens: int | None = None) -> None:
        """Commit the pending slots. ``logical_tokens`` (default: the slot count) advances the
        logical length; it differs from the slot count only when tokens were seen but not stored."""
        state = self._state(seq_id)
        if len(state.pending_written) != self.pool.num_layers:
            missing = sorted(set(range(self.pool.num_layers)) - state.pending_written)
            raise RuntimeError(
                f"end_append before every layer wrote its slots (missing layers {missing[:8]})"
            )
        state.num_slots += state.pending
        state.logical_length += state.pending if logical_tokens is None else logical_tokens
        state.pending = 0
        state.pending_written = set()

    def abort_append(self, seq_id: int) -> None:
        """Drop a reservation (e.g. after an error mid-forward) and free blocks it added."""
        state = self._state(seq_id)
        keep = self.blocks_needed(state.num_slots)
        extra = state.block_table[keep:]
        if extra:
            self.pool.free(extra)
            del state.block_table[keep:]
            state.table_tensor = None
            state.table_version += 1
        state.pending = 0
        state.pending_written = set()

    # ---- read --------------------------------------------------------------------------------
    def slot_indices(self, seq_id: int, include_pending: bool = False) -> torch.Tensor:
        """Flat pool slot indices of the sequence's occupied slots in slot order, ``[S]`` int64."""
        state = self._state(seq_id)
        n = state.num_slots + (state.pending if include_pending else 0)
        slots = torch.arange(n, device=self.pool.device)
        table = self.block_table_tensor(seq_id).long()
        return table[slots // self.block_size] * self.block_size + slots % self.block_size

    def positions(self, seq_id: int, layers: range | None = None) -> torch.Tensor:
        """True positions ``[len(layers), S, H_kv]`` of the sequence's occupied slots in slot order, for
        ``layers`` (default: every layer); where the tensors live, no K/V read."""
        pool = self.pool
        slot_index = self.slot_indices(seq_id)
        flat = pool.num_blocks * pool.block_size
        layers = range(pool.num_layers) if layers is None else layers
        return torch.stack(
            [
                pool.positions[layer].view(flat, pool.num_kv_heads).index_select(0, slot_index)
                for layer in layers
            ]
        )

    def gather(
        self, seq_id: int, layer: int, include_pending: bool = False, slot_index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``[S, H_kv, D]`` and positions ``[S, H_kv]`` of the sequence in slot order."""
        pool = self.pool
        if slot_index is None:
            slot_index = self.slot_indices(seq_id, include_pending)
        flat = pool.num_blocks * pool.block_size
        k = pool.keys[layer].view(flat, pool.num_kv_heads, pool.head_dim).index_select(0, slot_index)
        v = pool.values[layer].view(flat, pool.num_kv_heads, pool.head_dim).index_select(0, slot_index)
        p = pool.positions[layer].view(flat, pool.num_kv_heads).index_select(0, slot_index)
        return k, v, p

    # ---- shrink ------------------------------------------------------------------------------
    def truncate(self, seq_id: int, num_slots: int) -> int:
        """Keep the first ``num_slots`` slots; return the emptied tail blocks to the pool.

        Returns the number of blocks freed (exactly ``len(table) - ceil(num_slots / block_size)``).
        Slots past ``num_slots`` in the kept last block get position -1.
        """
        state = self._state(seq_id)
        if state.pending:
            raise RuntimeError("cannot truncate while an append is pending")
        if not 0 <= num_slots <= state.num_slots:
            raise ValueError(f"truncate to {num_slots} slots, sequence has {state.num_slots}")
        keep = self.blocks_needed(num_slots)
        tail = state.block_table[keep:]
        if num_slots % self.block_size:
            last = state.block_table[keep - 1]
            for pos in self.pool.positions:
                pos[last, num_slots % self.block_size :] = -1
        if tail:
            self.pool.free(tail)
            del state.block_table[keep:]
            state.table_tensor = None
            state.table_version += 1
        state.num_slots = num_slots
        return len(tail)
