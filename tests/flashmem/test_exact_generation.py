"""With a budget that covers the whole context, flashmem equals dense attention: greedy tokens
identical to Hugging Face's DynamicCache, logits within fp tolerance (docs/architecture.md,
invariant 1)."""

import pytest
import torch

import flashmem
from flashmem.testing import tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_greedy_64_tokens_match_dynamic_cache(family, backend, dense_generate):
    model = tiny_model(family, kv_heads=2 if family != "llama" else 1)
    ids = torch.randint(0, 128, (1, 45), generator=torch.Generator().manual_seed(1))
    ref_ids, ref_logits = dense_generate(model, ids, 64)
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(attention_backend=backend, prefill_chunk_tokens=16))
    out = fm.generate(ids, 64, eos_token_id=None, collect_logits=True)
    assert torch.equal(out, ref_ids)
    assert fm.step_logits.shape == ref_logits.shape
    rel = (fm.step_logits[-1] - ref_logits[-1]).abs().max() / ref_logits[-1].abs().max()
    assert rel < 1e-4
    torch.testing.assert_close(fm.step_logits, ref_logits, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_equals_single_pass():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(2))
    a = flashmem.wrap(model, flashmem.FlashMemConfig(prefill_chunk_tokens=7))
    b = flashmem.wrap(model, flashmem.FlashMemConfig(prefill_chunk_tokens=4096))
    out_a = a.generate(ids, 8, eos_token_id=None, collect_logits=True)
    out_b = b.generate(ids, 8, eos_token_id=None, collect_logits=True)
    assert torch.equal(out_a, out_b)
    torch.testing.assert_close(a.step_logits, b.step_logits, rtol=1e-5, atol=1e-5)


def test_user_model_is_left_unchanged():
    model = tiny_model("qwen2")
    before = model.config._attn_implementation
    fm = flashmem.wrap(model, flashmem.FlashMemConfig())
    fm.generate(torch.tensor([[1, 2, 3]]), 4, eos_token_id=None)
    assert model.config._attn_implementation == before
    # the plain model still runs with its own attention afterwards
    model(torch.tensor([[1, 2, 3]]))


def test_eos_stops_generation():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    fm = flashmem.wrap(model, flashmem.FlashMemConfig())
    free = fm.generate(ids, 6, eos_token_id=None)
    first = int(free[0, 4])
    stopped = fm.generate(ids, 6, eos_token_id=first)
    assert stopped.shape[1] == 5 and int(stopped[0, -1]) == first


def test_sampling_is_seeded():
    model = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    fm = flashmem.wrap(model, flashmem.FlashMemConfig())
    a = fm.generate(ids, 10, eos_token_id=None, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    b = fm.generate(ids, 10, eos_token_id=None, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    assert torch.equal(a, b)


def test_forced_tokens_are_fed_and_scored():
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(5))
    forced = torch.randint(0, 128, (6,), generator=torch.Generator().manual_seed(6)).tolist()
    fm = flashmem.wrap(model, flashmem.FlashMemConfig())
    out = fm.generate(ids, 6, eos_token_id=None, collect_logits=True, forced_tokens=forced)
    assert out[0, 20:].tolist() == forced
    # the logits of step i are the model's next-token logits after the prompt and forced[:i]
    with torch.no_grad():
        ref = model(torch.cat([ids, torch.tensor([forced[:5]])], dim=1)).logits[0, 19:]
    torch.testing.assert_close(fm.step_logits, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="forced_tokens"):
        fm.generate(ids, 6, forced_tokens=forced[:3])
