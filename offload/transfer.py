"""Data plane of recall: copy host-mirror chunks into planned device blocks, asynchronously.

One :meth:`TransferEngine.load` call is one *batch*:

1. gather, on the host, the rows of the requested chunks of every layer from the mirror into ONE
   contiguous (pinned, when CUDA is present) staging buffer of bytes (the host reads the mirror
   with the CPU, so it first blocks on the mirror's pending device-to-host writes of the rows it
   reads, every layer's own events: :meth:`HostMirror.wait_rows` with no stream), laid out as::

       slots      [n * C]                         int64  flat pool slot of each chunk row
       kv         [L, 2, n * C, H_kv, D]          mirror dtype (index 0 = K, 1 = V)
       positions  [n * C, H_kv]                   int32  true position, -1 for empty / duplicate

   (``n`` chunks of ``C = chunk_size`` tokens, ``L`` layers);
2. issue ONE ``non_blocking`` host-to-device copy of that buffer on a side stream;
3. on the side stream, after the compute stream's work queued so far (the target blocks may have
   just been freed by an eviction and still be read by it), scatter into the pool:
   ``keys[l]``, ``values[l]`` ``[num_blocks, block_size, H_kv, D]`` and ``positions[l]``
   ``[num_blocks, block_size, H_kv]``;
4. record a CUDA event for the batch.

:meth:`TransferEngine.wait` makes the *current* stream wait on the events of the batches holding the
chunks it is given (``wait_event``, never a device-wide sync). A wait on a batch whose event has not
fired yet is a *stall*; its duration is measured with timing events and resolved lazily in
:meth:`TransferEngine.stats`.

The CPU backend (pool on the CPU) runs the same steps synchronously; its events are no-ops and its
"H2D" figures measure a host memcpy, not a bus.

Traffic is counted where each copy is issued, in bytes: ``h2d_bytes`` the staging buffers of
:meth:`TransferEngine.load` (one copy per batch), ``meta_h2d_bytes`` the slot indices and positions
:meth:`TransferEngine.write_positions` sends, ``meta_d2h_bytes`` positions given on the device that
``load`` brings to the host staging buffer. The CPU backend counts the same copies (there they are
memcpys or no-ops), so both backends report the figures a device run moves. :meth:`traffic` sums
them; the mirror's own copies are counted by the mirror.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .block_pool import BlockPool, id_runs
from .host_mirror import HostMirror


@dataclass
class _Batch:
    batch_id: int
    chunk_ids: list[int]
    nbytes: int
    done: torch.cuda.Event | None = None
    copy_start: torch.cuda.Event | None = None
    copy_end: torch.cuda.Event | None = None
    staging_index: int = -1


@dataclass
class _Staging:
    buffer: torch.Tensor
    released: torch.cuda.Event | None = None  # fires when the copy out of this buffer has finished


@dataclass
class _Timings:
    pending: list[tuple[torch.cuda.Event, torch.cuda.Event, int]] = field(default_factory=list)
    total_s: float = 0.0
    total_bytes: int = 0


class TransferEngine:
    """Moves chunks from a :class:`HostMirror` into blocks of a :class:`BlockPool`.

    Args:
        mirror: the host mirror (its dtype, layers, heads and head_dim must match the pool).
        pool: the device block pool; its device selects the backend (``cuda`` or ``cpu``).
        num_staging: staging buffers used round-robin (a buffer is reused only after the copy out
            of it has finished).
    """

    def __init__(self, mirror: HostMirror, pool: BlockPool, *, num_staging: int = 2) -> None:
        if mirror.dtype != pool.dtype:
            raise TypeError(
                f"host mirror dtype {mirror.dtype} differs from the pool dtype {pool.dtype}; recall must be "
                "lossless, build both with the model's KV dtype"
            )
        if (mirror.num_layers, mirror.num_kv_heads, mirror.head_dim) != (
            pool.num_layers,
            pool.num_kv_heads,
            pool.head_dim,
        ):
            raise ValueError(
                "host mirror and pool disagree on (layers, H_kv, D): "
                f"{(mirror.num_layers, mirror.num_kv_heads, mirror.head_dim)} vs "
                f"{(pool.num_layers, pool.num_kv_heads, pool.head_dim)}"
            )
        if mirror.chunk_size % pool.block_size:
            raise ValueError(
                f"chunk_size ({mirror.chunk_size}) must be a multiple of block_size ({pool.block_size})"
            )
        if num_staging < 1:
            raise ValueError(f"num_staging must be >= 1, got {num_staging}")
        self.mirror = mirror
        self.pool = pool
        self.device = pool.device
        self.is_cuda = self.device.type == "cuda"
        self.backend = "cuda" if self.is_cuda else "cpu"
        self.blocks_per_chunk = mirror.chunk_size // pool.block_size
        self._pin = self.is_cuda
        self._stream = torch.cuda.Stream(device=self.device) if self.is_cuda else None
        self._staging: list[_Staging | None] = [None] * num_staging
        self._next_staging = 0
        self._chunk_batch: dict[int, _Batch] = {}
        self._next_batch = 0
        self._copy_timings = _Timings()
        # the device side of a batch (its packed rows before the scatter into pool blocks) lives only
        # while the batch is copied: the largest one, overall and since the caller's last mark
        self.device_staging_peak_bytes = 0
        self.device_staging_bytes_since_mark = 0
        self._stall_timings = _Timings()
        self.h2d_bytes = 0  # staging buffers of the recall loads
        self.h2d_copies = 0
        self.h2d_batches = 0
        self.meta_h2d_bytes = 0  # slot indices / positions sent by write_positions
        self.meta_d2h_bytes = 0  # device-side positions brought to the host staging buffer
        self.chunks_loaded = 0
        self.position_writes = 0
        self.waits = 0
        self.stalls = 0

    # ---- helpers -----------------------------------------------------------------------------
    def _layout(self, n_rows: int) -> tuple[int, int, int, int]:
        """Byte offsets (slots, kv, positions, end) of a staging buffer for ``n_rows`` chunk rows."""
        m = self.mirror
        slots_bytes = n_rows * 8
        kv_bytes = m.num_layers * 2 * n_rows * m.num_kv_heads * m.head_dim * m.element_size
        pos_bytes = n_rows * m.num_kv_heads * 4
        kv_start = slots_bytes
        pos_start = kv_start + kv_bytes
        pos_start += (-pos_start) % 8
        return 0, kv_start, pos_start, pos_start + pos_bytes

    def _views(self, buf: torch.Tensor, n_rows: int):
        m = self.mirror
        _, kv_start, pos_start, end = self._layout(n_rows)
        slots = buf[:kv_start].view(torch.int64)
        kv = buf[kv_start : kv_start + (pos_start - kv_start)]
        kv = kv[: m.num_layers * 2 * n_rows * m.num_kv_heads * m.head_dim * m.element_size]
        kv = kv.view(m.dtype).view(m.num_layers, 2, n_rows, m.num_kv_heads, m.head_dim)
        pos = buf[pos_start:end].view(torch.int32).view(n_rows, m.num_kv_heads)
        return slots, kv, pos

    def _take_staging(self, nbytes: int) -> tuple[int, torch.Tensor]:
        index = self._next_staging
        self._next_staging = (index + 1) % len(self._staging)
        entry = self._staging[index]
        if entry is not None and entry.released is not None:
            entry.released.synchronize()  # host waits only if that buffer's copy is unfinished
        if entry is None or entry.buffer.numel() < nbytes:
            size = max(nbytes, 2 * entry.buffer.numel() if entry is not None else 0)
            entry = _Staging(torch.empty(size, dtype=torch.uint8, pin_memory=self._pin))
            self._staging[index] = entry
        return index, entry.buffer[:nbytes]

    def _check_blocks(self, chunk_ids: list[int], blocks: list[list[int]]) -> None:
        if len(blocks) != len(chunk_ids):
            raise ValueError(f"need one block list per chunk: {len(chunk_ids)} chunks, {len(blocks)} lists")
        flat = []
        for c, b in zip(chunk_ids, blocks):
            if len(b) != self.blocks_per_chunk:
                raise ValueError(f"chunk {c} needs {self.blocks_per_chunk} blocks, got {len(b)}")
            flat.extend(b)
        bad = [b for b in flat if not self.pool.is_allocated(b)]
        if bad or len(set(flat)) != len(flat):
            raise ValueError(
                f"target blocks must be distinct allocated pool blocks, bad: {bad[:8] or flat[:8]}"
            )

    def slot_index(self, blocks: list[list[int]]) -> torch.Tensor:
        """Flat pool slot of every chunk row, ``[n * chunk_size]`` int64 (CPU), rows in chunk order."""
        return self.slot_index_on(blocks, "cpu")

    def slot_index_on(self, blocks: list[list[int]], device: torch.device | str) -> torch.Tensor:
        """:meth:`slot_index` made on ``device`` from ranges of consecutive blocks (no tensor from
        Python data: on a GPU no host-to-device copy)."""
        bs = self.pool.block_size
        parts = [
            torch.arange(a * bs, b * bs, dtype=torch.int64, device=device)
            for a, b in id_runs([b for bl in blocks for b in bl])
        ]
        if not parts:
            return torch.empty(0, dtype=torch.int64, device=device)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # ---- load --------------------------------------------------------------------------------
    def load(
        self,
        chunk_ids: list[int],
        blocks: list[list[int]],
        *,
        positions: torch.Tensor | None = None,
    ) -> int:
        """Copy chunks (all layers) into their blocks; returns the batch id.

        Args:
            chunk_ids: chunks of the mirror (committed, ``< mirror.num_chunks``).
            blocks: per chunk, ``chunk_size // block_size`` allocated pool block ids in slot order.
            positions: optional ``[n * chunk_size, H_kv]`` int positions to store (e.g. from
                :func:`~flashmem.offload.resident_set.dedupe_positions`); default: the true
                positions (``-1`` past the committed tokens), the same for every head.
        """
        chunk_ids = [int(c) for c in chunk_ids]
        if not chunk_ids:
            raise ValueError("load needs at least one chunk")
        m, pool = self.mirror, self.pool
        rows = m.chunk_row_index(chunk_ids)  # validates ids
        self._check_blocks(chunk_ids, blocks)
        n_rows = rows.numel()
        if positions is not None and tuple(positions.shape) != (n_rows, m.num_kv_heads):
            raise ValueError(f"positions must be [{n_rows}, {m.num_kv_heads}], got {tuple(positions.shape)}")
        busy = [c for c in chunk_ids if c in self._chunk_batch]
        if busy:
            raise ValueError(f"chunks {busy[:8]} already have a copy in flight")

        # 1. gather into one staging buffer: the host reads the pinned rows of every layer with the
        # CPU, so it blocks on those layers' pending device-to-host writes (event.synchronize)
        m.wait_rows(range(m.num_layers), (max(chunk_ids) + 1) * m.chunk_size)  # any order
        nbytes = self._layout(n_rows)[3]
        staging_index, buf = self._take_staging(nbytes)
        s_slots, s_kv, s_pos = self._views(buf, n_rows)
        s_slots.copy_(self.slot_index(blocks))
        for l in range(m.num_layers):
            torch.index_select(m.keys[l], 0, rows, out=s_kv[l, 0])
            torch.index_select(m.values[l], 0, rows, out=s_kv[l, 1])
        device_positions = None
        if positions is None:
            true_pos = torch.where(rows < m.num_tokens, rows, -1).to(torch.int32)
            s_pos.copy_(true_pos[:, None].expand(n_rows, m.num_kv_heads))
        elif positions.device.type != "cpu":
            # computed on the device (duplicate masks): scattered from there, never read back
            device_positions = positions.to(torch.int32)
        else:
            if positions.device.type != "cpu":
                self.meta_d2h_bytes += positions.numel() * positions.element_size()
            s_pos.copy_(positions.to(device="cpu", dtype=torch.int32))

        batch = _Batch(self._next_batch, chunk_ids, nbytes, staging_index=staging_index)
        self._next_batch += 1
        flat = pool.num_blocks * pool.block_size
        H, D = m.num_kv_heads, m.head_dim

        def scatter(dev_buf: torch.Tensor) -> None:
            d_slots, d_kv, d_pos = self._views(dev_buf, n_rows)
            if device_positions is not None:
                d_pos = device_positions
            for l in range(m.num_layers):
                pool.keys[l].view(flat, H, D).index_copy_(0, d_slots, d_kv[l, 0])
                pool.values[l].view(flat, H, D).index_copy_(0, d_slots, d_kv[l, 1])
                pool.positions[l].view(flat, H).index_copy_(0, d_slots, d_pos)

        if self.is_cuda:
            compute = torch.cuda.current_stream(self.device)
            compute_mark = compute.record_event()
            stream = self._stream
            batch.copy_start = torch.cuda.Event(enable_timing=True)
            batch.copy_end = torch.cuda.Event(enable_timing=True)
            batch.done = torch.cuda.Event()
            self.device_staging_peak_bytes = max(self.device_staging_peak_bytes, nbytes)
            self.device_staging_bytes_since_mark = max(self.device_staging_bytes_since_mark, nbytes)
            if device_positions is not None:
                device_positions.record_stream(stream)
            with torch.cuda.stream(stream):
                dev_buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                batch.copy_start.record(stream)
                dev_buf.copy_(buf, non_blocking=True)
                batch.copy_end.record(stream)
                stream.wait_event(compute_mark)  # target blocks may still be read by earlier compute
                scatter(dev_buf)
                batch.done.record(stream)
            entry = self._staging[staging_index]
            entry.released = batch.copy_end
            self._copy_timings.pending.append((batch.copy_start, batch.copy_end, nbytes))
        else:
            t0 = time.perf_counter()
            self.device_staging_peak_bytes = max(self.device_staging_peak_bytes, nbytes)
            self.device_staging_bytes_since_mark = max(self.device_staging_bytes_since_mark, nbytes)
            dev_buf = buf.clone()  # the "device" copy of the CPU backend: one synchronous memcpy
            self._copy_timings.total_s += time.perf_counter() - t0
            self._copy_timings.total_bytes += nbytes
            scatter(dev_buf)
        for c in chunk_ids:
            self._chunk_batch[c] = batch
        self.h2d_bytes += nbytes
        self.h2d_copies += 1
        self.h2d_batches += 1
        self.chunks_loaded += len(chunk_ids)
        return batch.batch_id

    def write_positions(self, blocks: list[list[int]], positions: torch.Tensor) -> None:
        """Overwrite the positions of resident (already waited-for) chunk slots, on the current stream.

        blocks: per chunk, its block ids; positions: ``[n * chunk_size, H_kv]`` int. Used to refresh
        the duplicate mask after the working tokens changed (e.g. after a compaction).
        """
        pool = self.pool
        slots = self.slot_index_on(blocks, self.device)
        if tuple(positions.shape) != (slots.numel(), pool.num_kv_heads):
            raise ValueError(
                f"positions must be [{slots.numel()}, {pool.num_kv_heads}], got {tuple(positions.shape)}"
            )
        self.meta_h2d_bytes += slots.numel() * slots.element_size()
        if positions.device.type == "cpu":
            self.meta_h2d_bytes += positions.numel() * positions.element_size()
        pos = positions.to(device=self.device, dtype=torch.int32, non_blocking=True)
        flat = pool.num_blocks * pool.block_size
        for l in range(pool.num_layers):
            pool.positions[l].view(flat, pool.num_kv_heads).index_copy_(0, slots, pos)
        self.position_writes += 1

    # ---- synchronisation ---------------------------------------------------------------------
    def in_flight(self) -> list[int]:
        """Chunks whose copy has not been waited for yet."""
        return sorted(self._chunk_batch)

    def is_ready(self, chunk_ids: list[int]) -> bool:
        """True when the copies of these chunks have finished (queries events; never blocks)."""
        for c in chunk_ids:
            batch = self._chunk_batch.get(c)
            if batch is not None and batch.done is not None and not batch.done.query():
                return False
        return True

    def wait(self, chunk_ids: list[int]) -> None:
        """Order the current stream after the copies of these chunks (only their batches' events).

        Chunks without a pending copy are ignored. A batch whose event has not fired yet counts as
        a stall; its duration on the waiting stream is measured with timing events.
        """
        batches: dict[int, _Batch] = {}
        for c in chunk_ids:
            batch = self._chunk_batch.get(c)
            if batch is not None:
                batches[batch.batch_id] = batch
        if not batches:
            return
        if self.is_cuda:
            compute = torch.cuda.current_stream(self.device)
            for batch in batches.values():
                self.waits += 1
                if batch.done.query():
                    continue
                self.stalls += 1
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(compute)
                compute.wait_event(batch.done)
                end.record(compute)
                self._stall_timings.pending.append((start, end, 0))
        else:
            self.waits += len(batches)
        waited = set(batches)
        for c in [c for c, b in self._chunk_batch.items() if b.batch_id in waited]:
            del self._chunk_batch[c]

    def synchronize(self) -> None:
        """Block the host until every issued copy has finished (end of sequence, tests)."""
        if self.is_cuda:
            self._stream.synchronize()

    # ---- stats -------------------------------------------------------------------------------
    def traffic(self) -> dict:
        """Cumulative bytes of the copies the engine issued: ``h2d_bytes`` (recall loads + metadata),
        ``d2h_bytes`` (metadata), and the parts ``recall_h2d_bytes``, ``meta_h2d_bytes``,
        ``meta_d2h_bytes``. The mirror's appends are in :meth:`HostMirror.traffic`."""
        return {
            "h2d_bytes": self.h2d_bytes + self.meta_h2d_bytes,
            "d2h_bytes": self.meta_d2h_bytes,
            "recall_h2d_bytes": self.h2d_bytes,
            "meta_h2d_bytes": self.meta_h2d_bytes,
            "meta_d2h_bytes": self.meta_d2h_bytes,
        }

    @staticmethod
    def _resolve(timings: _Timings, sync: bool) -> None:
        keep = []
        for start, end, nbytes in timings.pending:
            if sync:
                end.synchronize()
            if end.query():
                timings.total_s += start.elapsed_time(end) / 1e3
                timings.total_bytes += nbytes
            else:
                keep.append((start, end, nbytes))
        timings.pending = keep

    def stats(self, *, sync: bool = False) -> dict:
        """Transfer counters. Timed figures include only events that have fired (``sync=True``
        waits for them). Keys: ``backend``, ``h2d_bytes`` (recall loads), ``h2d_copies``,
        ``h2d_batches``, ``h2d_time_s``, ``h2d_gbps``, ``meta_h2d_bytes``, ``meta_d2h_bytes``,
        ``d2h_bytes`` and ``d2h_copies`` (the mirror's appends), ``chunks_loaded``, ``waits``,
        ``stalls``, ``stall_time_s``, ``pending_timings``."""
        self._resolve(self._copy_timings, sync)
        self._resolve(self._stall_timings, sync)
        ct = self._copy_timings
        return {
            "backend": self.backend,
            "h2d_bytes": self.h2d_bytes,
            "h2d_copies": self.h2d_copies,
            "h2d_batches": self.h2d_batches,
            "h2d_time_s": ct.total_s,
            "h2d_gbps": (ct.total_bytes / ct.total_s / 1e9) if ct.total_s > 0 else 0.0,
            "meta_h2d_bytes": self.meta_h2d_bytes,
            "meta_d2h_bytes": self.meta_d2h_bytes,
            "d2h_bytes": self.mirror.d2h_bytes,
            "d2h_copies": self.mirror.d2h_copies,
            "chunks_loaded": self.chunks_loaded,
            "waits": self.waits,
            "stalls": self.stalls,
            "stall_time_s": self._stall_timings.total_s,
            "pending_timings": len(ct.pending) + len(self._stall_timings.pending),
        }
