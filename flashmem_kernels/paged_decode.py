"""Paged decode attention: one query token per sequence against KV blocks listed in a block table.

Layout (one layer of :class:`flashmem.offload.block_pool.BlockPool`):
    query:          [B, H_q, D]
    key_cache:      [num_blocks, block_size, H_kv, D]
    value_cache:    [num_blocks, block_size, H_kv, D]
    block_tables:   [B, max_blocks] int32, block ids to attend (any subset of the pool, any order)
    block_valid:    [B, max_blocks] int32, valid slots at the start of each listed block (0 = unused)
    slot_positions: [num_blocks, block_size, H_kv] int32 (optional); a slot whose position is < 0 is
                    skipped for that KV head
Result:
    out: [B, H_q, D] in the query dtype; lse: [B, H_q] fp32 natural-log sum-exp of the scaled logits
    (-inf where a head attends nothing; ``out`` is 0 there).

GQA: query head ``h`` reads KV head ``h // (H_q // H_kv)``. One program handles a whole group of
query heads for one KV head, so each K/V tile is loaded once per group. The block list can be split
(flash-decoding): every split writes a partial (out, lse) in fp32 and a second kernel merges them.

Caller's contract (not checked, checking would need a device sync): every block id whose entry has
``block_valid > 0`` lies in ``[0, num_blocks)``; ids of entries with ``block_valid == 0`` are never
read (padding such as -1 is fine). ``block_valid`` is clamped to ``[0, block_size]``.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .checks import check_float_tensor, check_triton_device

__all__ = [
    "paged_decode_attention",
    "reference_paged_decode_attention",
    "merge_attention_states",
    "block_valid_from_num_slots",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_MIN_SLOTS_PER_SPLIT = 256
_MAX_SPLITS = 128
_MAX_BLOCK_H = 64
_TILE_BYTES = 16384


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
# runtime sizes change during a decode (table length, splits, positions): not specialised on
# (== 1, divisible by 16), so a new value never recompiles the kernel mid-decode
@triton.jit(do_not_specialize=["num_entries", "entries_per_split", "stride_tb", "stride_cb"])
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    valid_ptr,
    pos_ptr,
    out_ptr,
    lse_ptr,
    scale_log2,
    num_entries,
    entries_per_split,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_tb,
    stride_tj,
    stride_cb,
    stride_cj,
    stride_pb,
    stride_ps,
    stride_ph,
    stride_ob,
    stride_oh,
    stride_osplit,
    stride_lb,
    stride_lh,
    stride_lsplit,
    GROUP: tl.constexpr,
    NUM_HEAD_BLOCKS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_POS: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_head = tl.program_id(1)
    pid_split = tl.program_id(2)
    kv_head = pid_head // NUM_HEAD_BLOCKS
    head_block = pid_head % NUM_HEAD_BLOCKS

    offs_g = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H] index inside the GQA group
    mask_h = offs_g < GROUP
    offs_h = (kv_head * GROUP + offs_g).to(tl.int64)  # [BLOCK_H] query head ids
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_d = offs_d < HEAD_DIM
    pid_b64 = pid_b.to(tl.int64)
    kv_head64 = kv_head.to(tl.int64)

    q_ptrs = q_ptr + pid_b64 * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_h[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]

    entry_start = pid_split * entries_per_split
    entry_end = tl.minimum(entry_start + entries_per_split, num_entries)
    num_range_slots = (entry_end - entry_start) * BLOCK_SIZE  # flat slots covered by this split

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)  # [BLOCK_H, BLOCK_D]

    table_row = table_ptr + pid_b64 * stride_tb
    valid_row = valid_ptr + pid_b64 * stride_cb
    for tile_start in range(0, num_range_slots, BLOCK_N):
        offs_n = tile_start + tl.arange(0, BLOCK_N)  # [BLOCK_N] flat slot inside the split's range
        mask_entry = offs_n < num_range_slots
        entries = (entry_start + offs_n // BLOCK_SIZE).to(tl.int64)  # [BLOCK_N] table entry per slot
        offs_slot = (offs_n % BLOCK_SIZE).to(tl.int64)  # [BLOCK_N] offset inside its block
        block_ids = tl.load(table_row + entries * stride_tj, mask=mask_entry, other=0).to(tl.int64)
        num_valid = tl.load(valid_row + entries * stride_cj, mask=mask_entry, other=0)
        num_valid = tl.minimum(num_valid, BLOCK_SIZE)
        mask_n = mask_entry & (offs_slot < num_valid)  # [BLOCK_N]
        if HAS_POS:
            pos_ptrs = pos_ptr + block_ids * stride_pb + offs_slot * stride_ps + kv_head64 * stride_ph
            positions = tl.load(pos_ptrs, mask=mask_n, other=-1)  # [BLOCK_N]
            mask_n = mask_n & (positions >= 0)
        mask_kv = mask_n[:, None] & mask_d[None, :]  # [BLOCK_N, BLOCK_D]

        k_ptrs = (
            k_ptr
            + (block_ids * stride_kb + offs_slot * stride_ks + kv_head64 * stride_kh)[:, None]
            + offs_d[None, :]
        )
        k = tl.load(k_ptrs, mask=mask_kv, other=0.0)  # [BLOCK_N, BLOCK_D]
        # V is loaded before the scores are computed so both tiles are in flight together.
        v_ptrs = (
            v_ptr
            + (block_ids * stride_vb + offs_slot * stride_vs + kv_head64 * stride_vh)[:, None]
            + offs_d[None, :]
        )
        v = tl.load(v_ptrs, mask=mask_kv, other=0.0)  # [BLOCK_N, BLOCK_D]
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # [BLOCK_H, BLOCK_N]
        scores = tl.where(mask_n[None, :], scores, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # [BLOCK_H]
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)  # [BLOCK_H]; 0 while nothing was seen
        p = tl.exp2(scores - m_safe[:, None])  # [BLOCK_H, BLOCK_N]; 0 on masked slots
        l_i = l_i * alpha + tl.sum(p, axis=1)

        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]  # [BLOCK_H, BLOCK_D]; 0 where nothing attended
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)

    out_ptrs = (
        out_ptr
        + pid_b64 * stride_ob
        + offs_h[:, None] * stride_oh
        + pid_split.to(tl.int64) * stride_osplit
        + offs_d[None, :]
    )
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])
    lse_ptrs = lse_ptr + pid_b64 * stride_lb + offs_h * stride_lh + pid_split.to(tl.int64) * stride_lsplit
    tl.store(lse_ptrs, lse, mask=mask_h)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    lse_ptr,
    num_splits,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_plb,
    stride_plh,
    stride_pls,
    stride_ob,
    stride_oh,
    stride_lb,
    stride_lh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)  # [BLOCK_S]
    mask_s = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask_d = offs_d < HEAD_DIM

    lse_parts = tl.load(
        part_lse_ptr + pid_b * stride_plb + pid_h * stride_plh + offs_s * stride_pls,
        mask=mask_s,
        other=float("-inf"),
    )  # [BLOCK_S]
    m = tl.max(lse_parts, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp(lse_parts - m_safe)  # [BLOCK_S]; 0 for empty splits
    total = tl.sum(weights, axis=0)

    part_ptrs = (
        part_out_ptr
        + pid_b * stride_pob
        + pid_h * stride_poh
        + offs_s[:, None] * stride_pos
        + offs_d[None, :]
    )
    parts = tl.load(part_ptrs, mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    out = tl.sum(parts * weights[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)  # [BLOCK_D]
    lse = tl.where(total == 0.0, float("-inf"), m_safe + tl.log(tl.where(total == 0.0, 1.0, total)))

    tl.store(
        out_ptr + pid_b * stride_ob + pid_h * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty),
        mask=mask_d,
    )
    tl.store(lse_ptr + pid_b * stride_lb + pid_h * stride_lh, lse)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _default_num_splits(device: torch.device, programs: int, max_blocks: int, block_size: int) -> int:
    """Enough splits to give the device about two programs per SM, never fewer than
    ``_MIN_SLOTS_PER_SPLIT`` slots (of table capacity) per split."""
    if device.type != "cuda" or max_blocks == 0:
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    target = 2 * _sm_count(index)
    by_length = max(1, (max_blocks * block_size) // _MIN_SLOTS_PER_SPLIT)
    return max(1, min(math.ceil(target / max(programs, 1)), by_length, max_blocks, _MAX_SPLITS))


def _check_int32_table(name: str, t: object, batch: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}; convert with .to(torch.int32)")
    if t.dim() != 2 or t.shape[0] != batch:
        raise ValueError(f"{name} must be [B={batch}, max_blocks], got {tuple(t.shape)}")


def _validate(query, key_cache, value_cache, block_tables, block_valid, slot_positions, scale):
    """Shared checks of the kernel wrapper and the reference; returns (scale, group)."""
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        check_float_tensor(name, t)
    if query.dim() != 3:
        raise ValueError(f"query must be [B, H_q, D], got shape {tuple(query.shape)}")
    if key_cache.dim() != 4:
        raise ValueError(
            f"key_cache must be [num_blocks, block_size, H_kv, D], got shape {tuple(key_cache.shape)}"
        )
    if tuple(value_cache.shape) != tuple(key_cache.shape):
        raise ValueError(
            f"value_cache shape {tuple(value_cache.shape)} differs from key_cache shape {tuple(key_cache.shape)}"
        )
    if key_cache.dtype != query.dtype or value_cache.dtype != query.dtype:
        raise TypeError(
            f"query, key_cache and value_cache must share a dtype, got {query.dtype}, {key_cache.dtype}, "
            f"{value_cache.dtype}"
        )
    batch, num_q_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, kv_dim = key_cache.shape
    if kv_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} differs from cache head_dim {kv_dim}")
    if head_dim < 1 or block_size < 1 or num_kv_heads < 1:
        raise ValueError(
            f"head_dim, block_size and H_kv must be positive, got {head_dim}, {block_size}, {num_kv_heads}"
        )
    if num_q_heads % num_kv_heads != 0 or num_q_heads == 0:
        raise ValueError(f"H_q ({num_q_heads}) must be a positive multiple of H_kv ({num_kv_heads})")
    _check_int32_table("block_tables", block_tables, batch)
    _check_int32_table("block_valid", block_valid, batch)
    if block_valid.shape != block_tables.shape:
        raise ValueError(
            f"block_valid shape {tuple(block_valid.shape)} differs from block_tables shape {tuple(block_tables.shape)}"
        )
    tensors = [("key_cache", key_cache), ("value_cache", value_cache)]
    tensors += [("block_tables", block_tables), ("block_valid", block_valid)]
    if slot_positions is not None:
        if not isinstance(slot_positions, torch.Tensor):
            raise TypeError(
                f"slot_positions must be a torch.Tensor or None, got {type(slot_positions).__name__}"
            )
        if slot_positions.dtype != torch.int32:
            raise TypeError(f"slot_positions must be int32, got {slot_positions.dtype}")
        if tuple(slot_positions.shape) != (num_blocks, block_size, num_kv_heads):
            raise ValueError(
                f"slot_positions must be [num_blocks, block_size, H_kv] = {(num_blocks, block_size, num_kv_heads)}, "
                f"got {tuple(slot_positions.shape)}"
            )
        tensors.append(("slot_positions", slot_positions))
    for name, t in tensors:
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device}, query is on {query.device}; move them to one device")
    if scale is None:
        scale = head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number or None, got {scale!r}")
    return float(scale), num_q_heads // num_kv_heads


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    block_valid: torch.Tensor,
    slot_positions: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    *,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one query token per sequence over paged KV blocks (Triton).

    Args:
        query: [B, H_q, D] fp32 / fp16 / bf16, last dim contiguous.
        key_cache, value_cache: [num_blocks, block_size, H_kv, D], same dtype as ``query``,
            last dim contiguous.
        block_tables: [B, max_blocks] int32, block ids to attend, in any order. Ids of entries with
            ``block_valid > 0`` must be in ``[0, num_blocks)`` (caller's contract, not checked).
        block_valid: [B, max_blocks] int32, number of valid slots at the start of each listed block
            (0 = unused entry; partial blocks allowed anywhere; clamped to ``[0, block_size]``).
        slot_positions: optional [num_blocks, block_size, H_kv] int32; a slot with position < 0 is
            skipped for that KV head.
        scale: logit scale, default ``D ** -0.5``.
        num_splits: split-K over the table entries (flash-decoding); None picks by device and length.
        out: optional [B, H_q, D] tensor in the query dtype to write the result into.
        lse_out: optional [B, H_q] fp32 tensor to write the log-sum-exp into.

    Returns:
        (out [B, H_q, D] in the query dtype, lse [B, H_q] fp32 natural-log sum-exp of the scaled
        logits; -inf and out = 0 where a head attends nothing).

    Runs without any host-device synchronisation. Raises TypeError/ValueError on bad input before
    launching anything.
    """
    scale, group = _validate(query, key_cache, value_cache, block_tables, block_valid, slot_positions, scale)
    batch, num_q_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    max_blocks = block_tables.shape[1]
    device = query.device
    check_triton_device("paged_decode_attention", device, "reference_paged_decode_attention")
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim (stride 1), got strides {t.stride()}")
    if num_splits is not None and (
        isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1
    ):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if out is not None:
        if (
            not isinstance(out, torch.Tensor)
            or out.dtype != query.dtype
            or tuple(out.shape) != tuple(query.shape)
        ):
            raise ValueError(f"out must be a {query.dtype} tensor of shape {tuple(query.shape)}")
        if out.device != device or out.stride(-1) != 1:
            raise ValueError(f"out must be on {device} with a contiguous last dim")
    if lse_out is not None:
        if (
            not isinstance(lse_out, torch.Tensor)
            or lse_out.dtype != torch.float32
            or tuple(lse_out.shape) != (batch, num_q_heads)
        ):
            raise ValueError(f"lse_out must be a float32 tensor of shape {(batch, num_q_heads)}")
        if lse_out.device != device:
            raise ValueError(f"lse_out must be on {device}")

    if out is None:
        out = torch.empty_like(query, memory_format=torch.contiguous_format)
    if lse_out is None:
        lse_out = torch.empty((batch, num_q_heads), dtype=torch.float32, device=device)
    if batch == 0:
        return out, lse_out

    block_h = min(max(16, triton.next_power_of_2(group)), _MAX_BLOCK_H)
    num_head_blocks = triton.cdiv(group, block_h)
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Slots per tile: K and V tiles of at most 16 KiB each (no register spills at D=128 in fp32).
    block_n = min(64, max(16, _TILE_BYTES // (block_d * query.element_size())))

    programs = batch * num_kv_heads * num_head_blocks
    if num_splits is None:
        num_splits = _default_num_splits(device, programs, max_blocks, block_size)
    num_splits = max(1, min(num_splits, max_blocks, _MAX_SPLITS)) if max_blocks else 1
    entries_per_split = triton.cdiv(max_blocks, num_splits) if max_blocks else 0
    if entries_per_split:
        num_splits = triton.cdiv(max_blocks, entries_per_split)

    has_pos = slot_positions is not None
    pos_arg = slot_positions if has_pos else block_valid  # never read when HAS_POS is False
    pos_strides = slot_positions.stride() if has_pos else (0, 0, 0)

    if num_splits == 1:
        dest_out, dest_lse = out, lse_out
        out_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (lse_out.stride(0), lse_out.stride(1), 0)
    else:
        dest_out = torch.empty((batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=device)
        dest_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=device)
        out_strides = (dest_out.stride(0), dest_out.stride(1), dest_out.stride(2))
        lse_strides = dest_lse.stride()

    grid = (batch, num_kv_heads * num_head_blocks, num_splits)
    _paged_decode_kernel[grid](
        query,
        key_cache,
        value_cache,
        block_tables,
        block_valid,
        pos_arg,
        dest_out,
        dest_lse,
        scale * _LOG2E,
        max_blocks,
        entries_per_split,
        query.stride(0),
        query.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        value_cache.stride(0),
        value_cache.stride(1),
        value_cache.stride(2),
        block_tables.stride(0),
        block_tables.stride(1),
        block_valid.stride(0),
        block_valid.stride(1),
        *pos_strides,
        *out_strides,
        *lse_strides,
        GROUP=group,
        NUM_HEAD_BLOCKS=num_head_blocks,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        HAS_POS=has_pos,
        num_warps=8 if query.element_size() == 4 else 4,  # fp32 tiles at 4 warps spill registers on sm_90
        num_stages=2,
    )
    if num_splits > 1:
        _merge_splits_kernel[(batch, num_q_heads)](
            dest_out,
            dest_lse,
            out,
            lse_out,
            num_splits,
            *dest_out.stride()[:3],
            *dest_lse.stride(),
            out.stride(0),
            out.stride(1),
            lse_out.stride(0),
            lse_out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_S=max(2, triton.next_power_of_2(num_splits)),
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out, lse_out


def reference_paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    block_valid: torch.Tensor,
    slot_positions: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch paged decode attention with the same inputs and results as
    :func:`paged_decode_attention` (computed in fp32 over the gathered blocks).

    Shapes: query [B, H_q, D]; caches [num_blocks, block_size, H_kv, D]; block_tables and
    block_valid [B, max_blocks] int32; slot_positions [num_blocks, block_size, H_kv] int32 or None.
    Returns (out [B, H_q, D] in the query dtype, lse [B, H_q] fp32).
    """
    scale, group = _validate(query, key_cache, value_cache, block_tables, block_valid, slot_positions, scale)
    batch, num_q_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    max_blocks = block_tables.shape[1]
    valid = block_valid.long().clamp(0, block_size)  # [B, M]
    ids = torch.where(valid > 0, block_tables.long(), torch.zeros_like(valid))  # [B, M]
    offsets = torch.arange(block_size, device=query.device)
    mask = offsets[None, None, :] < valid[:, :, None]  # [B, M, bs]
    mask = mask[..., None].expand(batch, max_blocks, block_size, num_kv_heads)  # [B, M, bs, H_kv]
    if max_blocks == 0 or num_blocks == 0:
        keys = query.new_zeros((batch, 0, num_kv_heads, head_dim), dtype=torch.float32)
        values = keys
        mask = torch.zeros((batch, 0, num_kv_heads), dtype=torch.bool, device=query.device)
    else:
        if slot_positions is not None:
            mask = mask & (slot_positions[ids] >= 0)
        keys = key_cache[ids].float().reshape(batch, -1, num_kv_heads, head_dim)  # [B, N, H_kv, D]
        values = value_cache[ids].float().reshape(batch, -1, num_kv_heads, head_dim)
        mask = mask.reshape(batch, -1, num_kv_heads)  # [B, N, H_kv]
    q = query.float().reshape(batch, num_kv_heads, group, head_dim)  # [B, H_kv, G, D]
    # Zero the masked rows so stale NaN/inf in unused slots cannot leak into the sums.
    keys = torch.where(mask[..., None], keys, 0.0)
    values = torch.where(mask[..., None], values, 0.0)
    logits = torch.einsum("bhgd,bnhd->bhgn", q, keys) * scale  # [B, H_kv, G, N]
    attend = mask.permute(0, 2, 1)[:, :, None, :]  # [B, H_kv, 1, N]
    logits = logits.masked_fill(~attend, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, H_kv, G]; -inf where nothing is attended
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(logits - safe_lse[..., None]) * attend  # [B, H_kv, G, N]
    out = torch.einsum("bhgn,bnhd->bhgd", probs, values)  # [B, H_kv, G, D]
    return out.reshape(batch, num_q_heads, head_dim).to(query.dtype), lse.reshape(batch, num_q_heads)


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over two disjoint key sets A and B into attention over A ∪ B.

    Shapes: out_a, out_b [..., D]; lse_a, lse_b [...] (natural log, -inf = nothing attended).
    Returns (out [..., D] in out_a's dtype, lse [...] fp32). Exact: equals attention over A ∪ B.
    """
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_a {tuple(out_a.shape)} and out_b {tuple(out_b.shape)} differ in shape")
    if lse_a.shape != lse_b.shape or tuple(lse_a.shape) != tuple(out_a.shape[:-1]):
        raise ValueError(
            f"lse_a {tuple(lse_a.shape)} and lse_b {tuple(lse_b.shape)} must equal out.shape[:-1] "
            f"= {tuple(out_a.shape[:-1])}"
        )
    la, lb = lse_a.float(), lse_b.float()
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa = torch.exp(la - m_safe)
    wb = torch.exp(lb - m_safe)
    total = wa + wb
    denom = torch.where(total == 0, torch.ones_like(total), total)
    out = (out_a.float() * wa[..., None] + out_b.float() * wb[..., None]) / denom[..., None]
    lse = m_safe + torch.log(total)  # log(0) = -inf where neither side attended anything
    return out.to(out_a.dtype), lse


def block_valid_from_num_slots(num_slots: torch.Tensor, max_blocks: int, block_size: int) -> torch.Tensor:
    """Valid-slot counts per table entry for sequences whose slots are a dense prefix.

    num_slots: [B] integer tensor (slots per sequence). Returns [B, max_blocks] int32 with entry
    ``j`` = ``clamp(num_slots - j * block_size, 0, block_size)``; slots beyond
    ``max_blocks * block_size`` are dropped (no device sync is made to check).
    """
    if not isinstance(num_slots, torch.Tensor):
        raise TypeError(f"num_slots must be a torch.Tensor, got {type(num_slots).__name__}")
    if num_slots.dim() != 1 or num_slots.dtype.is_floating_point or num_slots.dtype == torch.bool:
        raise ValueError(
            f"num_slots must be a 1-D integer tensor [B], got {num_slots.dtype} {tuple(num_slots.shape)}"
        )
    for name, value in (("max_blocks", max_blocks), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if max_blocks < 0 or block_size < 1:
        raise ValueError(f"need max_blocks >= 0 and block_size >= 1, got {max_blocks}, {block_size}")
    starts = torch.arange(max_blocks, device=num_slots.device, dtype=torch.int64) * block_size  # [M]
    return (num_slots.long()[:, None] - starts[None, :]).clamp(0, block_size).to(torch.int32)
