"""HostMirror: lossless chunked storage, exact byte accounting, capacity refused up front."""

import gc

import pytest
import torch

from flashmem.offload import host_mirror as hm
from flashmem.offload.host_mirror import HostMirror

L, H, D = 3, 2, 5


def _fill(mirror: HostMirror, n: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(n, H, D, generator=g).to(dtype) for _ in range(L)]
    vs = [torch.randn(n, H, D, generator=g).to(dtype) for _ in range(L)]
    for l in range(L):
        mirror.append(l, ks[l], vs[l])
    mirror.commit(n)
    return ks, vs


def test_lossless_rows_and_bytes_equal_dense_kv():
    mirror = HostMirror(L, H, D, chunk_size=8, dtype=torch.bfloat16)
    ks, vs = [], []
    for i, n in enumerate([13, 1, 1, 7, 20]):
        k, v = _fill(mirror, n, seed=i, dtype=torch.bfloat16)
        ks.append(k)
        vs.append(v)
    total = 42
    assert mirror.num_tokens == total
    assert mirror.num_chunks == 6  # ceil(42 / 8)
    # full dense KV bytes of the tokens seen: 2 (K,V) * L * H * D * 2 bytes (bf16) per token
    assert mirror.host_kv_bytes == total * 2 * L * H * D * 2
    assert mirror.capacity_bytes >= mirror.host_kv_bytes
    assert mirror.capacity_tokens % 8 == 0
    for l in range(L):
        dense_k = torch.cat([k[l] for k in ks])
        dense_v = torch.cat([v[l] for v in vs])
        assert torch.equal(mirror.keys[l][:total], dense_k)
        assert torch.equal(mirror.values[l][:total], dense_v)
        k, v, pos = mirror.chunk_rows(l, [5, 1])
        # chunk 5 holds tokens 40, 41 then the empty tail; chunk 1 holds 8..15
        assert pos.tolist() == [40, 41] + [-1] * 6 + list(range(8, 16))
        assert torch.equal(k[:2], dense_k[40:42]) and torch.equal(v[8:], dense_v[8:16])
    assert mirror.d2h_bytes == mirror.host_kv_bytes
    assert mirror.d2h_copies == 2 * L * 5  # one copy per tensor per call, never per token


def test_commit_requires_every_layer():
    mirror = HostMirror(L, H, D, chunk_size=4, dtype=torch.float32)
    mirror.append(0, torch.zeros(3, H, D), torch.zeros(3, H, D))
    with pytest.raises(RuntimeError, match="layers"):
        mirror.commit(3)
    assert mirror.num_tokens == 0
    mirror.rollback()
    _fill(mirror, 3, 0)
    assert mirror.num_tokens == 3


def test_bad_input_is_refused_before_any_write():
    mirror = HostMirror(L, H, D, chunk_size=4, dtype=torch.float32, capacity_tokens=8)
    storage = mirror.storage
    with pytest.raises(TypeError, match="lossless"):
        mirror.append(0, torch.zeros(2, H, D, dtype=torch.float16), torch.zeros(2, H, D, dtype=torch.float16))
    with pytest.raises(ValueError, match="shape"):
        mirror.append(0, torch.zeros(2, H + 1, D), torch.zeros(2, H + 1, D))
    with pytest.raises(ValueError, match="layer"):
        mirror.append(L, torch.zeros(2, H, D), torch.zeros(2, H, D))
    with pytest.raises(ValueError, match="out of range"):
        mirror.chunk_rows(0, [0])  # no committed tokens yet
    assert mirror.storage is storage and mirror.num_tokens == 0 and mirror.d2h_bytes == 0


def test_growth_keeps_rows():
    mirror = HostMirror(L, H, D, chunk_size=4, dtype=torch.float32, capacity_tokens=4)
    k1, v1 = _fill(mirror, 3, 1)
    k2, v2 = _fill(mirror, 9, 2)  # forces a reallocation
    assert mirror.capacity_tokens >= 12 and mirror.reallocations >= 1
    for l in range(L):
        assert torch.equal(mirror.keys[l][:12], torch.cat([k1[l], k2[l]]))
        assert torch.equal(mirror.values[l][:12], torch.cat([v1[l], v2[l]]))


def test_huge_reserve_refused_up_front_state_unchanged():
    mirror = HostMirror(L, H, D, chunk_size=4, dtype=torch.float32, capacity_tokens=8)
    _fill(mirror, 5, 0)
    storage, cap, n = mirror.storage, mirror.capacity_tokens, mirror.num_tokens
    snapshot = storage.clone()
    physical, _ = hm.host_memory_bytes()
    too_many = physical // mirror.kv_bytes_per_token + 1000
    with pytest.raises(ValueError, match="GiB"):
        mirror.reserve(too_many)
    assert mirror.storage is storage and mirror.capacity_tokens == cap and mirror.num_tokens == n
    # bitwise: rows past the written ones are uninitialised and may hold NaN patterns
    assert torch.equal(mirror.storage.view(torch.int32), snapshot.view(torch.int32))


def test_reserve_over_available_memory_refused(monkeypatch):
    mirror = HostMirror(L, H, D, chunk_size=4, dtype=torch.float32)
    monkeypatch.setattr(hm, "host_memory_bytes", lambda: (1 << 40, 1000 * mirror.kv_bytes_per_token))
    with pytest.raises(ValueError, match="available"):
        mirror.reserve(2000)
    assert mirror.capacity_tokens == 0
    mirror.reserve(800)
    assert mirror.capacity_tokens == 800


def test_user_cap_refused_at_construction_and_on_append():
    per_token = 2 * L * H * D * 4
    with pytest.raises(ValueError, match="max_host_bytes"):
        HostMirror(
            L, H, D, chunk_size=4, dtype=torch.float32, capacity_tokens=100, max_host_bytes=per_token * 50
        )
    # pageable, so the cap is the K/V bytes exactly (page-locked storage rounds up to a page)
    mirror = HostMirror(
        L, H, D, chunk_size=4, dtype=torch.float32, max_host_bytes=per_token * 8, pin_memory=False
    )
    _fill(mirror, 8, 0)
    storage = mirror.storage
    with pytest.raises(ValueError, match="max_host_bytes"):
        mirror.append(0, torch.zeros(1, H, D), torch.zeros(1, H, D))
    assert mirror.storage is storage and mirror.num_tokens == 8


def test_rounding_and_chunk_counts():
    mirror = HostMirror(1, 1, 2, chunk_size=64, dtype=torch.float16, capacity_tokens=65)
    assert mirror.capacity_tokens == 128
    assert mirror.capacity_bytes == 128 * 2 * 1 * 1 * 2 * 2
    assert mirror.num_chunks == 0 and mirror.host_kv_bytes == 0
    mirror.append(0, torch.ones(64, 1, 2, dtype=torch.float16), torch.ones(64, 1, 2, dtype=torch.float16))
    mirror.commit(64)
    assert mirror.num_chunks == 1 and mirror.chunk_num_tokens(0) == 64 and mirror.chunk_num_tokens(1) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory, async device-to-host)")
def test_cuda_append_is_pinned_and_exact():
    mirror = HostMirror(L, H, D, chunk_size=8, dtype=torch.bfloat16, capacity_tokens=64)
    assert mirror.storage.is_pinned()
    k = torch.randn(L, 20, H, D, device="cuda").to(torch.bfloat16)
    v = torch.randn(L, 20, H, D, device="cuda").to(torch.bfloat16)
    for l in range(L):
        mirror.append(l, k[l], v[l])
    mirror.commit(20)
    for l in range(L):
        kr, vr, _ = mirror.chunk_rows(l, [0, 1, 2])
        assert torch.equal(kr[:20], k[l].cpu()) and torch.equal(vr[:20], v[l].cpu())


def test_reserved_bytes_rule():
    """Page-locked storage reserves whole pages, nothing more (no power-of-two rounding)."""
    page = 4096
    rule = hm.host_reserved_bytes
    assert rule(0, pinned=True, page=page) == 0
    assert rule(1, pinned=True, page=page) == page
    assert rule(page, pinned=True, page=page) == page
    assert rule(page + 1, pinned=True, page=page) == 2 * page
    gib = 1 << 30
    assert rule(61 * gib + 1, pinned=True, page=page) == 61 * gib + page  # not 64 GiB
    assert rule(61 * gib + 1, pinned=False, page=page) == 61 * gib + 1
    assert rule(1000, pinned=True) == hm.page_size()
    with pytest.raises(ValueError, match="nbytes"):
        rule(-1, pinned=True)


class _FakeRegister:
    """Stands in for cudaHostRegister / cudaHostUnregister: records the page-locked ranges."""

    def __init__(self, monkeypatch) -> None:
        self.live: dict[int, int] = {}
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []
        self.fail = False
        monkeypatch.setattr(hm, "_cuda_host_register", self.register)
        monkeypatch.setattr(hm, "_cuda_host_unregister", self.unregister)

    def register(self, ptr: int, nbytes: int) -> None:
        if self.fail:
            raise RuntimeError("cudaHostRegister failed (simulated)")
        assert ptr not in self.live
        self.live[ptr] = nbytes
        self.registered.append((ptr, nbytes))

    def unregister(self, ptr: int) -> None:
        assert ptr in self.live, "unregistering a range that is not registered"
        del self.live[ptr]
        self.unregistered.append(ptr)


def test_pinned_storage_locks_exactly_the_checked_bytes(monkeypatch):
    reg = _FakeRegister(monkeypatch)
    page = hm.page_size()
    mirror = HostMirror(L, H, D, chunk_size=4, dtype=torch.float32, capacity_tokens=8, pin_memory=True)
    # 8 tokens x 240 bytes = 1920 bytes of K/V; one page is locked and counted
    assert mirror.capacity_bytes == 8 * 2 * L * H * D * 4
    assert mirror.reserved_bytes == hm.host_reserved_bytes(mirror.capacity_bytes, pinned=True) == page
    assert mirror.stats()["host_reserved_bytes"] == page
    ((ptr, nbytes),) = reg.registered
    assert nbytes == mirror.reserved_bytes and ptr % page == 0
    assert mirror.storage.data_ptr() == ptr and mirror.keys[0].data_ptr() == ptr
    assert mirror.storage.shape == (L, 2, 8, H, D) and mirror.storage.dtype == torch.float32
    k1, v1 = _fill(mirror, 6, 1)
    k2, v2 = _fill(mirror, 40, 2)  # grows: a new range is locked, the old one released after the copy
    assert mirror.capacity_tokens >= 46 and len(reg.registered) == 2
    assert reg.unregistered == [ptr] and list(reg.live.values()) == [mirror.reserved_bytes]
    assert mirror.reserved_bytes == hm.host_reserved_bytes(mirror.capacity_tokens * 240, pinned=True)
    for l in range(L):
        assert torch.equal(mirror.keys[l][:46], torch.cat([k1[l], k2[l]]))
        assert torch.equal(mirror.values[l][:46], torch.cat([v1[l], v2[l]]))
    last = mirror.storage.data_ptr()
    del mirror, k1, v1, k2, v2
    gc.collect()
    assert reg.unregistered == [ptr, last] and reg.live == {}


def test_capacity_check_counts_the_page_rounding(monkeypatch):
    reg = _FakeRegister(monkeypatch)
    page = hm.page_size()
    kv = 8 * 2 * L * H * D * 4  # 1920 bytes for 8 tokens, page-locked as one page
    mirror = HostMirror(L, H, D, chunk_size=4, dtype=torch.float32, pin_memory=True, max_host_bytes=page - 1)
    assert kv < page - 1
    with pytest.raises(ValueError, match="max_host_bytes"):
        mirror.reserve(8)
    assert reg.registered == [] and mirror.capacity_tokens == 0
    monkeypatch.setattr(hm, "host_memory_bytes", lambda: (1 << 40, page - 1))
    mirror = HostMirror(L, H, D, chunk_size=4, dtype=torch.float32, pin_memory=True)
    with pytest.raises(ValueError, match="available"):
        mirror.check_capacity(8)
    monkeypatch.setattr(hm, "host_memory_bytes", lambda: (1 << 40, page))
    assert mirror.check_capacity(8) == 8
    mirror.reserve(8)
    assert reg.registered[-1][1] == page == mirror.reserved_bytes


def test_failed_page_lock_leaves_the_mirror_unchanged(monkeypatch):
    reg = _FakeRegister(monkeypatch)
    mirror = HostMirror(L, H, D, chunk_size=4, dtype=torch.float32, capacity_tokens=4, pin_memory=True)
    k, v = _fill(mirror, 3, 0)
    storage, cap, live = mirror.storage, mirror.capacity_tokens, dict(reg.live)
    reg.fail = True
    with pytest.raises(RuntimeError, match="cudaHostRegister"):
        mirror.reserve(64)
    assert mirror.storage is storage and mirror.capacity_tokens == cap
    assert reg.live == live and reg.unregistered == []
    assert torch.equal(mirror.keys[2][:3], k[2]) and mirror.reserved_bytes == hm.page_size()


def test_pinned_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match="pin_memory=False"):
        HostMirror(L, H, D, chunk_size=4, dtype=torch.float32, capacity_tokens=4, pin_memory=True)


def test_traffic_counts_the_bytes_copied():
    mirror = HostMirror(L, H, D, chunk_size=4, dtype=torch.float32, pin_memory=False)
    appended = 0
    ks, vs = [], []
    for i, n in enumerate([7, 1, 4]):
        k, v = _fill(mirror, n, seed=i)
        ks.append(k)
        vs.append(v)
        appended += sum(t.numel() * t.element_size() for t in k + v)
    dense_k = [torch.cat([k[l] for k in ks]) for l in range(L)]
    dense_v = [torch.cat([v[l] for v in vs]) for l in range(L)]
    assert mirror.traffic() == {"d2h_bytes": appended, "h2d_bytes": 0}
    served = 0
    for layer, start, end in [(0, 0, 8), (2, 4, 12), (1, 3, 3), (1, 0, 12)]:
        k, v = mirror.rows_to_device(layer, torch.arange(start, end), "cpu")
        assert torch.equal(k, dense_k[layer][start:end]) and torch.equal(v, dense_v[layer][start:end])
        served += k.numel() * k.element_size() + v.numel() * v.element_size()
    per_head = torch.tensor([[0, 5], [11, 2], [7, 7]])  # [n, H_kv]: each head its own rows
    k, v = mirror.rows_to_device(1, per_head, "cpu")
    for h in range(H):
        assert torch.equal(k[:, h], dense_k[1][per_head[:, h], h])
        assert torch.equal(v[:, h], dense_v[1][per_head[:, h], h])
    served += k.numel() * k.element_size() + v.numel() * v.element_size()
    assert mirror.traffic() == {"d2h_bytes": appended, "h2d_bytes": served}
    stats = mirror.stats()
    assert stats["d2h_bytes"] == appended and stats["mirror_h2d_bytes"] == served
    assert stats["mirror_h2d_copies"] == 2 * 5
    with pytest.raises(ValueError, match="must lie in"):
        mirror.rows_to_device(0, torch.tensor([12]), "cpu")
    assert mirror.traffic()["h2d_bytes"] == served
