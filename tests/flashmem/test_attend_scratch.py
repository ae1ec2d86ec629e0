"""Multi-token attention without ``[H_q, T, S]`` masks or per-head K/V copies, within a stated scratch
bound: the sparse prefill's path through ``FlashMemCache.attend`` (per-KV-head masks, query tiles) and
the exact layer-major prefill that ``budget_tokens=None`` always uses (one layer's prompt KV)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias
from torch.profiler import ProfilerActivity, profile, record_function

import flashmem
from flashmem.cache import FlashMemCache
from flashmem.calibration import calibrate
from flashmem.prefill import LayerMajorPrefill
from flashmem.testing import tiny_model

H_Q, H_KV, D = 6, 2, 16


@pytest.fixture(scope="module")
def model_stats(tmp_path_factory):
    model = tiny_model("llama", layers=2, q_heads=H_Q, kv_heads=H_KV, head_dim=D, vocab=128)
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("stats") / "tiny6.safetensors"
    calibrate(model, ids, max_tokens=600, tokens_per_forward=300, progress=False).save(path)
    return model, str(path)


class SdpaRecorder:
    """Wraps ``F.scaled_dot_product_attention``: records the q/k/v shapes and mask sizes it receives."""

    def __init__(self, monkeypatch):
        self.calls = []
        self._inside = False
        self._sdpa = F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention", self)

    def __call__(self, q, k, v, attn_mask=None, **kw):
        if self._inside:  # SDPA's own dispatch of a CausalBias calls it again: record the outer call
            return self._sdpa(q, k, v, attn_mask=attn_mask, **kw)
        self._inside = True
        try:
            return self._record(q, k, v, attn_mask, **kw)
        finally:
            self._inside = False

    def _record(self, q, k, v, attn_mask, **kw):
        if isinstance(attn_mask, CausalBias):
            mask = ("causal", attn_mask.seq_len_q * attn_mask.seq_len_kv)  # materialised [t, S] at most
        elif attn_mask is None:
            mask = (None, 0)
        else:
            mask = ("tensor", attn_mask.numel())
        self.calls.append(dict(q=tuple(q.shape), k=tuple(k.shape), v=tuple(v.shape), mask=mask, kw=kw))
        if isinstance(attn_mask, CausalBias):
            # what SDPA does for a CausalBias (its dispatch only recognises the unpatched function)
            return CausalBias._dispatch(q, k, v, attn_mask=attn_mask, **kw)
        return self._sdpa(q, k, v, attn_mask=attn_mask, **kw)


def largest_allocation_inside(fn, owner, monkeypatch) -> int:
    """The largest single CPU allocation (bytes) of any op under ``owner.attend`` for multi-token
    queries while ``fn`` runs (the model's own layers, the pool and the mirror are not counted)."""
    original = owner.attend

    def attend(self, layer_idx, query, scaling):
        if query.shape[2] == 1:
            return original(self, layer_idx, query, scaling)
        with record_function("multi_token_attend"):
            return original(self, layer_idx, query, scaling)

    with monkeypatch.context() as m:
        m.setattr(owner, "attend", attend)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()

    def inside(e):
        while e is not None:
            if e.name == "multi_token_attend":
                return True
            e = e.cpu_parent
        return False

    sizes = [e.self_cpu_memory_usage for e in prof.events() if inside(e)]
    assert sizes, "no multi-token attention ran"
    return max(sizes)


def _reference_multi_token(self, layer_idx, query, scaling):
    """The former multi-token path: ``[1, H_q, T, S]`` masks and K/V repeated per query head."""
    pool = self.paged.pool
    group = query.shape[1] // pool.num_kv_heads
    if self._fresh:
        k, v = self._new[layer_idx]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scaling)
        return out.transpose(1, 2)
    k, v, pos = self.paged.gather(self.seq_id, layer_idx, slot_index=self._read_index)
    qpos = self._positions.to(pos.device)
    allowed = (pos.T[:, None, :] <= qpos[None, :, None]) & (pos.T[:, None, :] >= 0)
    allowed = allowed.repeat_interleave(group, dim=0).unsqueeze(0)
    k = k.permute(1, 0, 2).repeat_interleave(group, dim=0).unsqueeze(0)
    v = v.permute(1, 0, 2).repeat_interleave(group, dim=0).unsqueeze(0)
    return F.scaled_dot_product_attention(query, k, v, attn_mask=allowed, scale=scaling).transpose(1, 2)


def _sparse(stats, **kw):
    base = dict(
        stats_path=stats,
        budget_tokens=96,
        compaction_interval=32,
        recent_tokens=32,
        sink_tokens=4,
        chunk_size=16,
        chunk_budget=3,
        indexer="quest",
        prefill="sparse",
        prefill_chunk_tokens=128,
    )
    base.update(kw)
    return flashmem.FlashMemConfig(**base)


def test_sparse_prefill_groups_queries_per_kv_head_within_the_scratch_bound(model_stats, monkeypatch):
    model, stats = model_stats
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(0))
    ref_fm = flashmem.wrap(model, _sparse(stats))
    with monkeypatch.context() as m:
        m.setattr(FlashMemCache, "attend", _patched_attend(FlashMemCache.attend))
        ref = ref_fm.generate(ids, 8, eos_token_id=None, collect_logits=True)
        ref_prefill = largest_allocation_inside(
            lambda: flashmem.wrap(model, _sparse(stats)).generate(ids, 1, eos_token_id=None),
            FlashMemCache,
            m,
        )

    bound = 4096  # attend_scratch_elements for this test: forces several query tiles per chunk
    monkeypatch.setattr(FlashMemCache, "attend_scratch_elements", bound)
    rec = SdpaRecorder(monkeypatch)
    fm = flashmem.wrap(model, _sparse(stats))
    out = fm.generate(ids, 8, eos_token_id=None, collect_logits=True)
    # exact: the same tokens and logits as the former dense-mask path
    assert torch.equal(out, ref)
    torch.testing.assert_close(fm.step_logits, ref_fm.step_logits, rtol=1e-5, atol=1e-5)
    assert fm.memory_report()["compactions"] > 0 and fm.recall.refreshes > 0
    tensor_masks = [c for c in rec.calls if c["mask"][0] == "tensor"]
    assert tensor_masks, "the gathered-slot path ran"
    chunk = 128
    for c in rec.calls:
        # K/V enter once per KV head (no repeat_interleave), the queries grouped per KV head or by GQA
        assert c["k"][1] == c["v"][1] == H_KV
        slots = c["k"][2]
        if c["mask"][0] == "tensor":
            assert c["q"][1] == H_KV and c["q"][2] % (H_Q // H_KV) == 0  # [1, H_kv, G*t, D]
            # the stated bound: H_q x t x S <= max(attend_scratch_elements, H_q x S), never H_q x T x S
            assert c["mask"][1] <= max(bound, H_Q * slots) < H_Q * chunk * slots
        else:
            assert c["kw"].get("enable_gqa") and c["q"][1] == H_Q
            assert c["mask"][1] <= max(bound, H_Q * slots)
    # measured: no allocation as large as one [H_q, T, S] bool mask of a prefill chunk
    s_max = max(c["k"][2] for c in tensor_masks)
    peak = largest_allocation_inside(
        lambda: flashmem.wrap(model, _sparse(stats)).generate(ids, 1, eos_token_id=None),
        FlashMemCache,
        monkeypatch,
    )
    print(f"largest allocation in the multi-token path: {peak} B (former path: {ref_prefill} B)")
    assert peak < H_Q * chunk * s_max <= ref_prefill


def _patched_attend(original):
    def attend(self, layer_idx, query, scaling):
        if query.shape[2] == 1:
            return original(self, layer_idx, query, scaling)
        if self.recall is not None:
            self.recall.on_query(layer_idx, query[0, :, -1, :])
        return _reference_multi_token(self, layer_idx, query, scaling)

    return attend


def test_exact_prefill_without_budget_stays_within_one_layers_prompt_kv(model_stats, monkeypatch):
    """``budget_tokens=None``: the layer-major prefill attends with SDPA over one layer's prompt KV,
    GQA without copies and a lower-right causal bias (never a mask tensor). Stated bound: the largest
    allocation of its attention is the causal bias torch's CPU path materialises for a tile, at most
    8 bytes x tile x T: no factor of H_q (one ``[H_q, T, T]`` bool tensor would be ``H_q x T x T`` bytes)."""
    model, _ = model_stats
    T, tile = 1500, 512
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(1))
    config = flashmem.FlashMemConfig(prefill_chunk_tokens=tile)
    dense = flashmem.wrap(model, flashmem.FlashMemConfig()).generate(ids, 4, eos_token_id=None)
    rec = SdpaRecorder(monkeypatch)
    fm = flashmem.wrap(model, config)
    assert torch.equal(fm.generate(ids, 4, eos_token_id=None), dense)
    # a decode step's call holds one token's query heads grouped per KV head: [1, H_kv, G, D]
    prefill_calls = [c for c in rec.calls if c["q"][2] > H_Q // H_KV]
    assert len(prefill_calls) == 2 * 3 and len(rec.calls) > 0  # 2 layers x 3 tiles
    for c in prefill_calls:
        assert c["k"][1] == c["v"][1] == H_KV and c["q"][1] == H_Q and c["kw"].get("enable_gqa")
        assert c["k"][2] <= T  # one layer's prompt KV
        assert c["mask"][0] in (None, "causal") and c["mask"][1] <= tile * T
    peak = largest_allocation_inside(
        lambda: flashmem.wrap(model, config).generate(ids, 1, eos_token_id=None),
        LayerMajorPrefill,
        monkeypatch,
    )
    print(f"largest allocation in the exact prefill's attention: {peak} B")
    assert peak <= 8 * tile * T < H_Q * T * T
