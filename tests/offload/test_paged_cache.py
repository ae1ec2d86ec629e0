"""Block pool and paged cache: bytes counted from allocated blocks, true positions per slot, the
logical length apart from the slot count, exact tail blocks freed, bad writes refused before any
change (docs/architecture.md, invariants 3 and 4)."""

import math

import pytest
import torch

from flashmem.offload.block_pool import BlockPool, BlockPoolExhausted
from flashmem.offload.paged_cache import PagedKVCache


def _pool(num_blocks=12, layers=2, heads=3, dim=8, block=4):
    return BlockPool(layers, num_blocks, heads, dim, block_size=block, dtype=torch.float32)


def _append(cache, seq, n, start, seed):
    g = torch.Generator().manual_seed(seed)
    pool = cache.pool
    cache.begin_append(seq, n)
    data = []
    for layer in range(pool.num_layers):
        k = torch.randn(n, pool.num_kv_heads, pool.head_dim, generator=g)
        v = torch.randn(n, pool.num_kv_heads, pool.head_dim, generator=g)
        cache.write(seq, layer, k, v, torch.arange(start, start + n))
        data.append((k, v))
    cache.end_append(seq)
    return data


def test_accounting_and_block_bytes():
    pool = _pool()
    assert pool.kv_block_bytes == 2 * 2 * 4 * 3 * 8 * 4
    ids = pool.allocate(5)
    assert pool.blocks_in_use == 5 and pool.num_free == 7
    assert pool.device_kv_bytes == 5 * pool.kv_block_bytes
    pool.free(ids[:2])
    assert pool.blocks_in_use == 3 and pool.peak_blocks_in_use == 5
    assert pool.blocks_freed_total == 2 and pool.blocks_allocated_total == 5
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(ids[:1])
    with pytest.raises(BlockPoolExhausted):
        pool.allocate(10)
    assert pool.blocks_in_use == 3  # all-or-nothing


def test_append_gather_roundtrip_and_positions():
    cache = PagedKVCache(_pool())
    seq = cache.add_sequence()
    a = _append(cache, seq, 6, 0, 1)
    b = _append(cache, seq, 1, 6, 2)
    assert cache.num_slots(seq) == 7 == cache.logical_length(seq)
    assert len(cache.block_table(seq)) == math.ceil(7 / 4)
    for layer in range(2):
        k, v, p = cache.gather(seq, layer)
        torch.testing.assert_close(k, torch.cat([a[layer][0], b[layer][0]]), rtol=0, atol=0)
        torch.testing.assert_close(v, torch.cat([a[layer][1], b[layer][1]]), rtol=0, atol=0)
        assert p.dtype == torch.int32 and torch.equal(p[:, 0], torch.arange(7, dtype=torch.int32))


def test_two_sequences_do_not_share_blocks_and_truncate_frees_exact_tail():
    cache = PagedKVCache(_pool())
    s1, s2 = cache.add_sequence(), cache.add_sequence()
    _append(cache, s1, 13, 0, 3)
    _append(cache, s2, 5, 0, 4)
    assert not set(cache.block_table(s1)) & set(cache.block_table(s2))
    k2, v2, p2 = cache.gather(s2, 1)
    freed = cache.truncate(s1, 5)
    assert freed == math.ceil(13 / 4) - math.ceil(5 / 4)
    assert cache.num_slots(s1) == 5 and cache.logical_length(s1) == 13  # two different counters
    assert cache.pool.blocks_in_use == math.ceil(5 / 4) + math.ceil(5 / 4)
    k2b, v2b, p2b = cache.gather(s2, 1)
    assert torch.equal(k2, k2b) and torch.equal(v2, v2b) and torch.equal(p2, p2b)
    # the kept partial block marks its dead slots empty
    last = cache.block_table(s1)[-1]
    assert (cache.pool.positions[0][last, 1:] == -1).all()


def test_bad_writes_are_refused_before_any_change():
    cache = PagedKVCache(_pool())
    seq = cache.add_sequence()
    cache.begin_append(seq, 3)
    before = cache.pool.keys[0].clone()
    with pytest.raises(ValueError, match="shape"):
        cache.write(seq, 0, torch.zeros(2, 3, 8), torch.zeros(2, 3, 8), torch.arange(2))
    with pytest.raises(ValueError, match="layer"):
        cache.write(seq, 5, torch.zeros(3, 3, 8), torch.zeros(3, 3, 8), torch.arange(3))
    assert torch.equal(before.nan_to_num(), cache.pool.keys[0].nan_to_num())
    with pytest.raises(RuntimeError, match="missing layers"):
        cache.end_append(seq)
    cache.abort_append(seq)
    assert cache.pool.blocks_in_use == 0 and cache.num_slots(seq) == 0


def test_free_sequence_returns_every_block():
    cache = PagedKVCache(_pool())
    seq = cache.add_sequence()
    _append(cache, seq, 9, 0, 5)
    cache.free_sequence(seq)
    assert cache.pool.blocks_in_use == 0 and cache.pool.num_free == 12
    assert (cache.pool.positions[1] == -1).all()
