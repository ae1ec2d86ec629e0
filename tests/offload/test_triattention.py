"""TriAttention statistics, calibration, keep-set selection and the compaction policy."""

from __future__ import annotations

import math

import pytest
import torch

from flashmem.calibration import calibrate
from flashmem.files import load_stats, load_stats_for_model
from flashmem.hf_compat import model_fingerprint, rotary_cos_sin, rotate
from flashmem.kernels.triattention_score import aggregate_scores, reference_triattention_score, zscore
from flashmem.offload import (
    DEFAULT_STATS_PATH,
    QueryStatsAccumulator,
    TriAttentionPolicy,
    TriAttentionStats,
    select_keep,
)
from flashmem.offload.block_pool import BlockPool
from flashmem.offload.paged_cache import PagedKVCache
from flashmem.testing import tiny_model


# ---- statistics --------------------------------------------------------------------------------
def test_accumulator_streams_complex_means():
    gen = torch.Generator().manual_seed(0)
    acc = QueryStatsAccumulator(2, 3, 8)
    chunks = [torch.randn(n, 3, 8, generator=gen) + 0.5 for n in (5, 1, 11)]
    for c in chunks:
        acc.update(0, c)
        acc.update(1, 2 * c)
    stats = acc.finalize(torch.arange(4, dtype=torch.float32), {"a": 1})
    q = torch.cat(chunks)  # [17, 3, 8]
    z = torch.complex(q[..., :4].double(), q[..., 4:].double())  # [17, 3, 4]
    assert stats.num_tokens == 17
    torch.testing.assert_close(stats.q_mean_real[0], z.mean(0).real.float())
    torch.testing.assert_close(stats.q_mean_imag[0], z.mean(0).imag.float())
    torch.testing.assert_close(stats.q_abs_mean[0], z.abs().mean(0).float())
    torch.testing.assert_close(stats.q_abs_mean[1], 2 * z.abs().mean(0).float())
    assert stats.q_mean_real.shape == (2, 3, 4) and stats.q_mean_real.dtype == torch.float32
    # E|q| >= |E q| (triangle inequality): the spread term is never negative
    assert bool((stats.q_abs_mean >= torch.hypot(stats.q_mean_real, stats.q_mean_imag) - 1e-6).all())
    with pytest.raises(ValueError, match=r"\[T, H_q, D\]"):
        acc.update(0, torch.randn(4, 3, 6))
    with pytest.raises(ValueError, match="even"):
        QueryStatsAccumulator(1, 1, 7)
    uneven = QueryStatsAccumulator(2, 3, 8)
    uneven.update(0, chunks[0])
    with pytest.raises(ValueError, match="same"):
        uneven.finalize(torch.zeros(4))


def _stats(layers=2, q_heads=4, head_dim=16, seed=0, fingerprint=None) -> TriAttentionStats:
    gen = torch.Generator().manual_seed(seed)
    half = head_dim // 2
    qr = torch.randn(layers, q_heads, half, generator=gen)
    qi = torch.randn(layers, q_heads, half, generator=gen)
    qa = torch.hypot(qr, qi) + torch.rand(layers, q_heads, half, generator=gen)
    omega = 1.0 / 10000 ** (torch.arange(half) / half)
    return TriAttentionStats(qr, qi, qa, omega.float(), 1234, fingerprint or {"x": 1})


def test_save_load_round_trip_and_fingerprint_check(tmp_path):
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16)
    fp = model_fingerprint(model)
    stats = _stats(fingerprint=fp)
    stats.source = "unit test"
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = load_stats(path, expected_fingerprint=fp)
    for name in ("q_mean_real", "q_mean_imag", "q_abs_mean", "omega"):
        assert torch.equal(getattr(loaded, name), getattr(stats, name))
    assert loaded.num_tokens == 1234 and loaded.fingerprint == fp and loaded.source == "unit test"
    assert load_stats_for_model(model, path).num_tokens == 1234

    other = dict(fp, num_layers=3, head_dim=32)
    other["rope"] = dict(fp["rope"], rope_theta=1.0)
    with pytest.raises(ValueError) as err:
        load_stats(path, expected_fingerprint=other)
    message = str(err.value)
    assert "num_layers" in message and "head_dim" in message and "rope.rope_theta" in message
    assert "architecture" not in message

    bogus = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bogus), metadata={"format": "something else"})
    with pytest.raises(ValueError, match="not a TriAttention stats file"):
        load_stats(bogus)


def test_shipped_stats_refuse_other_models():
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16)
    with pytest.raises((ValueError, FileNotFoundError), match="calibrat"):
        load_stats_for_model(model, None)


def _pre_rope_queries_by_hook(model, windows):
    """Reference: q_proj outputs (pre-RoPE queries) of every layer, [T, H_q, D] per layer."""
    layers = model.model.layers
    cfg = model.config
    out: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    hooks = [
        layer.self_attn.q_proj.register_forward_hook(
            lambda mod, inp, res, i=i: out[i].append(res[0].view(-1, cfg.num_attention_heads, cfg.head_dim))
        )
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for w in windows:
                model(input_ids=w[None])
    finally:
        for h in hooks:
            h.remove()
    return {i: torch.cat(v) for i, v in out.items()}


@pytest.mark.parametrize(
    "rope",
    [
        None,
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_calibrate_recovers_pre_rope_queries(rope):
    extra = {"rope_parameters": rope} if rope else {}
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16, **extra)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (50,), generator=gen)
    stats = calibrate(model, ids, max_tokens=45, tokens_per_forward=20, progress=False)
    assert stats.num_tokens == 45
    assert stats.fingerprint == model_fingerprint(model)
    assert torch.equal(stats.omega, model.model.rotary_emb.inv_freq.float())
    queries = _pre_rope_queries_by_hook(model, [ids[0:20], ids[20:40], ids[40:45]])
    for layer, q in queries.items():
        z = torch.complex(q[..., :8].double(), q[..., 8:].double())
        torch.testing.assert_close(stats.q_mean_real[layer], z.mean(0).real.float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(stats.q_mean_imag[layer], z.mean(0).imag.float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(stats.q_abs_mean[layer], z.abs().mean(0).float(), atol=1e-5, rtol=1e-4)


def test_calibrate_refuses_bad_input():
    model = tiny_model("llama", layers=1, q_heads=2, kv_heads=1, head_dim=8)
    with pytest.raises(TypeError):
        calibrate(model, torch.zeros(4), progress=False)
    with pytest.raises(ValueError):
        calibrate(model, torch.zeros(0, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="tokens_per_forward"):
        calibrate(model, torch.zeros(4, dtype=torch.long), tokens_per_forward=0, progress=False)


# ---- selection ---------------------------------------------------------------------------------
def test_select_keep_top_scores_plus_protected_sorted():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 3, generator=gen)
    protected = torch.zeros(40, dtype=torch.bool)
    protected[:4] = True
    protected[-5:] = True
    keep = select_keep(scores, 15, protected)
    assert keep.shape == (3, 15) and keep.dtype == torch.int64
    for h in range(3):
        row = keep[h].tolist()
        assert row == sorted(set(row))
        assert set(range(4)) | set(range(35, 40)) <= set(row)
        free = [i for i in range(4, 35)]
        best = sorted(free, key=lambda i: -float(scores[i, h]))[:6]
        assert set(row) - set(range(4)) - set(range(35, 40)) == set(best)
    per_head = torch.zeros(40, 3, dtype=torch.bool)
    per_head[7, 1] = True
    assert 7 in select_keep(torch.zeros(40, 3) - torch.arange(40)[:, None], 3, per_head)[1].tolist()
    with pytest.raises(ValueError, match="exceed the keep budget"):
        select_keep(scores, 8, protected)
    with pytest.raises(ValueError, match="cannot keep"):
        select_keep(scores, 41)


# ---- policy ------------------------------------------------------------------------------------
def _filled_cache(model, num_tokens, seed=0, block_size=16, num_blocks=None):
    """A paged cache holding the model's post-RoPE keys of random tokens (positions 0..N-1)."""
    cfg = model.config
    num_blocks = num_blocks or math.ceil(num_tokens / block_size) + 4
    pool = BlockPool(
        cfg.num_hidden_layers, num_blocks, cfg.num_key_value_heads, cfg.head_dim, block_size=block_size
    )
    cache = PagedKVCache(pool)
    seq = cache.add_sequence()
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(
        cfg.num_hidden_layers, num_tokens, cfg.num_key_value_heads, cfg.head_dim, generator=gen
    )
    values = torch.randn(keys.shape, generator=gen)
    positions = torch.arange(num_tokens)
    cos, sin = rotary_cos_sin(model, positions)
    cache.begin_append(seq, num_tokens)
    post = []
    for layer in range(cfg.num_hidden_layers):
        k_post = rotate(keys[layer].transpose(0, 1), cos, sin).transpose(0, 1)  # [N, H_kv, D]
        post.append(k_post)
        cache.write(seq, layer, k_post, values[layer], positions)
    cache.end_append(seq)
    return cache, seq, keys, torch.stack(post), values


def test_policy_should_compact_and_validation():
    stats = _stats()
    policy = TriAttentionPolicy(stats, budget_tokens=64, recent_tokens=16, sink_tokens=4)
    assert not policy.should_compact(64 + 127)
    assert policy.should_compact(64 + 128)
    with pytest.raises(ValueError, match="window"):
        TriAttentionPolicy(stats, budget_tokens=10, recent_tokens=16)
    with pytest.raises(ValueError, match="mode"):
        TriAttentionPolicy(stats, budget_tokens=200, mode="global")


@pytest.mark.parametrize("mode", ["per_head", "per_layer_per_head"])
def test_policy_compacts_to_budget_and_frees_blocks(mode):
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16)
    stats = _stats(layers=2, q_heads=4, head_dim=16, fingerprint=model_fingerprint(model))
    stats.omega = model.model.rotary_emb.inv_freq.float()
    n, budget = 300, 80
    cache, seq, pre_keys, post_keys, values = _filled_cache(model, n)
    policy = TriAttentionPolicy(
        stats, budget_tokens=budget, recent_tokens=32, sink_tokens=4, mode=mode, compaction_interval=64
    )
    assert policy.should_compact(cache.num_slots(seq))
    t = cache.logical_length(seq)
    expected_keep = policy.select(cache, seq, t)

    # the selection equals scoring the pre-RoPE keys at their positions with the reference
    positions = torch.arange(n)[:, None].expand(n, 2).to(torch.int32)
    per_layer = []
    for layer in range(2):
        raw = reference_triattention_score(pre_keys[layer], positions, *stats.layer(layer), stats.omega, t)
        per_layer.append(aggregate_scores(raw, 2))
    protected = torch.zeros(n, dtype=torch.bool)
    protected[:4] = True
    protected[-32:] = True
    if mode == "per_head":
        combined = sum(zscore(s) for s in per_layer)
        manual = select_keep(combined, budget, protected)
        assert expected_keep.shape == (2, budget)
    else:
        manual = torch.stack([select_keep(s, budget, protected) for s in per_layer])
        assert expected_keep.shape == (2, 2, budget)
    # scores from post-RoPE keys agree with the pre-RoPE computation up to float32 rounding: allow
    # a couple of boundary swaps, never more
    overlap = (manual[..., :, None] == expected_keep[..., None, :]).any(-1).float().mean()
    assert float(overlap) > 0.97

    blocks = len(cache.block_table(seq))
    freed = policy.compact(cache, seq, t)
    assert freed == blocks - math.ceil(budget / 16)
    assert cache.num_slots(seq) == budget and cache.logical_length(seq) == n
    for layer in range(2):
        k, v, p = cache.gather(seq, layer)
        assert bool((p[:4] == torch.arange(4)[:, None]).all())  # sinks
        assert bool((p[-32:] == torch.arange(n - 32, n)[:, None]).all())  # window
        # every surviving key is the original key of its true position (rotation unchanged)
        for h in range(2):
            assert torch.equal(k[:, h], post_keys[layer, p[:, h].long(), h])
            assert torch.equal(v[:, h], values[layer, p[:, h].long(), h])
    if mode == "per_head":
        p0 = cache.gather(seq, 0)[2]
        assert torch.equal(p0, cache.gather(seq, 1)[2])
    # under budget: nothing happens
    assert policy.compact(cache, seq, t) == 0


def test_policy_protects_prompt_and_pinned_slots():
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16)
    stats = _stats(layers=2, q_heads=4, head_dim=16)
    cache, seq, *_ = _filled_cache(model, 200)
    policy = TriAttentionPolicy(
        stats, budget_tokens=100, recent_tokens=16, sink_tokens=4, protect_prompt=True
    )
    keep = policy.select(cache, seq, 200, prompt_len=60)
    for h in range(2):
        assert set(range(60)) <= set(keep[h].tolist())
    pinned = torch.zeros(200, dtype=torch.bool)
    pinned[100:110] = True
    keep = policy.select(cache, seq, 200, extra_protected=pinned)
    for h in range(2):
        assert set(range(100, 110)) <= set(keep[h].tolist())
    with pytest.raises(ValueError, match="exceed"):
        policy.select(cache, seq, 200, prompt_len=150)


def test_policy_refuses_mismatched_model_and_cache():
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16)
    fp = model_fingerprint(model)
    with pytest.raises(ValueError, match="num_layers"):  # stats of another model: refused at once
        TriAttentionPolicy(
            _stats(fingerprint=dict(fp, num_layers=7)), budget_tokens=50, recent_tokens=8, fingerprint=fp
        )
    # stats of this model serve it
    stats = _stats(fingerprint=fp)
    stats.omega = model.model.rotary_emb.inv_freq.float()
    policy = TriAttentionPolicy(stats, budget_tokens=50, recent_tokens=8, fingerprint=fp)
    cache, seq, *_ = _filled_cache(model, 120)
    assert policy.compact(cache, seq) > 0 and cache.num_slots(seq) == 50
    # without a fingerprint, stats whose geometry does not fit the cache (3 layers for a 2-layer
    # cache) are refused when they would score it, before any slot moves
    policy = TriAttentionPolicy(_stats(layers=3), budget_tokens=50, recent_tokens=8)
    cache, seq, *_ = _filled_cache(model, 120)
    before = [cache.gather(seq, layer) for layer in range(2)]
    with pytest.raises(ValueError, match="do not fit the cache"):
        policy.compact(cache, seq)
    assert cache.num_slots(seq) == 120 and len(cache.block_table(seq)) == math.ceil(120 / 16)
    for layer in range(2):
        for a, b in zip(before[layer], cache.gather(seq, layer)):
            assert torch.equal(a, b)


def test_shipped_default_model_stats_are_well_formed():
    stats = load_stats(DEFAULT_STATS_PATH)
    assert stats.q_mean_real.shape == (30, 9, 32)  # SmolLM2-135M: 30 layers, 9 query heads, head_dim 64
    assert stats.fingerprint["num_key_value_heads"] == 3 and stats.fingerprint["rope"]["rope_theta"] == 1e5
    assert stats.num_tokens >= 32768
    torch.testing.assert_close(stats.omega, 1.0 / 1e5 ** (torch.arange(32) / 32.0))
    assert bool((stats.q_abs_mean >= torch.hypot(stats.q_mean_real, stats.q_mean_imag) - 1e-5).all())
