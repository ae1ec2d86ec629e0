"""TransferEngine data plane and the OffloadManager facade (CPU backend; CUDA parts skip without a GPU)."""

import pytest
import torch

from flashmem.offload.block_pool import BlockPool, BlockPoolExhausted
from flashmem.offload.host_mirror import HostMirror
from flashmem.offload.offload_manager import OffloadManager
from flashmem.offload.transfer import TransferEngine

L, H, D, C, BS = 2, 3, 4, 8, 4


def _mirror(n_tokens: int, dtype=torch.bfloat16, seed=0) -> HostMirror:
    mirror = HostMirror(L, H, D, chunk_size=C, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    for l in range(L):
        # random bit patterns (finite), so any byte mix-up shows
        k = (torch.randn(n_tokens, H, D, generator=g) * 100).to(dtype)
        v = (torch.randn(n_tokens, H, D, generator=g) * 100).to(dtype)
        mirror.append(l, k, v)
    mirror.commit(n_tokens)
    return mirror


def _device_rows(pool: BlockPool, layer: int, blocks: list[int]):
    idx = torch.tensor(blocks)
    k = pool.keys[layer][idx].reshape(-1, H, D)
    v = pool.values[layer][idx].reshape(-1, H, D)
    p = pool.positions[layer][idx].reshape(-1, H)
    return k, v, p


def _assert_chunk_matches(pool, mirror, chunk_id, blocks):
    for l in range(L):
        k, v, p = _device_rows(pool, l, blocks)
        mk, mv, mp = mirror.chunk_rows(l, [chunk_id])
        valid = mp >= 0
        assert torch.equal(p, mp[:, None].expand(-1, H))
        assert torch.equal(k[valid].view(torch.int16), mk[valid].view(torch.int16))
        assert torch.equal(v[valid].view(torch.int16), mv[valid].view(torch.int16))


def test_engine_one_copy_per_batch_exact_bytes():
    mirror = _mirror(29)  # chunks 0..3, chunk 3 holds 5 tokens
    pool = BlockPool(L, 10, H, D, block_size=BS, dtype=torch.bfloat16)
    engine = TransferEngine(mirror, pool)
    blocks = [pool.allocate(2), pool.allocate(2), pool.allocate(2)]
    engine.load([3, 0, 2], blocks)
    rows = 3 * C
    expected = rows * 8 + L * 2 * rows * H * D * 2 + rows * H * 4
    stats = engine.stats()
    assert stats["h2d_bytes"] == expected and stats["h2d_copies"] == 1 and stats["h2d_batches"] == 1
    assert stats["backend"] == "cpu" and stats["chunks_loaded"] == 3
    assert engine.in_flight() == [0, 2, 3]
    engine.load([1], [pool.allocate(2)])  # a second batch
    assert engine.in_flight() == [0, 1, 2, 3]
    # a wait covers the batches holding the chunks named, whole, each once: chunks 0 and 2 share a
    # batch that also carried 3; chunk 1's batch stays in flight
    engine.wait([0, 2])
    assert engine.in_flight() == [1] and engine.stats()["waits"] == 1
    engine.wait([0, 2, 3])  # their batch was waited for already: nothing to wait on
    assert engine.in_flight() == [1] and engine.stats()["waits"] == 1
    engine.wait([1])
    assert engine.in_flight() == [] and engine.stats()["waits"] == 2
    for c, b in zip([3, 0, 2], blocks):
        _assert_chunk_matches(pool, mirror, c, b)
    # the partial chunk (tokens 24..28) leaves its tail slots empty, in every layer and head
    for layer in range(L):
        assert pool.positions[layer][blocks[0][1]].tolist() == [[28] * H] + [[-1] * H] * (BS - 1)


def test_engine_rejects_bad_input_before_work():
    mirror = _mirror(16)
    pool = BlockPool(L, 6, H, D, block_size=BS, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dtype"):
        TransferEngine(mirror, BlockPool(L, 6, H, D, block_size=BS, dtype=torch.float32))
    with pytest.raises(ValueError, match="disagree"):
        TransferEngine(mirror, BlockPool(L, 6, H + 1, D, block_size=BS, dtype=torch.bfloat16))
    engine = TransferEngine(mirror, pool)
    keys_before = [k.clone() for k in pool.keys]
    good = pool.allocate(2)
    with pytest.raises(ValueError, match="allocated"):
        engine.load([0], [[good[0], 5]])  # block 5 is free
    with pytest.raises(ValueError, match="out of range"):
        engine.load([2], [good])
    with pytest.raises(ValueError, match="needs 2 blocks"):
        engine.load([0], [good[:1]])
    with pytest.raises(ValueError, match="positions"):
        engine.load([0], [good], positions=torch.zeros(3, H, dtype=torch.int32))
    assert engine.h2d_bytes == 0 and engine.in_flight() == []
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(pool.keys, keys_before))
    engine.load([0], [good])
    with pytest.raises(ValueError, match="in flight"):
        engine.load([0], [good])


def test_manager_evict_and_rerequest_is_bit_identical():
    mirror = _mirror(40)  # 5 full chunks
    pool = BlockPool(L, 6, H, D, block_size=BS, dtype=torch.bfloat16)  # room for 3 chunks
    om = OffloadManager(mirror, pool)
    assert om.request([1, 4]) == ([], [1, 4])
    om.ensure_ready([1, 4])
    first = {c: [t.clone() for t in _device_rows(pool, 0, om.resident.blocks(c))] for c in (1, 4)}
    om.release_window()
    om.request([0, 2, 3])  # pool holds 3 chunks: 1 and 4 get evicted (LRU)
    assert om.resident.lru_order() == [0, 2, 3] and om.resident.evictions == 2
    om.ensure_ready()
    om.release_window()
    om.evict([0, 2])
    hits, misses = om.request([4, 1])
    assert hits == [] and misses == [4, 1]
    om.ensure_ready()
    for c in (1, 4):
        blocks = om.resident.blocks(c)
        _assert_chunk_matches(pool, mirror, c, blocks)
        again = _device_rows(pool, 0, blocks)
        for a, b in zip(first[c], again):
            assert torch.equal(
                a.view(torch.int8) if a.is_floating_point() else a,
                b.view(torch.int8) if b.is_floating_point() else b,
            )
    stats = om.stats()
    for key in ("h2d_bytes", "d2h_bytes", "h2d_copies", "stalls", "stall_time_s", "hit_rate", "h2d_gbps"):
        assert key in stats
    assert (
        stats["h2d_copies"] == 3 and stats["chunk_loads"] == 7 and stats["d2h_bytes"] == mirror.host_kv_bytes
    )


def test_manager_flow_pins_resident_blocks_and_hits():
    mirror = _mirror(28)  # chunk 3 partial (4 tokens)
    pool = BlockPool(L, 12, H, D, block_size=BS, dtype=torch.bfloat16)
    om = OffloadManager(mirror, pool)
    om.request([3, 0])
    # nothing is attended before it was waited for
    assert om.resident_blocks()[0].tolist() == []
    with pytest.raises(ValueError, match="in flight"):
        om.evict([0])
    om.ensure_ready([3, 0])
    blocks, valid = om.resident_blocks()
    # token order: chunk 0 (blocks 2, 3) before chunk 3 (blocks 0, 1; 4 committed tokens)
    assert blocks.tolist() == [2, 3, 0, 1] and valid.tolist() == [4, 4, 4, 0]
    assert blocks.dtype == torch.int32
    with pytest.raises(ValueError, match="pinned"):
        om.evict([0])
    assert om.request([0, 1]) == ([0], [1])
    assert om.resident.lru_order() == [3, 0, 1]
    om.ensure_ready()
    om.release_window()
    assert om.resident.pinned_chunks() == []
    assert om.stats()["hit_rate"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="out of range"):
        om.request([4])
    with pytest.raises(ValueError, match="duplicate"):
        om.request([1, 1])


def test_manager_reloads_grown_partial_chunk():
    mirror = _mirror(12)  # chunk 1 has 4 of 8 tokens
    pool = BlockPool(L, 8, H, D, block_size=BS, dtype=torch.bfloat16)
    om = OffloadManager(mirror, pool)
    om.request([1])
    om.ensure_ready()
    om.release_window()
    g = torch.Generator().manual_seed(7)
    for l in range(L):
        mirror.append(
            l,
            torch.randn(4, H, D, generator=g).to(torch.bfloat16),
            torch.randn(4, H, D, generator=g).to(torch.bfloat16),
        )
    mirror.commit(4)
    hits, misses = om.request([1])
    assert (hits, misses) == ([], [1]) and om.stats()["stale_reloads"] == 1
    om.ensure_ready()
    _assert_chunk_matches(pool, mirror, 1, om.resident.blocks(1))
    assert om.resident_blocks()[1].tolist() == [4, 4]


def test_manager_partial_residency_dedupe_and_refresh():
    mirror = _mirror(16)
    pool = BlockPool(L, 8, H, D, block_size=BS, dtype=torch.bfloat16)
    om = OffloadManager(mirror, pool)
    working = [{8, 9}, set(), {15}]
    om.request([1], resident_per_head=working)
    om.ensure_ready()
    blocks = om.resident.blocks(1)
    for l in range(L):
        p = _device_rows(pool, l, blocks)[2]
        assert p[:, 0].tolist() == [-1, -1] + list(range(10, 16))
        assert p[:, 1].tolist() == list(range(8, 16))
        assert p[:, 2].tolist() == list(range(8, 15)) + [-1]
    om.refresh_positions([set(), {12}, set()])  # the working tokens changed (compaction)
    for l in range(L):
        p = _device_rows(pool, l, blocks)[2]
        assert p[:, 0].tolist() == list(range(8, 16))
        assert p[:, 1].tolist() == [8, 9, 10, 11, -1, 13, 14, 15]
        assert p[:, 2].tolist() == list(range(8, 16))


def test_manager_request_too_big_leaves_state():
    mirror = _mirror(40)
    pool = BlockPool(L, 4, H, D, block_size=BS, dtype=torch.bfloat16)
    om = OffloadManager(mirror, pool)
    om.request([0])
    before = (om.resident.lru_order(), pool.num_free, om.engine.h2d_bytes)
    with pytest.raises(BlockPoolExhausted):
        om.request([1, 2])  # chunk 0 is pinned and in flight
    assert (om.resident.lru_order(), pool.num_free, om.engine.h2d_bytes) == before
    om.close()
    assert pool.blocks_in_use == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (side stream, events, pinned staging)")
def test_cuda_async_load_wait_and_stats():
    mirror = HostMirror(L, H, D, chunk_size=C, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(L, 2, 64, H, D, generator=g).to(torch.bfloat16).cuda()
    for l in range(L):
        mirror.append(l, kv[l, 0], kv[l, 1])
    mirror.commit(64)
    assert mirror.storage.is_pinned()
    pool = BlockPool(L, 16, H, D, block_size=BS, dtype=torch.bfloat16, device="cuda")
    om = OffloadManager(mirror, pool)
    om.request([7, 2, 5])
    om.ensure_ready()
    torch.cuda.synchronize()
    for c in (7, 2, 5):
        blocks = om.resident.blocks(c)
        for l in range(L):
            k, v, p = _device_rows(pool, l, blocks)
            assert torch.equal(k, kv[l, 0, c * C : (c + 1) * C]) and torch.equal(
                v, kv[l, 1, c * C : (c + 1) * C]
            )
            assert p[:, 0].tolist() == list(range(c * C, (c + 1) * C))
    stats = om.stats(sync=True)
    assert stats["backend"] == "cuda" and stats["h2d_copies"] == 1 and stats["h2d_gbps"] > 0
    assert stats["pending_timings"] == 0


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
    ],
)
def test_manager_traffic_counts_every_copy(device):
    """Each copy counted once where it is issued; the same figures on both backends."""
    n = 29
    mirror = _mirror(n)
    pool = BlockPool(L, 12, H, D, block_size=BS, dtype=torch.bfloat16, device=device)
    om = OffloadManager(mirror, pool)
    om.request([3, 0], resident_per_head=[{0, 1}, set(), {27}])
    om.ensure_ready()
    om.resident_blocks()
    om.resident_blocks()  # unchanged resident set: the cached tables, no copy
    om.refresh_positions([set(), {2}, set()])  # rewrites both chunks' duplicate masks
    om.release_window()
    om.request([1])
    om.ensure_ready()
    om.resident_blocks()

    def staging(rows):  # slots int64 + K/V of every layer (bf16) + positions int32 per head
        return rows * 8 + L * 2 * rows * H * D * 2 + rows * H * 4

    recall = staging(2 * C) + staging(C)
    masks = 2 * C * 8 + 2 * C * H * 4  # slot indices + per-head positions of the two chunks
    tables = 2 * 4 * (4 + 6)  # block ids + valid counts (int32): 4 blocks, then 6
    traffic = om.traffic()
    assert traffic == {
        "h2d_bytes": recall + masks + tables,
        "d2h_bytes": n * mirror.kv_bytes_per_token,
        "mirror_d2h_bytes": n * mirror.kv_bytes_per_token,
        "mirror_h2d_bytes": 0,
        "recall_h2d_bytes": recall,
        "meta_h2d_bytes": masks + tables,
        "meta_d2h_bytes": 0,
    }
    stats = om.stats()
    assert stats["h2d_bytes"] == recall and stats["meta_h2d_bytes"] == masks
    assert stats["table_h2d_bytes"] == tables and stats["d2h_bytes"] == mirror.d2h_bytes
    assert om.engine.traffic()["h2d_bytes"] == recall + masks
