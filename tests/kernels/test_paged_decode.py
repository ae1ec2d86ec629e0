"""Paged decode attention: Triton kernel vs pure-torch reference vs dense SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flashmem.kernels.paged_decode import (
    block_valid_from_num_slots,
    merge_attention_states,
    paged_decode_attention,
    reference_paged_decode_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
LSE_TOL = dict(atol=1e-3, rtol=1e-4)


def _split_counts(n: int, block_size: int, gen: torch.Generator, mid_partial: bool) -> list[int]:
    """Per-block valid counts summing to ``n``; with ``mid_partial`` some middle blocks are partial
    and one empty entry sits among them."""
    counts: list[int] = []
    left = n
    while left > 0:
        if mid_partial and left > block_size and torch.rand((), generator=gen).item() < 0.4:
            c = int(torch.randint(1, block_size, (), generator=gen))
        else:
            c = min(block_size, left)
        counts.append(c)
        left -= c
    if mid_partial and len(counts) > 1:
        counts.insert(len(counts) // 2, 0)
    return counts


def make_case(
    num_slots: list[int],
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    block_size: int = 16,
    holes: bool = False,
    mid_partial: bool = True,
    extra_blocks: int = 7,
    strided: bool = False,
    seed: int = 0,
):
    """Random paged case: blocks drawn from a larger pool, tables shuffled, unused slots hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(num_slots)
    per_seq = [_split_counts(n, block_size, gen, mid_partial) for n in num_slots]
    used = sum(sum(1 for c in counts if c > 0) for counts in per_seq)
    num_blocks = used + extra_blocks
    max_blocks = max([len(c) for c in per_seq] + [1]) + 1  # at least one padding entry per row

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    if strided:  # caches as views with a padded head stride (last dim still contiguous)
        key_cache = torch.randn(shape[:3] + (2 * head_dim,), generator=gen)[..., :head_dim]
        value_cache = torch.randn(shape[:3] + (2 * head_dim,), generator=gen)[..., :head_dim]
        query = torch.randn(batch, 2 * num_q_heads, head_dim, generator=gen)[:, ::2]
    else:
        key_cache = torch.randn(shape, generator=gen)
        value_cache = torch.randn(shape, generator=gen)
        query = torch.randn(batch, num_q_heads, head_dim, generator=gen)
    filled = torch.zeros(num_blocks, block_size, num_kv_heads, dtype=torch.bool)
    positions = torch.full((num_blocks, block_size, num_kv_heads), -1, dtype=torch.int32)

    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((batch, max_blocks), -1, dtype=torch.int32)
    valid = torch.zeros((batch, max_blocks), dtype=torch.int32)
    for b, counts in enumerate(per_seq):
        order = torch.randperm(max_blocks, generator=gen)[: len(counts)].tolist()  # shuffled entries
        pos = 0
        for entry, c in zip(order, counts):
            if c == 0:
                tables[b, entry] = perm[-1]  # an unused entry pointing anywhere is never read
                continue
            block = perm.pop(0)
            tables[b, entry] = block
            valid[b, entry] = c
            filled[block, :c] = True
            positions[block, :c] = torch.arange(pos, pos + c, dtype=torch.int32)[:, None]
            pos += c
    if holes:
        drop = torch.rand(positions.shape, generator=gen) < 0.3
        positions[drop] = -1
    live = filled & (positions >= 0) if holes else filled
    # Slots the kernel must not read hold NaN: any leak shows up in the result.
    key_cache[~live] = float("nan")
    value_cache[~live] = float("nan")
    to = dict(device=DEVICE)

    def move(t):  # keeps the strides of a strided view (a plain .to() may make it contiguous)
        return (
            torch.empty_strided(t.shape, t.stride(), dtype=dtype, **to).copy_(t)
            if strided
            else t.to(dtype=dtype, **to)
        )

    return dict(
        query=move(query),
        key_cache=move(key_cache),
        value_cache=move(value_cache),
        block_tables=tables.to(**to),
        block_valid=valid.to(**to),
        slot_positions=positions.to(**to) if holes else None,
    )


def run_kernel_poisoned(case, **kwargs):
    q = case["query"]
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
    got_out, got_lse = paged_decode_attention(**case, out=out, lse_out=lse, **kwargs)
    assert got_out is out and got_lse is lse
    return out, lse


def assert_matches_reference(case, num_splits):
    out, lse = run_kernel_poisoned(case, num_splits=num_splits)
    ref_out, ref_lse = reference_paged_decode_attention(**case)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, **TOL[case["query"].dtype])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


# (num_slots per sequence, H_q, H_kv, D, dtype, holes, num_splits, extra options)
CASES = [
    ([1], 4, 1, 64, torch.float32, False, 1, {}),
    ([15], 9, 3, 64, torch.float16, False, 1, {}),
    ([17], 8, 8, 64, torch.float32, True, 2, {}),
    ([63], 9, 3, 128, torch.float32, False, 3, {}),
    ([63], 4, 1, 128, torch.float16, True, 1, {}),
    ([1000], 4, 2, 64, torch.float32, False, 4, {}),
    ([1000], 4, 2, 64, torch.float16, True, 1, {}),
    ([1, 15, 17, 63], 9, 3, 64, torch.float16, True, 2, {}),
    ([17, 63], 8, 8, 32, torch.float32, True, 1, {}),
    ([40, 3], 6, 2, 32, torch.float16, False, 5, dict(block_size=5)),
    ([33, 20], 9, 3, 64, torch.float32, True, 2, dict(strided=True)),
    ([21, 40], 4, 2, 64, torch.float16, False, 1, dict(strided=True)),
    ([50], 72, 1, 32, torch.float32, False, 2, {}),  # group of 72: two head tiles per KV head
    ([70], 4, 2, 80, torch.float16, False, 1, dict(mid_partial=False)),
    ([100, 30], 8, 2, 64, torch.float32, False, None, {}),
]


@pytest.mark.parametrize(
    "num_slots,hq,hkv,d,dtype,holes,splits,extra",
    CASES,
    ids=[
        f"n{'-'.join(map(str, c[0]))}_h{c[1]}x{c[2]}_d{c[3]}_{str(c[4])[6:]}_holes{int(c[5])}_s{c[6]}_{i}"
        for i, c in enumerate(CASES)
    ],
)
def test_kernel_matches_reference(num_slots, hq, hkv, d, dtype, holes, splits, extra):
    case = make_case(num_slots, hq, hkv, d, dtype, holes=holes, seed=len(num_slots) * 1000 + d + hq, **extra)
    if extra.get("strided"):
        assert case["query"].stride(1) == 2 * d and case["key_cache"].stride(2) == 2 * d
    assert_matches_reference(case, splits)


GRID = [
    (n, hq, hkv, dtype)
    for n in (1, 15, 17, 63, 1000)
    for hq, hkv in ((9, 3), (8, 8), (4, 1))
    for dtype in (torch.float32, torch.float16)
]


@pytest.mark.parametrize(
    "n,hq,hkv,dtype", GRID, ids=[f"n{c[0]}_h{c[1]}x{c[2]}_{str(c[3])[6:]}" for c in GRID]
)
def test_kernel_matches_reference_grid(n, hq, hkv, dtype):
    """Every required length x GQA ratio x dtype; D, holes and split count rotate over the grid."""
    i = GRID.index((n, hq, hkv, dtype))
    d = (64, 128)[i % 2]
    holes = (i // 2) % 2 == 1
    splits = (1, 3, None)[i % 3]
    case = make_case([n, max(1, n // 3)], hq, hkv, d, dtype, holes=holes, seed=100 + i)
    assert_matches_reference(case, splits)


def test_kernel_splits_agree():
    """Every split count gives the same result as one split (fp32)."""
    case = make_case([90, 47], 9, 3, 64, torch.float32, holes=True, seed=5)
    base, base_lse = run_kernel_poisoned(case, num_splits=1)
    for splits in (2, 3, 7, 64):
        out, lse = run_kernel_poisoned(case, num_splits=splits)
        torch.testing.assert_close(out, base, atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(lse, base_lse, atol=2e-6, rtol=1e-6)


def test_kernel_without_out_arguments_returns_fresh_tensors():
    case = make_case([17, 5], 4, 2, 32, torch.float16, seed=3)
    out, lse = paged_decode_attention(**case, num_splits=2)
    ref_out, ref_lse = reference_paged_decode_attention(**case)
    assert out.dtype == torch.float16 and out.shape == (2, 4, 32)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4)
    torch.testing.assert_close(out, ref_out, **TOL[torch.float16])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the Triton interpreter computes bf16 tl.dot wrongly"
)
@pytest.mark.parametrize("splits", [1, 4])
def test_kernel_bf16_cuda(splits):
    case = make_case([1000, 63, 1], 32, 8, 128, torch.bfloat16, holes=True, seed=11)
    assert_matches_reference(case, splits)


def _gather_dense(case, b):
    """Keys/values [N, H_kv, D] of sequence ``b`` in table order (no holes)."""
    k_list, v_list = [], []
    for entry in range(case["block_tables"].shape[1]):
        c = int(case["block_valid"][b, entry])
        if c:
            blk = int(case["block_tables"][b, entry])
            k_list.append(case["key_cache"][blk, :c])
            v_list.append(case["value_cache"][blk, :c])
    return torch.cat(k_list), torch.cat(v_list)


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 64), (8, 8, 32), (4, 1, 128)])
def test_reference_matches_dense_sdpa(hq, hkv, d):
    case = make_case([1, 17, 63, 200], hq, hkv, d, torch.float32, seed=hq + d)
    scale = 0.7 / math.sqrt(d)
    ref_out, ref_lse = reference_paged_decode_attention(**case, scale=scale)
    group = hq // hkv
    for b in range(case["query"].shape[0]):
        k, v = _gather_dense(case, b)  # [N, H_kv, D]
        k = k.permute(1, 0, 2).repeat_interleave(group, dim=0)  # [H_q, N, D]
        v = v.permute(1, 0, 2).repeat_interleave(group, dim=0)
        q = case["query"][b][:, None, :]  # [H_q, 1, D]
        dense = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=scale)[0, :, 0]
        torch.testing.assert_close(ref_out[b], dense, atol=1e-5, rtol=1e-5)
        logits = (q @ k.transpose(1, 2))[:, 0] * scale  # [H_q, N]
        torch.testing.assert_close(ref_lse[b], torch.logsumexp(logits, dim=-1), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_of_disjoint_parts_equals_union(dtype):
    case = make_case([120, 45], 9, 3, 64, dtype, holes=True, seed=21)
    tables, valid = case["block_tables"], case["block_valid"]
    cut = tables.shape[1] // 2
    part_a = dict(case, block_valid=torch.cat([valid[:, :cut], torch.zeros_like(valid[:, cut:])], 1))
    part_b = dict(case, block_valid=torch.cat([torch.zeros_like(valid[:, :cut]), valid[:, cut:]], 1))
    full_out, full_lse = reference_paged_decode_attention(**case)
    for fn in (reference_paged_decode_attention, paged_decode_attention):
        out_a, lse_a = fn(**part_a)
        out_b, lse_b = fn(**part_b)
        out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
        assert out.dtype == dtype and lse.dtype == torch.float32
        torch.testing.assert_close(out, full_out, **TOL[dtype])
        torch.testing.assert_close(lse, full_lse, **LSE_TOL)


def test_merge_with_empty_side():
    out_a = torch.randn(2, 3, 8)
    lse_a = torch.randn(2, 3)
    empty_out = torch.zeros(2, 3, 8)
    empty_lse = torch.full((2, 3), float("-inf"))
    out, lse = merge_attention_states(out_a, lse_a, empty_out, empty_lse)
    torch.testing.assert_close(out, out_a)
    torch.testing.assert_close(lse, lse_a)
    out, lse = merge_attention_states(empty_out, empty_lse, empty_out, empty_lse)
    assert torch.equal(out, empty_out) and torch.isneginf(lse).all()


@pytest.mark.parametrize("splits", [1, 3])
def test_head_that_attends_nothing(splits):
    case = make_case([40, 25], 6, 3, 32, torch.float32, holes=True, seed=8)
    positions = case["slot_positions"]
    positions[:, :, 1] = -1  # KV head 1 has no live slot anywhere
    case["block_valid"][1] = 0  # sequence 1 attends nothing at all
    out, lse = run_kernel_poisoned(case, num_splits=splits)
    ref_out, ref_lse = reference_paged_decode_attention(**case)
    for o, l in ((out, lse), (ref_out, ref_lse)):
        assert not torch.isnan(o).any() and not torch.isnan(l).any()
        assert torch.equal(o[1], torch.zeros_like(o[1])) and torch.isneginf(l[1]).all()
        assert torch.equal(o[0, 2:4], torch.zeros_like(o[0, 2:4])) and torch.isneginf(l[0, 2:4]).all()
        assert torch.isfinite(l[0, :2]).all() and torch.isfinite(l[0, 4:]).all()
    torch.testing.assert_close(out, ref_out, **TOL[torch.float32])
    torch.testing.assert_close(lse, ref_lse, **LSE_TOL)


def test_empty_table():
    case = make_case([5], 4, 2, 32, torch.float32, seed=1)
    case["block_tables"] = case["block_tables"][:, :0]
    case["block_valid"] = case["block_valid"][:, :0]
    out, lse = run_kernel_poisoned(case)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    ref_out, ref_lse = reference_paged_decode_attention(**case)
    assert torch.equal(ref_out, out) and torch.isneginf(ref_lse).all()


def _bad_inputs():
    def edit(**changes):
        return lambda c: {**c, **changes}

    def noncontig(name):
        def f(c):
            t = c[name]
            wide = torch.empty(t.shape + (2,), dtype=t.dtype, device=t.device)
            wide[..., 0] = t
            return {**c, name: wide[..., 0]}

        return f

    return {
        "query_2d": (lambda c: {**c, "query": c["query"][0]}, ValueError),
        "query_int": (lambda c: {**c, "query": c["query"].to(torch.int32)}, TypeError),
        "key_dtype": (lambda c: {**c, "key_cache": c["key_cache"].half()}, TypeError),
        "value_shape": (lambda c: {**c, "value_cache": c["value_cache"][:, :8]}, ValueError),
        "head_dim": (lambda c: {**c, "query": c["query"][..., :16]}, ValueError),
        "gqa_ratio": (lambda c: {**c, "query": c["query"][:, :3]}, ValueError),
        "table_int64": (lambda c: {**c, "block_tables": c["block_tables"].long()}, TypeError),
        "valid_float": (lambda c: {**c, "block_valid": c["block_valid"].float()}, TypeError),
        "table_shape": (lambda c: {**c, "block_tables": c["block_tables"][:, :1]}, ValueError),
        "table_batch": (
            lambda c: {**c, "block_tables": c["block_tables"][:1], "block_valid": c["block_valid"][:1]},
            ValueError,
        ),
        "positions_shape": (lambda c: {**c, "slot_positions": c["slot_positions"][:, :, :1]}, ValueError),
        "positions_dtype": (lambda c: {**c, "slot_positions": c["slot_positions"].long()}, TypeError),
        "device": (
            lambda c: {**c, "value_cache": torch.empty(c["value_cache"].shape, device="meta")},
            ValueError,
        ),
        "query_last_dim_strided": (noncontig("query"), ValueError),
        "key_last_dim_strided": (noncontig("key_cache"), ValueError),
        "scale": (edit(scale="big"), TypeError),
        "splits_zero": (edit(num_splits=0), ValueError),
        "not_tensor": (edit(block_valid=[[1, 2]]), TypeError),
    }


@pytest.mark.parametrize("name", list(_bad_inputs()))
def test_bad_input_raises_before_any_work(name):
    case = make_case([20, 9], 4, 2, 32, torch.float32, holes=True, seed=2)
    mutate, error = _bad_inputs()[name]
    bad = mutate(case)
    out = torch.full((2, 4, 32), float("nan"), device=DEVICE)
    lse = torch.full((2, 4), float("nan"), device=DEVICE)
    bad_out = out if bad["query"].shape == out.shape and bad["query"].dtype == out.dtype else None
    with pytest.raises(error):
        paged_decode_attention(**bad, out=bad_out, lse_out=lse)
    assert torch.isnan(out).all() and torch.isnan(lse).all()
    if name not in ("splits_zero", "query_last_dim_strided", "key_last_dim_strided"):
        ref_args = {k: v for k, v in bad.items() if k != "num_splits"}
        with pytest.raises(error):
            reference_paged_decode_attention(**ref_args)


def test_bad_out_arguments():
    case = make_case([20], 4, 2, 32, torch.float32, seed=2)
    with pytest.raises(ValueError, match="out"):
        paged_decode_attention(**case, out=torch.empty(1, 4, 32, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="lse_out"):
        paged_decode_attention(**case, lse_out=torch.empty(1, 4, dtype=torch.float16, device=DEVICE))


def test_block_valid_from_num_slots():
    got = block_valid_from_num_slots(torch.tensor([0, 1, 16, 17, 40, 100]), 3, 16)
    want = torch.tensor(
        [[0, 0, 0], [1, 0, 0], [16, 0, 0], [16, 1, 0], [16, 16, 8], [16, 16, 16]], dtype=torch.int32
    )
    assert got.dtype == torch.int32 and torch.equal(got, want)
    assert block_valid_from_num_slots(torch.tensor([5]), 0, 16).shape == (1, 0)
    with pytest.raises(ValueError):
        block_valid_from_num_slots(torch.tensor([1.0]), 2, 16)
    with pytest.raises(ValueError):
        block_valid_from_num_slots(torch.tensor([1]), 2, 0)
    with pytest.raises(TypeError):
        block_valid_from_num_slots([1], 2, 16)


def test_dense_prefix_table_matches_sdpa_via_kernel():
    """The kernel on a block_valid_from_num_slots table equals dense SDPA on the same tokens."""
    torch.manual_seed(4)
    num_slots, block_size, hq, hkv, d = 77, 16, 8, 2, 64
    blocks = math.ceil(num_slots / block_size)
    keys = torch.randn(num_slots, hkv, d)
    values = torch.randn(num_slots, hkv, d)
    query = torch.randn(1, hq, d)
    pool_k = torch.randn(blocks + 3, block_size, hkv, d)
    pool_v = torch.randn(blocks + 3, block_size, hkv, d)
    table = torch.randperm(blocks + 3)[:blocks].to(torch.int32)
    padded_k = torch.zeros(blocks * block_size, hkv, d)
    padded_v = torch.zeros(blocks * block_size, hkv, d)
    padded_k[:num_slots], padded_v[:num_slots] = keys, values
    pool_k[table.long()] = padded_k.view(blocks, block_size, hkv, d)
    pool_v[table.long()] = padded_v.view(blocks, block_size, hkv, d)
    valid = block_valid_from_num_slots(torch.tensor([num_slots]), blocks, block_size)
    to = dict(device=DEVICE)
    out, lse = paged_decode_attention(
        query.to(**to), pool_k.to(**to), pool_v.to(**to), table[None].to(**to), valid.to(**to), num_splits=2
    )
    dense = F.scaled_dot_product_attention(
        query[:, :, None], keys.permute(1, 0, 2)[None], values.permute(1, 0, 2)[None], enable_gqa=True
    )[:, :, 0]
    torch.testing.assert_close(out.cpu(), dense, atol=2e-5, rtol=1e-4)
