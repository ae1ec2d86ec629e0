"""A budget on a model nothing was calibrated for: the exact prefill derives the TriAttention query
statistics from the prompt's own queries, scores each layer's keys with them, and every later
compaction uses them."""

import math
from pathlib import Path

import pytest
import torch

import flashmem
from flashmem import files, hf_compat
from flashmem.offload import BlockPool, PagedKVCache, QueryStatsAccumulator, TriAttentionPolicy
from flashmem.testing import tiny_model


def _dense_queries_and_keys(model, ids):
    """Post-RoPE queries ``[T, H_q, D]`` and keys ``[T, H_kv, D]`` of every layer, one plain forward."""
    captured = {}
    with (
        torch.no_grad(),
        hf_compat.capture_attention_inputs(model, lambda l, q, k, v: captured.setdefault(l, (q, k))),
    ):
        model(ids)
    layers = sorted(captured)
    queries = [captured[l][0][0].transpose(0, 1) for l in layers]
    keys = [captured[l][1][0].transpose(0, 1) for l in layers]
    return queries, keys


def _reference_stats(model, queries):
    """A QueryStatsAccumulator fed the dense pass's queries, un-rotated with the model's cos/sin."""
    T = queries[0].shape[0]
    cos, sin = hf_compat.rotary_cos_sin(model, torch.arange(T))
    _, num_q, _, head_dim = hf_compat.kv_geometry(model)
    acc = QueryStatsAccumulator(len(queries), num_q, head_dim)
    for layer, q in enumerate(queries):
        acc.update(layer, hf_compat.unrotate(q.float(), cos[:, None, :], sin[:, None, :]))
    return acc.finalize(hf_compat.rope_omega(model), hf_compat.model_fingerprint(model), "reference")


@pytest.mark.parametrize("mode", ["per_head", "per_layer_per_head"])
def test_prompt_stats_equal_the_dense_queries_and_choose_the_keep_set(mode):
    model = tiny_model("qwen2", layers=3, q_heads=4, kv_heads=2, head_dim=16)
    T, budget = 300, 64
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(2))
    config = flashmem.FlashMemConfig(
        budget_tokens=budget,
        chunk_size=16,
        recent_tokens=16,
        triattention_mode=mode,
        indexer="none" if mode == "per_layer_per_head" else "quest",
        prefill_chunk_tokens=128,  # three tiles: the statistics are summed over tiles
    )
    fm = flashmem.wrap(model, config)  # no stats_path, and the shipped stats are for another model
    assert fm.stats_source == "prompt" and fm.policy.stats is None
    fm.generate(ids, 1, eos_token_id=None, progress=False)
    assert fm.memory_report()["triattention_stats"] == "prompt"

    queries, keys = _dense_queries_and_keys(model, ids)
    want = _reference_stats(model, queries)
    got = fm.policy.stats
    assert got.num_tokens == T and got.fingerprint == hf_compat.model_fingerprint(model)
    for name in ("q_mean_real", "q_mean_imag", "q_abs_mean", "omega"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6)

    pool = BlockPool(3, math.ceil(T / 16), 2, 16, block_size=16, dtype=torch.float32)
    dense = PagedKVCache(pool)
    seq = dense.add_sequence()
    dense.begin_append(seq, T)
    for layer, k in enumerate(keys):
        dense.write(seq, layer, k, torch.zeros_like(k), torch.arange(T))
    dense.end_append(seq)
    reference = TriAttentionPolicy(
        want, budget_tokens=budget, recent_tokens=16, sink_tokens=4, mode=mode, backend="torch"
    )
    expected = reference.select(dense, seq, T, prompt_len=T)  # [H_kv, K] or [L, H_kv, K]
    if mode == "per_head":
        expected = expected.expand(3, -1, -1)
    cache = fm.cache
    for layer in range(3):
        _, _, positions = cache.paged.gather(cache.seq_id, layer)  # [K, H_kv]
        assert torch.equal(positions.t().long(), expected[layer])


def test_budget_decodes_bounded_and_lossless_with_prompt_stats():
    """Decode compactions score with the prompt's stats; the device stays bounded and the host
    mirror holds every token."""
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16)
    T, new, budget, interval = 200, 60, 48, 16
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(5))
    config = flashmem.FlashMemConfig(
        budget_tokens=budget, compaction_interval=interval, recent_tokens=16, chunk_size=16
    )
    fm = flashmem.wrap(model, config)
    fm.generate(ids, new, eos_token_id=None, progress=False)
    report = fm.memory_report()
    assert report["triattention_stats"] == "prompt"
    assert report["compactions"] > 1  # the prefill's keep-set and decode compactions
    assert report["device_slots"] < budget + interval
    # chunk_budget = 48 // (2 x 16) = 1, at least 2: two 16-token chunks recalled per window, 2 windows
    # held while the next one is prefetched (prefetch_steps defaults to 8)
    assert config.effective_chunk_budget == 2
    recalled_blocks = 2 * config.recall_windows_held
    bound = report["kv_block_bytes"] * (math.ceil((budget + interval) / 16) + recalled_blocks)
    assert max(report["device_kv_trace"]) <= bound
    assert fm.mirror.num_tokens == T + new - 1 == report["logical_tokens"]
    assert fm.policy.stats.num_tokens == T and fm.policy.stats.source == "prompt"


def test_sources_given_path_and_shipped(model_and_stats, monkeypatch):
    model, path = model_and_stats
    small = dict(budget_tokens=48, recent_tokens=16, chunk_size=16)
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(**small, stats_path=path))
    assert fm.stats_source == path and fm.policy.stats is not None
    fm.generate(torch.randint(0, 128, (1, 80)), 2, eos_token_id=None, progress=False)
    assert fm.memory_report()["triattention_stats"] == path
    # stats shipped for this model are used as such
    monkeypatch.setattr(files, "DEFAULT_STATS_PATH", Path(path))
    stats, source = files.find_stats_for_model(model, None)
    assert source == "shipped" and stats.fingerprint == hf_compat.model_fingerprint(model)
    assert flashmem.wrap(model, flashmem.FlashMemConfig(**small)).stats_source == "shipped"


def test_sparse_prefill_without_stats_is_refused_at_wrap():
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16)
    config = flashmem.FlashMemConfig(budget_tokens=48, recent_tokens=16, chunk_size=16, prefill="sparse")
    with pytest.raises(ValueError, match="prefill='sparse' needs TriAttention stats.*prefill='exact'"):
        flashmem.wrap(model, config)


def test_stats_path_prompt_derives_them_even_where_stats_exist(model_and_stats):
    """``stats_path="prompt"``: the prompt's own statistics, even for a model that has a stats file
    (here: prepared ones would be found otherwise); refused with the sparse prefill."""
    model, _ = model_and_stats
    config = flashmem.FlashMemConfig(budget_tokens=48, recent_tokens=16, chunk_size=16, stats_path="prompt")
    fm = flashmem.wrap(model, config)
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(9))
    fm.generate(ids, 4, eos_token_id=None, progress=False)
    assert fm.memory_report()["triattention_stats"] == "prompt"
    with pytest.raises(ValueError, match="stats_path='prompt'"):
        flashmem.FlashMemConfig(budget_tokens=48, recent_tokens=16, stats_path="prompt", prefill="sparse")
