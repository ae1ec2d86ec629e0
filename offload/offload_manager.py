"""Recall of host-mirror chunks for ONE sequence: mirror + resident set + transfer engine together.

Per lookahead window (every ``lookahead`` decode steps), on demand::

    manager.release_window()                 # last window's chunks become evictable (LRU)
    manager.request(chunk_ids, resident_per_head=...)   # hits touched + pinned; misses planned,
                                                        # copied asynchronously, pinned
    ...                                      # other work overlaps the copies
    manager.ensure_ready(chunk_ids)          # current stream waits on those chunks' events only
    blocks, valid = manager.resident_blocks()   # what the paged decode kernel reads

or prefetched ahead of the boundary, so decoding overlaps the copies::

    manager.prefetch(next_ids, resident_per_head=...)   # misses copied (side stream), pinned, and
                                                        # LOADING: invisible to resident_blocks()
    ...                                      # decode steps of the current window
    manager.swap_window(resident_per_head=...)          # at the boundary: wait on the prefetched
                                                        # copies, evict the old window's other chunks

``resident_per_head`` (``H_kv`` collections of positions already resident in the sequence's working
slots) makes the recalled slots of those (token, head) pairs carry position -1, so the kernel never
attends a token twice; :meth:`OffloadManager.refresh_positions` recomputes that mask after the
working tokens change (compaction). A compaction between :meth:`~OffloadManager.prefetch` and
:meth:`~OffloadManager.swap_window` marks the prefetched masks outdated: the swap rewrites them
(after the copy, on the compute stream) from the ``resident_per_head`` it is given.

Visibility: :meth:`OffloadManager.resident_blocks` lists RESIDENT chunks only, and a chunk becomes
RESIDENT only in :meth:`~OffloadManager.ensure_ready`, after the current stream was ordered behind
its copy event, so no kernel reads a block before its copy has landed.

Traffic: :meth:`OffloadManager.traffic` sums, cumulatively, every host<->device copy of the
sequence's recall path, each counted where it is issued: the mirror's (appends, exact-prefill
rows), the transfer engine's (recall loads, position writes) and the manager's own (block tables,
slot positions for the duplicate masks, resident positions pulled to the host). Take differences of
two snapshots for a phase (prefill, decode).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..kernels.checks import device_tensor_bytes
from .block_pool import BlockPool
from .host_mirror import HostMirror
from .resident_set import ChunkState, ResidentSet, dedupe_positions
from .transfer import TransferEngine


@dataclass
class _Prefetch:
    """The next window while its copies are in flight: all its chunks, the ones being copied, the
    hits this prefetch pinned, and whether the misses' duplicate masks predate the working set."""

    chunk_ids: list[int]
    misses: list[int]
    newly_pinned: list[int]
    masks_outdated: bool = False


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
        self.prefetches_issued = 0
        self.chunks_prefetched = 0
        self.chunks_on_demand = 0
        self.prefetches_cancelled = 0
        self._pending: _Prefetch | None = None
        self._blocks_cache: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.table_h2d_bytes = 0  # block tables and mask slot positions sent to the pool's device
        self.table_d2h_bytes = 0  # device-side resident positions brought to the host for dedupe

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
        # dedupe runs where the resident positions live: device tensors stay on the device (the
        # chunk positions are made there from ranges), so nothing comes back to the host
        first = resident_per_head[0] if len(resident_per_head) else None
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
        return dedupe_positions(self.mirror.chunk_positions(chunk_ids, device), resident_per_head)

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
        if self._pending is not None:
            raise ValueError("request: a prefetch is pending; call swap_window() or cancel_prefetch() first")
        hits, misses = self._load(chunk_ids, resident_per_head, "request")
        self.chunks_on_demand += len(misses)
        return hits, misses

    def _load(self, chunk_ids, resident_per_head, what: str) -> tuple[list[int], list[int]]:
        """Shared by :meth:`request` and :meth:`prefetch`: look up, plan, copy the misses, touch and
        pin every requested chunk. All or nothing on error."""
        ids = [int(c) for c in chunk_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{what}: duplicate chunk ids in {ids}")
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
        """Unpin every chunk of the current window (in-flight chunks stay protected until
        :meth:`ensure_ready`; the chunks of a pending prefetch stay pinned)."""
        if self._pending is None:
            self.resident.unpin()
        else:
            keep = set(self._pending.chunk_ids)
            self.resident.unpin([c for c in self.resident.lru_order() if c not in keep])

    # ---- prefetch ahead of a window boundary -------------------------------------------------
    @property
    def pending_prefetch(self) -> list[int] | None:
        """Chunk ids of the prefetched next window, or None when no prefetch is pending."""
        return None if self._pending is None else list(self._pending.chunk_ids)

    @property
    def prefetch_masks_outdated(self) -> bool:
        """True when the working tokens changed (:meth:`refresh_positions`) after the pending
        prefetch was issued: :meth:`swap_window` then needs ``resident_per_head``."""
        return self._pending is not None and self._pending.masks_outdated

    def prefetch(
        self,
        chunk_ids: Iterable[int],
        *,
        resident_per_head: Sequence[Iterable[int] | torch.Tensor] | None = None,
    ) -> tuple[list[int], list[int]]:
        """Start the next window's copies while the current window stays what the kernel reads.

        Misses get blocks and are copied asynchronously (LOADING: not listed by
        :meth:`resident_blocks`, never evicted); every chunk of the next window is pinned, so
        neither the copies nor the hits can be evicted before :meth:`swap_window`. The current
        window is untouched (still pinned and visible). Returns ``(hits, misses)``; all or nothing
        on error. One prefetch at a time.
        """
        hits, misses = self._begin_window(chunk_ids, resident_per_head, "prefetch")
        self.prefetches_issued += 1
        self.chunks_prefetched += len(misses)
        return hits, misses

    def _begin_window(self, chunk_ids, resident_per_head, what: str) -> tuple[list[int], list[int]]:
        if self._pending is not None:
            raise ValueError(f"{what}: a prefetch is already pending; call swap_window() first")
        ids = [int(c) for c in chunk_ids]
        was_pinned = {c for c in ids if c in self.resident and self.resident.get(c).pinned}
        hits, misses = self._load(ids, resident_per_head, what)
        self._pending = _Prefetch(ids, list(misses), [c for c in hits if c not in was_pinned])
        return hits, misses

    def swap_window(
        self, *, resident_per_head: Sequence[Iterable[int] | torch.Tensor] | None = None
    ) -> list[int]:
        """At the window boundary: the prefetched chunks become the window, everything else goes.

        Orders the current stream after the prefetched copies (a stall only if one has not landed),
        marks them resident, rewrites the misses' duplicate masks against ``resident_per_head`` when
        it is given (required when :attr:`prefetch_masks_outdated`), then unpins every other chunk
        and evicts the resident ones, so :meth:`resident_blocks` lists exactly the new window (a
        chunk of an unrelated :meth:`request` still in flight stays until its copy is waited for).
        Returns the new window's chunk ids.
        """
        pending = self._pending
        if pending is None:
            raise ValueError("swap_window: no prefetch is pending; call prefetch() first")
        if pending.masks_outdated and resident_per_head is None:
            raise ValueError(
                "swap_window: the working tokens changed since the prefetch (compaction); pass "
                "resident_per_head so the prefetched chunks' duplicate masks are rewritten"
            )
        if resident_per_head is not None and len(resident_per_head) != self.pool.num_kv_heads:
            raise ValueError(
                f"resident_per_head needs one entry per KV head ({self.pool.num_kv_heads}), "
                f"got {len(resident_per_head)}"
            )
        ids = pending.chunk_ids
        self.ensure_ready(ids)
        self._pending = None
        if resident_per_head is not None and pending.misses:
            self._write_masks(pending.misses, resident_per_head)
        keep = set(ids)
        self.resident.unpin([c for c in self.resident.lru_order() if c not in keep])
        old = [c for c in self.resident.resident_chunks() if c not in keep]
        if old:
            self.resident.evict(old)
        self.resident.touch(ids)
        self.resident.pin(ids)
        return list(ids)

    def load_window(
        self,
        chunk_ids: Iterable[int],
        *,
        resident_per_head: Sequence[Iterable[int] | torch.Tensor] | None = None,
    ) -> tuple[list[int], list[int]]:
        """On demand, with :meth:`swap_window`'s outcome: the chunks become the window now (copy,
        then wait) and every other resident chunk is evicted. Returns ``(hits, misses)``."""
        hits, misses = self._begin_window(chunk_ids, resident_per_head, "load_window")
        self.chunks_on_demand += len(misses)
        self.swap_window()
        return hits, misses

    def cancel_prefetch(self) -> None:
        """Drop a pending prefetch: wait for its copies, evict its misses and unpin the hits it
        pinned. The current window is unchanged. No-op when none is pending."""
        pending = self._pending
        if pending is None:
            return
        self.ensure_ready(pending.misses)
        self._pending = None
        if pending.misses:
            self.resident.unpin(pending.misses)
            self.resident.evict(pending.misses)
        if pending.newly_pinned:
            self.resident.unpin(pending.newly_pinned)
        self.prefetches_cancelled += 1

    def evict(self, chunk_ids: Iterable[int]) -> None:
        """Evict resident, unpinned chunks now (errors for pinned / in-flight ones)."""
        self.resident.evict(list(chunk_ids))

    def refresh_positions(self, resident_per_head: Sequence[Iterable[int] | torch.Tensor]) -> None:
        """Rewrite the duplicate mask of every resident chunk against the working tokens now
        resident per head (``H_kv`` collections of positions). In-flight chunks: wait first, except
        those of a pending prefetch, whose masks are marked outdated and rewritten by
        :meth:`swap_window` once their copies have landed."""
        ids = self.resident.resident_chunks()
        loading = self.resident.loading_chunks()
        prefetched = set(self._pending.misses) if self._pending is not None else set()
        if [c for c in loading if c not in prefetched] and ids:
            raise ValueError("refresh_positions with chunks in flight; call ensure_ready() first")
        if len(resident_per_head) != self.pool.num_kv_heads:
            raise ValueError(
                f"resident_per_head needs one entry per KV head ({self.pool.num_kv_heads}), "
                f"got {len(resident_per_head)}"
            )
        if self._pending is not None and self._pending.misses:
            self._pending.masks_outdated = True
        if ids:
            self._write_masks(ids, resident_per_head)

    def _write_masks(self, chunk_ids: list[int], resident_per_head) -> None:
        """Duplicate masks of ready chunks against ``resident_per_head``, written on the current
        stream. Computed where the given positions live (device tensors: no host round trip)."""
        first = resident_per_head[0] if len(resident_per_head) else None
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
        slot_positions = self.loaded_positions(chunk_ids, device)
        positions = dedupe_positions(slot_positions, resident_per_head)
        self.engine.write_positions([self.resident.blocks(c) for c in chunk_ids], positions)

    def loaded_positions(self, chunk_ids: Iterable[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """True positions of the slots of resident chunks as loaded, ``[n * chunk_size]`` int32 (on
        ``device``, made from ranges): -1 past the tokens the chunk held when it was copied (the
        mirror may have grown since)."""
        cs = self.chunk_size
        parts = []
        for c in chunk_ids:
            valid = self.resident.get(c).valid_tokens
            rows = torch.arange(c * cs, (c + 1) * cs, dtype=torch.int32, device=device)
            parts.append(rows if valid >= cs else torch.where(rows < c * cs + valid, rows, -1))
        if not parts:
            return torch.empty(0, dtype=torch.int32, device=device)
        return torch.cat(parts)

    def resident_block_lists(self) -> tuple[int, list[int], list[int]]:
        """Host-side :meth:`resident_blocks`: ``(version, block_ids, valid)`` as Python lists (the version
        changes whenever they do), for a caller that writes them into its own device tables."""
        bs = self.pool.block_size
        blocks: list[int] = []
        valid: list[int] = []
        for c in self.resident.resident_chunks():
            entry = self.resident.get(c)
            for j, b in enumerate(entry.blocks):
                blocks.append(b)
                valid.append(max(0, min(bs, entry.valid_tokens - j * bs)))
        return self.resident.version, blocks, valid

    def resident_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks of the ready chunks in token order and their valid slot counts.

        Returns ``block_ids [n_blocks]`` and ``valid [n_blocks]``, both int32 on the pool's device
        (cached until the resident set changes). ``valid[i]`` counts the slots of block i holding a
        committed token when the chunk was loaded; per-head duplicates carry position -1 inside them.
        """
        version = self.resident.version
        if self._blocks_cache is not None and self._blocks_cache[0] == version:
            return self._blocks_cache[1], self._blocks_cache[2]
        _, blocks, valid = self.resident_block_lists()
        dev = self.pool.device
        out = (
            torch.tensor(blocks, dtype=torch.int32, device=dev),
            torch.tensor(valid, dtype=torch.int32, device=dev),
        )
        self.table_h2d_bytes += 2 * 4 * len(blocks)  # counted on the CPU backend too
        self._blocks_cache = (version, *out)
        return out

    def take_staging_mark(self) -> int:
        """The largest device-side copy of a recall batch since the last call (it lived inside a step,
        so a sampled total misses it); resets the mark."""
        staged = self.engine.device_staging_bytes_since_mark
        self.engine.device_staging_bytes_since_mark = 0
        return staged

    def device_bytes(self) -> int:
        """Bytes this manager holds on the pool's device outside the pool: the cached block table and
        valid counts of the resident chunks (the recalled K/V live in pool blocks)."""
        cached = self._blocks_cache[1:] if self._blocks_cache is not None else ()
        return device_tensor_bytes(cached, self.pool.device)

    def close(self) -> None:
        """Wait for every copy and give every chunk's blocks back to the pool."""
        self._pending = None
        self.ensure_ready()
        self.engine.synchronize()
        self.resident.clear()

    def traffic(self) -> dict:
        """Cumulative bytes of every host<->device copy of this sequence's mirror and recall path.

        ``h2d_bytes`` / ``d2h_bytes``: totals; parts: ``mirror_d2h_bytes`` (appends),
        ``mirror_h2d_bytes`` (rows served to the exact prefill), ``recall_h2d_bytes`` (recall loads),
        ``meta_h2d_bytes`` / ``meta_d2h_bytes`` (positions, slot indices and block tables)."""
        mirror, engine = self.mirror.traffic(), self.engine.traffic()
        meta_h2d = engine["meta_h2d_bytes"] + self.table_h2d_bytes
        meta_d2h = engine["meta_d2h_bytes"] + self.table_d2h_bytes
        return {
            "h2d_bytes": mirror["h2d_bytes"] + engine["recall_h2d_bytes"] + meta_h2d,
            "d2h_bytes": mirror["d2h_bytes"] + meta_d2h,
            "mirror_d2h_bytes": mirror["d2h_bytes"],
            "mirror_h2d_bytes": mirror["h2d_bytes"],
            "recall_h2d_bytes": engine["recall_h2d_bytes"],
            "meta_h2d_bytes": meta_h2d,
            "meta_d2h_bytes": meta_d2h,
        }

    def stats(self, *, sync: bool = False) -> dict:
        """Engine transfer stats + resident-set counters + mirror bytes, one flat dict."""
        out = {}
        out.update(self.mirror.stats())
        out.update(self.resident.stats())
        out.update(self.engine.stats(sync=sync))
        out["stale_reloads"] = self.refreshed_stale
        out["prefetches_issued"] = self.prefetches_issued
        out["prefetches_cancelled"] = self.prefetches_cancelled
        out["chunks_prefetched"] = self.chunks_prefetched
        out["chunks_loaded_on_demand"] = self.chunks_on_demand
        out["table_h2d_bytes"] = self.table_h2d_bytes
        out["table_d2h_bytes"] = self.table_d2h_bytes
        return out
