"""compact_sequence on a real PagedKVCache: survivors in order, exact freed blocks from the allocator,
other sequences untouched, attention preserved, bad input refused before any change."""

from __future__ import annotations

import math

import pytest
import torch

from flashmem.offload.block_pool import BlockPool
from flashmem.offload.compaction import compact_sequence
from flashmem.offload.paged_cache import PagedKVCache

BACKENDS = ["torch", "triton"]


def fill(cache: PagedKVCache, seq: int, n: int, gen: torch.Generator, start: int = 0, chunk: int = 7) -> None:
    pool = cache.pool
    done = 0
    while done < n:
        m = min(chunk, n - done)
        cache.begin_append(seq, m)
        pos = torch.arange(start + done, start + done + m)
        for layer in range(pool.num_layers):
            k = torch.randn(m, pool.num_kv_heads, pool.head_dim, generator=gen)
            v = torch.randn(m, pool.num_kv_heads, pool.head_dim, generator=gen)
            cache.write(seq, layer, k, v, pos)
        cache.end_append(seq)
        done += m


def make(num_layers=2, num_kv=3, head_dim=8, num_blocks=64, block_size=16, seed=0):
    pool = BlockPool(num_layers, num_blocks, num_kv, head_dim, block_size=block_size)
    return PagedKVCache(pool), torch.Generator().manual_seed(seed)


def snapshot(cache: PagedKVCache) -> list[torch.Tensor]:
    """Raw bytes of the whole pool (unwritten slots may hold NaN, so compare bits)."""
    pool = cache.pool
    return [t.clone().view(torch.uint8) for t in pool.keys + pool.values] + [
        t.clone() for t in pool.positions
    ]


def snapshot_blocks(pool: BlockPool, blocks: torch.Tensor) -> list[torch.Tensor]:
    """Raw bytes of some blocks in every layer (K, V as bits, positions as ints)."""
    return [t[blocks].clone().view(torch.uint8) for t in pool.keys + pool.values] + [
        t[blocks].clone() for t in pool.positions
    ]


def random_keep(num_slots, n_keep, shape, gen) -> torch.Tensor:
    rows = [torch.randperm(num_slots, generator=gen)[:n_keep].sort().values for _ in range(math.prod(shape))]
    return torch.stack(rows).view(*shape, n_keep)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("num_slots,n_keep", [(200, 37), (200, 48), (161, 1), (64, 64), (50, 0)])
def test_survivors_in_order_and_exact_freed_blocks(backend, per_layer, num_slots, n_keep):
    cache, gen = make()
    pool = cache.pool
    other = cache.add_sequence()
    seq = cache.add_sequence()
    fill(cache, other, 40, gen)
    fill(cache, seq, num_slots, gen, start=1000)
    fill(cache, other, 30, gen, start=40)  # interleaved block allocation
    before = {layer: cache.gather(seq, layer) for layer in range(pool.num_layers)}
    other_before = {layer: cache.gather(other, layer) for layer in range(pool.num_layers)}
    other_table = cache.block_table(other)
    other_blocks = torch.tensor(other_table)
    other_raw = snapshot_blocks(pool, other_blocks)
    allocated = len(cache.block_table(seq))
    in_use = pool.blocks_in_use
    shape = (pool.num_layers, pool.num_kv_heads) if per_layer else (pool.num_kv_heads,)
    keep = random_keep(num_slots, n_keep, shape, gen)

    freed = compact_sequence(cache, seq, keep, backend=backend)

    assert freed == allocated - math.ceil(n_keep / pool.block_size)
    assert pool.blocks_in_use == in_use - freed
    assert cache.num_slots(seq) == n_keep
    assert len(cache.block_table(seq)) == math.ceil(n_keep / pool.block_size)
    heads = torch.arange(pool.num_kv_heads)[:, None]
    for layer in range(pool.num_layers):
        k, v, p = cache.gather(seq, layer)
        k0, v0, p0 = before[layer]
        idx = keep[layer] if per_layer else keep  # [H_kv, n_keep]
        assert torch.equal(k, k0[idx, heads].transpose(0, 1))
        assert torch.equal(v, v0[idx, heads].transpose(0, 1))
        assert torch.equal(p, p0[idx, heads].transpose(0, 1))
        # positions stay true and increasing in slot order per head
        assert bool((p[1:] > p[:-1]).all())
        # the other sequence is bit-equal, through its table and in raw block storage
        for got, exp in zip(cache.gather(other, layer), other_before[layer]):
            assert torch.equal(got, exp)
    assert cache.block_table(other) == other_table
    for raw, now in zip(other_raw, snapshot_blocks(pool, other_blocks)):
        assert torch.equal(raw, now)
    # slots past the survivors in the last kept block are marked empty
    if n_keep % pool.block_size:
        last = cache.block_table(seq)[-1]
        for pos in pool.positions:
            assert bool((pos[last, n_keep % pool.block_size :] == -1).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_over_compacted_cache_equals_attention_over_survivors(backend):
    cache, gen = make(num_layers=1, num_kv=2, head_dim=16)
    seq = cache.add_sequence()
    fill(cache, seq, 150, gen)
    k0, v0, _ = cache.gather(seq, 0)
    keep = random_keep(150, 41, (2,), gen)
    compact_sequence(cache, seq, keep, backend=backend)
    k1, v1, _ = cache.gather(seq, 0)
    q = torch.randn(2, 3, 16, generator=gen)  # [H_kv, queries, D]
    for h in range(2):
        ks, vs = k0[keep[h], h], v0[keep[h], h]  # survivors gathered from the original cache
        expected = torch.softmax(q[h] @ ks.T / 4.0, dim=-1) @ vs
        got = torch.softmax(q[h] @ k1[:, h].T / 4.0, dim=-1) @ v1[:, h]
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize(
    "keep,match",
    [
        ([[3, 1, 5], [0, 1, 2], [4, 5, 6]], "strictly increasing"),
        ([[1, 1, 5], [0, 1, 2], [4, 5, 6]], "strictly increasing"),
        ([[1, 2], [0, 1, 2], [4, 5, 6]], "same number"),
        ([[1, 2, 80], [0, 1, 2], [4, 5, 6]], "out of range"),
        ([[-1, 2, 3], [0, 1, 2], [4, 5, 6]], "out of range"),
        ([[1, 2, 3], [0, 1, 2]], "H_kv"),
    ],
)
def test_bad_keep_sets_raise_before_any_change(keep, match):
    cache, gen = make()
    seq = cache.add_sequence()
    fill(cache, seq, 70, gen)
    state = snapshot(cache)
    table = cache.block_table(seq)
    freed_total = cache.pool.blocks_freed_total
    with pytest.raises(ValueError, match=match):
        compact_sequence(cache, seq, keep)
    if isinstance(keep, list) and len({len(r) for r in keep}) == 1:
        with pytest.raises(ValueError, match=match):
            compact_sequence(cache, seq, torch.tensor(keep))
    assert all(torch.equal(a, b) for a, b in zip(state, snapshot(cache)))
    assert cache.block_table(seq) == table and cache.num_slots(seq) == 70
    assert cache.pool.blocks_freed_total == freed_total


def test_other_refusals():
    cache, gen = make()
    seq = cache.add_sequence()
    fill(cache, seq, 20, gen)
    keep = torch.arange(5).expand(3, 5)
    with pytest.raises(TypeError, match="integer"):
        compact_sequence(cache, seq, keep.float())
    with pytest.raises(ValueError, match="backend"):
        compact_sequence(cache, seq, keep, backend="cuda")
    with pytest.raises(ValueError, match="keeps 30 slots"):
        compact_sequence(cache, seq, torch.arange(30).expand(3, 30))
    with pytest.raises(ValueError, match=r"\[L, H_kv, n_keep\]"):
        compact_sequence(cache, seq, torch.arange(5).expand(5, 3, 5))
    cache.begin_append(seq, 1)
    with pytest.raises(RuntimeError, match="pending"):
        compact_sequence(cache, seq, keep)
    assert cache.num_slots(seq) == 20


def test_repeated_compaction_keeps_freeing_exactly():
    """Append / compact cycles as the decode loop does them: blocks in use stay bounded."""
    cache, gen = make(num_blocks=40)
    seq = cache.add_sequence()
    pool = cache.pool
    logical = 0
    for _ in range(6):
        fill(cache, seq, 96, gen, start=logical, chunk=16)
        logical += 96
        n = cache.num_slots(seq)
        blocks = len(cache.block_table(seq))
        rest = random_keep(n - 4, 60, (pool.num_kv_heads,), gen) + 4
        keep = torch.cat([torch.arange(4).expand(pool.num_kv_heads, 4), rest], dim=1)  # sinks + 60
        freed = compact_sequence(cache, seq, keep)
        assert freed == blocks - 4
        assert pool.blocks_in_use == 4
    assert cache.logical_length(seq) == logical
