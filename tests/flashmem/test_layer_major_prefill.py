"""The exact prefill runs layer by layer: exact logits, the keep-set TriAttention chooses from the whole
prompt, chunk summaries and prompt-tail mass as a dense pass gives them, and bounded device memory and
host-to-device traffic."""

import math

import pytest
import torch

import flashmem
from flashmem import hf_compat
from flashmem.calibration import calibrate
from flashmem.indexer.summaries import summarize_chunks
from flashmem.offload import BlockPool, PagedKVCache
from flashmem.testing import tiny_model


def _stats_for(model, tmp_path, name="stats"):
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids, max_tokens=600, tokens_per_forward=300, progress=False)
    path = tmp_path / f"{name}.safetensors"
    stats.save(path)
    return str(path)


def _dense_keys(model, ids):
    """Post-RoPE keys ``[T, H_kv, D]`` of every layer from one plain Hugging Face forward."""
    captured = {}
    with (
        torch.no_grad(),
        hf_compat.capture_attention_inputs(model, lambda l, q, k, v: captured.setdefault(l, k)),
    ):
        model(ids)
    return [captured[l][0].transpose(0, 1) for l in sorted(captured)]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_first_token_logits_equal_dense_at_16k_under_a_budget(family, tmp_path):
    """16K tokens in four 4,096-token tiles (tiles after the first use the lower-right causal mask)."""
    model = tiny_model(family, layers=2, q_heads=4, kv_heads=2, head_dim=16, max_positions=16384)
    stats = _stats_for(model, tmp_path)
    ids = torch.randint(0, 128, (1, 16384), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids, logits_to_keep=1).logits[0, -1].float()
    config = flashmem.FlashMemConfig(
        budget_tokens=256,
        stats_path=stats,
        chunk_size=16,
        prefill_chunk_tokens=4096,
        max_context_tokens=16384 + 1,
    )
    fm = flashmem.wrap(model, config)
    fm.generate(ids, 1, eos_token_id=None, collect_logits=True, progress=False)
    rel = (fm.step_logits[0] - dense).abs().max() / dense.abs().max()
    assert rel < 1e-4
    report = fm.memory_report()
    assert report["compactions"] == 1 and report["device_slots"] == 256 and report["logical_tokens"] == 16384


@pytest.mark.parametrize("mode", ["per_head", "per_layer_per_head"])
def test_keep_set_is_the_policy_applied_once_to_the_whole_prompt(mode, tmp_path):
    """The survivors are what the TriAttention policy keeps of a dense cache of the prompt, scored
    at t = T (the token-chunked pass compacted every interval instead: a sequence of choices)."""
    model = tiny_model("qwen2", layers=3, q_heads=4, kv_heads=2, head_dim=16)
    stats = _stats_for(model, tmp_path)
    T, budget = 300, 64
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(2))
    config = flashmem.FlashMemConfig(
        budget_tokens=budget,
        stats_path=stats,
        chunk_size=16,
        recent_tokens=16,
        triattention_mode=mode,
        indexer="none" if mode == "per_layer_per_head" else "quest",
    )
    fm = flashmem.wrap(model, config)
    fm.generate(ids, 1, eos_token_id=None, progress=False)

    keys = _dense_keys(model, ids)
    pool = BlockPool(3, math.ceil(T / 16), 2, 16, block_size=16, dtype=torch.float32)
    dense = PagedKVCache(pool)
    seq = dense.add_sequence()
    dense.begin_append(seq, T)
    for layer, k in enumerate(keys):
        dense.write(seq, layer, k, torch.zeros_like(k), torch.arange(T))
    dense.end_append(seq)
    expected = fm.policy.select(dense, seq, T, prompt_len=T)  # [H_kv, K] or [L, H_kv, K]
    if mode == "per_head":
        expected = expected.expand(3, -1, -1)
    cache = fm.cache
    for layer in range(3):
        k, _, positions = cache.paged.gather(cache.seq_id, layer)  # [K, H_kv, D], [K, H_kv]
        assert torch.equal(positions.t().long(), expected[layer])
        heads = torch.arange(2)
        torch.testing.assert_close(k, keys[layer][expected[layer].t(), heads], rtol=1e-5, atol=1e-6)


def test_summaries_and_tail_mass_equal_a_dense_pass(tmp_path):
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16)
    stats = _stats_for(model, tmp_path)
    T, cs, window = 200, 16, 8
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(3))
    config = flashmem.FlashMemConfig(
        budget_tokens=48,
        compaction_interval=16,
        recent_tokens=16,
        stats_path=stats,
        chunk_size=cs,
        indexer="quest",
        prefill_chunk_tokens=64,
        observe_tokens=window,
    )
    fm = flashmem.wrap(model, config)
    fm.generate(ids, 1, eos_token_id=None, progress=False)
    cos, sin = hf_compat.rotary_cos_sin(model, torch.arange(T))
    for layer, k in enumerate(_dense_keys(model, ids)):
        pre = hf_compat.unrotate(k, cos[:, None, :], sin[:, None, :])
        want = summarize_chunks(k[: T // cs * cs], pre[: T // cs * cs], cs)
        got = fm.recall.builders[layer].summaries
        built = [
            name
            for name in ("mean_key", "mean_key_rope", "min_key", "max_key")
            if getattr(got, name) is not None
        ]
        assert set(built) >= {"min_key", "max_key"}  # what quest reads
        for name in built:
            if name in ("min_key", "max_key"):  # int8 codes: compare what they stand for
                continue
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-5)
        step = want.bound_scale.max().item()  # a key within 1e-5 of its twin can round one code apart
        for g, w in zip(got.bounds(), want.bounds()):
            torch.testing.assert_close(g, w, rtol=0, atol=step + 1e-5)
        torch.testing.assert_close(got.bound_scale, want.bound_scale, rtol=1e-5, atol=1e-7)
    # per layer and KV head, every chunk, the partial last one too
    assert fm.recall._observed.shape == (2, 2, math.ceil(T / cs))


@pytest.mark.parametrize("mode", ["per_head", "per_layer_per_head"])
@pytest.mark.parametrize("T", [400, 1600])
def test_prefill_traffic_and_device_memory_are_bounded(T, mode, model_and_stats):
    """Host-to-device bytes: the working set only (budget rows per layer) when one keep-set serves
    every layer (it is known once every layer has been scored, and read back from the mirror), none
    when each layer keeps its own (written from the layer's buffer), whatever the prompt length;
    device KV during the pass: at most one layer's prompt K/V beside the pool."""
    model, stats = model_and_stats  # 2 layers, 2 KV heads, head_dim 16, fp32
    budget = 64
    config = flashmem.FlashMemConfig(
        budget_tokens=budget,
        stats_path=stats,
        chunk_size=16,
        recent_tokens=16,
        prefill_chunk_tokens=128,
        triattention_mode=mode,
    )
    fm = flashmem.wrap(model, config)
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(4))
    fm.generate(ids, 1, eos_token_id=None, progress=False)
    mirror = fm.mirror.traffic()
    row = 2 * 16 * 4  # H_kv x D x fp32
    # K and V, 2 layers, budget rows
    assert mirror["h2d_bytes"] == (2 * 2 * budget * row if mode == "per_head" else 0)
    assert mirror["d2h_bytes"] == 2 * 2 * T * row  # every prompt row written once
    layer_kv = 2 * T * row
    report = fm.memory_report()
    assert report["peak_device_kv_bytes"] <= report["peak_pool_kv_bytes"] + layer_kv
    assert report["peak_device_kv_bytes"] >= layer_kv  # the layer's prompt K/V was on the device
