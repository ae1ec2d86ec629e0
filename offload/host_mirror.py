"""Lossless host copy of every token's K and V, in token order, grouped into fixed-size chunks.

The device cache keeps only a bounded subset of the KV (sinks, recalled chunks, compacted working
tokens, the recent window); the host mirror keeps all of it so any token can be recalled later.

Storage (one allocation, page-locked when CUDA is available)::

    storage:     [num_layers, 2, capacity_tokens, H_kv, D]   (index 0 = K, 1 = V)
    keys[l]:     [capacity_tokens, H_kv, D]                  view of storage[l, 0]
    values[l]:   [capacity_tokens, H_kv, D]                  view of storage[l, 1]

Chunk ``c`` is rows ``[c * chunk_size, (c + 1) * chunk_size)``; ``capacity_tokens`` is always a
multiple of ``chunk_size`` so the rows of the last (possibly partial) chunk exist.

Writing, once per forward pass: ``append(layer, k, v)`` for every layer (``k, v: [n, H_kv, D]``),
then ``commit(n)``. On CUDA each append is one batched device-to-host copy per tensor, issued on
the mirror's own stream after it waits on the caller's (compute) stream, followed by a CUDA event
recorded for that append; nothing blocks the host.

Ordering readers after those copies is per layer: each layer keeps the events of its appends whose
copies are not known to have landed (``_pending[layer]``), and a read of rows ``[0, end)`` of layer
``l`` waits on the event of the latest append of layer ``l`` that wrote a row below ``end`` (on one
stream that event also covers every earlier append of the layer). Nothing is tracked as a maximum
over layers: a reader of layer ``l`` (the exact prefill's working-set fill, recall's gather) may
run while the copies of other layers' rows are still in flight. Two kinds of reader (see :meth:`wait_rows`):

* a device stream (a host-to-device copy out of the pinned storage queued on that stream):
  ``stream.wait_event(event)``, the host does not block;
* the host itself, reading the pinned storage with the CPU (the transfer engine's gather,
  :meth:`chunk_rows`, :meth:`rows_to_device`, growth): ``event.synchronize()``.

All counters are host-side. Traffic is counted where each copy is issued: ``d2h_bytes`` (appends,
every row written once per append) and ``h2d_bytes`` (rows served to the device by
:meth:`rows_to_device`); :meth:`traffic` returns both, cumulative, so a caller can take the
difference across a prefill or a decode. The transfer engine counts the recall copies it issues.

Capacity is checked before any allocation: a :meth:`reserve` (or a constructor ``capacity_tokens``)
that would exceed ``max_host_bytes`` or the host's memory raises ``ValueError`` and leaves the
mirror unchanged. The figure checked is the one reserved, :func:`host_reserved_bytes`.

Pinned allocation. ``torch.empty(..., pin_memory=True)`` goes through PyTorch's caching host
allocator, which rounds every request up to the next power of two (a 61 GiB mirror reserves
64 GiB; 33 GiB reserves 64 GiB) and keeps a freed block cached rather than giving it back (after a
growth the old storage stays pinned). One allocation per layer through it would still round each
one (61 GiB over 36 layers: 36 x 2 GiB = 72 GiB). So the mirror allocates its storage as pageable
memory (``torch.empty``, pages untouched until written) and page-locks exactly that range with
``cudaHostRegister``: the driver locks whole pages, so what is reserved is the byte count rounded
up to the page size, the figure :meth:`HostMirror.check_capacity` checks. The range is
unregistered (after the copies that may still touch it: pending writes and reads) when the mirror
grows or is garbage-collected, and the memory returns to the OS with the last tensor viewing it.
The transfer engine's small staging buffers keep ``torch.empty(..., pin_memory=True)``.
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from dataclasses import dataclass

import torch

from .block_pool import id_runs

_GIB = float(1 << 30)
_MAX_PENDING = 8  # pending write events per layer before the landed ones are pruned (event queries)


@dataclass
class _Write:
    """One append of one layer still possibly in flight: rows ``[start, end)``, copied on the mirror
    stream of device ``device``, followed by ``event``."""

    start: int
    end: int
    device: int
    event: torch.cuda.Event


def _copy_to_device(src: torch.Tensor, device: torch.device) -> torch.Tensor:
    """One ``non_blocking`` host-to-device copy on the current stream of ``device`` (a seam the CPU
    tests replace to simulate CUDA ordering)."""
    return src.to(device, non_blocking=True)


_CUDA_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context


def page_size() -> int:
    """Bytes of one host memory page (the granularity of page-locking)."""
    return os.sysconf("SC_PAGE_SIZE")


def host_reserved_bytes(nbytes: int, *, pinned: bool, page: int | None = None) -> int:
    """Host bytes reserved to store ``nbytes`` of mirror K/V: the figure the capacity check uses.

    Pinned storage is pageable memory page-locked with ``cudaHostRegister`` (see the module
    docstring), which locks whole pages: ``nbytes`` rounded up to ``page`` (default: this host's
    page size); no power-of-two rounding. Pageable storage: ``nbytes`` (the CPU allocator does not
    round).
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
    if not pinned or nbytes == 0:
        return nbytes
    page = page_size() if page is None else page
    return -(-nbytes // page) * page


def _cuda_host_register(ptr: int, nbytes: int) -> None:
    """Page-lock ``[ptr, ptr + nbytes)`` (``cudaHostRegister``); raises before locking anything when
    CUDA is missing. Tests replace it (and :func:`_cuda_host_unregister`) to run on the CPU."""
    if not torch.cuda.is_available():
        raise ValueError(
            "HostMirror(pin_memory=True) page-locks host memory with CUDA, which is not available; "
            "build the mirror with pin_memory=False"
        )
    cudart = torch.cuda.cudart()
    try:
        torch.cuda.check_error(cudart.cudaHostRegister(ptr, nbytes, _CUDA_HOST_REGISTER_PORTABLE))
    except RuntimeError as exc:
        raise RuntimeError(
            f"cudaHostRegister of {nbytes} bytes ({nbytes / _GIB:.2f} GiB) for the host mirror failed: "
            f"{exc}; shorten the context or free host memory"
        ) from exc


def _cuda_host_unregister(ptr: int) -> None:
    """Undo :func:`_cuda_host_register` (``cudaHostUnregister``)."""
    torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(ptr))


def _wait_pending_copies(pending: list[list[_Write]], read_events: dict) -> None:
    """Block the host until every write into, and every recorded read out of, the storage is done."""
    for writes in pending:
        for w in writes:
            w.event.synchronize()
    for event in read_events.values():
        event.synchronize()


class _PageLockedBytes:
    """``nbytes`` (rounded up to whole pages) of pageable host memory, page-aligned and page-locked
    with ``cudaHostRegister``; :meth:`release` waits for the copies that may still touch it, then
    unregisters it. ``data``: ``[reserved]`` uint8."""

    def __init__(self, nbytes: int, wait_copies) -> None:
        page = page_size()
        self.reserved = host_reserved_bytes(nbytes, pinned=True, page=page)
        raw = torch.empty(
            self.reserved + page, dtype=torch.uint8
        )  # pageable; the slack page is never touched
        offset = (-raw.data_ptr()) % page
        self.data = raw[offset : offset + self.reserved]
        self.ptr = self.data.data_ptr()
        _cuda_host_register(self.ptr, self.reserved)
        self._wait_copies = wait_copies
        self.registered = True

    def release(self) -> None:
        if not self.registered:
            return
        self.registered = False
        self._wait_copies()
        _cuda_host_unregister(self.ptr)
        self.data = None  # the memory goes back with the last tensor viewing it


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
        pin_memory: page-lock the storage (default: when CUDA is available) with
            ``cudaHostRegister``, exactly the checked size (see the module docstring). Required for
            truly asynchronous host-to-device copies.
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
        # device-to-host bookkeeping (host-side only), per layer: the appends whose copies are not
        # known to have landed, in issue order; rows below the lowest pending start have landed
        self._d2h_streams: dict[int, torch.cuda.Stream] = {}
        self._pending: list[list[_Write]] = [[] for _ in range(num_layers)]
        # landed writes' events, per device (an event is recorded on streams of its own device only)
        self._free_events: dict[int, list[torch.cuda.Event]] = {}
        # per device: event recorded after the latest host-to-device read of the storage
        self._read_events: dict[int, torch.cuda.Event] = {}
        self._release_storage = None  # finalizer that unregisters the page-locked storage
        self.d2h_bytes = 0  # device-to-host bytes of the appends (K and V)
        self.d2h_copies = 0
        self.h2d_bytes = 0  # host-to-device bytes of the rows served by rows_to_device (K and V)
        self.h2d_copies = 0
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
    def reserved_bytes(self) -> int:
        """Host bytes the storage reserves now (:func:`host_reserved_bytes` of ``capacity_bytes``)."""
        return self.reserved_bytes_for(self.capacity_tokens)

    def reserved_bytes_for(self, capacity_tokens: int) -> int:
        """Host bytes a storage of ``capacity_tokens`` rows (a multiple of chunk_size) reserves."""
        return host_reserved_bytes(capacity_tokens * self.kv_bytes_per_token, pinned=self.pin_memory)

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

        Checks the bytes the storage would reserve (:meth:`reserved_bytes_for`, page rounding of
        page-locked memory included) against the user cap ``max_host_bytes``, the physical RAM and
        the RAM available now (a growth allocates the new storage before the old one is released).
        """
        if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 0:
            raise ValueError(f"HostMirror.reserve expects a token count >= 0, got {n_tokens!r}")
        target = math.ceil(n_tokens / self.chunk_size) * self.chunk_size
        if target <= self.capacity_tokens:
            return self.capacity_tokens
        need = self.reserved_bytes_for(target)
        what = (
            f"host mirror for {n_tokens} tokens reserves {need} bytes ({need / _GIB:.2f} GiB, "
            f"{self.kv_bytes_per_token} bytes/token{', page-locked' if self.pin_memory else ''})"
        )
        if self.max_host_bytes is not None and need > self.max_host_bytes:
            raise ValueError(
                f"{what}, over max_host_bytes={self.max_host_bytes} ({self.max_host_bytes / _GIB:.2f} GiB); "
                "shorten the context or raise max_host_bytes"
            )
        physical, available = host_memory_bytes()
        if need > physical:
            raise ValueError(
                f"{what}, more than this machine's {physical / _GIB:.2f} GiB of RAM; shorten the context"
            )
        if need > available:
            raise ValueError(
                f"{what} but only {available / _GIB:.2f} GiB of host RAM is available; shorten the "
                "context or free host memory"
            )
        return target

    def reserve(self, n_tokens: int) -> None:
        """Make room for ``n_tokens`` tokens (rounded up to a whole chunk).

        Checked up front: raises ``ValueError`` before allocating anything when the storage would
        not fit (see :meth:`check_capacity`); the mirror is then unchanged (also when page-locking
        fails). Growing keeps the rows already written (one copy of the used rows, after every
        pending write has landed) and then releases the old storage.
        """
        target = self.check_capacity(n_tokens)
        if target <= self.capacity_tokens:
            return
        shape = (self.num_layers, 2, target, self.num_kv_heads, self.head_dim)
        buffer = None
        if self.pin_memory:
            wait = functools.partial(_wait_pending_copies, self._pending, self._read_events)
            buffer = _PageLockedBytes(target * self.kv_bytes_per_token, wait)
            new = buffer.data[: target * self.kv_bytes_per_token].view(self.dtype).view(shape)
        else:
            new = torch.empty(shape, dtype=self.dtype)
        used = max(self._layer_tokens)
        try:
            if used:
                self.flush()  # the host copies the rows: every layer's writes must have landed
                new[:, :, :used].copy_(self.storage[:, :, :used])
        except BaseException:
            if buffer is not None:
                buffer.release()
            raise
        if self.capacity_tokens:
            self.reallocations += 1
        release_old = self._release_storage
        self.storage = new
        self._make_views()
        self._release_storage = None
        if buffer is not None:
            self._release_storage = weakref.finalize(self, buffer.release)
            self._release_storage.atexit = False  # at exit the process frees it all
        if release_old is not None:
            release_old()  # waits for the copies still touching the old storage, then unregisters

    # ---- writes ------------------------------------------------------------------------------
    @staticmethod
    def _device_index(device: torch.device) -> int:
        return device.index if device.index is not None else torch.cuda.current_device()

    def _d2h_stream(self, device: torch.device) -> torch.cuda.Stream:
        index = self._device_index(device)
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
        pending = self._pending[layer]
        if k.device.type == "cuda":
            device = self._device_index(k.device)
            stream = self._d2h_stream(k.device)
            stream.wait_stream(torch.cuda.current_stream(k.device))
            for w in pending:  # rows rewritten after a rollback, first written from another device
                if w.device != device and w.end > start:
                    stream.wait_event(w.event)
            with torch.cuda.stream(stream):
                dst_k.copy_(k, non_blocking=True)
                dst_v.copy_(v, non_blocking=True)
            k.record_stream(stream)
            v.record_stream(stream)
            if len(pending) >= _MAX_PENDING:
                self._prune_landed(layer)
            free = self._free_events.setdefault(device, [])
            event = free.pop() if free else torch.cuda.Event()
            event.record(stream)
            self._pending[layer].append(_Write(start, end, device, event))
        else:
            if pending:  # a copy still in flight must not land over this host write
                self._synchronize_pending([layer])
            dst_k.copy_(k)
            dst_v.copy_(v)
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
        """Forget rows appended since the last commit (e.g. after an error mid-forward).

        Copies still in flight for the forgotten rows stay pending: a later append of the same rows
        is issued after them on the same stream, so the latest append covering a row is still the
        one a reader waits for."""
        self._layer_tokens = [self._num_tokens] * self.num_layers

    def landed_rows(self, layer: int) -> int:
        """Rows ``[0, n)`` of ``layer`` that the host knows hold their written values (host-side
        counter; a CUDA append counts only once its event was waited for or queried)."""
        pending = self._pending[layer]
        return min([self._layer_tokens[layer]] + [w.start for w in pending])

    def _covering(self, layer: int, end_row: int) -> list[_Write]:
        """Per device stream, the latest pending append of ``layer`` that wrote a row below
        ``end_row``: its event follows (stream order) every earlier write of those rows."""
        latest: dict[int, _Write] = {}
        for w in self._pending[layer]:
            if w.start < end_row:
                latest[w.device] = w
        return list(latest.values())

    def _retire(self, layer: int, upto: _Write) -> None:
        """Drop ``upto`` and the earlier pending appends of its stream (they have landed)."""
        pending = self._pending[layer]
        index = next(i for i, w in enumerate(pending) if w is upto)
        keep = []
        for i, w in enumerate(pending):
            if w.device == upto.device and i <= index:
                self._free_events[w.device].append(w.event)
            else:
                keep.append(w)
        self._pending[layer] = keep

    def _prune_landed(self, layer: int) -> None:
        """Drop the pending appends of ``layer`` whose events have fired (queries; never blocks)."""
        keep = []
        for w in self._pending[layer]:
            if w.event.query():
                self._free_events[w.device].append(w.event)
            else:
                keep.append(w)
        self._pending[layer] = keep

    def _layer_list(self, layers) -> list[int]:
        layer_list = [layers] if isinstance(layers, int) else list(layers)
        for l in layer_list:
            if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < self.num_layers:
                raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {l!r}")
        return layer_list

    def wait_rows(
        self, layers, end_row: int | None = None, *, stream: torch.cuda.Stream | None = None
    ) -> None:
        """Order a reader of rows ``[0, end_row)`` of ``layers`` after the appends that wrote them.

        Args:
            layers: the layer (int) or layers (iterable of ints) the reader reads. Only these layers'
                write events are waited for.
            end_row: rows below it are read (default: every row the layers have appended).
            stream: the reader. ``None``: the host reads the storage with the CPU (gather, growth,
                :meth:`chunk_rows`): it blocks on each covering event (``event.synchronize()``) and
                the rows then count as landed. A CUDA stream: the reader is work queued on that
                stream (a host-to-device copy out of the pinned storage): ``stream.wait_event`` on
                each covering event; the host does not block.

        Per layer, the event waited for is the one of the latest append that wrote a row below
        ``end_row``. A no-op for CPU appends and rows already landed.
        """
        for l in self._layer_list(layers):
            end = self._layer_tokens[l] if end_row is None else min(int(end_row), self._layer_tokens[l])
            if end <= self.landed_rows(l):
                continue
            for w in self._covering(l, end):
                if stream is None:
                    w.event.synchronize()
                    self._retire(l, w)
                else:
                    stream.wait_event(w.event)

    def _synchronize_pending(self, layers) -> None:
        """Block the host on every pending write of ``layers`` (rolled-back rows included)."""
        for l in layers:
            for w in self._pending[l]:
                w.event.synchronize()
                self._free_events[w.device].append(w.event)
            self._pending[l] = []

    def flush(self) -> None:
        """Block the host until every pending device-to-host write (all layers) has landed."""
        self._synchronize_pending(range(self.num_layers))

    # ---- reads -------------------------------------------------------------------------------
    def _check_chunk_ids(self, chunk_ids) -> list[int]:
        ids = [int(c) for c in chunk_ids]
        bad = [c for c in ids if not 0 <= c < self.num_chunks]
        if bad:
            raise ValueError(
                f"chunk ids {bad[:8]} out of range [0, {self.num_chunks}) for {self._num_tokens} tokens"
            )
        return ids

    def chunk_row_index(self, chunk_ids, device: torch.device | str = "cpu") -> torch.Tensor:
        """Storage row of every slot of the given chunks, ``[len(chunk_ids) * chunk_size]`` int64 (on
        ``device``, default the host), made from ranges (no tensor from Python data)."""
        ids = self._check_chunk_ids(chunk_ids)
        c = self.chunk_size
        parts = [torch.arange(a * c, b * c, dtype=torch.int64, device=device) for a, b in id_runs(ids)]
        if not parts:
            return torch.empty(0, dtype=torch.int64, device=device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def chunk_positions(self, chunk_ids, device: torch.device | str = "cpu") -> torch.Tensor:
        """True token position of every slot of the chunks, ``[n * chunk_size]`` int32 (on ``device``);
        -1 past the committed tokens (the tail of a partial last chunk)."""
        rows = self.chunk_row_index(chunk_ids, device)
        return torch.where(rows < self._num_tokens, rows, -1).to(torch.int32)

    def chunk_rows(self, layer: int, chunk_ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K, V ``[n * chunk_size, H_kv, D]`` (copies) and positions ``[n * chunk_size]`` of chunks of one layer.

        Rows past the committed tokens (positions -1) hold unspecified values.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        rows = self.chunk_row_index(chunk_ids)
        self.wait_rows(layer, int(rows.max()) + 1 if rows.numel() else 0)  # host reader
        k = self.keys[layer].index_select(0, rows)
        v = self.values[layer].index_select(0, rows)
        return k, v, torch.where(rows < self._num_tokens, rows, -1).to(torch.int32)

    def rows_to_device(
        self, layer: int, rows: torch.Tensor, device: torch.device | str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of chosen rows of one layer on ``device``: ``rows`` ``[n]`` (the same rows for every KV
        head) or ``[n, H_kv]`` (each head its own rows, e.g. a TriAttention keep-set) int64 ->
        ``[n, H_kv, D]`` each.

        The exact prefill's fill of the working set. The host gathers the rows out of the storage,
        so it first waits (``event.synchronize()``) for this layer's writes covering them, and for
        no other layer's; then one ``non_blocking`` copy per tensor goes to ``device``. Counts
        ``h2d_bytes`` (K and V; on the CPU the bytes served, what a device would copy).
        """
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
        rows = torch.as_tensor(rows, dtype=torch.int64, device="cpu")
        if rows.dim() not in (1, 2) or (rows.dim() == 2 and rows.shape[1] != self.num_kv_heads):
            raise ValueError(f"rows must be [n] or [n, {self.num_kv_heads}], got {tuple(rows.shape)}")
        written = self._layer_tokens[layer]
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= written):
            raise ValueError(f"rows of layer {layer} must lie in [0, {written}) (the rows it holds)")
        self.wait_rows(layer, int(rows.max()) + 1 if rows.numel() else 0)
        if rows.dim() == 1:
            src_k = self.keys[layer].index_select(0, rows)
            src_v = self.values[layer].index_select(0, rows)
        else:
            heads = torch.arange(self.num_kv_heads)
            src_k = self.keys[layer][rows, heads]  # [n, H_kv, D]
            src_v = self.values[layer][rows, heads]
        device = torch.device(device)
        k, v = _copy_to_device(src_k, device), _copy_to_device(src_v, device)
        self.h2d_bytes += 2 * src_k.numel() * self.element_size
        self.h2d_copies += 2
        return k, v

    def traffic(self) -> dict:
        """Cumulative bytes of the copies the mirror issued: ``d2h_bytes`` (appends into the mirror)
        and ``h2d_bytes`` (rows served by :meth:`rows_to_device`, the exact prefill's working set)."""
        return {"d2h_bytes": self.d2h_bytes, "h2d_bytes": self.h2d_bytes}

    def stats(self) -> dict:
        """Host-side counters: tokens, K/V bytes held, capacity (K/V bytes of the allocated rows) and
        reserved host bytes (page rounding included), traffic: ``d2h_bytes`` / ``d2h_copies``
        (appends) and ``mirror_h2d_bytes`` / ``mirror_h2d_copies`` (rows served to the device by
        :meth:`rows_to_device`; named apart from the transfer engine's ``h2d_bytes``)."""
        return {
            "host_tokens": self._num_tokens,
            "host_chunks": self.num_chunks,
            "host_kv_bytes": self.host_kv_bytes,
            "host_capacity_bytes": self.capacity_bytes,
            "host_reserved_bytes": self.reserved_bytes,
            "host_pinned": self.pin_memory,
            "d2h_bytes": self.d2h_bytes,
            "d2h_copies": self.d2h_copies,
            "mirror_h2d_bytes": self.h2d_bytes,
            "mirror_h2d_copies": self.h2d_copies,
            "host_reallocations": self.reallocations,
        }
