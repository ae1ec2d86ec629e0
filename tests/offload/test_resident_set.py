"""ResidentSet control plane: narrated scenarios with exact block ids, LRU order and counters."""

import pytest
import torch

from flashmem.offload.block_pool import BlockPool, BlockPoolExhausted
from flashmem.offload.resident_set import ChunkState, ResidentSet, dedupe_positions


def _pool(num_blocks=8, block_size=4):
    return BlockPool(1, num_blocks, 1, 2, block_size=block_size)


def _snapshot(rs: ResidentSet):
    return (
        rs.lru_order(),
        {c: (rs.blocks(c), rs.state(c), rs.get(c).pinned) for c in rs.lru_order()},
        rs.pool.num_free,
        (rs.hits, rs.misses, rs.loads, rs.evictions, rs.lru_evictions),
    )


def test_chunk_size_must_be_multiple_of_block_size():
    with pytest.raises(ValueError, match="multiple"):
        ResidentSet(_pool(block_size=4), 6)


def test_narrated_request_load_pin_evict_rerequest():
    pool = _pool()  # 8 blocks of 4 slots; chunks of 8 tokens -> 2 blocks each; free list 0..7
    rs = ResidentSet(pool, 8)
    assert rs.blocks_per_chunk == 2

    # A window asks for chunks 0 and 1: both miss.
    assert rs.lookup([0, 1]) == ([], [0, 1])
    plan = rs.prepare_load([0, 1])
    assert plan.chunk_ids == [0, 1] and plan.blocks == [[0, 1], [2, 3]] and plan.evicted == []
    assert rs.state(0) is ChunkState.LOADING and pool.blocks_in_use == 4

    # In flight: cannot be evicted, and the refusal changes nothing.
    before = _snapshot(rs)
    with pytest.raises(ValueError, match="in flight"):
        rs.evict([0])
    assert _snapshot(rs) == before

    rs.complete_load([0, 1])
    assert rs.resident_chunks() == [0, 1] and rs.loading_chunks() == []

    # Chunk 0 is pinned for the window; 2 and 3 take the last free blocks.
    rs.pin([0])
    assert rs.prepare_load([2, 3]).blocks == [[4, 5], [6, 7]]
    rs.complete_load([2, 3])
    assert rs.lru_order() == [0, 1, 2, 3]
    rs.touch([1])
    assert rs.lru_order() == [0, 2, 3, 1]

    # Pool full: loading chunk 4 evicts the LRU unpinned chunk (2, since 0 is pinned).
    plan = rs.prepare_load([4])
    assert plan.evicted == [2] and plan.blocks == [[4, 5]]
    assert rs.lru_order() == [0, 3, 1, 4] and 2 not in rs
    assert (rs.loads, rs.evictions, rs.lru_evictions) == (5, 1, 1)

    # Pinned chunk: explicit eviction is an error until the window is released.
    with pytest.raises(ValueError, match="pinned"):
        rs.evict([0])
    rs.unpin([0])
    rs.evict([0])  # blocks 0, 1 go to the end of the free list
    assert rs.lru_order() == [3, 1, 4] and pool.num_free == 2

    # Chunk 4 is still loading: when 5 and 6 need 4 blocks, only chunk 3 may go.
    rs.pin([1])
    plan = rs.prepare_load([5, 6])
    assert plan.evicted == [3] and plan.blocks == [[0, 1], [6, 7]]
    assert rs.lru_order() == [1, 4, 5, 6]

    # Nothing evictable (1 pinned, 4/5/6 in flight): refused, nothing changed.
    before = _snapshot(rs)
    with pytest.raises(BlockPoolExhausted, match="evictable"):
        rs.prepare_load([7])
    assert _snapshot(rs) == before

    # Re-request chunk 2 together with the in-flight 5: 5 hits, 2 misses.
    assert rs.lookup([2, 5]) == ([5], [2])
    assert (rs.hits, rs.misses) == (1, 3)
    assert rs.hit_rate == pytest.approx(0.25)

    rs.complete_load([4, 5, 6])
    rs.unpin()
    plan = rs.prepare_load([2])
    assert plan.evicted == [1] and plan.blocks == [[2, 3]]
    assert rs.lru_order() == [4, 5, 6, 2]
    assert pool.blocks_in_use == 8 and rs.num_blocks_held == 8
    assert list(rs.events)[-3:] == [("ready", 6), ("evict_lru", 1), ("load", 2)]
    stats = rs.stats()
    assert stats["chunk_loads"] == 8 and stats["chunk_evictions"] == 4 and stats["chunk_lru_evictions"] == 3
    assert stats["recall_device_kv_bytes"] == 8 * pool.kv_block_bytes

    rs.complete_load([2])
    rs.clear()
    assert len(rs) == 0 and pool.blocks_in_use == 0 and pool.num_free == 8


def test_protect_and_errors_leave_state_unchanged():
    pool = _pool(num_blocks=4)
    rs = ResidentSet(pool, 8)
    rs.prepare_load([0, 1])
    rs.complete_load([0, 1])
    before = _snapshot(rs)
    with pytest.raises(BlockPoolExhausted):
        rs.prepare_load([2], protect=[0, 1])  # the hits of the same request may not be victims
    with pytest.raises(ValueError, match="already"):
        rs.prepare_load([1])
    with pytest.raises(ValueError, match="duplicate"):
        rs.prepare_load([3, 3])
    with pytest.raises(KeyError):
        rs.evict([0, 9])
    with pytest.raises(ValueError, match="not loading"):
        rs.complete_load([0])
    with pytest.raises(ValueError, match="valid_tokens"):
        rs.prepare_load([2], valid_tokens=[9])
    assert _snapshot(rs) == before
    plan = rs.prepare_load([2], protect=[0])
    assert plan.evicted == [1] and plan.blocks == [[2, 3]]


def test_chunk_budget_evicts_by_count():
    pool = _pool(num_blocks=16)
    rs = ResidentSet(pool, 8, max_chunks=2)
    rs.prepare_load([0, 1])
    rs.complete_load([0, 1])
    plan = rs.prepare_load([2])  # blocks are free, but the budget of 2 chunks forces an eviction
    assert plan.evicted == [0] and plan.blocks == [[4, 5]]
    assert len(rs) == 2 and pool.blocks_in_use == 4
    with pytest.raises(ValueError, match="budget"):
        rs.prepare_load([5, 6, 7])


def test_partial_residency_mask():
    # Chunk 1 of 8 tokens (positions 8..15; 14, 15 not committed yet) and 2 KV heads.
    slot_positions = torch.tensor([8, 9, 10, 11, 12, 13, -1, -1])
    working = [{0, 9, 12}, torch.tensor([3, 8, 13, -1])]
    out = dedupe_positions(slot_positions, working)
    assert out.dtype == torch.int32 and out.shape == (8, 2)
    assert out[:, 0].tolist() == [8, -1, 10, 11, -1, 13, -1, -1]
    assert out[:, 1].tolist() == [-1, 9, 10, 11, 12, -1, -1, -1]
    # no (token, head) both in the working set and valid in the recalled slots
    for h, res in enumerate([{0, 9, 12}, {3, 8, 13}]):
        kept = {int(p) for p in out[:, h] if p >= 0}
        assert kept.isdisjoint(res)
        assert kept | (res & set(range(8, 14))) == set(range(8, 14))
