"""Randomised interleavings of append / request / ensure_ready / release / evict / compact, and
(with ``prefetch=True``) prefetch / swap_window / cancel_prefetch of the next window.

After every step: device contents equal the host mirror for every resident token (K, V, position),
no token is visible twice per KV head (working slots plus the slots with position >= 0 of the ready
chunks the kernel reads), the recalled slots carry exactly the expected per-head positions (a
prefetched chunk in flight: as computed when it was prefetched), a prefetched chunk is never listed
for the kernel before its swap, and the allocator's bytes equal an independent count of blocks held
by the working cache and the resident chunks.
"""

import random

import pytest
import torch

from flashmem.offload.block_pool import BlockPool, BlockPoolExhausted
from flashmem.offload.host_mirror import HostMirror
from flashmem.offload.offload_manager import OffloadManager
from flashmem.offload.paged_cache import PagedKVCache
from flashmem.offload.resident_set import ChunkState

L, H, D, BS, C = 2, 2, 3, 4, 8


class World:
    def __init__(
        self, seed: int, num_blocks: int = 28, max_chunks: int | None = None, prefetch: bool = False
    ):
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.pool = BlockPool(L, num_blocks, H, D, block_size=BS, dtype=torch.float32)
        self.cache = PagedKVCache(self.pool)
        self.seq = self.cache.add_sequence()
        self.mirror = HostMirror(L, H, D, chunk_size=C, dtype=torch.float32)
        self.om = OffloadManager(self.mirror, self.pool, max_chunks=max_chunks)
        self.ref_k = torch.empty(L, 0, H, D)  # every token ever seen, independent of the mirror
        self.ref_v = torch.empty(L, 0, H, D)
        self.working = [[] for _ in range(H)]  # positions in working slot order, per head
        self.counts = {"append": 0, "request": 0, "ready": 0, "release": 0, "evict": 0, "compact": 0}
        self.use_prefetch = prefetch
        if prefetch:
            self.counts.update({"prefetch": 0, "swap": 0, "swap_rewrite": 0, "cancel": 0})
        self.pending_misses: set[int] = set()
        self.pending_working: list[set[int]] | None = None  # working tokens when the prefetch was issued

    # ---- operations --------------------------------------------------------------------------
    def append(self):
        n = self.rng.randint(1, 9)
        if (
            self.cache.blocks_needed(self.cache.num_slots(self.seq) + n)
            - len(self.cache.block_table(self.seq))
            > self.pool.num_free
        ):
            return self.compact()
        start = self.mirror.num_tokens
        k = torch.randn(L, n, H, D, generator=self.gen)
        v = torch.randn(L, n, H, D, generator=self.gen)
        pos = torch.arange(start, start + n)
        self.cache.begin_append(self.seq, n)
        for l in range(L):
            self.mirror.append(l, k[l], v[l])
            self.cache.write(self.seq, l, k[l], v[l], pos)
        self.mirror.commit(n)
        self.cache.end_append(self.seq)
        self.ref_k = torch.cat([self.ref_k, k], dim=1)
        self.ref_v = torch.cat([self.ref_v, v], dim=1)
        for h in range(H):
            self.working[h].extend(pos.tolist())
        self.counts["append"] += 1

    def request(self):
        if self.mirror.num_chunks == 0 or self.om.pending_prefetch is not None:
            return
        if self.rng.random() < 0.5:
            self.om.release_window()
            self.counts["release"] += 1
        k = self.rng.randint(1, min(3, self.mirror.num_chunks))
        ids = self.rng.sample(range(self.mirror.num_chunks), k)
        before = self._control_snapshot()
        try:
            self.om.request(ids, resident_per_head=[set(w) for w in self.working])
        except BlockPoolExhausted:
            # all or nothing: refusal leaves the control plane as it was (stale reloads excepted)
            after = self._control_snapshot()
            assert after[1] <= before[1] and after[2] >= before[2]
            return
        self.counts["request"] += 1
        if self.rng.random() < 0.7:
            self.om.ensure_ready(ids)
            self.counts["ready"] += 1

    def evict(self):
        candidates = [c for c in self.om.resident.resident_chunks() if not self.om.resident.get(c).pinned]
        if not candidates:
            return
        self.om.evict([self.rng.choice(candidates)])
        self.counts["evict"] += 1

    def compact(self):
        """Per head keep a random in-order subset of the working tokens; survivors slide forward."""
        s_old = self.cache.num_slots(self.seq)
        if s_old == 0:
            return
        s_new = self.rng.randint(0, s_old)
        keep = [sorted(self.rng.sample(range(s_old), s_new)) for _ in range(H)]
        slots = self.cache.slot_indices(self.seq)
        flat = self.pool.num_blocks * BS
        for l in range(L):
            k, v, p = self.cache.gather(self.seq, l)
            for h in range(H):
                idx = torch.tensor(keep[h], dtype=torch.long)
                self.pool.keys[l].view(flat, H, D)[slots[:s_new], h] = k[idx, h]
                self.pool.values[l].view(flat, H, D)[slots[:s_new], h] = v[idx, h]
                self.pool.positions[l].view(flat, H)[slots[:s_new], h] = p[idx, h]
        self.cache.truncate(self.seq, s_new)
        self.working = [[self.working[h][i] for i in keep[h]] for h in range(H)]
        # copies of the current window are waited for; a pending prefetch stays in flight
        self.om.ensure_ready([c for c in self.om.resident.loading_chunks() if c not in self.pending_misses])
        self.om.refresh_positions([set(w) for w in self.working])
        self.counts["compact"] += 1

    def prefetch(self):
        if self.mirror.num_chunks == 0 or self.om.pending_prefetch is not None:
            return
        k = self.rng.randint(0, min(3, self.mirror.num_chunks))
        ids = self.rng.sample(range(self.mirror.num_chunks), k)
        working = [set(w) for w in self.working]
        before = self._control_snapshot()
        try:
            _, misses = self.om.prefetch(ids, resident_per_head=working)
        except BlockPoolExhausted:
            after = self._control_snapshot()
            assert after[1] <= before[1] and after[2] >= before[2]
            assert self.om.pending_prefetch is None
            return
        assert self.om.pending_prefetch == ids
        self.pending_misses = set(misses)
        self.pending_working = working
        self.counts["prefetch"] += 1

    def swap(self):
        if self.om.pending_prefetch is None:
            return
        ids = self.om.pending_prefetch
        rewrite = self.om.prefetch_masks_outdated or self.rng.random() < 0.3
        if rewrite:
            self.om.swap_window(resident_per_head=[set(w) for w in self.working])
            self.counts["swap_rewrite"] += 1
        else:
            self.om.swap_window()
        self.pending_misses, self.pending_working = set(), None
        rs = self.om.resident
        # exactly the new window is resident, pinned and listed for the kernel
        assert rs.resident_chunks() == sorted(ids) and rs.pinned_chunks() == sorted(ids)
        assert rs.loading_chunks() == [c for c in rs.loading_chunks() if c not in ids]
        self.counts["swap"] += 1

    def cancel(self):
        if self.om.pending_prefetch is None:
            return
        self.om.cancel_prefetch()
        for c in self.pending_misses:
            assert c not in self.om.resident
        self.pending_misses, self.pending_working = set(), None
        self.counts["cancel"] += 1

    def step(self):
        ops = [self.append, self.request, self.evict, self.compact]
        weights = [4, 4, 2, 1]
        if self.use_prefetch:
            ops += [self.prefetch, self.swap, self.cancel]
            weights = [4, 2, 2, 1, 3, 2, 0.3]
        op = self.rng.choices(ops, weights=weights)[0]
        op()
        self.check()

    # ---- invariants --------------------------------------------------------------------------
    def _control_snapshot(self):
        rs = self.om.resident
        return (rs.lru_order(), rs.loads, rs.evictions)

    def check(self):
        pool, mirror, rs = self.pool, self.mirror, self.om.resident
        n = mirror.num_tokens
        # lossless mirror, exact bytes
        assert mirror.host_kv_bytes == n * 2 * L * H * D * 4
        for l in range(L):
            assert torch.equal(mirror.keys[l][:n], self.ref_k[l])
            assert torch.equal(mirror.values[l][:n], self.ref_v[l])
        # allocator bytes equal an independent count
        held = len(self.cache.block_table(self.seq)) + len(rs) * (C // BS)
        assert pool.blocks_in_use == held
        assert pool.device_kv_bytes == held * pool.kv_block_bytes
        assert pool.blocks_in_use + pool.num_free == pool.num_blocks
        owned = self.cache.block_table(self.seq) + [b for c in rs.lru_order() for b in rs.blocks(c)]
        assert len(set(owned)) == len(owned)
        # every chunk of the window that is ready is listed for the kernel, in token order; a
        # prefetched chunk is not listed before its swap
        blocks, valid = self.om.resident_blocks()
        assert blocks.tolist() == [b for c in rs.resident_chunks() for b in rs.blocks(c)]
        assert int(valid.sum()) == sum(rs.get(c).valid_tokens for c in rs.resident_chunks())
        listed = set(blocks.tolist())
        for c in self.pending_misses:
            assert rs.state(c) is ChunkState.LOADING and rs.get(c).pinned
            assert not listed & set(rs.blocks(c))
        if self.om.pending_prefetch is not None:
            assert all(rs.get(c).pinned for c in self.om.pending_prefetch)

        for l in range(L):
            k, v, p = self.cache.gather(self.seq, l)
            for h in range(H):
                assert p[:, h].tolist() == self.working[h]
            seen = [list(self.working[h]) for h in range(H)]
            # working slots hold mirror rows
            if p.numel():
                pos = p.long()
                for h in range(H):
                    assert torch.equal(k[:, h], self.ref_k[l, pos[:, h], h])
                    assert torch.equal(v[:, h], self.ref_v[l, pos[:, h], h])
            # recalled slots: exact expected positions, mirror rows where position >= 0
            for c in rs.lru_order():
                entry = rs.get(c)
                pending = c in self.pending_misses
                against = self.pending_working if pending else [set(w) for w in self.working]
                idx = torch.tensor(entry.blocks)
                ck = pool.keys[l][idx].reshape(C, H, D)
                cv = pool.values[l][idx].reshape(C, H, D)
                cp = pool.positions[l][idx].reshape(C, H)
                for h in range(H):
                    expected = [
                        c * C + r if r < entry.valid_tokens and c * C + r not in against[h] else -1
                        for r in range(C)
                    ]
                    assert cp[:, h].tolist() == expected, (c, h)
                    live = cp[:, h] >= 0
                    rows = cp[live, h].long()
                    assert torch.equal(ck[live, h], self.ref_k[l, rows, h])
                    assert torch.equal(cv[live, h], self.ref_v[l, rows, h])
                    if not pending:  # what the kernel reads: working slots + ready chunks
                        seen[h].extend(rows.tolist())
            for h in range(H):
                assert len(seen[h]) == len(set(seen[h])), f"token resident twice (layer {l}, head {h})"


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_interleavings(seed):
    world = World(seed, max_chunks=None if seed % 2 else 4)
    for _ in range(250):
        world.step()
    # every operation was exercised
    assert all(v > 0 for v in world.counts.values()), world.counts
    assert world.om.resident.loads > 0 and world.om.resident.evictions > 0
    # recall of everything still in the mirror: evict all, then bring back and compare
    world.om.ensure_ready()
    world.om.release_window()
    world.om.evict(world.om.resident.resident_chunks())
    ids = list(range(min(world.mirror.num_chunks, 3)))
    world.om.request(ids, resident_per_head=[set(w) for w in world.working])
    world.om.ensure_ready()
    world.check()
    world.om.close()
    world.cache.free_sequence(world.seq)
    assert world.pool.blocks_in_use == 0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_interleavings_with_prefetch(seed):
    world = World(seed, max_chunks=None if seed % 2 else 6, prefetch=True)
    for _ in range(300):
        world.step()
    assert all(v > 0 for v in world.counts.values()), world.counts
    stats = world.om.stats()
    assert stats["prefetches_issued"] == world.counts["prefetch"] and stats["chunks_prefetched"] > 0
    # whatever is pending lands in a swap; then everything still in the mirror can come back
    world.swap()
    world.check()
    world.om.ensure_ready()
    world.om.release_window()
    world.om.evict(world.om.resident.resident_chunks())
    ids = list(range(min(world.mirror.num_chunks, 3)))
    world.om.prefetch(ids, resident_per_head=[set(w) for w in world.working])
    world.pending_misses, world.pending_working = set(ids), [set(w) for w in world.working]
    world.check()
    world.swap()
    world.check()
    world.om.close()
    world.cache.free_sequence(world.seq)
    assert world.pool.blocks_in_use == 0
