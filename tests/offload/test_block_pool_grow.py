"""BlockPool.grow keeps every block's id and contents; the new blocks are free and empty."""

import pytest
import torch

from flashmem.offload.block_pool import BlockPool, BlockPoolExhausted
from flashmem.offload.paged_cache import PagedKVCache


def test_grow_keeps_ids_contents_and_counters():
    pool = BlockPool(2, 3, 2, 4, block_size=4)
    paged = PagedKVCache(pool)
    seq = paged.add_sequence()
    torch.manual_seed(0)
    k = torch.randn(10, 2, 4)
    v = torch.randn(10, 2, 4)
    paged.begin_append(seq, 10)
    for layer in range(2):
        paged.write(seq, layer, k + layer, v - layer, torch.arange(10))
    paged.end_append(seq)
    table = paged.block_table(seq)
    before = [paged.gather(seq, layer) for layer in range(2)]
    counters = (pool.blocks_in_use, pool.peak_blocks_in_use, pool.blocks_allocated_total, pool.num_free)
    with pytest.raises(BlockPoolExhausted, match=r"BlockPool\(num_blocks=\.\.\.\) or BlockPool.grow"):
        pool.allocate(1)

    pool.grow(7)
    assert pool.num_blocks == 7 and pool.num_free == 4
    assert (pool.blocks_in_use, pool.peak_blocks_in_use, pool.blocks_allocated_total) == counters[:3]
    assert pool.capacity_bytes == 7 * pool.kv_block_bytes
    for layer in range(2):
        assert pool.keys[layer].shape == (7, 4, 2, 4) and pool.positions[layer].shape == (7, 4, 2)
        assert bool((pool.positions[layer][3:] == -1).all())
        for a, b in zip(before[layer], paged.gather(seq, layer)):
            assert torch.equal(a, b)
    assert paged.block_table(seq) == table
    # the sequence grows into the new blocks
    paged.begin_append(seq, 9)
    for layer in range(2):
        paged.write(seq, layer, torch.ones(9, 2, 4), torch.ones(9, 2, 4), torch.arange(10, 19))
    paged.end_append(seq)
    assert sorted(paged.block_table(seq))[3:] == [3, 4]
    k2, _, pos = paged.gather(seq, 1)
    assert torch.equal(k2[:10], k + 1) and torch.equal(pos[:, 0], torch.arange(19, dtype=torch.int32))


def test_grow_refuses_to_shrink_and_same_size_is_a_no_op():
    pool = BlockPool(1, 4, 1, 2)
    with pytest.raises(ValueError, match=">= num_blocks"):
        pool.grow(3)
    with pytest.raises(ValueError, match=">= num_blocks"):
        pool.grow(5.0)
    keys = pool.keys[0]
    pool.grow(4)
    assert pool.keys[0] is keys and pool.num_free == 4
