"""Per-chunk summary vectors of one layer's keys.

When a chunk of ``chunk_size`` tokens closes, each KV head gets:

* ``mean_key``: mean of the *pre-RoPE* keys ``[D]`` (position-free content; the learned indexer's
  input and the ``mean_key_prerope`` heuristic's vector);
* ``mean_key_rope``: mean of the *post-RoPE* keys ``[D]``. Its dot product with a post-RoPE query is
  exactly the mean attention logit over the chunk, which is why the ``mean_key`` heuristic uses it;
* ``min_key`` / ``max_key``: element-wise bounds of the *post-RoPE* keys ``[D]`` (Quest). Quest scores
  the decode query against the keys the attention actually sees, i.e. rotated at their true
  positions, so its upper bound ``sum_d max(q_d min_d, q_d max_d) >= q . k`` holds for every key of the
  chunk;
* ``compressed``: the learned indexer's own compressed key ``[r]`` (filled by
  :meth:`flashmem.indexer.lookahead.LookaheadIndexer.compress`), optional.

Only closed (full) chunks are summarised; tokens of the open chunk stay in the recency tail.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ChunkSummaries:
    """Summaries of ``N`` closed chunks of one layer.

    mean_key:      [N, H_kv, D]  mean pre-RoPE key
    mean_key_rope: [N, H_kv, D]  mean post-RoPE key
    min_key:       [N, H_kv, D]  element-wise min of post-RoPE keys
    max_key:       [N, H_kv, D]  element-wise max of post-RoPE keys
    start:         [N] int64     position of each chunk's first token
    chunk_size:    tokens per chunk
    compressed:    [N, H_kv, r]  learned compressed key, or None
    """

    mean_key: torch.Tensor
    mean_key_rope: torch.Tensor
    min_key: torch.Tensor
    max_key: torch.Tensor
    start: torch.Tensor
    chunk_size: int
    compressed: torch.Tensor | None = None

    @property
    def num_chunks(self) -> int:
        return int(self.mean_key.shape[0])

    def select(self, index: torch.Tensor | slice) -> ChunkSummaries:
        """Summaries of a subset of chunks (``index`` over the first dimension)."""
        return ChunkSummaries(
            mean_key=self.mean_key[index],
            mean_key_rope=self.mean_key_rope[index],
            min_key=self.min_key[index],
            max_key=self.max_key[index],
            start=self.start[index],
            chunk_size=self.chunk_size,
            compressed=None if self.compressed is None else self.compressed[index],
        )

    @staticmethod
    def concat(parts: list[ChunkSummaries]) -> ChunkSummaries:
        if not parts:
            raise ValueError("concat needs at least one ChunkSummaries")
        comp = [p.compressed for p in parts]
        return ChunkSummaries(
            mean_key=torch.cat([p.mean_key for p in parts]),
            mean_key_rope=torch.cat([p.mean_key_rope for p in parts]),
            min_key=torch.cat([p.min_key for p in parts]),
            max_key=torch.cat([p.max_key for p in parts]),
            start=torch.cat([p.start for p in parts]),
            chunk_size=parts[0].chunk_size,
            compressed=None if any(c is None for c in comp) else torch.cat(comp),
        )


def _check_keys(keys_rope: torch.Tensor, keys_pre: torch.Tensor, chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if keys_rope.dim() != 3:
        raise ValueError(f"keys must be [T, H_kv, D], got shape {tuple(keys_rope.shape)}")
    if keys_pre.shape != keys_rope.shape:
        raise ValueError(
            f"pre-RoPE keys {tuple(keys_pre.shape)} and post-RoPE keys {tuple(keys_rope.shape)} differ in shape"
        )
    if not keys_rope.is_floating_point():
        raise TypeError(f"keys must be floating point, got {keys_rope.dtype}")


def summarize_chunks(
    keys_rope: torch.Tensor, keys_pre: torch.Tensor, chunk_size: int = 64, start_position: int = 0
) -> ChunkSummaries:
    """Summaries of every full chunk of ``keys``; a trailing partial chunk is ignored.

    keys_rope: [T, H_kv, D] post-RoPE keys at positions ``start_position + arange(T)``
    keys_pre:  [T, H_kv, D] the same keys before RoPE
    returns ChunkSummaries with N = T // chunk_size chunks (fp32).
    """
    _check_keys(keys_rope, keys_pre, chunk_size)
    T, H, D = keys_rope.shape
    n = T // chunk_size
    kr = keys_rope[: n * chunk_size].float().reshape(n, chunk_size, H, D)
    kp = keys_pre[: n * chunk_size].float().reshape(n, chunk_size, H, D)
    start = start_position + torch.arange(n, dtype=torch.int64, device=keys_rope.device) * chunk_size
    return ChunkSummaries(
        mean_key=kp.mean(dim=1),
        mean_key_rope=kr.mean(dim=1),
        min_key=kr.amin(dim=1),
        max_key=kr.amax(dim=1),
        start=start,
        chunk_size=chunk_size,
    )


@dataclass
class ChunkSummaryBuilder:
    """Incremental summaries of one layer: append keys as they are produced; each time a chunk closes
    its summary joins :attr:`summaries`. Positions are host-side counters (no device reads)."""

    num_kv_heads: int
    head_dim: int
    chunk_size: int = 64
    device: torch.device | str = "cpu"
    _pending_rope: list[torch.Tensor] = field(default_factory=list)
    _pending_pre: list[torch.Tensor] = field(default_factory=list)
    _pending_len: int = 0
    _closed: int = 0
    _parts: list[ChunkSummaries] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")

    @property
    def num_tokens(self) -> int:
        return self._closed * self.chunk_size + self._pending_len

    @property
    def num_chunks(self) -> int:
        return self._closed

    def append(self, keys_rope: torch.Tensor, keys_pre: torch.Tensor) -> int:
        """Append ``[n, H_kv, D]`` post- and pre-RoPE keys; returns how many chunks closed."""
        _check_keys(keys_rope, keys_pre, self.chunk_size)
        if keys_rope.shape[1:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"keys must be [n, {self.num_kv_heads}, {self.head_dim}], got {tuple(keys_rope.shape)}"
            )
        self._pending_rope.append(keys_rope)
        self._pending_pre.append(keys_pre)
        self._pending_len += keys_rope.shape[0]
        closed = self._pending_len // self.chunk_size
        if closed == 0:
            return 0
        kr = torch.cat(self._pending_rope)
        kp = torch.cat(self._pending_pre)
        take = closed * self.chunk_size
        part = summarize_chunks(kr[:take], kp[:take], self.chunk_size, self._closed * self.chunk_size)
        self._parts.append(part)  # concatenated lazily by `summaries` (appends stay O(new chunks))
        self._pending_rope = [kr[take:]]
        self._pending_pre = [kp[take:]]
        self._pending_len -= take
        self._closed += closed
        return closed

    @property
    def summaries(self) -> ChunkSummaries:
        if not self._parts:
            empty = torch.empty(0, self.num_kv_heads, self.head_dim, device=self.device)
            return ChunkSummaries(
                empty,
                empty.clone(),
                empty.clone(),
                empty.clone(),
                torch.empty(0, dtype=torch.int64, device=self.device),
                self.chunk_size,
            )
        if len(self._parts) > 1:
            self._parts = [ChunkSummaries.concat(self._parts)]
        return self._parts[0]
