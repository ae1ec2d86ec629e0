"""One recall window in which every layer and KV head holds chunks of its own choosing.

The pool's block ids address the same block in every layer, and each slot stores K, V and its true
position per KV head (``keys[l]``, ``values[l]`` ``[num_blocks, block_size, H_kv, D]``, ``positions[l]``
``[num_blocks, block_size, H_kv]``). So the window's blocks can hold, in layer ``l`` and head ``h``,
the chunk that this layer and head asked for: one block table serves every layer, and the decode
kernel reads each slot's own position, so nothing else changes for it.

    window = HeadRecallWindow(mirror, pool, max_slots=k)
    window.load(assign, working)        # assign [L, H_kv, k] chunk ids (-1: empty slot)
    blocks, valid = window.resident_blocks()   # what the decode kernel reads (its table's tail)
    window.refresh_positions(working)   # after a compaction changed the working tokens

Slot ``j`` of layer ``l``, head ``h`` holds the K/V rows of chunk ``assign[l, h, j]`` at head ``h``; its
positions are the true ones, or -1 where that head's working set already holds the token (it is
attended there; see :func:`dedupe_heads`) or the slot is empty. ``working`` is ``[L, n, H_kv]`` (or
``[1, n, H_kv]`` when every layer keeps the same tokens) int positions, -1 for an empty slot.

Each load copies every slot of every layer (no reuse of a chunk a slot already held): one
``non_blocking`` copy of K and one of V per layer, issued on the current stream, so the kernels queued
after it read the new rows without any wait. Traffic is counted by the mirror
(:meth:`HostMirror.rows_to_device`) and, for the positions, here.
"""

from __future__ import annotations

import torch

from ..kernels.checks import device_tensor_bytes
from .block_pool import BlockPool
from .host_mirror import HostMirror


def dedupe_heads(positions: torch.Tensor, working: torch.Tensor) -> torch.Tensor:
    """``positions`` ``[L, R, H]`` with -1 wherever ``working`` (``[L or 1, n, H]``, -1 = empty) holds
    the same position for that layer and head. Sorted search, batched over layers and heads; runs
    where the tensors live (no host round trip on a GPU)."""
    if positions.dim() != 3 or working.dim() != 3:
        raise ValueError(
            f"positions must be [L, R, H] and working [L or 1, n, H], got {tuple(positions.shape)} and "
            f"{tuple(working.shape)}"
        )
    L, _, H = positions.shape
    if working.shape[2] != H or working.shape[0] not in (1, L):
        raise ValueError(f"working {tuple(working.shape)} does not fit positions {tuple(positions.shape)}")
    pos = positions.to(torch.int64).transpose(1, 2)  # [L, H, R]
    if working.shape[1] == 0:
        return positions.to(torch.int32)
    ws = working.to(device=pos.device, dtype=torch.int64).transpose(1, 2).expand(L, H, -1)
    ws = torch.sort(ws, dim=-1).values.contiguous()  # [L, H, n]
    idx = torch.searchsorted(ws, pos.contiguous()).clamp_max(ws.shape[-1] - 1)
    dup = (torch.gather(ws, -1, idx) == pos) & (pos >= 0)
    out = torch.where(dup, torch.full_like(pos, -1), pos)
    return out.transpose(1, 2).to(torch.int32)


class HeadRecallWindow:
    """Recall slots whose chunk is chosen per layer and KV head (see the module docstring).

    Args:
        mirror: the sequence's host mirror (every token's K/V).
        pool: the device block pool shared with the working cache.
        max_slots: most chunks one layer and head may hold (the chunk budget); blocks are allocated
            on the first load that needs them and kept for the run.
    """

    def __init__(self, mirror: HostMirror, pool: BlockPool, *, max_slots: int) -> None:
        if mirror.chunk_size % pool.block_size:
            raise ValueError(
                f"chunk_size ({mirror.chunk_size}) must be a multiple of block_size ({pool.block_size})"
            )
        if (mirror.num_layers, mirror.num_kv_heads, mirror.head_dim) != (
            pool.num_layers,
            pool.num_kv_heads,
            pool.head_dim,
        ):
            raise ValueError("host mirror and pool disagree on (layers, H_kv, D)")
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.mirror = mirror
        self.pool = pool
        self.max_slots = max_slots
        self.blocks_per_chunk = mirror.chunk_size // pool.block_size
        self.blocks: list[int] = []  # slot j owns blocks[j * blocks_per_chunk : (j + 1) * blocks_per_chunk]
        self.assign: torch.Tensor | None = None  # [L, H_kv, slots] int64 on the pool's device, -1 = empty
        self.version = 0
        self._slots_used = 0
        self._table: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.loads = 0
        self.chunks_loaded = 0  # (layer, head, slot) entries copied
        self.recall_h2d_bytes = 0  # K/V of the loads (the mirror counts them among its h2d bytes too)
        self.meta_h2d_bytes = 0
        self.meta_d2h_bytes = 0
        self.device_staging_bytes_since_mark = 0  # the K/V of one layer's copy, live inside the load

    @property
    def chunk_size(self) -> int:
        return self.mirror.chunk_size

    @property
    def num_slots(self) -> int:
        return len(self.blocks) // self.blocks_per_chunk

    def __len__(self) -> int:
        """Slots holding a chunk in at least one layer and head."""
        return 0 if self.assign is None else self._slots_used

    def _check_assign(self, assign: torch.Tensor) -> torch.Tensor:
        m = self.mirror
        assign = torch.as_tensor(assign, dtype=torch.int64, device="cpu")
        if assign.dim() != 3 or assign.shape[:2] != (m.num_layers, m.num_kv_heads):
            raise ValueError(
                f"assign must be [{m.num_layers}, {m.num_kv_heads}, k] chunk ids, got {tuple(assign.shape)}"
            )
        if assign.shape[2] > self.max_slots:
            raise ValueError(f"assign holds {assign.shape[2]} slots, the window at most {self.max_slots}")
        real = assign[assign >= 0]
        if real.numel() and int(real.max()) >= m.num_tokens // m.chunk_size:
            raise ValueError(
                f"chunk ids must name closed chunks of the mirror (< {m.num_tokens // m.chunk_size}), "
                f"got {int(real.max())}"
            )
        if (assign < -1).any():
            raise ValueError("chunk ids must be >= 0 (-1 for an empty slot)")
        return assign

    def _grow(self, slots: int) -> None:
        if slots > self.num_slots:
            self.blocks += self.pool.allocate((slots - self.num_slots) * self.blocks_per_chunk)
            self.version += 1

    def _slot_index(self, device) -> torch.Tensor:
        bs = self.pool.block_size
        b = torch.tensor(self.blocks, dtype=torch.int64, device=device)
        return (b[:, None] * bs + torch.arange(bs, device=device)[None]).reshape(-1)  # [slots * C]

    def load(self, assign: torch.Tensor, working: torch.Tensor) -> int:
        """Make slot ``j`` of layer ``l``, head ``h`` hold chunk ``assign[l, h, j]``; returns the number
        of (layer, head, slot) chunks copied. Errors (state unchanged) on a malformed ``assign`` or when
        the pool cannot give the blocks."""
        assign = self._check_assign(assign)
        m, pool = self.mirror, self.pool
        L, H, k = assign.shape
        self._grow(k)
        full = torch.full((L, H, self.num_slots), -1, dtype=torch.int64)
        full[:, :, :k] = assign
        C = self.chunk_size
        offs = torch.arange(C)
        rows = (full.clamp_min(0)[..., None] * C + offs).reshape(L, H, -1).transpose(1, 2)  # [L, R, H]
        empty = (full < 0)[..., None].expand(L, H, self.num_slots, C).reshape(L, H, -1).transpose(1, 2)
        device = pool.device
        slots = self._slot_index(device)
        flat = pool.num_blocks * pool.block_size
        if (full >= 0).any():  # an empty slot reads chunk 0's rows (a closed chunk exists): masked below
            for layer in range(L):
                k_rows, v_rows = m.rows_to_device(layer, rows[layer].contiguous(), device)  # [R, H, D]
                nbytes = 2 * k_rows.numel() * k_rows.element_size()
                self.recall_h2d_bytes += nbytes
                self.device_staging_bytes_since_mark = max(self.device_staging_bytes_since_mark, nbytes)
                pool.keys[layer].view(flat, H, -1).index_copy_(0, slots, k_rows)
                pool.values[layer].view(flat, H, -1).index_copy_(0, slots, v_rows)
        self.assign = full.to(device)
        self._slots_used = int((full >= 0).flatten(0, 1).any(0).sum())  # host side, no read-back
        self.meta_h2d_bytes += full.numel() * full.element_size()
        self._write_positions(torch.where(empty, -1, rows), working)
        self.loads += 1
        self.chunks_loaded += int((assign >= 0).sum())
        return int((assign >= 0).sum())

    def _write_positions(self, rows: torch.Tensor, working: torch.Tensor) -> None:
        """rows ``[L, R, H]`` true positions (-1 empty) -> deduplicated against ``working`` into the
        pool's position tensors of the window's blocks."""
        pool = self.pool
        device = pool.device
        if rows.device.type != device.type:
            self.meta_h2d_bytes += rows.numel() * 4  # made on the host from the assignment
        pos = dedupe_heads(rows.to(device), working)
        slots = self._slot_index(device)
        flat = pool.num_blocks * pool.block_size
        for layer in range(pool.num_layers):
            pool.positions[layer].view(flat, pool.num_kv_heads).index_copy_(0, slots, pos[layer])

    def refresh_positions(self, working: torch.Tensor) -> None:
        """Rewrite every slot's duplicate mask against the working tokens now resident (``[L or 1, n,
        H_kv]``), after a compaction changed them."""
        if self.assign is None:
            return
        L, H, S = self.assign.shape
        C = self.chunk_size
        offs = torch.arange(C, device=self.assign.device)
        rows = (self.assign.clamp_min(0)[..., None] * C + offs).reshape(L, H, -1)
        empty = (self.assign < 0)[..., None].expand(L, H, S, C).reshape(L, H, -1)
        self._write_positions(torch.where(empty, -1, rows).transpose(1, 2), working)

    # ---- what the kernel reads ---------------------------------------------------------------------
    def resident_block_lists(self) -> tuple[int, list[int], list[int]]:
        """``(version, block_ids, valid)`` as lists: every block of the window, each full (a slot with
        nothing for some layer or head carries position -1 there)."""
        return self.version, list(self.blocks), [self.pool.block_size] * len(self.blocks)

    def resident_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``block_ids [n]`` and ``valid [n]`` int32 on the pool's device (cached per version)."""
        if self._table is not None and self._table[0] == self.version:
            return self._table[1], self._table[2]
        _, blocks, valid = self.resident_block_lists()
        dev = self.pool.device
        out = (
            torch.tensor(blocks, dtype=torch.int32, device=dev),
            torch.tensor(valid, dtype=torch.int32, device=dev),
        )
        self.meta_h2d_bytes += 2 * 4 * len(blocks)
        self._table = (self.version, *out)
        return out

    def take_staging_mark(self) -> int:
        """The largest device copy of one layer's K/V rows since the last call (it lived inside a
        load); resets the mark."""
        staged = self.device_staging_bytes_since_mark
        self.device_staging_bytes_since_mark = 0
        return staged

    def device_bytes(self) -> int:
        """Bytes held outside the pool: the assignment, the cached block table and valid counts."""
        table = self._table[1:] if self._table is not None else ()
        return device_tensor_bytes([self.assign, *table], self.pool.device)

    # ---- the OffloadManager surface the decode loop uses ---------------------------------------------
    pending_prefetch = None

    def cancel_prefetch(self) -> None:
        """Nothing to cancel: this window never prefetches."""

    def close(self) -> None:
        """Give the window's blocks back to the pool."""
        if self.blocks:
            self.pool.free(self.blocks)
        self.blocks, self.assign, self._table = [], None, None
        self.version += 1

    def traffic(self) -> dict:
        """Cumulative bytes: the mirror's (appends, exact-prefill rows, this window's K/V loads) and the
        window's tables and positions."""
        mirror = self.mirror.traffic()
        return {
            "h2d_bytes": mirror["h2d_bytes"] + self.meta_h2d_bytes,
            "d2h_bytes": mirror["d2h_bytes"] + self.meta_d2h_bytes,
            "mirror_d2h_bytes": mirror["d2h_bytes"],
            "mirror_h2d_bytes": mirror["h2d_bytes"] - self.recall_h2d_bytes,
            "recall_h2d_bytes": self.recall_h2d_bytes,
            "meta_h2d_bytes": self.meta_h2d_bytes,
            "meta_d2h_bytes": self.meta_d2h_bytes,
        }

    def stats(self, *, sync: bool = False) -> dict:
        """The mirror's counters, then the window's: ``h2d_bytes`` (the K/V of the loads; the mirror's
        ``mirror_h2d_bytes`` then counts the exact prefill's rows only), ``chunks_loaded`` ((layer,
        head, slot) chunks copied), ``window_loads``, the window's blocks; no prefetch, so no stalls
        to time (each load is queued before the kernels that read it)."""
        out = dict(self.mirror.stats())
        out.update(
            recall_mode="per_layer_per_head",
            h2d_bytes=self.recall_h2d_bytes,
            mirror_h2d_bytes=out["mirror_h2d_bytes"] - self.recall_h2d_bytes,
            meta_h2d_bytes=self.meta_h2d_bytes,
            meta_d2h_bytes=self.meta_d2h_bytes,
            window_loads=self.loads,
            chunks_loaded=self.chunks_loaded,
            recall_blocks=len(self.blocks),
            recall_device_kv_bytes=len(self.blocks) * self.pool.kv_block_bytes,
            waits=0,
            stalls=0,
            stall_time_s=0.0,
        )
        return out
