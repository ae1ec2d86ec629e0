"""HostMirror on CUDA, simulated on the CPU: a reader of a layer's rows waits for that layer's writes.

The simulation stands in for ``torch.cuda`` (streams, events, the stream context) and for the K/V
coming from a GPU (a tensor subclass that reports a CUDA device). A copy issued on a side stream
is queued, not run; the scheduler is adversarial: a stream's queued copies run only when
something waits for them (``event.synchronize()`` by the host, ``stream.wait_event`` by another
stream), so a reader that is not ordered after a copy sees the poisoned rows the copy has not
overwritten yet. Work on the current (compute) stream runs at once.

The scenario is the exact prefill's: forwards over chunks of T tokens, layer-major; each layer
appends its K/V, then reads its history (rows of earlier chunks). The old bookkeeping (one event,
rows flushed = the maximum over layers) lets layer 1 skip waiting for its previous-chunk rows
once layer 0 has waited for its own.
"""

import contextlib
import gc

import pytest
import torch

from flashmem.offload import host_mirror as hm
from flashmem.offload.block_pool import BlockPool
from flashmem.offload.host_mirror import HostMirror
from flashmem.offload.transfer import TransferEngine

L, H, D, T = 3, 2, 4, 4
POISON = -7.0


class _Sim:
    def __init__(self) -> None:
        self.compute = _Stream(self, "compute")
        self.current = self.compute
        self.tag = None  # label of the copies issued next (set by the test)
        self.ran: list = []  # labels of the copies that have run, in order
        self.host_syncs: list = []  # events the host blocked on
        self.stream_waits: list = []  # (stream, event) waits issued
        self.side_streams: list = []
        self.events_created = 0
        self.d2h_copied = 0  # bytes of the copies queued on side streams
        self.h2d_copied = 0  # bytes of the host-to-device copies issued


class _Stream:
    def __init__(self, sim: _Sim, name: str) -> None:
        self.sim, self.name = sim, name
        self.ops: list = []
        self.done = 0

    def run_until(self, mark: int) -> None:
        while self.done < mark:
            tag, op = self.ops[self.done]
            op()
            self.sim.ran.append(tag)
            self.done += 1

    def wait_stream(self, other) -> None:
        other.run_until(len(other.ops))

    def wait_event(self, event) -> None:
        self.sim.stream_waits.append((self, event))
        if event.stream is not None:
            event.stream.run_until(event.mark)  # work queued later on self sees what event covers

    def synchronize(self) -> None:
        self.run_until(len(self.ops))


class _Event:
    sim: _Sim

    def __init__(self, enable_timing: bool = False, **kwargs) -> None:
        self.sim.events_created += 1
        self.stream = None
        self.mark = 0

    def record(self, stream=None) -> None:
        self.stream = stream if stream is not None else self.sim.current
        self.mark = len(self.stream.ops)

    def synchronize(self) -> None:
        self.sim.host_syncs.append(self)
        if self.stream is not None:
            self.stream.run_until(self.mark)

    def query(self) -> bool:
        return self.stream is None or self.stream.done >= self.mark


class _OnGpu(torch.Tensor):
    """CPU data that reports a CUDA device; a copy out of it on a side stream is queued there."""

    sim: _Sim

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)

    def record_stream(self, stream) -> None:
        return None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sim = cls.sim
        if func is torch.Tensor.copy_ and sim.current is not sim.compute:
            dst, src = args[0], args[1]
            with torch._C.DisableTorchFunctionSubclass():
                snapshot = src.clone()
            sim.current.ops.append((sim.tag, lambda: dst.copy_(snapshot)))
            sim.d2h_copied += snapshot.numel() * snapshot.element_size()
            return dst
        return super().__torch_function__(func, types, args, kwargs)


@pytest.fixture
def sim(monkeypatch):
    sim = _Sim()
    _Event.sim = sim
    _OnGpu.sim = sim

    @contextlib.contextmanager
    def stream_ctx(stream):
        previous, sim.current = sim.current, stream
        try:
            yield
        finally:
            sim.current = previous

    def side_stream(device=None, **kwargs):
        sim.side_streams.append(_Stream(sim, f"side{device}"))
        return sim.side_streams[-1]

    monkeypatch.setattr(torch.cuda, "Stream", side_stream)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: sim.current)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "stream", stream_ctx)

    # the device reader's host-to-device copy runs on the compute stream: at once
    def copy_to_device(src, device):
        sim.h2d_copied += src.numel() * src.element_size()
        return src.clone()

    monkeypatch.setattr(hm, "_copy_to_device", copy_to_device, raising=False)
    return sim


def _chunks(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            [torch.randn(T, H, D, generator=g).as_subclass(_OnGpu) for _ in range(L)],
            [torch.randn(T, H, D, generator=g).as_subclass(_OnGpu) for _ in range(L)],
        )
        for _ in range(n)
    ]


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(torch.Tensor)


def _mirror() -> HostMirror:
    mirror = HostMirror(L, H, D, chunk_size=T, dtype=torch.float32, capacity_tokens=4 * T, pin_memory=False)
    for l in range(L):
        mirror.keys[l].fill_(POISON)
        mirror.values[l].fill_(POISON)
    return mirror


def _append(sim: _Sim, mirror: HostMirror, chunk, step: int, layer: int) -> None:
    sim.tag = (step, layer)
    mirror.append(layer, chunk[0][layer], chunk[1][layer])


def test_host_read_of_a_layer_waits_for_that_layers_writes(sim):
    """``chunk_rows`` (the host reads with the CPU) after layer 0 alone was waited for."""
    mirror = _mirror()
    a, b = _chunks(2)
    for l in range(L):
        _append(sim, mirror, a, 0, l)
    mirror.commit(T)
    _append(sim, mirror, b, 1, 0)
    k, v, _ = mirror.chunk_rows(0, [0])  # layer 0 reads its history: rows 0..T-1
    assert torch.equal(k, _plain(a[0][0])) and torch.equal(v, _plain(a[1][0]))
    for l in range(1, L):
        _append(sim, mirror, b, 1, l)
    mirror.commit(T)
    for l in range(L):  # every layer's rows of chunk b, each written by its own in-flight copy
        k, v, pos = mirror.chunk_rows(l, [1])
        assert pos.tolist() == list(range(T, 2 * T))
        assert torch.equal(k, _plain(b[0][l])), f"layer {l} read rows its copy had not written"
        assert torch.equal(v, _plain(b[1][l]))


def test_recall_gather_waits_for_every_layer_it_reads(sim):
    """The transfer engine gathers every layer on the host: all their writes must have landed."""
    mirror = _mirror()
    a, b = _chunks(2, seed=1)
    for l in range(L):
        _append(sim, mirror, a, 0, l)
    mirror.commit(T)
    _append(sim, mirror, b, 1, 0)
    mirror.chunk_rows(0, [0])  # a layer-0 history read between the two layers' writes
    for l in range(1, L):
        _append(sim, mirror, b, 1, l)
    mirror.commit(T)
    pool = BlockPool(L, 4, H, D, block_size=T, dtype=torch.float32)
    engine = TransferEngine(mirror, pool)
    blocks = [pool.allocate(1)]
    engine.load([1], blocks)
    engine.wait([1])
    for l in range(L):
        assert torch.equal(pool.keys[l][blocks[0][0]], _plain(b[0][l])), f"layer {l} gathered stale rows"
        assert torch.equal(pool.values[l][blocks[0][0]], _plain(b[1][l]))


def test_row_gather_waits_for_its_layer_only(sim):
    """``rows_to_device`` (the host gathers rows, then copies them): the host waits for the event of
    the layer's latest append covering the rows read, neither a later append of the layer nor other
    layers' appends."""
    mirror = _mirror()
    steps = 4
    chunks = _chunks(steps, seed=2)
    for step, chunk in enumerate(chunks):
        start = step * T
        for l in range(L):
            _append(sim, mirror, chunk, step, l)
            if not start:
                continue
            k, v = mirror.rows_to_device(l, torch.arange(start), "cuda")
            want_k = torch.cat([_plain(c[0][l]) for c in chunks[:step]])
            want_v = torch.cat([_plain(c[1][l]) for c in chunks[:step]])
            assert torch.equal(k, want_k), f"step {step} layer {l}: history read before its copy landed"
            assert torch.equal(v, want_v)
            assert (step - 1, l) in sim.ran
            assert (step, l) not in sim.ran, "waited for the append of the chunk being prefilled"
            if l + 1 < L:
                assert (step - 1, l + 1) not in sim.ran, "waited for another layer's writes"
        mirror.commit(T)
    assert sim.host_syncs, "the host gathers the rows: it must wait for their copies"
    # traffic: what was queued device-to-host and copied host-to-device, counted where issued
    history_rows = sum(step * T for step in range(steps)) * L
    assert sim.h2d_copied == 2 * history_rows * H * D * 4
    assert mirror.traffic() == {"d2h_bytes": sim.d2h_copied, "h2d_bytes": sim.h2d_copied}


def test_host_wait_after_rollback_covers_the_rewritten_rows(sim):
    """Rows rewritten after a rollback: a reader waits for the rewrite, the latest append."""
    mirror = _mirror()
    a, b, c = _chunks(3, seed=3)
    for l in range(L):
        _append(sim, mirror, a, 0, l)
    mirror.commit(T)
    for l in range(L):
        _append(sim, mirror, b, 1, l)
    mirror.rollback()  # chunk b's rows are forgotten (their copies still queued)
    for l in range(L):
        _append(sim, mirror, c, 1, l)
    mirror.commit(T)
    for l in range(L):
        k, v, _ = mirror.chunk_rows(l, [1])
        assert torch.equal(k, _plain(c[0][l])) and torch.equal(v, _plain(c[1][l]))
    mirror.flush()
    assert all(s.done == len(s.ops) for s in {e.stream for e in sim.host_syncs})


def test_page_locked_storage_is_released_after_its_copies(sim, monkeypatch):
    """The mirror's page-locked storage is unregistered only once the copies into it have run."""
    released = []

    def unregister(ptr):
        released.append(all(st.done == len(st.ops) for st in sim.side_streams))

    monkeypatch.setattr(hm, "_cuda_host_register", lambda ptr, nbytes: None)
    monkeypatch.setattr(hm, "_cuda_host_unregister", unregister)
    mirror = HostMirror(L, H, D, chunk_size=T, dtype=torch.float32, capacity_tokens=T, pin_memory=True)
    (a,) = _chunks(1, seed=4)
    for l in range(L):
        _append(sim, mirror, a, 0, l)
    mirror.commit(T)
    assert sim.side_streams and sim.side_streams[0].done == 0  # the copies are still queued
    del mirror
    gc.collect()
    assert released == [True]


def test_decode_appends_reuse_landed_events(sim):
    """One-token appends whose copies land between steps: landed events are pruned (queried) and
    reused, so events do not pile up, and a read after many steps still waits for the last ones."""
    mirror = HostMirror(L, H, D, chunk_size=T, dtype=torch.float32, capacity_tokens=64, pin_memory=False)
    g = torch.Generator().manual_seed(5)
    written = [[] for _ in range(L)]
    for step in range(40):
        for l in range(L):
            k = torch.randn(1, H, D, generator=g)
            written[l].append(k)
            sim.tag = (step, l)
            mirror.append(l, k.as_subclass(_OnGpu), (-k).as_subclass(_OnGpu))
        mirror.commit(1)
        if step < 38:
            sim.side_streams[0].synchronize()  # the GPU catches up; the last two steps stay queued
    assert sim.events_created <= 2 * 8 * L
    for l in range(L):
        k, v, _ = mirror.chunk_rows(l, range(10))
        assert torch.equal(k, torch.cat(written[l])) and torch.equal(v, -torch.cat(written[l]))
