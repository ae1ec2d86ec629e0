"""Control plane of recall: which host-mirror chunks are on the device, and in which pool blocks.

Pure host-side bookkeeping (no device work except what :meth:`BlockPool.free` does when a chunk is
evicted). A resident chunk of ``chunk_size`` tokens owns ``chunk_size // block_size`` blocks of the
shared :class:`~flashmem.offload.block_pool.BlockPool`; slot ``r`` of the chunk (token
``chunk_id * chunk_size + r``) lives in block ``blocks[r // block_size]`` at offset ``r % block_size``.

Life of a chunk::

    prepare_load(ids)  -> LOADING (blocks allocated, LRU-evicting unpinned chunks if the pool is short)
    complete_load(ids) -> RESIDENT (its copy is ordered before the compute stream's next use)
    touch / pin / unpin while RESIDENT
    evict(ids)         -> gone (blocks back to the pool)

A chunk that is LOADING (in flight) or pinned (selected for the current lookahead window) can never
be evicted: asking to is a ``ValueError``. LRU order runs from least to most recently used; loads and
touches move a chunk to the most-recent end.

Partial residency: after compaction some tokens of a chunk may still sit in the sequence's working
slots (per KV head). :func:`dedupe_positions` computes, per recalled slot and head, the position to
store: the true position, or -1 where that (token, head) is already resident elsewhere, so the paged
decode kernel (which skips slots with position < 0 per head) never attends a token twice.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .block_pool import BlockPool, BlockPoolExhausted


class ChunkState(enum.Enum):
    LOADING = "loading"
    RESIDENT = "resident"


@dataclass
class ResidentChunk:
    """One chunk on the device. ``blocks``: pool block ids in slot order; ``valid_tokens``: committed
    tokens of the chunk when it was loaded (slots past it hold position -1)."""

    chunk_id: int
    blocks: list[int]
    state: ChunkState
    valid_tokens: int
    pinned: bool = False


@dataclass
class LoadPlan:
    """What :meth:`ResidentSet.prepare_load` decided: load ``chunk_ids`` into ``blocks[i]`` (one list
    of ``blocks_per_chunk`` block ids per chunk) after evicting ``evicted`` (LRU first)."""

    chunk_ids: list[int]
    blocks: list[list[int]]
    evicted: list[int] = field(default_factory=list)
    valid_tokens: list[int] = field(default_factory=list)

    @property
    def flat_blocks(self) -> list[int]:
        return [b for blocks in self.blocks for b in blocks]


def _check_ids(chunk_ids: Iterable[int], what: str) -> list[int]:
    ids = list(chunk_ids)
    for c in ids:
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"{what}: chunk ids must be ints >= 0, got {c!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what}: duplicate chunk ids in {ids}")
    return ids


class ResidentSet:
    """Resident chunks of one sequence over a shared block pool, with LRU eviction and pinning.

    Args:
        pool: the device block pool (shared with the working cache).
        chunk_size: tokens per chunk; a multiple of ``pool.block_size``.
        max_chunks: optional cap on resident + loading chunks (the chunk budget).
        log_size: entries kept in :attr:`events` (oldest dropped first).
    """

    def __init__(
        self, pool: BlockPool, chunk_size: int, *, max_chunks: int | None = None, log_size: int = 4096
    ) -> None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"ResidentSet.chunk_size must be a positive int, got {chunk_size!r}")
        if chunk_size % pool.block_size:
            raise ValueError(
                f"chunk_size ({chunk_size}) must be a multiple of the pool's block_size ({pool.block_size}); "
                "change one of them"
            )
        if max_chunks is not None and (
            isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 1
        ):
            raise ValueError(f"ResidentSet.max_chunks must be a positive int or None, got {max_chunks!r}")
        self.pool = pool
        self.chunk_size = chunk_size
        self.blocks_per_chunk = chunk_size // pool.block_size
        self.max_chunks = max_chunks
        self._chunks: OrderedDict[int, ResidentChunk] = OrderedDict()  # LRU first
        self.events: deque[tuple[str, int]] = deque(maxlen=log_size)
        self.hits = 0
        self.misses = 0
        self.loads = 0
        self.evictions = 0
        self.lru_evictions = 0
        self.version = 0  # bumped whenever the resident blocks change

    # ---- queries -----------------------------------------------------------------------------
    def __contains__(self, chunk_id: int) -> bool:
        return chunk_id in self._chunks

    def __len__(self) -> int:
        return len(self._chunks)

    def get(self, chunk_id: int) -> ResidentChunk:
        try:
            return self._chunks[chunk_id]
        except KeyError:
            raise KeyError(f"chunk {chunk_id} is not resident") from None

    def blocks(self, chunk_id: int) -> list[int]:
        return list(self.get(chunk_id).blocks)

    def state(self, chunk_id: int) -> ChunkState | None:
        entry = self._chunks.get(chunk_id)
        return None if entry is None else entry.state

    def lru_order(self) -> list[int]:
        """Chunk ids from least to most recently used (loading chunks included)."""
        return list(self._chunks)

    def resident_chunks(self) -> list[int]:
        """Chunks whose load completed, in chunk-id (token) order."""
        return sorted(c for c, e in self._chunks.items() if e.state is ChunkState.RESIDENT)

    def loading_chunks(self) -> list[int]:
        return sorted(c for c, e in self._chunks.items() if e.state is ChunkState.LOADING)

    def pinned_chunks(self) -> list[int]:
        return sorted(c for c, e in self._chunks.items() if e.pinned)

    @property
    def num_blocks_held(self) -> int:
        return len(self._chunks) * self.blocks_per_chunk

    def lookup(self, chunk_ids: Iterable[int]) -> tuple[list[int], list[int]]:
        """Split ``chunk_ids`` into (hits, misses), each in the given order; counts them.

        A chunk in flight is a hit (it is already on its way). Does not touch the LRU order.
        """
        ids = _check_ids(chunk_ids, "lookup")
        hits = [c for c in ids if c in self._chunks]
        misses = [c for c in ids if c not in self._chunks]
        self.hits += len(hits)
        self.misses += len(misses)
        return hits, misses

    # ---- transitions -------------------------------------------------------------------------
    def _resident_ids(self, chunk_ids: Iterable[int], what: str) -> list[int]:
        """Checked ids (see :func:`_check_ids`) that must all be in the set; KeyError otherwise."""
        ids = _check_ids(chunk_ids, what)
        missing = [c for c in ids if c not in self._chunks]
        if missing:
            raise KeyError(f"{what}: chunks {missing[:8]} are not resident")
        return ids

    def touch(self, chunk_ids: Iterable[int]) -> None:
        """Mark chunks as just used (most-recent end of the LRU order, in the given order)."""
        ids = self._resident_ids(chunk_ids, "touch")
        for c in ids:
            self._chunks.move_to_end(c)

    def _victims(self, n_new: int, protect: set[int]) -> list[int]:
        """LRU victims needed to make room for ``n_new`` chunks; raises if there are not enough."""
        need_blocks = n_new * self.blocks_per_chunk - self.pool.num_free
        need_chunks = 0 if self.max_chunks is None else len(self._chunks) + n_new - self.max_chunks
        victims: list[int] = []
        if need_blocks <= 0 and need_chunks <= 0:
            return victims
        for c, entry in self._chunks.items():
            if entry.state is not ChunkState.RESIDENT or entry.pinned or c in protect:
                continue
            victims.append(c)
            if len(victims) * self.blocks_per_chunk >= need_blocks and len(victims) >= need_chunks:
                return victims
        evictable = len(victims)
        raise BlockPoolExhausted(
            f"cannot load {n_new} chunks ({n_new * self.blocks_per_chunk} blocks): {self.pool.num_free} blocks "
            f"free, {evictable} unpinned resident chunks evictable"
            + ("" if self.max_chunks is None else f", chunk budget {self.max_chunks}")
            + "; release the window, request fewer chunks or enlarge the pool"
        )

    def prepare_load(
        self,
        chunk_ids: Iterable[int],
        *,
        valid_tokens: Sequence[int] | None = None,
        protect: Iterable[int] = (),
    ) -> LoadPlan:
        """Allocate blocks for chunks not yet resident; evict LRU unpinned chunks if needed.

        All or nothing: on error nothing changes. The new chunks are LOADING (in flight, never
        evicted) and at the most-recent end of the LRU order. ``protect``: resident chunks that must
        not be chosen as victims (e.g. the hits of the same request). ``valid_tokens[i]``: committed
        tokens of chunk i (default: the full chunk).
        """
        ids = _check_ids(chunk_ids, "prepare_load")
        present = [c for c in ids if c in self._chunks]
        if present:
            raise ValueError(f"prepare_load: chunks {present[:8]} are already resident or loading")
        if valid_tokens is None:
            valid = [self.chunk_size] * len(ids)
        else:
            valid = [int(v) for v in valid_tokens]
            if len(valid) != len(ids) or any(not 0 < v <= self.chunk_size for v in valid):
                raise ValueError(
                    f"prepare_load: valid_tokens must give one count in [1, {self.chunk_size}] per chunk, "
                    f"got {valid} for {len(ids)} chunks"
                )
        if self.max_chunks is not None and len(ids) > self.max_chunks:
            raise ValueError(
                f"prepare_load: {len(ids)} chunks requested but the chunk budget is {self.max_chunks}; "
                "request fewer chunks or raise the budget"
            )
        victims = self._victims(len(ids), set(protect))
        if victims:
            self._evict(victims, lru=True)
        flat = self.pool.allocate(len(ids) * self.blocks_per_chunk)
        bpc = self.blocks_per_chunk
        blocks = [flat[i * bpc : (i + 1) * bpc] for i in range(len(ids))]
        for c, b, v in zip(ids, blocks, valid):
            self._chunks[c] = ResidentChunk(c, b, ChunkState.LOADING, v)
            self.events.append(("load", c))
        self.loads += len(ids)
        self.version += 1
        return LoadPlan(ids, blocks, victims, valid)

    def complete_load(self, chunk_ids: Iterable[int]) -> None:
        """Mark loading chunks as resident (their copy is ordered before the next use)."""
        ids = _check_ids(chunk_ids, "complete_load")
        wrong = [c for c in ids if self.state(c) is not ChunkState.LOADING]
        if wrong:
            raise ValueError(f"complete_load: chunks {wrong[:8]} are not loading")
        for c in ids:
            self._chunks[c].state = ChunkState.RESIDENT
            self.events.append(("ready", c))
        self.version += 1

    def pin(self, chunk_ids: Iterable[int]) -> None:
        """Protect chunks from eviction (current lookahead window). Idempotent."""
        ids = self._resident_ids(chunk_ids, "pin")
        for c in ids:
            self._chunks[c].pinned = True

    def unpin(self, chunk_ids: Iterable[int] | None = None) -> None:
        """Drop the window pin of the given chunks (default: all)."""
        if chunk_ids is None:
            ids = list(self._chunks)
        else:
            ids = self._resident_ids(chunk_ids, "unpin")
        for c in ids:
            self._chunks[c].pinned = False

    def evict(self, chunk_ids: Iterable[int]) -> None:
        """Drop resident chunks and free their blocks. Pinned, in-flight or absent chunks are an
        error (checked for all ids before anything changes)."""
        ids = self._resident_ids(chunk_ids, "evict")
        loading = [c for c in ids if self._chunks[c].state is ChunkState.LOADING]
        if loading:
            raise ValueError(f"evict: chunks {loading[:8]} are in flight; wait for their copy first")
        pinned = [c for c in ids if self._chunks[c].pinned]
        if pinned:
            raise ValueError(
                f"evict: chunks {pinned[:8]} are pinned for the current lookahead window; release it first"
            )
        self._evict(ids, lru=False)

    def _evict(self, ids: list[int], *, lru: bool) -> None:
        blocks = [b for c in ids for b in self._chunks[c].blocks]
        self.pool.free(blocks)
        for c in ids:
            del self._chunks[c]
            self.events.append(("evict_lru" if lru else "evict", c))
        self.evictions += len(ids)
        if lru:
            self.lru_evictions += len(ids)
        self.version += 1

    def clear(self) -> None:
        """Evict everything (end of the sequence). In-flight chunks are an error."""
        loading = self.loading_chunks()
        if loading:
            raise ValueError(f"clear: chunks {loading[:8]} are in flight; wait for their copy first")
        self.unpin()
        if self._chunks:
            self._evict(list(self._chunks), lru=False)

    # ---- stats -------------------------------------------------------------------------------
    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def stats(self) -> dict:
        return {
            "chunk_hits": self.hits,
            "chunk_misses": self.misses,
            "hit_rate": self.hit_rate,
            "chunk_loads": self.loads,
            "chunk_evictions": self.evictions,
            "chunk_lru_evictions": self.lru_evictions,
            "resident_chunks": len(self._chunks),
            "recall_blocks": self.num_blocks_held,
            "recall_device_kv_bytes": self.num_blocks_held * self.pool.kv_block_bytes,
        }


def dedupe_positions(
    slot_positions: torch.Tensor, resident_per_head: Sequence[torch.Tensor | Iterable[int]]
) -> torch.Tensor:
    """Per-head positions to store in recalled slots so no (token, head) is attended twice.

    Args:
        slot_positions: ``[n]`` int, true position of each recalled slot (-1 for an empty slot).
        resident_per_head: ``H_kv`` entries, each the positions already resident for that KV head
            outside the recalled chunks (a 1-D int tensor on the same device, or any iterable of
            ints). Negative entries are ignored.

    Returns:
        ``[n, H_kv]`` int32: ``slot_positions[i]`` where head h does not already hold that token,
        else -1. Computed where ``slot_positions`` lives (no host/device sync).
    """
    if slot_positions.dim() != 1:
        raise ValueError(f"slot_positions must be [n], got {tuple(slot_positions.shape)}")
    pos = slot_positions.to(torch.int64)
    cols = []
    for resident in resident_per_head:
        if not isinstance(resident, torch.Tensor):
            resident = torch.tensor(sorted(int(p) for p in resident), dtype=torch.int64)
        resident = resident.to(device=pos.device, dtype=torch.int64).reshape(-1)
        dup = torch.isin(pos, resident) & (pos >= 0)
        cols.append(torch.where(dup, torch.full_like(pos, -1), pos))
    if not cols:
        raise ValueError("resident_per_head must have one entry per KV head (got none)")
    return torch.stack(cols, dim=1).to(torch.int32)
