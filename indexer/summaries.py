"""Per-chunk summary vectors of one layer's keys.

When a chunk of ``chunk_size`` tokens closes, each KV head gets (the *fields*):

* ``mean_key``: mean of the *pre-RoPE* keys ``[D]`` (position-free content; the learned indexer's
  input and the ``mean_key_prerope`` heuristic's vector);
* ``mean_key_rope``: mean of the *post-RoPE* keys ``[D]``. Its dot product with a post-RoPE query is
  exactly the mean attention logit over the chunk, which is why the ``mean_key`` heuristic uses it;
* ``min_key`` / ``max_key``: element-wise bounds of the *post-RoPE* keys ``[D]`` (Quest). Quest scores
  the decode query against the keys the attention actually sees, i.e. rotated at their true
  positions, so its upper bound ``sum_d max(q_d min_d, q_d max_d) >= q . k`` holds for every key of the
  chunk. The bounds are stored as int8 codes with one fp32 scale per chunk and KV head
  (``bound_scale``, see :func:`quantize_bounds`), rounded outward: ``min_code * scale <= min`` and
  ``max_code * scale >= max``, so the dequantized bounds (:meth:`ChunkSummaries.bounds`) still bound
  every key and Quest's score stays an upper bound;
* ``compressed``: the learned indexer's own compressed key ``[r]`` (``mean_key @ Wk``, see
  :meth:`flashmem.indexer.lookahead.LookaheadIndexer.compress`), optional.

Only closed (full) chunks are summarised; tokens of the open chunk stay in the recency tail.

Means and the compressed key are stored in the dtype of the keys fed in (the model's dtype), computed
in fp32 and rounded once when stored; the bounds in int8 (above). A :class:`ChunkSummaryBuilder` computes and stores only the fields it is
asked for (each indexer declares the fields it reads: ``Indexer.fields``), appended in place into
preallocated storage that grows by doubling; the open chunk is held as running fp32 sums and
element-wise bounds (``[H_kv, D]`` per field), not as keys.

Device bytes per closed chunk and KV head: ``D x e`` (``e``: the model's element size) per stored field
of ``mean_key`` and ``mean_key_rope``, ``r x e`` for ``compressed``, and ``2 D + 4`` for the bounds
(two int8 codes per dimension and the fp32 scale); the chunk's KV is ``2 x chunk_size x D x e``. At
``chunk_size = 64`` in bf16: one ``D`` field is 0.78% of the chunk's KV and Quest's bounds 0.81% at
``D = 64`` (0.79% at ``D = 128``; in the model's dtype they would be 1.56%); the learned indexer with
bounds (``mean_key_rope``, ``compressed``, ``min_key``, ``max_key``; ``D = 64``, ``r = 32``) 2.0%. In fp32
(the CPU default) the bounds are 0.40% of the KV (in fp32 they would be 1.56%).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

SUMMARY_FIELDS = ("mean_key", "mean_key_rope", "min_key", "max_key")
"""The fields :func:`summarize_chunks` computes from keys alone."""
ALL_FIELDS = (*SUMMARY_FIELDS, "compressed")
PRE_ROPE_FIELDS = ("mean_key", "compressed")
BOUND_FIELDS = ("min_key", "max_key")
"""Fields stored as int8 codes with a per-chunk, per-head fp32 scale (``ChunkSummaries.bound_scale``)."""
"""Fields computed from the pre-RoPE keys (a builder without them needs no un-rotation)."""


def check_fields(fields: Iterable[str]) -> tuple[str, ...]:
    """``fields`` as a tuple in canonical order; unknown names raise ValueError."""
    fields = tuple(fields)
    unknown = sorted(set(fields) - set(ALL_FIELDS))
    if unknown:
        raise ValueError(f"unknown summary fields {unknown}; choose from {ALL_FIELDS}")
    return tuple(f for f in ALL_FIELDS if f in fields)


@dataclass
class ChunkSummaries:
    """Summaries of ``N`` closed chunks of one layer; a field that was not built is None.

    mean_key:      [N, H_kv, D]  mean pre-RoPE key
    mean_key_rope: [N, H_kv, D]  mean post-RoPE key
    min_key:       [N, H_kv, D]  element-wise min of post-RoPE keys: int8 codes when ``bound_scale`` is
                                 set (as the builder and :func:`summarize_chunks` store them), else floats
    max_key:       [N, H_kv, D]  element-wise max of post-RoPE keys, likewise
    start:         [N] int64     position of each chunk's first token
    chunk_size:    tokens per chunk
    compressed:    [N, H_kv, r]  learned compressed key, or None
    bound_scale:   [N, H_kv] fp32 the bounds' scale (codes x scale = bound), or None for float bounds

    Read the bounds through :meth:`bounds`, which dequantizes them.
    """

    mean_key: torch.Tensor | None
    mean_key_rope: torch.Tensor | None
    min_key: torch.Tensor | None
    max_key: torch.Tensor | None
    start: torch.Tensor
    chunk_size: int
    compressed: torch.Tensor | None = None
    bound_scale: torch.Tensor | None = None

    @property
    def num_chunks(self) -> int:
        return int(self.start.shape[0])

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Quest's bounds as fp32 ``(min_key, max_key)``, each ``[N, H_kv, D]``: the int8 codes times
        ``bound_scale`` (outward-rounded, so they still bound every key of the chunk), or the float
        bounds as stored."""
        lo, hi = self.field("min_key"), self.field("max_key")
        if self.bound_scale is None:
            return lo.float(), hi.float()
        scale = self.bound_scale[..., None]
        return lo.float() * scale, hi.float() * scale

    def field(self, name: str) -> torch.Tensor:
        """The field ``name``; a clear error when these summaries were built without it."""
        value = getattr(self, name)
        if value is None:
            present = [f for f in ALL_FIELDS if getattr(self, f) is not None]
            raise ValueError(
                f"these chunk summaries hold no {name!r} (built with fields {present}); build them with "
                f"the fields the indexer declares (Indexer.fields)"
            )
        return value

    def select(self, index: torch.Tensor | slice) -> ChunkSummaries:
        """Summaries of a subset of chunks (``index`` over the first dimension; a slice gives views)."""

        def pick(x):
            return None if x is None else x[index]

        return ChunkSummaries(
            mean_key=pick(self.mean_key),
            mean_key_rope=pick(self.mean_key_rope),
            min_key=pick(self.min_key),
            max_key=pick(self.max_key),
            start=self.start[index],
            chunk_size=self.chunk_size,
            compressed=pick(self.compressed),
            bound_scale=pick(self.bound_scale),
        )

    def head(self, h: int) -> ChunkSummaries:
        """The summaries of KV head ``h`` alone (views, ``[N, 1, ...]`` per field)."""

        def pick(x):
            return None if x is None else x[:, h : h + 1]

        return ChunkSummaries(
            mean_key=pick(self.mean_key),
            mean_key_rope=pick(self.mean_key_rope),
            min_key=pick(self.min_key),
            max_key=pick(self.max_key),
            start=self.start,
            chunk_size=self.chunk_size,
            compressed=pick(self.compressed),
            bound_scale=pick(self.bound_scale),
        )

    @staticmethod
    def concat(parts: list[ChunkSummaries]) -> ChunkSummaries:
        if not parts:
            raise ValueError("concat needs at least one ChunkSummaries")

        if len({p.bound_scale is None for p in parts if p.min_key is not None}) > 1:
            raise ValueError("concat cannot mix int8 bounds (with bound_scale) and float bounds")

        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)

        return ChunkSummaries(
            mean_key=cat("mean_key"),
            mean_key_rope=cat("mean_key_rope"),
            min_key=cat("min_key"),
            max_key=cat("max_key"),
            start=torch.cat([p.start for p in parts]),
            chunk_size=parts[0].chunk_size,
            compressed=cat("compressed"),
            bound_scale=cat("bound_scale"),
        )


BOUND_LEVELS = 126
"""Largest code magnitude the scale maps ``max(|min|, |max|)`` to; the outward rounding moves a code at
most one step further, so every code fits int8."""


def quantize_bounds(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quest's bounds ``lo <= hi`` (``[..., H_kv, D]``, any float dtype) as int8 codes and one fp32 scale
    per ``[..., H_kv]`` row, rounded outward: ``lo_code * scale <= lo`` and ``hi_code * scale >= hi``,
    exactly as :meth:`ChunkSummaries.bounds` computes them in fp32. Returns ``(lo_code, hi_code, scale)``;
    a row of zeros gets scale 1."""
    lo32, hi32 = lo.float(), hi.float()
    amax = torch.maximum(lo32.abs().amax(-1), hi32.abs().amax(-1))
    scale = torch.where(amax > 0, amax / BOUND_LEVELS, torch.ones_like(amax))
    s = scale[..., None]
    lo_c = torch.floor(lo32 / s)
    lo_c = lo_c - (lo_c * s > lo32).float()  # the division rounded up: one step further out
    hi_c = torch.ceil(hi32 / s)
    hi_c = hi_c + (hi_c * s < hi32).float()
    return lo_c.to(torch.int8), hi_c.to(torch.int8), scale


def _check_keys(keys_rope: torch.Tensor, keys_pre: torch.Tensor | None, chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if keys_rope.dim() != 3:
        raise ValueError(f"keys must be [T, H_kv, D], got shape {tuple(keys_rope.shape)}")
    if keys_pre is not None and keys_pre.shape != keys_rope.shape:
        raise ValueError(
            f"pre-RoPE keys {tuple(keys_pre.shape)} and post-RoPE keys {tuple(keys_rope.shape)} differ in shape"
        )
    if not keys_rope.is_floating_point():
        raise TypeError(f"keys must be floating point, got {keys_rope.dtype}")


def _block_values(
    kr: torch.Tensor, kp: torch.Tensor | None, fields: tuple[str, ...], chunk_size: int
) -> dict[str, torch.Tensor]:
    """Summaries of ``n`` whole chunks: ``kr``/``kp`` ``[n * chunk_size, H_kv, D]`` -> ``{field: [n, H_kv, D]}``
    (means in fp32, bounds in the keys' dtype; ``compressed`` is left to the caller)."""
    n = kr.shape[0] // chunk_size
    out = {}
    block = kr.reshape(n, chunk_size, *kr.shape[1:])
    if "mean_key_rope" in fields:
        out["mean_key_rope"] = block.float().mean(dim=1)
    if "min_key" in fields:
        out["min_key"] = block.amin(dim=1)
    if "max_key" in fields:
        out["max_key"] = block.amax(dim=1)
    if "mean_key" in fields or "compressed" in fields:
        out["mean_key"] = kp.reshape(n, chunk_size, *kp.shape[1:]).float().mean(dim=1)
    return out


def summarize_chunks(
    keys_rope: torch.Tensor,
    keys_pre: torch.Tensor | None,
    chunk_size: int = 64,
    start_position: int = 0,
    *,
    fields: Iterable[str] = SUMMARY_FIELDS,
    dtype: torch.dtype | None = None,
) -> ChunkSummaries:
    """Summaries of every full chunk of ``keys``; a trailing partial chunk is ignored.

    keys_rope: [T, H_kv, D] post-RoPE keys at positions ``start_position + arange(T)``
    keys_pre:  [T, H_kv, D] the same keys before RoPE (None when no pre-RoPE field is asked for)
    fields:    which summaries to compute (others are None; ``compressed`` is never computed here)
    dtype:     storage dtype of the means (None: the keys' dtype), computed in fp32; bounds: int8 codes
               with ``bound_scale`` (:func:`quantize_bounds`)
    returns ChunkSummaries with N = T // chunk_size chunks.
    """
    fields = check_fields(fields)
    if "compressed" in fields:
        raise ValueError("summarize_chunks computes no 'compressed' field; use a ChunkSummaryBuilder")
    _check_keys(keys_rope, keys_pre, chunk_size)
    if keys_pre is None and "mean_key" in fields:
        raise ValueError("the 'mean_key' field needs the pre-RoPE keys")
    dtype = keys_rope.dtype if dtype is None else dtype
    n = keys_rope.shape[0] // chunk_size
    take = n * chunk_size
    values = _block_values(
        keys_rope[:take], None if keys_pre is None else keys_pre[:take], fields, chunk_size
    )
    start = start_position + torch.arange(n, dtype=torch.int64, device=keys_rope.device) * chunk_size
    stored = {f: values[f].to(dtype) if f in fields else None for f in SUMMARY_FIELDS}
    scale = None
    if "min_key" in fields or "max_key" in fields:
        lo_c, hi_c, scale = _quantize_fields(values)
        stored["min_key"] = lo_c if "min_key" in fields else None
        stored["max_key"] = hi_c if "max_key" in fields else None
    return ChunkSummaries(**stored, start=start, chunk_size=chunk_size, bound_scale=scale)


def _quantize_fields(values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_bounds` of the bounds among ``values`` (``[..., H_kv, D]``); a bound computed
    without the other stands in for it, so the scale fits the field that is stored."""
    lo = values.get("min_key", values.get("max_key"))
    hi = values.get("max_key", lo)
    return quantize_bounds(lo, hi)


class ChunkSummaryBuilder:
    """Incremental summaries of one layer: append keys as they are produced; each time a chunk closes
    its summary is written in place into preallocated storage ``[capacity, H_kv, dim]`` per field
    (doubled when full: amortised O(1) per chunk, no re-concatenation), and :attr:`summaries` returns
    views of the first ``num_chunks`` rows. Positions are host-side counters (no device reads).

    fields: the fields to store (see :data:`ALL_FIELDS`); ``compressed`` needs ``compress``, a callable
        ``mean_key [n, H_kv, D] fp32 -> [n, H_kv, r]`` applied once when a chunk closes.
    dtype: storage dtype (None: the dtype of the first keys appended, i.e. the model's).
    extra_fields: fields computed for ``on_close`` only, never stored (e.g. a chunk index's vectors).
    on_close: called as ``on_close({field: [n, H_kv, dim]})`` with the fields and extra fields of the
        ``n`` chunks that just closed (means in fp32).
    capacity_chunks: initial storage rows.

    Device bytes held: ``capacity x H_kv x (sum of field dims) x element size`` (1 byte for the int8
    bounds, plus ``capacity x H_kv`` fp32 bound scales) + ``capacity`` int64 chunk starts + the open
    chunk's running sums/bounds (``[H_kv, D]`` per field).
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        chunk_size: int = 64,
        device: torch.device | str = "cpu",
        *,
        fields: Iterable[str] = SUMMARY_FIELDS,
        dtype: torch.dtype | None = None,
        compress: Callable[[torch.Tensor], torch.Tensor] | None = None,
        extra_fields: Iterable[str] = (),
        on_close: Callable[[dict[str, torch.Tensor]], None] | None = None,
        capacity_chunks: int = 16,
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if capacity_chunks <= 0:
            raise ValueError(f"capacity_chunks must be positive, got {capacity_chunks}")
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.chunk_size = chunk_size
        self.device = torch.device(device)
        self.fields = check_fields(fields)
        self.extra_fields = tuple(f for f in check_fields(extra_fields) if f not in self.fields)
        if "compressed" in self.extra_fields:
            raise ValueError("'compressed' can be stored, not emitted as an extra field")
        if "compressed" in self.fields and compress is None:
            raise ValueError("the 'compressed' field needs a compress callable (mean_key -> compressed)")
        self.compress = compress
        self.on_close = on_close
        self.dtype = dtype
        computed = set(self.fields) | set(self.extra_fields)
        self._computed = tuple(f for f in ALL_FIELDS if f in computed)
        self.needs_pre_rope = any(f in PRE_ROPE_FIELDS for f in self._computed)
        self._has_bounds = any(f in BOUND_FIELDS for f in self.fields)
        self._capacity = capacity_chunks
        self._store: dict[str, torch.Tensor] = {}
        self._start: torch.Tensor | None = None
        self._acc: dict[str, torch.Tensor] = {}
        self._pending_len = 0
        self._closed = 0
        self.growths = 0

    # ---- counters --------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self._closed * self.chunk_size + self._pending_len

    @property
    def num_chunks(self) -> int:
        return self._closed

    @property
    def capacity_chunks(self) -> int:
        return self._capacity

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the builder holds (storage as allocated, chunk starts, open-chunk state)."""
        held = list(self._store.values()) + list(self._acc.values())
        return held + ([self._start] if self._start is not None else [])

    # ---- storage ---------------------------------------------------------------------------------
    def _allocate(self, rows: int, dtype: torch.dtype, compressed_dim: int | None) -> None:
        h, d = self.num_kv_heads, self.head_dim
        old, n = self._store, self._closed
        new = {}
        for f in self.fields:
            dim = compressed_dim if f == "compressed" else d
            if f == "compressed" and f in old:
                dim = old[f].shape[-1]
            kind = torch.int8 if f in BOUND_FIELDS else dtype
            new[f] = torch.empty(rows, h, dim, dtype=kind, device=self.device)
            if f in old and n:
                new[f][:n] = old[f][:n]
        if self._has_bounds:
            new["bound_scale"] = torch.empty(rows, h, dtype=torch.float32, device=self.device)
            if n:
                new["bound_scale"][:n] = old["bound_scale"][:n]
        self._store = new
        self._start = torch.arange(rows, dtype=torch.int64, device=self.device) * self.chunk_size
        self._capacity = rows

    def _write(self, values: dict[str, torch.Tensor], n: int) -> None:
        """Store ``n`` closed chunks (``values[field]``: ``[n, H_kv, dim]``) at rows ``num_chunks ..``."""
        if "compressed" in self._computed:
            values["compressed"] = self.compress(values["mean_key"])
        if self._start is None or self._closed + n > self._capacity:
            rows = self._capacity
            while self._closed + n > rows:
                rows *= 2
            if self._start is not None:
                self.growths += 1
            comp = values["compressed"].shape[-1] if "compressed" in values else None
            self._allocate(rows, self.dtype, comp)
        lo, hi = self._closed, self._closed + n
        stored = dict(values)
        if self._has_bounds:
            stored["min_key"], stored["max_key"], stored["bound_scale"] = _quantize_fields(values)
            self._store["bound_scale"][lo:hi] = stored["bound_scale"]
        for f in self.fields:
            self._store[f][lo:hi] = stored[f]
        self._closed = hi
        if self.on_close is not None:
            self.on_close({f: values[f] for f in self._computed})

    # ---- the open chunk: running sums (fp32) and bounds --------------------------------------------
    def _accumulate(self, kr: torch.Tensor, kp: torch.Tensor | None, first: bool) -> None:
        """Fold ``m`` keys ``[m, H_kv, D]`` of the open chunk into its running state."""
        one = kr.shape[0] == 1
        acc = self._acc
        parts = []
        if "mean_key_rope" in self._computed:
            parts.append(("sum_rope", kr[0] if one else kr.float().sum(0), "add"))
        if "min_key" in self._computed:
            parts.append(("min", kr[0] if one else kr.amin(0), "min"))
        if "max_key" in self._computed:
            parts.append(("max", kr[0] if one else kr.amax(0), "max"))
        if self.needs_pre_rope:
            parts.append(("sum_pre", kp[0] if one else kp.float().sum(0), "add"))
        for name, x, op in parts:
            if name not in acc:
                dtype = torch.float32 if op == "add" else kr.dtype
                acc[name] = torch.empty(x.shape, dtype=dtype, device=x.device)
            a = acc[name]
            if first:
                a.copy_(x)
            elif op == "add":
                a.add_(x)
            elif op == "min":
                torch.minimum(a, x.to(a.dtype), out=a)
            else:
                torch.maximum(a, x.to(a.dtype), out=a)

    def _close_open_chunk(self) -> None:
        acc, c = self._acc, self.chunk_size
        values = {}
        if "mean_key_rope" in self._computed:
            values["mean_key_rope"] = (acc["sum_rope"] / c)[None]
        if "min_key" in self._computed:
            values["min_key"] = acc["min"][None]
        if "max_key" in self._computed:
            values["max_key"] = acc["max"][None]
        if self.needs_pre_rope:
            values["mean_key"] = (acc["sum_pre"] / c)[None]
        self._write(values, 1)

    def append(self, keys_rope: torch.Tensor, keys_pre: torch.Tensor | None = None) -> int:
        """Append ``[n, H_kv, D]`` post-RoPE keys (and their pre-RoPE values when a stored field needs
        them: ``needs_pre_rope``); returns how many chunks closed."""
        _check_keys(keys_rope, keys_pre, self.chunk_size)
        if keys_rope.shape[1:] != (self.num_kv_heads, self.head_dim):
            raise ValueError(
                f"keys must be [n, {self.num_kv_heads}, {self.head_dim}], got {tuple(keys_rope.shape)}"
            )
        if self.needs_pre_rope and keys_pre is None:
            raise ValueError(f"fields {self._computed} need the pre-RoPE keys: pass keys_pre")
        if not self.needs_pre_rope:
            keys_pre = None
        if self.dtype is None:
            self.dtype = keys_rope.dtype
        c = self.chunk_size
        n = keys_rope.shape[0]
        i = closed = 0
        if self._pending_len:
            m = min(n, c - self._pending_len)
            self._accumulate(keys_rope[:m], None if keys_pre is None else keys_pre[:m], first=False)
            self._pending_len += m
            i = m
            if self._pending_len == c:
                self._close_open_chunk()
                self._pending_len = 0
                closed += 1
        full = (n - i) // c
        if full:
            j = i + full * c
            values = _block_values(
                keys_rope[i:j], None if keys_pre is None else keys_pre[i:j], self._computed, c
            )
            self._write(values, full)
            closed += full
            i = j
        if i < n:
            self._accumulate(keys_rope[i:], None if keys_pre is None else keys_pre[i:], first=True)
            self._pending_len = n - i
        return closed

    @property
    def summaries(self) -> ChunkSummaries:
        """Views of the closed chunks' stored fields (unstored fields are None). Views stay valid until
        the storage next grows."""
        n = self._closed
        if self._start is None:
            h, d = self.num_kv_heads, self.head_dim
            dtype = self.dtype or torch.float32

            def empty(f):
                if f not in self.fields:
                    return None
                kind = torch.int8 if f in BOUND_FIELDS else dtype
                return torch.empty(0, h, d, dtype=kind, device=self.device)

            return ChunkSummaries(
                *(empty(f) for f in SUMMARY_FIELDS),
                start=torch.empty(0, dtype=torch.int64, device=self.device),
                chunk_size=self.chunk_size,
                compressed=empty("compressed"),
                bound_scale=torch.empty(0, h, device=self.device) if self._has_bounds else None,
            )
        store = self._store
        return ChunkSummaries(
            *(store[f][:n] if f in store else None for f in SUMMARY_FIELDS),
            start=self._start[:n],
            chunk_size=self.chunk_size,
            compressed=store["compressed"][:n] if "compressed" in store else None,
            bound_scale=store["bound_scale"][:n] if "bound_scale" in store else None,
        )
