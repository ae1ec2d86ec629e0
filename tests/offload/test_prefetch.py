"""Prefetch ahead of a window boundary: OffloadManager.prefetch / swap_window / cancel_prefetch /
load_window, with exact expected resident states (CPU backend; the CUDA part skips without a GPU)."""

import pytest
import torch

from flashmem.offload.block_pool import BlockPool, BlockPoolExhausted
from flashmem.offload.host_mirror import HostMirror
from flashmem.offload.offload_manager import OffloadManager
from flashmem.offload.resident_set import ChunkState

L, H, D, C, BS = 2, 3, 4, 8, 4  # 2 blocks per chunk


def _mirror(n_tokens: int, device="cpu") -> HostMirror:
    mirror = HostMirror(L, H, D, chunk_size=C, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    for l in range(L):
        k = torch.randn(n_tokens, H, D, generator=g).to(device)
        v = torch.randn(n_tokens, H, D, generator=g).to(device)
        mirror.append(l, k, v)
    mirror.commit(n_tokens)
    return mirror


def _setup(n_tokens=48, num_blocks=8, max_chunks=4, device="cpu"):
    mirror = _mirror(n_tokens, device)
    pool = BlockPool(L, num_blocks, H, D, block_size=BS, dtype=torch.float32, device=device)
    return mirror, pool, OffloadManager(mirror, pool, max_chunks=max_chunks)


def _positions(pool, blocks, layer=0):
    return pool.positions[layer][torch.tensor(blocks)].reshape(-1, H).cpu()


def _assert_matches_mirror(om, chunk_id):
    pool, mirror = om.pool, om.mirror
    idx = torch.tensor(om.resident.blocks(chunk_id))
    for l in range(L):
        p = pool.positions[l][idx].reshape(-1, H).cpu()
        k = pool.keys[l][idx].reshape(-1, H, D).cpu()
        v = pool.values[l][idx].reshape(-1, H, D).cpu()
        for h in range(H):
            live = p[:, h] >= 0
            rows = p[live, h].long()
            assert torch.equal(k[live, h], mirror.keys[l][rows, h].cpu())
            assert torch.equal(v[live, h], mirror.values[l][rows, h].cpu())


def _visible(om) -> list[int]:
    return om.resident_blocks()[0].tolist()


def _window_blocks(om, ids) -> list[int]:
    return [b for c in sorted(ids) for b in om.resident.blocks(c)]


def test_prefetch_is_invisible_and_pinned_until_the_swap():
    mirror, pool, om = _setup()
    om.request([0, 1])
    om.ensure_ready([0, 1])
    current = _visible(om)
    assert current == _window_blocks(om, [0, 1])

    hits, misses = om.prefetch([1, 3])
    assert (hits, misses) == ([1], [3])
    assert om.pending_prefetch == [1, 3]
    rs = om.resident
    assert rs.state(3) is ChunkState.LOADING and rs.resident_chunks() == [0, 1]
    # the kernel still reads exactly the current window; the copy of chunk 3 is not visible
    assert _visible(om) == current
    assert rs.pinned_chunks() == [0, 1, 3]
    with pytest.raises(ValueError, match="in flight"):
        om.evict([3])
    with pytest.raises(ValueError, match="pinned"):
        om.evict([1])
    # both windows are held during the overlap: 3 chunks x 2 blocks
    assert pool.blocks_in_use == 6

    assert om.swap_window() == [1, 3]
    assert om.pending_prefetch is None
    assert rs.resident_chunks() == [1, 3] and rs.loading_chunks() == []
    assert rs.pinned_chunks() == [1, 3] and rs.lru_order() == [1, 3]
    assert _visible(om) == _window_blocks(om, [1, 3])
    assert pool.blocks_in_use == 4  # chunk 0 (old window, not selected again) went back
    for c in (1, 3):
        _assert_matches_mirror(om, c)
    stats = om.stats()
    assert stats["prefetches_issued"] == 1 and stats["chunks_prefetched"] == 1
    assert stats["chunks_loaded_on_demand"] == 2 and stats["prefetches_cancelled"] == 0


def test_release_window_keeps_the_pending_prefetch_pinned():
    _, _, om = _setup()
    om.request([0, 1])
    om.ensure_ready()
    om.prefetch([1, 2])
    om.release_window()
    assert om.resident.pinned_chunks() == [1, 2]
    om.evict([0])  # the old window's other chunk may go early
    assert om.swap_window() == [1, 2]
    assert _visible(om) == _window_blocks(om, [1, 2])


def test_compaction_between_prefetch_and_swap_rewrites_the_masks():
    _, pool, om = _setup()
    om.load_window([0], resident_per_head=[{0}, set(), set()])
    working = [{16, 17}, set(), {23}]
    om.prefetch([0, 2], resident_per_head=working)
    blocks2 = om.resident.blocks(2)
    assert _positions(pool, blocks2)[:, 0].tolist() == [-1, -1] + list(range(18, 24))
    # a compaction: the working set now holds other tokens; chunk 0 (ready) is rewritten at once,
    # chunk 2 (in flight) is marked outdated
    after = [set(), {20}, set()]
    om.refresh_positions(after)
    assert om.prefetch_masks_outdated
    assert _positions(pool, om.resident.blocks(0))[:, 0].tolist() == list(range(0, 8))
    with pytest.raises(ValueError, match="resident_per_head"):
        om.swap_window()
    assert om.pending_prefetch == [0, 2]  # refused before any change
    om.swap_window(resident_per_head=[torch.tensor(sorted(w), dtype=torch.int64) for w in after])
    assert not om.prefetch_masks_outdated
    for l in range(L):
        p = _positions(pool, blocks2, l)
        assert p[:, 0].tolist() == list(range(16, 24))
        assert p[:, 1].tolist() == [16, 17, 18, 19, -1, 21, 22, 23]
        assert p[:, 2].tolist() == list(range(16, 24))
    _assert_matches_mirror(om, 2)


def test_swap_without_compaction_keeps_prefetch_masks():
    _, pool, om = _setup()
    om.prefetch([2], resident_per_head=[{16}, set(), set()])
    assert not om.prefetch_masks_outdated
    om.swap_window()
    assert _positions(pool, om.resident.blocks(2))[:, 0].tolist() == [-1] + list(range(17, 24))
    assert _positions(pool, om.resident.blocks(2))[:, 1].tolist() == list(range(16, 24))


def test_cancel_prefetch_restores_the_window():
    _, pool, om = _setup()
    om.load_window([0, 1])
    before = (_visible(om), om.resident.pinned_chunks(), pool.blocks_in_use)
    om.prefetch([1, 4])
    om.cancel_prefetch()
    assert om.pending_prefetch is None
    assert (_visible(om), om.resident.pinned_chunks(), pool.blocks_in_use) == before
    # a hit that the prefetch pinned (an unpinned leftover) is unpinned again
    om.release_window()
    om.prefetch([0, 5])
    assert om.resident.pinned_chunks() == [0, 5]
    om.cancel_prefetch()
    assert om.resident.pinned_chunks() == [] and om.resident.resident_chunks() == [0, 1]
    assert om.stats()["prefetches_cancelled"] == 2
    om.cancel_prefetch()  # nothing pending: no-op


def test_load_window_is_an_immediate_swap():
    _, pool, om = _setup()
    assert om.load_window([0, 1]) == ([], [0, 1])
    assert om.load_window([1, 2]) == ([1], [2])
    assert om.resident.resident_chunks() == [1, 2] and om.resident.pinned_chunks() == [1, 2]
    assert _visible(om) == _window_blocks(om, [1, 2]) and pool.blocks_in_use == 4
    assert om.load_window([]) == ([], [])
    assert om.resident.resident_chunks() == [] and pool.blocks_in_use == 0
    stats = om.stats()
    assert stats["chunks_loaded_on_demand"] == 3 and stats["prefetches_issued"] == 0


def test_prefetch_misuse_is_refused_without_changes():
    mirror, pool, om = _setup(num_blocks=6, max_chunks=None)
    om.load_window([0, 1])
    with pytest.raises(ValueError, match="no prefetch is pending"):
        om.swap_window()
    om.prefetch([2])
    with pytest.raises(ValueError, match="already pending"):
        om.prefetch([3])
    with pytest.raises(ValueError, match="prefetch is pending"):
        om.request([3])
    with pytest.raises(ValueError, match="already pending"):
        om.load_window([3])
    om.cancel_prefetch()
    # the pool holds 3 chunks and the current window (2, pinned) cannot be evicted
    state = (om.resident.lru_order(), pool.num_free, om.engine.h2d_bytes)
    with pytest.raises(BlockPoolExhausted):
        om.prefetch([3, 4])
    assert (om.resident.lru_order(), pool.num_free, om.engine.h2d_bytes) == state
    assert om.pending_prefetch is None
    with pytest.raises(ValueError, match="out of range"):
        om.prefetch([6])
    with pytest.raises(ValueError, match="duplicate"):
        om.prefetch([2, 2])
    assert om.pending_prefetch is None
    om.close()
    assert pool.blocks_in_use == 0


def test_close_with_a_pending_prefetch_frees_everything():
    _, pool, om = _setup()
    om.load_window([0])
    om.prefetch([1, 2])
    om.close()
    assert pool.blocks_in_use == 0 and om.pending_prefetch is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (side stream, events)")
def test_cuda_prefetch_lands_before_the_swap_is_read():
    mirror, pool, om = _setup(n_tokens=64, num_blocks=16, max_chunks=8, device="cuda")
    om.load_window([0, 1])
    visible = _visible(om)
    om.prefetch([1, 5, 6])
    assert _visible(om) == visible  # in flight: not listed for the kernel
    om.swap_window()
    blocks, _ = om.resident_blocks()
    gathered = pool.keys[0][blocks.long()].reshape(-1, H, D)  # ordered after the copies' events
    torch.cuda.synchronize()
    expected = torch.cat([mirror.keys[0][c * C : (c + 1) * C] for c in (1, 5, 6)])
    assert torch.equal(gathered.cpu(), expected.cpu())
    stats = om.stats(sync=True)
    assert stats["prefetches_issued"] == 1 and stats["chunks_prefetched"] == 2
    assert stats["pending_timings"] == 0
    om.close()
    assert pool.blocks_in_use == 0
