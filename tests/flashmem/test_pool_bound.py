"""The block pool is sized from the real bound of the policy: no valid setting exhausts it, and it
never reserves more than the tokens that were actually reached can use."""

import math
import random

import pytest
import torch

import flashmem
from flashmem.offload.block_pool import BlockPoolExhausted


def bound_blocks(c: flashmem.FlashMemConfig, tokens: int) -> int:
    """Independent statement of the bound: before a forward the policy holds < budget + interval slots
    (it compacts back to budget when it reaches that; the exact prefill writes at most budget), a
    forward adds one token chunk (sparse prefill) or one token, and recall holds chunk_budget chunks
    per window among the closed chunks that begin before the window."""
    full = math.ceil(tokens / c.block_size)
    if c.budget_tokens is None:
        return full
    step = c.effective_prefill_chunk if c.prefill == "sparse" else 1
    working = min(full, math.ceil((c.budget_tokens + c.compaction_interval - 1 + step) / c.block_size))
    recall = 0
    if c.recall_enabled:
        windows = 2 if c.prefetch_steps else 1
        closed = tokens // c.chunk_size
        before_window = math.ceil(max(0, tokens - c.recent_tokens) / c.chunk_size)
        chunks = min(c.effective_chunk_budget * windows, closed, before_window)
        recall = chunks * c.chunk_size // c.block_size
    return working + recall


def _prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _check(model, config, prompt_len, new):
    fm = flashmem.wrap(model, config)
    out = fm.generate(_prompt(prompt_len), new, eos_token_id=None)
    assert out.shape == (1, prompt_len + new)
    r = fm.memory_report()
    assert r["peak_blocks_in_use"] <= r["pool_blocks"] <= bound_blocks(config, prompt_len + new - 1)
    assert r["pool_capacity_bytes"] == r["pool_blocks"] * r["kv_block_bytes"]
    return r


@pytest.mark.parametrize(
    "kw",
    [
        {"budget_tokens": 160},  # the CLI case of the issue (default window 128)
        {"budget_tokens": 132},
        {"budget_tokens": 190},
        {"budget_tokens": 200, "indexer": "none"},
        {"budget_tokens": 300, "indexer": "none"},
        {"budget_tokens": 300, "prefill": "sparse"},
        {"budget_tokens": 400, "prefill": "sparse"},
    ],
)
def test_budgets_that_exhausted_the_pool_mid_prefill(model_and_stats, kw):
    model, stats = model_and_stats
    r = _check(model, flashmem.FlashMemConfig(stats_path=stats, **kw), 1000, 8)
    assert r["compactions"] > 0


def test_random_sweep_of_budgets_intervals_chunks_and_modes_stays_within_the_pool(model_and_stats):
    model, stats = model_and_stats
    rng = random.Random(11)
    configs = []
    while len(configs) < 40:
        window = rng.choice([0, 16, 128])
        sink = rng.choice([0, 4])
        block = rng.choice([1, 8, 16])
        chunk = block * rng.choice([1, 2, 4]) if block < 16 else rng.choice([16, 64])
        kw = dict(
            budget_tokens=sink + window + rng.choice([1, 3, 17, 40, 100]),
            compaction_interval=rng.choice([1, 7, 16, 37, 128]),
            recent_tokens=window,
            sink_tokens=sink,
            block_size=block,
            chunk_size=chunk,
            prefill=rng.choice(["exact", "sparse"]),
            prefill_chunk_tokens=rng.choice([None, 5, 64, 200]),
            indexer=rng.choice(["none", "quest", "recency"]),
            chunk_budget=rng.choice([None, 1, 3]),
            lookahead=16,
            prefetch_steps=rng.choice([0, 0, 5]),
            stats_path=stats,
        )
        kw["recall_mode"] = (
            "shared" if kw["prefetch_steps"] else "per_layer_per_head"
        )  # only shared prefetches
        if kw["recall_mode"] == "per_layer_per_head":  # shared recall needs one keep-set for all layers
            kw["triattention_mode"] = rng.choice(["per_head", "per_layer_per_head"])
        # compaction every token over a long prompt is slow on a CPU and adds nothing new
        if kw["compaction_interval"] < 7 and (kw["prefill_chunk_tokens"] or kw["compaction_interval"]) < 64:
            continue
        configs.append(flashmem.FlashMemConfig(**kw))
    compacted = tight = 0
    for config in configs:
        r = _check(model, config, rng.choice([90, 250, 400]), rng.choice([1, 9, 40]))
        compacted += r["compactions"] > 0
        # the bound is the real peak, not padding: some runs fill the pool to it exactly
        tight += r["compactions"] > 0 and r["peak_blocks_in_use"] == bound_blocks(config, 10**9)
    assert compacted >= len(configs) // 2 and tight >= 1


def test_short_prompt_with_a_huge_budget_reserves_only_what_it_can_use(model_and_stats):
    model, stats = model_and_stats
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(budget_tokens=400_000, stats_path=stats))
    fm.generate(_prompt(54), 64, eos_token_id=None)
    r = fm.memory_report()
    fed = 54 + 63  # the last generated token is never fed back
    assert r["pool_blocks"] == math.ceil(fed / 16) == r["peak_blocks_in_use"]
    assert r["pool_capacity_bytes"] == math.ceil(fed / 16) * r["kv_block_bytes"]
    # the tensors the pool holds are that size (nothing else reserved per layer)
    held = sum(
        k.numel() * k.element_size() + v.numel() * v.element_size()
        for k, v in zip(fm.pool.keys, fm.pool.values)
    )
    assert held == r["pool_capacity_bytes"]


@pytest.mark.parametrize("budget", [None, 400_000])
def test_generation_that_stops_early_never_reserved_max_new_tokens(model_and_stats, budget):
    model, stats = model_and_stats
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(budget_tokens=budget, stats_path=stats))
    forced = [5, 6, 7] + [1] * 997
    out = fm.generate(_prompt(54), 1000, eos_token_id=7, forced_tokens=forced)
    assert out.shape[1] == 54 + 3
    r = fm.memory_report()
    assert r["pool_blocks"] == math.ceil((54 + 2) / 16)  # not ceil((54 + 1000) / 16)


def test_a_pool_grown_during_decoding_keeps_decoding_exact():
    from flashmem.testing import tiny_model

    model = tiny_model("qwen3")
    ids = _prompt(20, seed=3)
    forced = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        dense = model(torch.cat([ids[0], forced[:-1]])[None]).logits[0, 19:].float()  # [300, vocab]
    fm = flashmem.wrap(model, flashmem.FlashMemConfig())
    fm.generate(ids, 300, eos_token_id=None, forced_tokens=forced, collect_logits=True)
    torch.testing.assert_close(fm.step_logits, dense, rtol=1e-4, atol=1e-4)
    r = fm.memory_report()
    assert r["pool_blocks"] == math.ceil((20 + 299) / 16) == r["blocks_in_use"]


def test_an_exhausted_pool_is_reported_as_a_flashmem_bug_and_leaves_a_usable_wrapper(
    model_and_stats, monkeypatch
):
    model, stats = model_and_stats
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(budget_tokens=160, stats_path=stats))
    ok = fm.generate(_prompt(300), 4, eos_token_id=None)
    monkeypatch.setattr(type(fm), "_pool_blocks", lambda self, tokens, windows=None: 2)
    with pytest.raises(BlockPoolExhausted) as info:
        fm.generate(_prompt(300), 4, eos_token_id=None)
    message = str(info.value)
    assert "flashmem bug" in message and "raise the pool size" not in message
    with pytest.raises(RuntimeError, match="last one raised"):
        fm.memory_report()
    monkeypatch.undo()
    assert torch.equal(fm.generate(_prompt(300), 4, eos_token_id=None), ok)
