"""Per-head recall (``recall_mode="per_layer_per_head"``): each layer and KV head holds the chunks it
ranks highest, in the same slots shared recall would use."""

import math

import pytest
import torch

import flashmem
from flashmem import hf_compat

PER_HEAD = dict(recall_mode="per_layer_per_head")


def test_query_independent_ranking_gives_exactly_what_shared_recall_gives(model_and_stats, budget_config):
    """Recency ranks every head alike, so per-head slots hold what shared recall holds: the same
    tokens attended, the same logits (the data plane differs entirely: per-head copies, positions)."""
    model, _ = model_and_stats
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(11))
    runs = {}
    for mode in ("shared", "per_layer_per_head"):
        fm = flashmem.wrap(
            model,
            budget_config(
                indexer="recency",
                chunk_budget=3,
                lookahead=8,
                observe_tokens=0,
                recall_mode=mode,
                triattention_mode="per_head",  # the same working set under both modes
            ),
        )
        out = fm.generate(ids, 60, eos_token_id=None, collect_logits=True)
        r = fm.memory_report()
        assert r["recall_refreshes"] >= 6
        runs[mode] = (out, fm.step_logits, r["avg_device_share"])
    assert torch.equal(runs["shared"][0], runs["per_layer_per_head"][0])
    torch.testing.assert_close(runs["shared"][1], runs["per_layer_per_head"][1], rtol=1e-5, atol=1e-5)
    assert runs["shared"][2] == pytest.approx(runs["per_layer_per_head"][2], rel=0.02)


@pytest.mark.parametrize("observe_tokens", [0, 16])
def test_each_head_takes_its_own_top_chunks(model_and_stats, budget_config, observe_tokens):
    """A later refresh's assignment equals a brute-force per-(layer, KV head) ranking: the Quest bound
    per query head, softmax over the candidates, mean over the head's query group, plus (when the
    prefill measured it) the head's own prompt-tail mass; top chunk_budget."""
    model, _ = model_and_stats
    fm = flashmem.wrap(
        model, budget_config(indexer="quest", chunk_budget=2, observe_tokens=observe_tokens, **PER_HEAD)
    )
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(12))
    fm.generate(ids, 20, eos_token_id=None)
    recall = fm.recall
    prompt = recall._prompt_ranks
    assert (prompt is None) == (observe_tokens == 0)
    position = fm.cache.logical_length
    lo, hi = recall.candidates(position)
    got = recall.select_heads(position)
    h_kv = recall.num_kv_heads
    differ = 0
    for layer in range(len(recall.builders)):
        s = recall.builders[layer].summaries.select(slice(lo, hi))
        s_lo, s_hi = s.bounds()  # [N, H_kv, D] fp32
        q = recall._queries[layer].float()  # [H_q, D] post-RoPE
        g = q.shape[0] // h_kv
        for h in range(h_kv):
            qh = q[h * g : (h + 1) * g]
            bound = qh.clamp_min(0) @ s_hi[:, h].T + qh.clamp_max(0) @ s_lo[:, h].T
            score = torch.softmax(bound / math.sqrt(q.shape[-1]), dim=-1).mean(0)
            if prompt is not None:
                score = score + prompt[layer, h, lo:hi]
            want = sorted((torch.topk(score, 2).indices + lo).tolist())
            assert got[layer, h].tolist() == want, (layer, h)
        differ += int(not torch.equal(got[layer, 0], got[layer, 1]))
    assert differ > 0  # the heads did choose differently somewhere (else this test shows little)


def test_the_first_refresh_gives_every_head_the_prompts_peak_chunks(model_and_stats, budget_config):
    """The first window after the prompt: every layer and head holds the chunks with the highest
    prompt-tail mass maximised over layers and heads (a chunk also inherits its predecessor's)."""
    model, _ = model_and_stats
    fm = flashmem.wrap(model, budget_config(indexer="quest", chunk_budget=2, **PER_HEAD))
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(13))
    fm.generate(ids, 2, eos_token_id=None)  # prefill, the first refresh and one decode step
    recall, window = fm.recall, fm.offload
    mass = recall._prompt_ranks  # [L, H_kv, N], predecessor peaks folded in
    lo, hi = recall.candidates(300, straddling=True)
    want = sorted((torch.topk(mass[..., lo:hi].amax(dim=(0, 1)), 2).indices + lo).tolist())
    assert window.assign.shape == (len(recall.builders), recall.num_kv_heads, 2)
    assert (window.assign == torch.tensor(want)).all()


def test_per_head_prefill_mass_equals_brute_force_attention(model_and_stats, budget_config):
    """The first refresh ranks each layer's KV head by the peak share of one of its query heads'
    attention that the prompt's last queries give a chunk (resident tokens left out)."""
    model, _ = model_and_stats
    T, cs, window, sinks, recent = 200, 16, 8, 4, 16
    ids = torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(6))
    fm = flashmem.wrap(
        model,
        budget_config(indexer="quest", prefill_chunk_tokens=64, observe_tokens=window, **PER_HEAD),
    )
    fm.generate(ids, 1, eos_token_id=None)
    observed = fm.recall._observed  # [L, H_kv, N]
    captured = {}
    with (
        torch.no_grad(),
        hf_compat.capture_attention_inputs(model, lambda l, q, k, v: captured.setdefault(l, (q, k))),
    ):
        model(ids)
    assert observed.shape == (len(captured), 2, math.ceil(T / cs))
    for layer, (q, k) in captured.items():
        group = q.shape[1] // k.shape[1]
        logits = (q @ k.repeat_interleave(group, dim=1).transpose(-1, -2))[0] * q.shape[-1] ** -0.5
        logits = logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        probs = logits.softmax(-1)[:, -window:, :].clone()  # [H_q, W, T]
        probs[..., :sinks] = 0
        probs[..., T - recent :] = 0
        probs = torch.nn.functional.pad(probs, (0, (-T) % cs)).unflatten(-1, (-1, cs)).sum(-1)  # [H_q, W, N]
        expected = probs.unflatten(0, (k.shape[1], group)).amax(dim=(1, 2))  # [H_kv, N]
        torch.testing.assert_close(observed[layer], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("triattention_mode", ["per_head", "per_layer_per_head"])
def test_no_token_is_attended_twice_in_any_layer_or_head(model_and_stats, budget_config, triattention_mode):
    """Recalled slots drop the tokens the working set of their own layer and head holds, also when
    every layer keeps its own tokens (``triattention_mode="per_layer_per_head"``)."""
    model, _ = model_and_stats
    fm = flashmem.wrap(
        model,
        budget_config(
            indexer="quest", chunk_budget=3, lookahead=8, triattention_mode=triattention_mode, **PER_HEAD
        ),
    )
    fm.generate(
        torch.randint(0, 128, (1, 160), generator=torch.Generator().manual_seed(14)), 90, eos_token_id=None
    )
    cache, pool = fm.cache, fm.pool
    blocks, valid = fm.offload.resident_blocks()
    assert blocks.numel() == 3 * (16 // pool.block_size) and fm.memory_report()["compactions"] > 0
    works = [cache.paged.gather(cache.seq_id, layer)[2] for layer in range(pool.num_layers)]
    assert torch.equal(cache.paged.positions(cache.seq_id), torch.stack(works))
    # per layer and head, the layers' keep-sets differ (else this shows nothing beyond per_head)
    assert any(not torch.equal(w, works[0]) for w in works) == (triattention_mode == "per_layer_per_head")
    recalled = 0
    for layer in range(pool.num_layers):
        work = works[layer]
        for h in range(pool.num_kv_heads):
            seen = work[:, h].tolist()
            extra = [
                p
                for b, n in zip(blocks.tolist(), valid.tolist())
                for p in pool.positions[layer][b, :n, h].tolist()
            ]
            extra = [p for p in extra if p >= 0]
            recalled += len(extra)
            assert len(seen + extra) == len(set(seen + extra))
            # every recalled slot holds the mirror's key of the position it carries
            for b in blocks.tolist():
                for slot, p in enumerate(pool.positions[layer][b, :, h].tolist()):
                    if p >= 0:
                        assert torch.equal(pool.keys[layer][b, slot, h], fm.mirror.keys[layer][p, h])
    assert recalled > 0


def test_shared_recall_needs_one_keep_set_for_every_layer():
    with pytest.raises(ValueError, match="recall_mode='per_layer_per_head'"):
        flashmem.FlashMemConfig(
            budget_tokens=256, recall_mode="shared", triattention_mode="per_layer_per_head"
        )
    flashmem.FlashMemConfig(budget_tokens=256, triattention_mode="per_layer_per_head")  # per-head recall


def test_per_head_recall_refuses_prefetch():
    with pytest.raises(ValueError, match="prefetch_steps"):
        flashmem.FlashMemConfig(budget_tokens=256, recall_mode="per_layer_per_head", prefetch_steps=8)
    with pytest.raises(ValueError, match="recall_mode"):
        flashmem.FlashMemConfig(budget_tokens=256, recall_mode="per_token")
