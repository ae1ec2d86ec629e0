"""The family matrix: every tiny random-init family either works (no budget: greedy tokens equal Hugging
Face's DynamicCache; a budget with nothing calibrated: bounded device slots and a host mirror holding
every token) or is refused at wrap, before any work, with an error naming the reason."""

import math

import pytest
import torch

import flashmem
from flashmem import hf_compat
from flashmem.testing import tiny_model

WORKING = ["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "granite", "gemma"]
REFUSED = [
    ("cohere", {}, "interleaved pairs"),
    ("stablelm", {}, "partial_rotary_factor"),
    (
        "phi3",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
        "partial rotary",
    ),
    ("mistral", {"sliding_window": 16}, r"sliding_window=16.*max_context_tokens <= 16"),
    (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 32, "max_window_layers": 0},
        "sliding_window=32",
    ),
]


@pytest.mark.parametrize("family", WORKING)
def test_no_budget_equals_dynamic_cache(family, dense_generate):
    model = tiny_model(family)
    ids = torch.randint(3, 128, (1, 45), generator=torch.Generator().manual_seed(1))
    ref_ids, ref_logits = dense_generate(model, ids, 32)
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(prefill_chunk_tokens=16))  # three prefill tiles
    out = fm.generate(ids, 32, eos_token_id=None, collect_logits=True)
    assert torch.equal(out, ref_ids)
    torch.testing.assert_close(fm.step_logits, ref_logits.float(), rtol=1e-4, atol=1e-4)


def _layer_keys(model, ids):
    """Post-RoPE keys ``[T, H_kv, D]`` of every layer, one plain forward over ``ids`` ``[1, T]``."""
    captured = {}
    with (
        torch.no_grad(),
        hf_compat.capture_attention_inputs(model, lambda l, q, k, v: captured.setdefault(l, k)),
    ):
        model(ids)
    return [captured[l][0].transpose(0, 1) for l in sorted(captured)]


@pytest.mark.parametrize("family", WORKING)
def test_budget_without_stats_is_bounded_and_lossless(family):
    model = tiny_model(family)
    T, new, budget, interval = 150, 40, 48, 16
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(2))
    config = flashmem.FlashMemConfig(
        budget_tokens=budget, compaction_interval=interval, recent_tokens=16, chunk_size=16
    )
    fm = flashmem.wrap(model, config)  # nothing calibrated for this model: stats come from the prompt
    out = fm.generate(ids, new, eos_token_id=None, progress=False)
    report = fm.memory_report()
    assert report["triattention_stats"] == "prompt" and report["compactions"] > 1
    assert report["device_slots"] < budget + interval
    recalled_blocks = config.effective_chunk_budget  # 2 one-block chunks (48 // (2 x 16) = 1, at least 2)
    assert recalled_blocks == 2
    bound = report["kv_block_bytes"] * (math.ceil((budget + interval) / 16) + recalled_blocks)
    assert max(report["device_kv_trace"]) <= bound
    n = T + new - 1  # the last token is sampled, never fed
    assert fm.mirror.num_tokens == n == report["logical_tokens"]
    # every token's K is in the mirror: the prompt's of every layer (exact prefill), and layer 0's of
    # every decoded token (layer 0 sees only embeddings, so its keys do not depend on the budget)
    dense = _layer_keys(model, out[:, :n])
    for layer, k in enumerate(dense):
        rows = n if layer == 0 else T
        torch.testing.assert_close(fm.mirror.keys[layer][:rows], k[:rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "overrides", "reason"), REFUSED, ids=[r[0] + str(i) for i, r in enumerate(REFUSED)]
)
def test_refused_at_wrap_naming_the_reason(family, overrides, reason):
    model = tiny_model(family, **overrides)
    with pytest.raises(ValueError, match=reason):
        flashmem.wrap(model, flashmem.FlashMemConfig(budget_tokens=64, recent_tokens=16))
    with pytest.raises(ValueError, match=reason):
        flashmem.wrap(model, flashmem.FlashMemConfig())


def test_sliding_window_mistral_is_exact_when_the_context_fits_the_window(dense_generate):
    """A window that the whole context fits never binds: accepted, and equal to DynamicCache (whose
    mask applies the window); one shorter than max_context_tokens is refused (above)."""
    model = tiny_model("mistral", sliding_window=64)
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(3))
    ref_ids, ref_logits = dense_generate(model, ids, 34)  # 64 tokens in all
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(max_context_tokens=64, prefill_chunk_tokens=16))
    out = fm.generate(ids, 34, eos_token_id=None, collect_logits=True)
    assert torch.equal(out, ref_ids)
    torch.testing.assert_close(fm.step_logits, ref_logits.float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="max_context_tokens"):
        fm.generate(ids, 35, eos_token_id=None)
