"""Recall of host-mirror chunks for ONE sequence: mirror + resident set + transfer engine together.

Per lookahead window (every ``tau`` decode steps)::

    manager.release_window()                 # last window's chunks become evictable (LRU)
    manager.request(chunk_ids, resident_per_head=...)   # hits touched + pinned; misses planned,
                                                        # copied asynchronously, pinned
    ...                                      # other work overlaps the copies
    manager.ensure_ready(chunk_ids)          # current stream waits on those chunks' events only
    blocks, valid = manager.resident_blocks()   # what the paged decode kernel reads

``resident_per_head`` (``H_kv`` collections of positions already resident in the sequence's working
slots) makes the recalled slots of those (token, head) pairs carry position -1, so the kernel never
attends a token twice; :meth:`OffloadManager.refresh_positions` recomputes that mask after the
working tokens change (compaction).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .block_pool import BlockPool
from .host_mirror import HostMirror
from .resident_set import ChunkState, ResidentSet, dedupe_positions
from .transfer import TransferEngine


class OffloadManager:
    """Chunk recall for one sequence.

    Args:
        mirror: the sequence's host mirror.
        pool: the device block pool shared with the working cache.
        max_chunks: optional cap on chunks resident at once (the chunk budget).
    """

    def __init__(self, mirror: HostMirror, pool: BlockPool, *, max_chunks: int | None = None) -> None:
        self.mirror = mirror
        self.pool = pool
        self.engine = TransferEngine(mirror, pool)
        self.resident = ResidentSet(pool, mirror.chunk_size, max_chunks=max_chunks)
        self.refreshed_stale = 0
        self._blocks_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    @property
    def chunk_size(self) -> int:
        return self.mirror.chunk_size

    def _positions(self, chunk_ids: list[int], resident_per_head) -> torch.Tensor | None:
        if resident_per_head is None:
            return None
        if len(resident_per_head) != self.pool.num_kv_heads:
            raise ValueError(
                f"resident_per_head needs one entry per KV head ({self.pool.num_kv_heads}), "
                f"got {len(resident_per_head)}"
            )
        return dedupe_positions(self.mirror.chunk_positions(chunk_ids), resident_per_head)

    def request(
        self,
        chunk_ids: Iterable[int],
        *,
        resident_per_head: Sequence[Iterable[int] | torch.Tensor] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Make chunks resident for the current window; returns ``(hits, misses)``.

        All requested chunks move to the most-recent end of the LRU order (in request order) and
        are pinned. Misses get blocks
        (evicting LRU unpinned chunks if needed), are copied asynchronously and pinned. A resident
        chunk loaded while it was the partial last chunk, that has since grown, is reloaded when it
        is not pinned. Raises (state unchanged) on unknown chunk ids or when the pool cannot fit them.
        """
        ids = [int(c) for c in chunk_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request: duplicate chunk ids in {ids}")
        self.mirror.chunk_row_index(ids)  # validates the range against the committed tokens
        if resident_per_head is not None and len(resident_per_head) != self.pool.num_kv_heads:
            raise ValueError(
                f"resident_per_head needs one entry per KV head ({self.pool.num_kv_heads}), "
                f"got {len(resident_per_head)}"
            )
        hits, misses = self.resident.lookup(ids)
        stale = [
            c
            for c in hits
            if self.resident.state(c) is ChunkState.RESIDENT
            and not self.resident.get(c).pinned
            and self.resident.get(c).valid_tokens < self.mirror.chunk_num_tokens(c)
        ]
        if stale:
            self.resident.evict(stale)
            self.refreshed_stale += len(stale)
            hits = [c for c in hits if c not in stale]
            misses = [c for c in ids if c not in hits]
        if misses:
            valid = [self.mirror.chunk_num_tokens(c) for c in misses]
            plan = self.resident.prepare_load(misses, valid_tokens=valid, protect=hits)
            try:
                self.engine.load(
                    plan.chunk_ids, plan.blocks, positions=self._positions(misses, resident_per_head)
                )
            except Exception:
                self.resident.complete_load(plan.chunk_ids)
                self.resident.evict(plan.chunk_ids)
                raise
        self.resident.touch(ids)  # request order = recency order, hits and new loads alike
        self.resident.pin(ids)
        return hits, misses

    def ensure_ready(self, chunk_ids: Iterable[int] | None = None) -> None:
        """Order the current stream after the copies of these chunks (default: all in flight) and
        mark them resident. Never a device-wide sync."""
        ids = self.resident.loading_chunks() if chunk_ids is None else [int(c) for c in chunk_ids]
        self.engine.wait(ids)
        loading = [c for c in ids if self.resident.state(c) is ChunkState.LOADING]
        if loading:
            self.resident.complete_load(loading)

    def release_window(self) -> None:
        """Unpin every chunk (in-flight chunks stay protected until :meth:`ensure_ready`)."""
        self.resident.unpin()

    def evict(self, chunk_ids: Iterable[int]) -> None:
        """Evict resident, unpinned chunks now (errors for pinned / in-flight ones)."""
        self.resident.evict(list(chunk_ids))

    def refresh_positions(self, resident_per_head: Sequence[Iterable[int] | torch.Tensor]) -> None:
        """Rewrite the duplicate mask of every resident chunk against the working tokens now
        resident per head (``H_kv`` collections of positions). In-flight chunks: wait first."""
        ids = self.resident.resident_chunks()
        if not ids:
            return
        if self.resident.loading_chunks():
            raise ValueError("refresh_positions with chunks in flight; call ensure_ready() first")
        if len(resident_per_head) != self.pool.num_kv_heads:
            raise ValueError(
                f"resident_per_head needs one entry per KV head ({self.pool.num_kv_heads}), "
                f"got {len(resident_per_head)}"
            )
        positions = dedupe_positions(self.loaded_positions(ids), resident_per_head)
        self.engine.write_positions([self.resident.blocks(c) for c in ids], positions)

    def loaded_positions(self, chunk_ids: Iterable[int]) -> torch.Tensor:
        """True positions of the slots of resident chunks as loaded, ``[n * chunk_size]`` int32 (CPU):
        -1 past the tokens the chunk held when it was copied (the mirror may have grown since)."""
        cs = self.chunk_size
        out = []
        for c in chunk_ids:
            valid = self.resident.get(c).valid_tokens
            out.extend(c * cs + r if r < valid else -1 for r in range(cs))
        return torch.tensor(out, dtype=torch.int32)

    def resident_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks of the ready chunks in token order and their valid slot counts.

        Returns ``block_ids [n_blocks]`` and ``valid [n_blocks]``, both int32 on the pool's device
        (cached until the resident set changes). ``valid[i]`` counts the slots of block i holding a
        committed token when the chunk was loaded; per-head duplicates carry position -1 inside them.
        """
        version = self.resident.version
        if self._blocks_cache is not None and self._blocks_cache[0] == version:
            return self._blocks_cache[1], self._blocks_cache[2]
        bs = self.pool.block_size
        blocks: list[int] = []
        valid: list[int] = []
        for c in self.resident.resident_chunks():
            entry = self.resident.get(c)
            for j, b in enumerate(entry.blocks):
                blocks.append(b)
                valid.append(max(0, min(bs, entry.valid_tokens - j * bs)))
        dev = self.pool.device
        out = (
            torch.tensor(blocks, dtype=torch.int32, device=dev),
            torch.tensor(valid, dtype=torch.int32, device=dev),
        )
        self._blocks_cache = (version, *out)
        return out

    def close(self) -> None:
        """Wait for every copy and give every chunk's blocks back to the pool."""
        self.ensure_ready()
        self.engine.synchronize()
        self.resident.clear()

    def stats(self, *, sync: bool = False) -> dict:
        """Engine transfer stats + resident-set counters + mirror bytes, one flat dict."""
        out = {}
        out.update(self.mirror.stats())
        out.update(self.resident.stats())
        out.update(self.engine.stats(sync=sync))
        out["stale_reloads"] = self.refreshed_stale
        return out
