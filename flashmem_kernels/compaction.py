"""Compaction of paged KV slots: move chosen slots (key, value and position) to chosen destinations.

Layout (every layer of :class:`flashmem.offload.block_pool.BlockPool`):
    keys[l], values[l]: [num_blocks, block_size, H_kv, D]   (contiguous)
    positions[l]:       [num_blocks, block_size, H_kv]      int32
Indices are flat pool slots ``block_id * block_size + offset``:
    src_slots: [H_kv, n] (one keep-set per KV head shared by all layers) or [L, H_kv, n] (per layer)
    dst_slots: [n]       (the same destination slots for every head and layer)
For every layer ``l``, head ``h`` and ``j < n``: slot ``dst_slots[j]`` of head ``h`` receives the
key, value and position that slot ``src_slots[(l,) h, j]`` of head ``h`` held before the call.

In place and race free for any index pattern: per layer, one launch gathers every source row into a
scratch buffer ``[n, H_kv, D]`` and a second launch (ordered after it on the same stream) scatters
the scratch rows to their destinations. The work is O(n) rows per layer.

Caller's contract (not checked: checking would need a device sync): every index lies in
``[0, num_blocks * block_size)`` and ``dst_slots`` has no duplicates.
:func:`flashmem.offload.compaction.compact_sequence` validates its keep-sets before calling.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_float_tensor, check_triton_device

__all__ = ["compaction", "reference_compaction"]


# runtime sizes change during a decode (table length, splits, positions): not specialised on
# (== 1, divisible by 16), so a new value never recompiles the kernel mid-decode
@triton.jit(do_not_specialize=["num_rows", "stride_si_head", "stride_di_head"])
def _copy_slots_kernel(
    src_k_ptr,
    src_v_ptr,
    src_p_ptr,
    dst_k_ptr,
    dst_v_ptr,
    dst_p_ptr,
    src_idx_ptr,
    dst_idx_ptr,
    num_rows,
    stride_src_k_row,
    stride_src_k_head,
    stride_src_v_row,
    stride_src_v_head,
    stride_src_p_row,
    stride_src_p_head,
    stride_dst_k_row,
    stride_dst_k_head,
    stride_dst_v_row,
    stride_dst_v_head,
    stride_dst_p_row,
    stride_dst_p_head,
    stride_si_head,
    stride_si_row,
    stride_di_head,
    stride_di_row,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dst[dst_idx[h, j], h] = src[src_idx[h, j], h] for k, v (rows of HEAD_DIM) and positions."""
    pid_n = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)

    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] row of the move list
    mask_n = offs_n < num_rows
    src_rows = tl.load(src_idx_ptr + head * stride_si_head + offs_n * stride_si_row, mask=mask_n, other=0)
    dst_rows = tl.load(dst_idx_ptr + head * stride_di_head + offs_n * stride_di_row, mask=mask_n, other=0)
    src_rows = src_rows.to(tl.int64)  # [BLOCK_N] flat source slot
    dst_rows = dst_rows.to(tl.int64)  # [BLOCK_N] flat destination slot

    pos = tl.load(src_p_ptr + src_rows * stride_src_p_row + head * stride_src_p_head, mask=mask_n)
    tl.store(dst_p_ptr + dst_rows * stride_dst_p_row + head * stride_dst_p_head, pos, mask=mask_n)

    src_k_rows = src_k_ptr + src_rows * stride_src_k_row + head * stride_src_k_head  # [BLOCK_N]
    src_v_rows = src_v_ptr + src_rows * stride_src_v_row + head * stride_src_v_head
    dst_k_rows = dst_k_ptr + dst_rows * stride_dst_k_row + head * stride_dst_k_head
    dst_v_rows = dst_v_ptr + dst_rows * stride_dst_v_row + head * stride_dst_v_head
    for d_start in tl.static_range(0, HEAD_DIM, BLOCK_D):
        offs_d = d_start + tl.arange(0, BLOCK_D)  # [BLOCK_D]
        mask = mask_n[:, None] & (offs_d < HEAD_DIM)[None, :]  # [BLOCK_N, BLOCK_D]
        k = tl.load(src_k_rows[:, None] + offs_d[None, :], mask=mask)  # [BLOCK_N, BLOCK_D]
        tl.store(dst_k_rows[:, None] + offs_d[None, :], k, mask=mask)
        v = tl.load(src_v_rows[:, None] + offs_d[None, :], mask=mask)  # [BLOCK_N, BLOCK_D]
        tl.store(dst_v_rows[:, None] + offs_d[None, :], v, mask=mask)


def _check(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    positions: list[torch.Tensor],
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
) -> tuple[int, int, int, int]:
    """Validate; return ``(L, flat_slots, H_kv, D)``."""
    for name, seq in (("keys", keys), ("values", values), ("positions", positions)):
        if not isinstance(seq, (list, tuple)) or not seq:
            raise TypeError(f"{name} must be a non-empty list of per-layer tensors")
        for t in seq:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must hold torch.Tensors, got {type(t).__name__}")
    num_layers = len(keys)
    if len(values) != num_layers or len(positions) != num_layers:
        raise ValueError(
            f"keys, values and positions must list the same layers, got {num_layers}, {len(values)}, "
            f"{len(positions)}"
        )
    kv_shape = tuple(keys[0].shape)
    if len(kv_shape) != 4:
        raise ValueError(f"keys[l] must be [num_blocks, block_size, H_kv, D], got {kv_shape}")
    num_blocks, block_size, num_kv_heads, head_dim = kv_shape
    device = keys[0].device
    dtype = keys[0].dtype
    check_float_tensor("keys", keys[0])
    for name, seq, shape, want in (
        ("keys", keys, kv_shape, dtype),
        ("values", values, kv_shape, dtype),
        ("positions", positions, kv_shape[:3], torch.int32),
    ):
        for layer, t in enumerate(seq):
            if tuple(t.shape) != shape:
                raise ValueError(f"{name}[{layer}] must have shape {shape}, got {tuple(t.shape)}")
            if t.dtype != want:
                raise TypeError(f"{name}[{layer}] must be {want}, got {t.dtype}")
            if t.device != device:
                raise ValueError(f"{name}[{layer}] is on {t.device}, keys[0] on {device}")
            if not t.is_contiguous():
                raise ValueError(f"{name}[{layer}] must be contiguous (a BlockPool tensor)")
    for name, idx in (("src_slots", src_slots), ("dst_slots", dst_slots)):
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(idx).__name__}")
        if idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32 or int64, got {idx.dtype}")
        if idx.device != device:
            raise ValueError(f"{name} is on {idx.device}, the pool is on {device}")
    if dst_slots.dim() != 1:
        raise ValueError(f"dst_slots must be [n], got shape {tuple(dst_slots.shape)}")
    n = dst_slots.shape[0]
    if src_slots.dim() == 2:
        if tuple(src_slots.shape) != (num_kv_heads, n):
            raise ValueError(
                f"src_slots must be [H_kv, n] = {(num_kv_heads, n)}, got {tuple(src_slots.shape)}"
            )
    elif src_slots.dim() == 3:
        if tuple(src_slots.shape) != (num_layers, num_kv_heads, n):
            raise ValueError(
                f"src_slots must be [L, H_kv, n] = {(num_layers, num_kv_heads, n)}, got {tuple(src_slots.shape)}"
            )
    else:
        raise ValueError(f"src_slots must be [H_kv, n] or [L, H_kv, n], got shape {tuple(src_slots.shape)}")
    return num_layers, num_blocks * block_size, num_kv_heads, head_dim


def compaction(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    positions: list[torch.Tensor],
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    *,
    block_n: int = 64,
) -> None:
    """Move slots in place (Triton): see the module docstring for shapes and the contract.

    keys, values: L tensors [num_blocks, block_size, H_kv, D]; positions: L tensors
    [num_blocks, block_size, H_kv] int32; src_slots: [H_kv, n] or [L, H_kv, n]; dst_slots: [n].
    """
    num_layers, flat, num_kv_heads, head_dim = _check(keys, values, positions, src_slots, dst_slots)
    device = keys[0].device
    check_triton_device("compaction", device, "reference_compaction")
    if block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    n = dst_slots.shape[0]
    if n == 0:
        return
    scratch_k = torch.empty((n, num_kv_heads, head_dim), dtype=keys[0].dtype, device=device)
    scratch_v = torch.empty_like(scratch_k)
    scratch_p = torch.empty((n, num_kv_heads), dtype=torch.int32, device=device)
    rows = torch.arange(n, dtype=torch.int64, device=device)
    block_d = min(triton.next_power_of_2(head_dim), 64)
    grid = (triton.cdiv(n, block_n), num_kv_heads)
    for layer in range(num_layers):
        pool_k = keys[layer].view(flat, num_kv_heads, head_dim)
        pool_v = values[layer].view(flat, num_kv_heads, head_dim)
        pool_p = positions[layer].view(flat, num_kv_heads)
        src = src_slots[layer] if src_slots.dim() == 3 else src_slots  # [H_kv, n]
        scratch = (scratch_k, scratch_v, scratch_p)
        pool = (pool_k, pool_v, pool_p)
        # gather: scratch[j, h] = pool[src[h, j], h]
        _launch(grid, pool, scratch, src, src.stride(), rows, (0, 1), n, head_dim, block_n, block_d)
        # scatter: pool[dst[j], h] = scratch[j, h]
        dst_strides = (0, dst_slots.stride(0))
        _launch(grid, scratch, pool, rows, (0, 1), dst_slots, dst_strides, n, head_dim, block_n, block_d)


def _launch(
    grid, src, dst, src_idx, src_idx_strides, dst_idx, dst_idx_strides, n, head_dim, block_n, block_d
):
    """One copy pass: ``src``/``dst`` are (keys [S, H_kv, D], values [S, H_kv, D], positions [S, H_kv])."""
    sk, sv, sp = src
    dk, dv, dp = dst
    _copy_slots_kernel[grid](
        sk,
        sv,
        sp,
        dk,
        dv,
        dp,
        src_idx,
        dst_idx,
        n,
        sk.stride(0),
        sk.stride(1),
        sv.stride(0),
        sv.stride(1),
        sp.stride(0),
        sp.stride(1),
        dk.stride(0),
        dk.stride(1),
        dv.stride(0),
        dv.stride(1),
        dp.stride(0),
        dp.stride(1),
        src_idx_strides[0],
        src_idx_strides[1],
        dst_idx_strides[0],
        dst_idx_strides[1],
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
    )


def reference_compaction(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    positions: list[torch.Tensor],
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
) -> None:
    """Pure-torch in-place equivalent of :func:`compaction` (gather into temporaries, then scatter)."""
    num_layers, flat, num_kv_heads, head_dim = _check(keys, values, positions, src_slots, dst_slots)
    n = dst_slots.shape[0]
    if n == 0:
        return
    heads = torch.arange(num_kv_heads, device=keys[0].device)[:, None]  # [H_kv, 1]
    dst = dst_slots.long()[None, :].expand(num_kv_heads, n)  # [H_kv, n]
    for layer in range(num_layers):
        src = (src_slots[layer] if src_slots.dim() == 3 else src_slots).long()  # [H_kv, n]
        for tensor in (keys[layer], values[layer], positions[layer]):
            view = tensor.view(flat, num_kv_heads, *tensor.shape[3:])
            moved = view[src, heads].clone()  # [H_kv, n(, D)]
            view[dst, heads] = moved
