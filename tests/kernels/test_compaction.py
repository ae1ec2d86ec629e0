"""Slot compaction: Triton kernel vs torch reference (exact copies), overlapping in-place moves."""

from __future__ import annotations

import pytest
import torch

from flashmem.kernels.compaction import compaction, reference_compaction

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_pool(num_layers, num_blocks, block_size, num_kv, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, num_kv, head_dim)
    keys = [torch.randn(shape, generator=gen).to(dtype).to(DEVICE) for _ in range(num_layers)]
    values = [torch.randn(shape, generator=gen).to(dtype).to(DEVICE) for _ in range(num_layers)]
    positions = [
        torch.randint(0, 10**6, shape[:3], generator=gen, dtype=torch.int32).to(DEVICE)
        for _ in range(num_layers)
    ]
    return keys, values, positions


def sorted_keep(num_slots, n_keep, gen):
    return torch.randperm(num_slots, generator=gen)[:n_keep].sort().values


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.is_floating_point() else t


def _clone(pool):
    return tuple([t.clone() for t in part] for part in pool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [1, 15, 17, 63, 1000])
@pytest.mark.parametrize("per_layer", [False, True])
def test_kernel_matches_reference(n, per_layer, dtype):
    """In-order moves inside one sequence (dst j <= src keep[j], overlapping ranges), poisoned
    destinations, per-head (and per-layer) keep-sets: kernel == reference bit for bit."""
    torch.manual_seed(n)
    gen = torch.Generator().manual_seed(n + 1)
    num_layers, num_kv, head_dim, block_size = 2, 3, 48, 16
    num_slots = n + 37
    num_blocks = (num_slots + block_size - 1) // block_size + 5
    pool = make_pool(num_layers, num_blocks, block_size, num_kv, head_dim, dtype, seed=n)
    # the sequence owns a shuffled subset of the pool's blocks
    table = torch.randperm(num_blocks, generator=gen)[: (num_slots + block_size - 1) // block_size]
    slots = torch.arange(num_slots)
    flat_of = table[slots // block_size] * block_size + slots % block_size  # [num_slots]
    shape = (num_layers, num_kv) if per_layer else (num_kv,)
    keep = torch.stack([sorted_keep(num_slots, n, gen) for _ in range(int(torch.tensor(shape).prod()))])
    keep = keep.view(*shape, n)
    src = flat_of[keep].to(DEVICE)
    dst = flat_of[:n].to(DEVICE)

    # poison every destination slot that is not also a source (it must be written)
    sources = set(src.flatten().tolist())
    poison = torch.tensor([s for s in dst.tolist() if s not in sources], dtype=torch.long)
    for layer in range(num_layers):
        for part in pool[:2]:
            part[layer].view(-1, num_kv, head_dim)[poison.to(DEVICE)] = float("nan")
    expected_pool = _clone(pool)
    before = _clone(pool)
    reference_compaction(*expected_pool, src, dst)
    compaction(*pool, src, dst)
    for got_part, exp_part in zip(pool, expected_pool):
        for got, exp in zip(got_part, exp_part):
            assert torch.equal(_bits(got), _bits(exp))

    # and the reference does what the contract says: dst j of head h <- old src[h, j]
    for layer in range(num_layers):
        for h in range(num_kv):
            s = (src[layer, h] if per_layer else src[h]).long()
            for part_now, part_old in zip(pool, before):
                now = part_now[layer].view(-1, num_kv, *part_now[layer].shape[3:])
                old = part_old[layer].view(-1, num_kv, *part_old[layer].shape[3:])
                assert torch.equal(now[dst.long(), h], old[s, h])  # NaN != NaN: every slot written


def test_untouched_slots_are_bit_equal():
    pool = make_pool(1, 8, 4, 2, 16, torch.float32, seed=3)
    before = _clone(pool)
    src = torch.tensor([[1, 5, 9], [2, 3, 12]], device=DEVICE)
    dst = torch.tensor([0, 1, 2], device=DEVICE)
    compaction(*pool, src, dst)
    for part_now, part_old in zip(pool, before):
        now = part_now[0].flatten(0, 1)
        old = part_old[0].flatten(0, 1)
        assert torch.equal(now[3:], old[3:])


def test_empty_move_is_a_no_op():
    pool = make_pool(1, 2, 4, 1, 8, torch.float32)
    before = _clone(pool)
    empty = torch.empty(0, dtype=torch.long, device=DEVICE)
    compaction(*pool, empty.view(1, 0), empty)
    assert all(torch.equal(a, b) for pa, pb in zip(pool, before) for a, b in zip(pa, pb))


def test_bad_inputs_raise():
    keys, values, positions = make_pool(2, 4, 4, 2, 8, torch.float32)
    src = torch.zeros(2, 3, dtype=torch.long, device=DEVICE)
    dst = torch.arange(3, device=DEVICE)
    with pytest.raises(ValueError, match="same layers"):
        compaction(keys, values[:1], positions, src, dst)
    with pytest.raises(ValueError, match=r"\[H_kv, n\]"):
        compaction(keys, values, positions, src[:1], dst)
    with pytest.raises(ValueError, match=r"\[L, H_kv, n\]"):
        compaction(keys, values, positions, src[None].expand(3, 2, 3), dst)
    with pytest.raises(TypeError, match="int32 or int64"):
        compaction(keys, values, positions, src.float(), dst)
    with pytest.raises(TypeError, match="int32"):
        compaction(keys, values, [p.long() for p in positions], src, dst)
    with pytest.raises(ValueError, match="shape"):
        compaction(keys, [v[:2] for v in values], positions, src, dst)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 path checked on a GPU only")
def test_kernel_bf16_on_cuda():
    pool = make_pool(2, 200, 16, 4, 128, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    src = torch.stack([sorted_keep(3200, 1000, gen) for _ in range(4)]).to(DEVICE)
    dst = torch.arange(1000, device=DEVICE)
    expected = _clone(pool)
    reference_compaction(*expected, src, dst)
    compaction(*pool, src, dst)
    assert all(torch.equal(a, b) for pa, pb in zip(pool, expected) for a, b in zip(pa, pb))
