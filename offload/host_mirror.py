"""Lossless host copy of every token's K and V, in token order, grouped into fixed-size chunks.

The device cache keeps only a bounded subset of the KV (sinks, recalled chunks, compacted working
tokens, the recent window); the host mirror keeps all of it so any token can be recalled later.

Storage (one allocation, pinned when CUDA is available)::

    storage:     [num_layers, 2, capacity_tokens, H_kv, D]   (index 0 = K, 1 = V)
    keys[l]:     [capacity_tokens, H_kv, D]                  view of storage[l, 0]
    values[l]:   [capacity_tokens, H_kv, D]                  view of storage[l, 1]

Chunk ``c`` is rows ``[c * chunk_size, (c + 1) * chunk_size)``; ``capacity_tokens`` is always a
multiple of ``chunk_size`` so the rows of the last (possibly partial) chunk exist.

Writing, once per forward pass: ``append(layer, k, v)`` for every layer (``k, v: [n, H_kv, D]``),
then ``commit(n)``. On CUDA each append is one batched device-to-host copy per tensor, issued on
the mirror's own stream after it waits on the caller's (compute) stream; nothing blocks the host.
Readers (the transfer engine) call :meth:`wait_rows` before reading rows that may still be in
flight. All counters are host-side.

Capacity is checked before any allocation: a :meth:`reserve` (or a constructor ``capacity_tokens``)
that would exceed ``max_host_bytes`` or the host's memory raises ``ValueError`` and leaves the
mirror unchanged.
"""

from __future__ import annotations

import math
import os

import torch

_GIB = float(1 << 30)


def host_memory_bytes() -> tuple[int, int]:
    """``(physical_bytes, available_bytes)`` of host RAM, read without allocating anything.

    ``available`` is ``MemAvailable`` from ``/proc/meminfo`` when readable (Linux), else the
    free physical pages from ``os.sysconf``, else the physical size.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    physical = os.sysconf("SC_PHYS_PAGES") * page
    available = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        available = None
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError):
            available = physical
    return physical, min(available, physical)


class HostMirror:
    """Host copy of the full K/V of one sequence, chunked in token order.

    Args:
        num_layers, num_kv_heads, head_dim: model KV geometry (``H_kv``, ``D``).
        chunk_size: tokens per chunk (recall granularity), default 64.
        dtype: storage dtype; appends must match it exactly (the mirror is lossless).
        capacity_tokens: tokens to reserve now (rounded up to a whole chunk); 0 defers allocation.
        max_host_bytes: optional cap on the mirror's K+V bytes (``capacity_bytes``).
        pin_memory: page-lock the storage (default: when CUDA is available). Required for truly
            asynchronous host-to-device copies.
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        chunk_size: int = 64,
        dtype: torch.dtype = torch.bfloat16,
        capacity_tokens: int = 0,
        max_host_bytes: int | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        for name, value, minimum in (
            ("num_layers", num_layers, 1),
            ("num_kv_heads", num_kv_heads, 1),
            ("head_dim", head_dim, 1),
            ("chunk_size", chunk_size, 1),
            ("capacity_tokens", capacity_tokens, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"HostMirror.{name} must be an int >= {minimum}, got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"HostMirror dtype must be a floating torch.dtype, got {dtype!r}")
        if max_host_bytes is not None and (
            isinstance(max_host_bytes, bool) or not isinstance(max_host_bytes, int) or max_host_bytes < 1
        ):
            raise ValueError(
                f"HostMirror.max_host_bytes must be a positive int or None, got {max_host_bytes!r}"
            )
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.chunk_size = chunk_size
        self.dtype = dtype
        self.max_host_bytes = max_host_bytes
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.element_size = torch.empty((), dtype=dtype).element_size()

        self.storage = torch.empty((num_layers, 2, 0, num_kv_heads, head_dim), dtype=dtype)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._make_views()
        self._num_tokens = 0
        self._layer_tokens = [0] * num_layers
        # device-to-host bookkeeping (host-side only)
        self._d2h_streams: dict[int, torch.cuda.Stream] = {}
        self._write_event: torch.cuda.Event | None = None
        self._write_event_rows = 0
        self._flushed_rows = 0
        self.d2h_bytes = 0
        self.d2h_copies = 0
        self.reallocations = 0
        if capacity_tokens:
            self.reserve(capacity_tokens)

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        """K + V bytes of one token over all layers and KV heads (what a dense cache stores)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def capacity_tokens(self) -> int:
        return self.storage.shape[2]

    @property
    def capacity_bytes(self) -> int:
        """K + V bytes allocated on the host (reserved rows, used or not)."""
        return self.capacity_tokens * self.kv_bytes_per_token

    @property
    def host_kv_bytes(self) -> int:
        """K + V bytes of the committed tokens: exactly the dense KV size of the tokens seen."""
        return self._num_tokens * self.kv_bytes_per_token

    @property
    def num_tokens(self) -> int:
        """Committed tokens (the next token's position)."""
        return self._num_tokens

    @property
    def num_chunks(self) -> int:
        """Chunks holding at least one committed token (the last one may be partial)."""
        return math.ceil(self._num_tokens / self.chunk_size)

    def chunk_num_tokens(self, chunk_id: int) -> int:
        """Committed tokens in chunk ``chunk_id`` (``chunk_size`` except for the last chunk)."""
        return max(0, min(self.chunk_size, self._num_tokens - chunk_id * self.chunk_size))

    def _make_views(self) -> None:
        self.keys = [self.storage[l, 0] for l in range(self.num_layers)]
        self.values = [self.storage[l, 1] for l in range(self.num_layers)]

    # ---- capacity ----------------------------------------------------------------------------
    def check_capacity(self, n_tokens: int) -> int:
        """Rounded capacity (tokens) for ``n_tokens``; raises ``ValueError`` if it cannot fit.

        Checks the user cap ``max_host_bytes``, the physical RAM and the RAM available now (a
        growth allocates the new storage before the old one is released).
        """
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
            raise ValueError(f"HostMirror.reserve expects a token count >= 0, got {n_tokens!r}")
        target = math.ceil(n_tokens / self.chunk_size) * self.chunk_size
        if target <= self.capacity_tokens:
            return self.capacity_tokens
        need = target * self.kv_bytes_per_token
        per_tok = self.kv_bytes_per_token
        if self.max_host_bytes is not None and need > self.max_host_bytes:
            raise ValueError(
                f"host mirror for {n_tokens} tokens needs {need / _GIB:.2f} GiB "
                f"({per_tok} bytes/token), over max_host_bytes={self.max_host_bytes / _GIB:.2f} GiB; "
                "shorten the context or raise max_host_bytes"
            )
        physical, available = host_memory_bytes()
        if need > physical:
            raise ValueError(
                f"host mirror for {n_tokens} tokens needs {need / _GIB:.2f} GiB ({per_tok} bytes/token), "
                f"more than this machine's {physical / _GIB:.2f} GiB of RAM; shorten the context"
            )
        if need > available:
            raise ValueError(
                f"host mirror for {n_tokens} tokens needs {need / _GIB:.2f} GiB ({per_tok} bytes/token) "
                f"but only {available / _GIB:.2f} GiB of host RAM is available; shorten the context or "
                "free host memory"
            )
        return target

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` tokens (rounded up to a whole chunk).

        Checked up front: raises ``ValueError`` before allocating anything when the storage would
        not fit (see :meth:`check_capacity`); the mirror is then unchanged. Growing keeps the rows
        already written (one copy of the used rows).
        """
        target = self.check_capacity(n_tokens)
        if target <= self.capacity_tokens:
            return
        shape = (self.num_layers, 2, target, self.num_kv_heads, self.head_dim)
        new = torch.empty(shape, dtype=self.dtype, pin_memory=self.pin_memory)
        used = max(self._layer_tokens)
        if used:
            self.wait_rows(used)
            new[:, :, :used].copy_(self.storage[:, :, :used])
        if self.capacity_tokens:
            self.reallocations += 1
        self.storage = new
        self._make_views()

    # ---- writes ------------------------------------------------------------------------------
    def _d2h_stream(self, device: torch.device) -> torch.cuda.Stream:
        index = device.index if device.index is not None else torch.cuda.current_device()
        stream = self._d2h_streams.get(index)
        if stream is None:
            stream = torch.cuda.Stream(device=index)
            self._d2h_streams[index] = stream
        return stream

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the next ``n`` tokens of one layer: ``k, v: [n, H_kv, D]`` (any device).

        Rows go right after what this layer has written so far; :meth:`commit` makes them count.
        From a CUDA tensor: one non-blocking device-to-host copy per tensor on the mirror's stream,
        ordered after the caller's current stream. Grows the storage (doubling) when needed.
        """
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
            raise TypeError("HostMirror.append expects tensors k and v of shape [n, H_kv, D]")
        if k.dim() != 3 or tuple(k.shape[1:]) != (self.num_kv_heads, self.head_dim) or k.shape != v.shape:
            raise ValueError(
                f"HostMirror.append expects k, v of shape [n, {self.num_kv_heads}, {self.head_dim}], "
                f"got {tuple(k.shape)} / {tuple(v.shape)}"
            )
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise TypeError(
                f"HostMirror stores {self.dtype}; got k {k.dtype} / v {v.dtype} (the mirror is lossless: "
                "build it with the model's KV dtype)"
            )
        if k.device != v.device:
            raise ValueError(f"k and v must be on the same device, got {k.device} / {v.device}")
        n = k.shape[0]
        if n == 0:
            return
        start = self._layer_tokens[layer]
        end = start + n
        if end > self.capacity_tokens:
            try:
                self.reserve(max(end, 2 * self.capacity_tokens))
            except ValueError:
                self.reserve(end)  # doubling does not fit: grow exactly (raises if that does not fit)
        dst_k = self.keys[layer][start:end]
        dst_v = self.values[layer][start:end]
        if k.device.type == "cuda":
            stream = self._d2h_stream(k.device)
            stream.wait_stream(torch.cuda.current_stream(k.device))
            with torch.cuda.stream(stream):
                dst_k.copy_(k, non_blocking=True)
                dst_v.copy_(v, non_blocking=True)
            k.record_stream(stream)
            v.record_stream(stream)
            if self._write_event is None:
                self._write_event = torch.cuda.Event()
            self._write_event.record(stream)
            self._write_event_rows = max(self._write_event_rows, end)
        else:
            dst_k.copy_(k)
            dst_v.copy_(v)
            if self._write_event is None:
                self._flushed_rows = max(self._flushed_rows, end)
        self._layer_tokens[layer] = end
        self.d2h_bytes += 2 * k.numel() * self.element_size
        self.d2h_copies += 2

    def commit(self, n: int) -> None:
        """Count ``n`` new tokens once every layer has appended exactly ``n`` rows past the last commit."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"commit expects a token count >= 0, got {n!r}")
        target = self._num_tokens + n
        wrong = [l for l, t in enumerate(self._layer_tokens) if t != target]
        if wrong:
            got = {l: self._layer_tokens[l] - self._num_tokens for l in wrong[:8]}
            raise RuntimeError(
                f"commit({n}) but layers {wrong[:8]} appended a different number of rows ({got}); "
                "append every layer's K/V for the same tokens before committing"
            )
        self._num_tokens = target

    def rollback(self) -> None:
        """Forget rows appended since the last commit (e.g. after an error mid-forward)."""
        self._layer_tokens = [self._num_tokens] * self.num_layers

    def wait_rows(self, end_row: int) -> None:
        """Block the host until rows ``[0, end_row)`` written by :meth:`append` have landed.

        A no-op for CPU writes and for rows already known to be flushed.
        """
        if end_row <= self._flushed_rows or self._write_event is None:
            return
        self._write_event.synchronize()
        self._flushed_rows = max(self._flushed_rows, self._write_event_rows)

    def flush(self) -> None:
        """Wait for every pending device-to-host write."""
        self.wait_rows(max(self._layer_tokens) if self._layer_tokens else 0)

    # ---- reads -------------------------------------------------------------------------------
    def _check_chunk_ids(self, chunk_ids) -> list[int]:
        ids = [int(c) for c in chunk_ids]
        bad = [c for c in ids if not 0 <= c < self.num_chunks]
        if bad:
            raise ValueError(
                f"chunk ids {bad[:8]} out of range [0, {self.num_chunks}) for {self._num_tokens} tokens"
            )
        return ids

    def chunk_row_index(self, chunk_ids) -> torch.Tensor:
        """Storage row of every slot of the given chunks, ``[len(chunk_ids) * chunk_size]`` int64 (CPU)."""
        ids = torch.as_tensor(self._check_chunk_ids(chunk_ids), dtype=torch.int64)
        offsets = torch.arange(self.chunk_size, dtype=torch.int64)
        return (ids[:, None] * self.chunk_size + offsets[None, :]).reshape(-1)

    def chunk_positions(self, chunk_ids) -> torch.Tensor:
        """True token position of every slot of the chunks, ``[n * chunk_size]`` int32; -1 past the
        committed tokens (the tail of a partial last chunk)."""
        rows = self.chunk_row_index(chunk_ids)
        return torch.where(rows < self._num_tokens, rows, -1).to(torch.int32)

    def chunk_rows(self, layer: int, chunk_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V ``[n * chunk_size, H_kv, D]`` (copies) and positions ``[n * chunk_size]`` of chunks of one layer.

        Rows past the committed tokens (positions -1) hold unspecified values.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        rows = self.chunk_row_index(chunk_ids)
        self.wait_rows(int(rows.max()) + 1 if rows.numel() else 0)
        k = self.keys[layer].index_select(0, rows)
        v = self.values[layer].index_select(0, rows)
        return k, v, torch.where(rows < self._num_tokens, rows, -1).to(torch.int32)

    def stats(self) -> dict:
        """Host-side counters: tokens, bytes held/reserved, device-to-host traffic."""
        return {
            "host_tokens": self._num_tokens,
            "host_chunks": self.num_chunks,
            "host_kv_bytes": self.host_kv_bytes,
            "host_capacity_bytes": self.capacity_bytes,
            "host_pinned": self.pin_memory,
            "d2h_bytes": self.d2h_bytes,
            "d2h_copies": self.d2h_copies,
            "host_reallocations": self.reallocations,
        }
