"""In-order compaction of one sequence of a :class:`~flashmem.offload.paged_cache.PagedKVCache`.

Survivors slide forward to the first slots of the sequence (slot order = block-table order), keeping
their relative order, per KV head and in every layer; then the emptied tail blocks go back to the
pool. Keys keep their rotation: each slot's true position moves with its key and value.

    keep_idx: [H_kv, n_keep]     sequence slot indices, strictly increasing per head; one keep-set
                                 per KV head shared by all layers, or
              [L, H_kv, n_keep]  one keep-set per layer and KV head.
Every head keeps the same number of slots, so the sequence stays a dense prefix of ``n_keep`` slots.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..kernels.compaction import compaction, reference_compaction
from .paged_cache import PagedKVCache

__all__ = ["COMPACTION_BACKENDS", "compact_sequence", "validate_keep_idx", "keep_to_pool_slots"]

COMPACTION_BACKENDS = ("auto", "triton", "torch")


def _as_index_tensor(keep_idx, device: torch.device) -> torch.Tensor:
    if isinstance(keep_idx, torch.Tensor):
        if keep_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"keep_idx must be an integer tensor (int64), got {keep_idx.dtype}")
        return keep_idx.to(device=device, dtype=torch.int64)
    if isinstance(keep_idx, Sequence) and not isinstance(keep_idx, (str, bytes)):
        rows = [torch.as_tensor(row, dtype=torch.int64) for row in keep_idx]
        lengths = sorted({int(r.shape[-1]) if r.dim() else -1 for r in rows})
        if any(r.dim() != 1 for r in rows):
            raise ValueError("keep_idx given as a list must hold one 1-D index list per KV head")
        if len(lengths) > 1:
            raise ValueError(
                f"every KV head must keep the same number of slots, got sizes {lengths}; "
                "select an equal-size keep-set per head"
            )
        if not rows:
            raise ValueError("keep_idx is empty: give one index list per KV head")
        return torch.stack(rows).to(device)
    raise TypeError(f"keep_idx must be a tensor [H_kv, n_keep] or [L, H_kv, n_keep], got {type(keep_idx)}")


def validate_keep_idx(cache: PagedKVCache, seq_id: int, keep_idx) -> torch.Tensor:
    """Check a keep-set against the sequence and return it as int64 on the pool's device.

    Raises ValueError/TypeError for a wrong shape, unequal sizes per head, indices outside
    ``[0, num_slots)``, indices not strictly increasing (unsorted or duplicated), or a pending append.
    Reads tensor contents (one device sync): meant for compaction time, not for every decode step.
    """
    pool = cache.pool
    num_slots = cache.num_slots(seq_id)
    idx = _as_index_tensor(keep_idx, pool.device)
    if idx.dim() == 2:
        if idx.shape[0] != pool.num_kv_heads:
            raise ValueError(
                f"keep_idx [H_kv, n_keep] needs H_kv = {pool.num_kv_heads}, got {tuple(idx.shape)}"
            )
    elif idx.dim() == 3:
        if tuple(idx.shape[:2]) != (pool.num_layers, pool.num_kv_heads):
            raise ValueError(
                f"keep_idx [L, H_kv, n_keep] needs L, H_kv = {pool.num_layers}, {pool.num_kv_heads}, "
                f"got {tuple(idx.shape)}"
            )
    else:
        raise ValueError(f"keep_idx must be [H_kv, n_keep] or [L, H_kv, n_keep], got {tuple(idx.shape)}")
    n_keep = idx.shape[-1]
    if n_keep > num_slots:
        raise ValueError(f"keep_idx keeps {n_keep} slots, sequence {seq_id} has only {num_slots}")
    if n_keep:
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= num_slots:
            raise ValueError(
                f"keep_idx out of range: values span [{low}, {high}], sequence {seq_id} has slots [0, {num_slots})"
            )
        if n_keep > 1 and not bool((idx[..., 1:] > idx[..., :-1]).all()):
            raise ValueError(
                "keep_idx must be strictly increasing per head (sorted, no duplicates); sort it with "
                "torch.sort(keep_idx, dim=-1) and drop repeats"
            )
    return idx


def keep_to_pool_slots(cache: PagedKVCache, seq_id: int, keep_idx: torch.Tensor) -> torch.Tensor:
    """Sequence slot indices -> flat pool slots (``block_id * block_size + offset``), same shape."""
    block_size = cache.block_size
    table = cache.block_table_tensor(seq_id).long()
    return table[keep_idx // block_size] * block_size + keep_idx % block_size


def _use_triton(backend: str, device: torch.device) -> bool:
    if backend not in COMPACTION_BACKENDS:
        raise ValueError(f"backend must be one of {COMPACTION_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return device.type == "cuda"
    return backend == "triton"


def compact_sequence(
    cache: PagedKVCache, seq_id: int, keep_idx, *, backend: str = "auto", validate: bool = True
) -> int:
    """Keep only ``keep_idx`` of the sequence, slid to the front in order, and free the tail blocks.

    keep_idx: [H_kv, n_keep] or [L, H_kv, n_keep] sequence slot indices (strictly increasing per
    head), or a list of H_kv equal-length index lists. backend: "triton" (the kernel of
    :mod:`flashmem.kernels.compaction`), "torch" (its reference) or "auto" (triton on CUDA, torch
    elsewhere). ``validate=False`` skips the content checks (for keep-sets built by a policy).
    Returns the number of blocks freed: ``blocks before - ceil(n_keep / block_size)``, counted by
    the allocator. Other sequences' blocks are not touched. On bad input nothing changes.
    """
    use_triton = _use_triton(backend, cache.pool.device)
    state_pending = cache.pending(seq_id)
    if state_pending:
        raise RuntimeError(f"sequence {seq_id} has {state_pending} slots pending; compact after end_append")
    if validate:
        idx = validate_keep_idx(cache, seq_id, keep_idx)
    else:
        idx = _as_index_tensor(keep_idx, cache.pool.device)
    n_keep = idx.shape[-1]
    pool = cache.pool
    if n_keep:
        src = keep_to_pool_slots(cache, seq_id, idx)  # [H_kv, n] or [L, H_kv, n]
        dst = keep_to_pool_slots(cache, seq_id, torch.arange(n_keep, device=pool.device))  # [n]
        move = compaction if use_triton else reference_compaction
        move(pool.keys, pool.values, pool.positions, src, dst)
    freed_before = pool.blocks_freed_total
    cache.truncate(seq_id, n_keep)
    return pool.blocks_freed_total - freed_before
