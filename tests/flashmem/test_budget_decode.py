"""Decoding under a token budget: TriAttention compaction frees blocks, the device stays bounded,
the host mirror keeps everything, recalled chunks are never attended twice."""

import math

import pytest
import torch

import flashmem


@pytest.mark.parametrize("indexer", ["none", "quest", "mean_key"])
def test_peak_bounded_blocks_freed_mirror_lossless(model_and_stats, indexer, budget_config):
    model, _ = model_and_stats
    config = budget_config(indexer=indexer, chunk_budget=2)
    fm = flashmem.wrap(model, config)
    ids = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(1))
    fm.generate(ids, 200, eos_token_id=None)
    r = fm.memory_report()
    bpt = r["kv_bytes_per_token"]
    # recalled chunks: chunk_budget per window, two windows while a prefetch overlaps the current one
    recall_tokens = config.recall_windows_held * 2 * 16 if indexer != "none" else 0
    bound = math.ceil((48 + 16 + recall_tokens) / 16) * 16 * bpt + 16 * bpt  # + one partial block
    assert r["peak_device_kv_bytes"] <= bound
    assert r["blocks_freed"] > 0 and r["compactions"] > 0
    assert r["device_slots"] < r["logical_tokens"] == 40 + 199
    # the host mirror holds every token, bit for bit what a dense cache would hold
    assert r["host_kv_bytes"] == r["full_kv_bytes"]
    assert fm.mirror.num_tokens == r["logical_tokens"]
    assert len(r["device_kv_trace"]) == r["decode_steps"] + 1
    if indexer != "none":
        assert r["recall_refreshes"] > 0 and r["offload"]["h2d_bytes"] > 0


def test_positions_stay_true_after_compaction(model_and_stats, budget_config):
    model, _ = model_and_stats
    fm = flashmem.wrap(model, budget_config(indexer="none"))
    fm.generate(torch.randint(0, 128, (1, 30)), 120, eos_token_id=None)
    cache = fm.cache
    k, _, pos = cache.paged.gather(cache.seq_id, 1)
    for h in range(pos.shape[1]):
        p = pos[:, h]
        assert (p[1:] > p[:-1]).all()  # survivors in token order
        assert int(p[-1]) == cache.logical_length - 1
        # rotation never changed: every surviving key equals the mirror's copy at its true position
        torch.testing.assert_close(k[:, h], fm.mirror.keys[1][p.long(), h], rtol=0, atol=0)


def test_recalled_tokens_are_never_attended_twice(model_and_stats, budget_config):
    model, _ = model_and_stats
    fm = flashmem.wrap(model, budget_config(indexer="recency", chunk_budget=3))
    fm.generate(torch.randint(0, 128, (1, 100)), 150, eos_token_id=None)
    cache = fm.cache
    pool = fm.pool
    _, _, work = cache.paged.gather(cache.seq_id, 0)
    blocks, valid = fm.offload.resident_blocks()
    assert blocks.numel() > 0
    for h in range(pool.num_kv_heads):
        seen = work[:, h].tolist()
        for b, n in zip(blocks.tolist(), valid.tolist()):
            seen += [p for p in pool.positions[0][b, :n, h].tolist() if p >= 0]
        assert len(seen) == len(set(seen))


def test_full_budget_with_mirror_is_exact(model_and_stats, budget_config):
    """A budget covering the whole context, with exact prefill through the mirror: equals dense."""
    model, _ = model_and_stats
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(3))
    dense = flashmem.wrap(model, flashmem.FlashMemConfig())
    ref = dense.generate(ids, 30, eos_token_id=None, collect_logits=True)
    fm = flashmem.wrap(model, budget_config(budget_tokens=512, prefill_chunk_tokens=16, indexer="quest"))
    out = fm.generate(ids, 30, eos_token_id=None, collect_logits=True)
    assert fm.memory_report()["compactions"] == 0
    assert torch.equal(out, ref)
    torch.testing.assert_close(fm.step_logits, dense.step_logits, rtol=1e-4, atol=1e-4)


def test_exact_prefill_first_token_matches_dense_under_a_small_budget(model_and_stats, budget_config):
    model, _ = model_and_stats
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(4))
    dense = flashmem.wrap(model, flashmem.FlashMemConfig())
    dense.generate(ids, 1, eos_token_id=None, collect_logits=True)
    fm = flashmem.wrap(model, budget_config(indexer="none", prefill="exact"))
    fm.generate(ids, 1, eos_token_id=None, collect_logits=True)
    assert fm.memory_report()["compactions"] > 0  # the prompt did not fit the budget
    torch.testing.assert_close(fm.step_logits[0], dense.step_logits[0], rtol=1e-4, atol=1e-4)


def test_bad_recall_settings_fail_before_prefill(model_and_stats, tmp_path, budget_config):
    model, _ = model_and_stats
    with pytest.raises(ValueError, match="at least sink_tokens"):
        flashmem.FlashMemConfig(budget_tokens=10, recent_tokens=16)
    with pytest.raises(ValueError, match="unknown indexer"):
        flashmem.wrap(model, budget_config(indexer="nonsense"))
    fm = flashmem.wrap(model, budget_config(indexer="none", max_host_bytes=1000))
    with pytest.raises(ValueError, match="host"):
        fm.generate(torch.randint(0, 128, (1, 100)), 10)
    assert fm.pool is None  # nothing was allocated


def test_sparse_prefill_keeps_device_bounded_for_long_prompts(model_and_stats, budget_config):
    model, _ = model_and_stats
    config = budget_config(indexer="quest", chunk_budget=2, prefill="sparse", prefill_chunk_tokens=32)
    fm = flashmem.wrap(model, config)
    ids = torch.randint(0, 128, (1, 900), generator=torch.Generator().manual_seed(5))
    fm.generate(ids, 10, eos_token_id=None)
    r = fm.memory_report()
    bpt = r["kv_bytes_per_token"]
    # working set: budget + one prefill chunk (+ a partial block); recall: 2 chunks of 16
    assert r["peak_device_kv_bytes"] <= (48 + 32 + 16 + 2 * 16) * bpt
    assert r["peak_device_kv_share"] < 0.15
    # every device byte: the pool, quest's min/max summaries (2 x D per 16-token chunk: 1/16 of the KV
    # here), the stats and the gathered slots of a prefill chunk; still well under the full KV
    assert r["peak_device_share"] < 0.5
    assert r["host_kv_bytes"] == r["full_kv_bytes"] and r["recall_refreshes"] > 10


def test_learned_indexer_for_another_chunk_size_is_refused(model_and_stats, budget_config):
    model, _ = model_and_stats
    from flashmem.indexer.lookahead import default_checkpoint_path

    # the shipped checkpoint is for the default model: refused for this one, before any work
    with pytest.raises(ValueError, match="another model"):
        flashmem.wrap(model, budget_config(indexer=str(default_checkpoint_path())))


def test_prefill_observed_mass_equals_brute_force_attention(model_and_stats, budget_config):
    """Exact prefill measures, for every chunk of the prompt (the last one partial), the peak share of
    one query head's attention that the last queries give it, the always-resident tokens' share (sinks,
    recent window) left out, maximised over layers: check it against full attention matrices
    computed directly."""
    from flashmem import hf_compat

    model, _ = model_and_stats
    T, chunk, cs, window, sinks = 200, 64, 16, 8, 20  # sinks span more than one chunk
    recent = 16  # the window [184, 200) starts inside chunk 11 and covers all of chunk 12
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(6))
    fm = flashmem.wrap(
        model,
        budget_config(
            indexer="quest",
            prefill_chunk_tokens=chunk,
            observe_tokens=window,
            sink_tokens=sinks,
            recent_tokens=recent,
            recall_mode="shared",  # one [N] over layers and heads (per head: test_recall_heads.py)
        ),
    )
    fm.generate(ids, 1, eos_token_id=None)
    observed = fm.recall._observed
    captured = {}
    with (
        torch.no_grad(),
        hf_compat.capture_attention_inputs(model, lambda l, q, k, v: captured.setdefault(l, (q, k))),
    ):
        model(ids)
    expected = torch.zeros(math.ceil(T / cs))
    for q, k in captured.values():
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        logits = (q @ k.transpose(-1, -2))[0] * q.shape[-1] ** -0.5  # [H_q, T, T]
        logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        probs = logits.softmax(-1)[:, -window:, :].clone()  # [H_q, W, T]
        probs[..., :sinks] = 0
        probs[..., T - recent :] = 0
        probs = torch.nn.functional.pad(probs, (0, (-T) % cs))
        expected = torch.maximum(expected, probs.unflatten(-1, (-1, cs)).sum(dim=3).amax(dim=(0, 1)))
    assert observed[0] == 0 and 0 < observed[1] < expected.max()  # chunk 0 is all sinks, chunk 1 partly
    assert observed[12] == 0 and 0 < observed[11] < expected.max()  # chunk 12 is all recent, 11 partly
    torch.testing.assert_close(observed, expected, rtol=1e-4, atol=1e-6)


def test_chunk_index_backends_retrieve_the_same_candidates(model_and_stats, budget_config):
    pytest.importorskip("faiss")
    model, _ = model_and_stats
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(7))
    outs, reports = [], []
    for backend in ("torch", "faiss"):
        config = budget_config(
            indexer="quest",
            chunk_budget=3,
            index_backend=backend,
            index_candidates=4,
            prefill="sparse",
            observe_tokens=0,
        )
        fm = flashmem.wrap(model, config)
        outs.append(fm.generate(ids, 40, eos_token_id=None))
        reports.append(fm.memory_report())
    assert torch.equal(outs[0], outs[1])
    assert reports[0]["offload"]["h2d_bytes"] == reports[1]["offload"]["h2d_bytes"] > 0
    with pytest.raises(ValueError, match="index_candidates"):
        flashmem.FlashMemConfig(budget_tokens=256, index_backend="faiss")


@pytest.mark.parametrize("recall_mode", ["shared", "per_layer_per_head"])
def test_recall_candidates_reach_the_chunk_the_recent_window_starts_in(
    model_and_stats, budget_config, recall_mode
):
    """Candidates are the closed chunks past the sinks that end before the recent window; the chunk
    the window's start falls inside (its older tokens are otherwise neither recent nor recallable) is
    one only for the ranking by the prompt's attention, which leaves the resident keys out, not for an
    indexer, which would rate it by its recent keys."""
    model, _ = model_and_stats
    fm = flashmem.wrap(
        model,
        budget_config(
            indexer="quest", recent_tokens=16, chunk_size=16, sink_tokens=20, recall_mode=recall_mode
        ),
    )
    fm.generate(torch.randint(0, 128, (1, 200)), 1, eos_token_id=None)
    recall = fm.recall
    assert recall.builders[0].num_chunks == 12  # chunks [0, 16) .. [176, 192) closed
    lo = 2  # the 20 sinks cover chunk 0 and part of chunk 1: the first candidate is chunk 2
    assert recall.candidates(200, straddling=True) == (lo, 12)  # window [184, 200) starts in chunk 11
    assert recall.candidates(200) == (lo, 11)
    assert recall.candidates(193, straddling=True) == (lo, 12)  # [177, 193): chunk 11 begins before it
    assert recall.candidates(192, straddling=True) == (lo, 11)  # [176, 192) is chunk 11: recent
    assert recall.candidates(190, straddling=True) == (lo, 11)  # [174, 190) starts inside chunk 10
    assert recall.candidates(190) == (lo, 10)
    assert recall.candidates(40, straddling=True) == (lo, 2)  # nothing to recall yet

    # the prefill's mass ranks the straddling chunk (its peak on chunk 11): it is recalled
    mass = torch.zeros(13)
    mass[11] = 1.0
    if recall_mode == "shared":
        recall._observed = mass
        assert 11 in recall.select(200)
        # an indexer refresh (no mass) never takes it, whatever it scores
        assert recall._observed is None
        assert all(c < 11 for c in recall.select(200))
    else:
        recall._observed = mass.expand(len(recall.builders), recall.num_kv_heads, -1).clone()
        assert (recall.select_heads(200) == 11).any(-1).all()  # every layer and head holds it
        assert recall._observed is None
        assert (recall.select_heads(200) < 11).all()
