"""HeadRecallWindow: every (layer, KV head, slot) holds the rows of its own chunk, positions are the
true ones except where that head's working set holds the token (or the slot is empty)."""

import pytest
import torch

from flashmem.offload.block_pool import BlockPool
from flashmem.offload.head_window import HeadRecallWindow, dedupe_heads
from flashmem.offload.host_mirror import HostMirror

L, H, D, C, BS = 2, 3, 4, 8, 4


def _mirror(n_tokens: int, seed=0) -> HostMirror:
    mirror = HostMirror(L, H, D, chunk_size=C, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    for layer in range(L):
        mirror.append(
            layer, torch.randn(n_tokens, H, D, generator=g), torch.randn(n_tokens, H, D, generator=g)
        )
    mirror.commit(n_tokens)
    return mirror


def _slot_rows(pool, window, layer, slot):
    """K, V [C, H, D] and positions [C, H] of one slot of one layer, in token order (on the host)."""
    per = window.blocks_per_chunk
    idx = torch.tensor(window.blocks[slot * per : (slot + 1) * per], device=pool.device)
    return (
        pool.keys[layer][idx].reshape(C, H, D).cpu(),
        pool.values[layer][idx].reshape(C, H, D).cpu(),
        pool.positions[layer][idx].reshape(C, H).cpu(),
    )


def _check_window(pool, mirror, window, assign, working):
    """Every (layer, head, slot) against the mirror and a per-head duplicate check in Python."""
    for layer in range(L):
        for slot in range(window.num_slots):
            k, v, p = _slot_rows(pool, window, layer, slot)
            for h in range(H):
                c = int(assign[layer, h, slot]) if slot < assign.shape[2] else -1
                if c < 0:
                    assert (p[:, h] == -1).all()
                    continue
                rows = torch.arange(c * C, (c + 1) * C)
                assert torch.equal(k[:, h], mirror.keys[layer][rows, h])
                assert torch.equal(v[:, h], mirror.values[layer][rows, h])
                held = set(working[0, :, h].tolist())
                want = [-1 if int(r) in held else int(r) for r in rows]
                assert p[:, h].tolist() == want


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_each_layer_and_head_holds_its_own_chunk(device):
    mirror = _mirror(100)  # closed chunks 0..11
    pool = BlockPool(L, 16, H, D, block_size=BS, device=device)
    window = HeadRecallWindow(mirror, pool, max_slots=3)
    assign = torch.tensor(
        [
            [[0, 5, 9], [1, 2, 3], [11, 4, -1]],
            [[7, 8, 10], [0, 6, 9], [-1, -1, -1]],
        ]
    )
    # head 0 already holds tokens 40..47 (chunk 5) and 3; head 2 holds 90
    working = torch.full((1, 10, H), -1, dtype=torch.int32)
    working[0, :9, 0] = torch.tensor([3, 40, 41, 42, 43, 44, 45, 46, 47])
    working[0, 0, 2] = 90
    copied = window.load(assign, working.to(device))
    assert copied == int((assign >= 0).sum()) == 14
    assert window.num_slots == 3 and len(window.blocks) == 3 * (C // BS) and len(window) == 3
    _check_window(pool, mirror, window, assign, working)
    blocks, valid = window.resident_blocks()
    assert blocks.device.type == device and blocks.tolist() == window.blocks and (valid == BS).all()


@pytest.mark.parametrize("device", DEVICES)
def test_refresh_positions_follows_the_working_set(device):
    mirror = _mirror(64)
    pool = BlockPool(L, 8, H, D, block_size=BS, device=device)
    window = HeadRecallWindow(mirror, pool, max_slots=2)
    assign = torch.tensor([[[1, 2], [2, 3], [0, 1]]] * L)
    empty = torch.full((1, 0, H), -1, dtype=torch.int32, device=device)
    window.load(assign, empty)
    _check_window(pool, mirror, window, assign, torch.full((1, 1, H), -1))
    working = torch.tensor([[[8, 16, 0], [9, 17, 15], [23, 30, -1]]], dtype=torch.int32)  # [1, 3, H]
    window.refresh_positions(working.to(device))
    _check_window(pool, mirror, window, assign, working)


def test_fewer_chunks_later_leave_the_other_slots_empty_and_close_frees_every_block():
    mirror = _mirror(64)
    pool = BlockPool(L, 8, H, D, block_size=BS)
    base = pool.blocks_in_use
    window = HeadRecallWindow(mirror, pool, max_slots=2)
    empty = torch.full((1, 0, H), -1, dtype=torch.int32)
    window.load(torch.tensor([[[1, 2]] * H] * L), empty)
    one = torch.tensor([[[4]] * H] * L)
    window.load(one, empty)
    assert window.num_slots == 2  # blocks stay for the run
    _check_window(pool, mirror, window, one, torch.full((1, 1, H), -1))
    window.close()
    assert pool.blocks_in_use == base and window.blocks == []


@pytest.mark.parametrize(
    "assign, match",
    [
        (torch.zeros(L, H + 1, 1, dtype=torch.int64), "assign must be"),
        (torch.zeros(L, H, 3, dtype=torch.int64), "at most 2"),
        (torch.full((L, H, 1), 8, dtype=torch.int64), "closed chunks"),  # 64 tokens: chunks 0..7
        (torch.full((L, H, 1), -2, dtype=torch.int64), ">= 0"),
    ],
)
def test_bad_assignment_is_refused_before_any_work(assign, match):
    mirror = _mirror(64)
    pool = BlockPool(L, 8, H, D, block_size=BS)
    window = HeadRecallWindow(mirror, pool, max_slots=2)
    before = pool.blocks_in_use
    with pytest.raises(ValueError, match=match):
        window.load(assign, torch.full((1, 0, H), -1, dtype=torch.int32))
    assert pool.blocks_in_use == before and window.assign is None and window.num_slots == 0


def test_dedupe_heads_matches_a_per_head_membership_test():
    g = torch.Generator().manual_seed(1)
    positions = torch.randint(-1, 40, (3, 17, 2), generator=g)
    for working in (
        torch.randint(-1, 40, (3, 9, 2), generator=g),
        torch.randint(-1, 40, (1, 9, 2), generator=g),
    ):
        got = dedupe_heads(positions, working)
        for layer in range(3):
            for h in range(2):
                held = set(working[min(layer, working.shape[0] - 1), :, h].tolist())
                want = [-1 if (p in held and p >= 0) else p for p in positions[layer, :, h].tolist()]
                assert got[layer, :, h].tolist() == want
    assert dedupe_heads(positions, torch.empty(1, 0, 2, dtype=torch.int64)).tolist() == positions.tolist()
