"""Fixed-size pool of device KV blocks shared by every layer, with a free list and exact accounting.

One block id addresses the same block in every layer's tensors (as in vLLM): a sequence has one
block table, and the physical footprint is ``blocks_in_use * kv_block_bytes``.

Layout, per layer ``l``:
    keys[l], values[l]:  [num_blocks, block_size, H_kv, D]
    positions[l]:        [num_blocks, block_size, H_kv]  int32, true token position of each slot
                         (-1 in a slot that holds nothing)
"""

from __future__ import annotations

from collections import deque

import torch

from ..kernels.checks import device_tensor_bytes


def id_runs(ids: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive ints in ``ids`` (in the given order) as ``[start, stop)`` pairs."""
    runs: list[tuple[int, int]] = []
    for i in ids:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


class BlockPoolExhausted(RuntimeError):
    """Raised when an allocation asks for more blocks than the pool has free."""


class BlockPool:
    """Preallocated K/V/position storage for ``num_blocks`` blocks and the free list over them.

    Counters (``blocks_in_use``, ``peak_blocks_in_use``, ``blocks_allocated_total``,
    ``blocks_freed_total``) live on the host and are updated by :meth:`allocate` and
    :meth:`free` only; nothing is ever read back from device tensors.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        block_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        for name, value in (
            ("num_layers", num_layers),
            ("num_blocks", num_blocks),
            ("num_kv_heads", num_kv_heads),
            ("head_dim", head_dim),
            ("block_size", block_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockPool.{name} must be a positive int, got {value!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"BlockPool dtype must be a floating type, got {dtype}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.positions = [
            torch.full(shape[:3], -1, dtype=torch.int32, device=self.device) for _ in range(num_layers)
        ]
        self._free: deque[int] = deque(range(num_blocks))
        self._in_use: set[int] = set()
        self._reserved_bytes = self._count_reserved_bytes()
        self.peak_blocks_in_use = 0
        self.blocks_allocated_total = 0
        self.blocks_freed_total = 0

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def kv_bytes_per_token(self) -> int:
        """K + V bytes of one token over all layers and KV heads (what a dense cache stores)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def kv_block_bytes(self) -> int:
        """K + V bytes of one block over all layers."""
        return self.block_size * self.kv_bytes_per_token

    @property
    def position_block_bytes(self) -> int:
        """Bytes of the int32 position metadata of one block over all layers."""
        return self.num_layers * self.block_size * self.num_kv_heads * 4

    @property
    def capacity_bytes(self) -> int:
        """K + V bytes reserved by the whole pool (allocated or not)."""
        return self.num_blocks * self.kv_block_bytes

    @property
    def reserved_bytes(self) -> int:
        """Every byte the pool's tensors hold on its device: K, V and the int32 slot positions of all
        ``num_blocks`` blocks, in use or free (counted from the tensors when they are made or grown)."""
        return self._reserved_bytes

    def _count_reserved_bytes(self) -> int:
        return device_tensor_bytes([*self.keys, *self.values, *self.positions], self.device)

    # ---- allocation --------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def blocks_in_use(self) -> int:
        return len(self._in_use)

    @property
    def device_kv_bytes(self) -> int:
        return self.blocks_in_use * self.kv_block_bytes

    @property
    def peak_device_kv_bytes(self) -> int:
        return self.peak_blocks_in_use * self.kv_block_bytes

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the free list (all or nothing)."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise BlockPoolExhausted(
                f"block pool exhausted: asked for {n} blocks, {len(self._free)} of {self.num_blocks} free "
                "(BlockPool(num_blocks=...) or BlockPool.grow() sets the size)"
            )
        ids = [self._free.popleft() for _ in range(n)]
        self._in_use.update(ids)
        self.blocks_allocated_total += n
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, len(self._in_use))
        return ids

    def grow(self, num_blocks: int) -> None:
        """Enlarge the pool to ``num_blocks`` blocks. Every block keeps its id and contents; the new
        blocks join the free list (positions -1). One layer's tensors are replaced at a time, so the
        transient extra memory is one layer's old K/V/positions. On CUDA the device is synchronized
        first: a copy in flight on another stream (a recall transfer) must land before its destination
        moves. Readers must look up ``keys[l]`` / ``values[l]`` / ``positions[l]`` anew after a grow."""
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < self.num_blocks:
            raise ValueError(
                f"BlockPool.grow needs an int >= num_blocks ({self.num_blocks}), got {num_blocks!r}"
            )
        old = self.num_blocks
        if num_blocks == old:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for tensors, fill in ((self.keys, None), (self.values, None), (self.positions, -1)):
            for layer, current in enumerate(tensors):
                shape = (num_blocks, *current.shape[1:])
                if fill is None:
                    bigger = torch.empty(shape, dtype=current.dtype, device=self.device)
                else:
                    bigger = torch.full(shape, fill, dtype=current.dtype, device=self.device)
                bigger[:old].copy_(current)
                tensors[layer] = bigger
                del current
        self._free.extend(range(old, num_blocks))
        self._reserved_bytes = self._count_reserved_bytes()
        self.num_blocks = num_blocks

    def free(self, ids: list[int]) -> None:
        """Return blocks to the free list; their position slots are reset to -1."""
        ids = list(ids)
        bad = [i for i in ids if i not in self._in_use]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"freeing blocks that are not allocated (or twice): {bad or ids}")
        # runs of consecutive ids are reset by slice fills: no index tensor is made from Python data
        # (on a GPU that would be a host-to-device copy), a scalar fill per run and layer
        for start, stop in id_runs(sorted(ids)):
            for pos in self.positions:
                pos[start:stop].fill_(-1)
        for i in ids:
            self._in_use.remove(i)
            self._free.append(i)
        self.blocks_freed_total += len(ids)

    def is_allocated(self, block_id: int) -> bool:
        return block_id in self._in_use
