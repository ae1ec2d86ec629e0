"""Bad input gets a clear error before any work."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import flashmem
from flashmem.testing import tiny_model


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"budget_tokens": 1.5}, TypeError, "budget_tokens must be an int"),
        ({"budget_tokens": -3}, ValueError, "budget_tokens must be >= 1"),
        ({"budget_tokens": True}, TypeError, "budget_tokens must be an int"),
        ({"budget_tokens": 100}, ValueError, "at least sink_tokens \\+ recent_tokens"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"triattention_mode": "global"}, ValueError, "triattention_mode"),
        ({"attention_backend": "cuda"}, ValueError, "attention_backend"),
        ({"budget_tokens": 10_000, "max_context_tokens": 5_000}, ValueError, "exceeds max_context_tokens"),
    ],
)
def test_config_validation(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        flashmem.FlashMemConfig(**kwargs)


def test_model_without_rotary_embeddings_is_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64))
    with pytest.raises(ValueError, match="not supported"):
        flashmem.wrap(model, flashmem.FlashMemConfig())


def test_rope_model_without_rotary_module_is_refused():
    model = tiny_model("llama")
    del model.model.rotary_emb
    with pytest.raises(ValueError, match="rotary"):
        flashmem.wrap(model, flashmem.FlashMemConfig())


def test_sliding_window_layers_are_refused():
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=0)
    with pytest.raises(ValueError, match="sliding"):
        flashmem.wrap(model, flashmem.FlashMemConfig())


def test_non_config_is_refused():
    with pytest.raises(TypeError, match="FlashMemConfig"):
        flashmem.FlashMemModel(tiny_model("llama"), {"budget_tokens": 10})


@pytest.fixture(scope="module")
def fm():
    return flashmem.wrap(tiny_model("llama"), flashmem.FlashMemConfig(max_context_tokens=64))


@pytest.mark.parametrize(
    "ids, n, exc, words",
    [
        (torch.zeros(2, 5, dtype=torch.long), 4, ValueError, "batch size"),
        (torch.zeros(1, 0, dtype=torch.long), 4, ValueError, "empty"),
        (torch.zeros(1, 5), 4, TypeError, "integer token ids"),
        ([[1, 2, 3]], 4, TypeError, "LongTensor"),
        (torch.zeros(1, 5, dtype=torch.long), -1, ValueError, "max_new_tokens"),
        (torch.zeros(1, 5, dtype=torch.long), 2.5, ValueError, "max_new_tokens"),
        (torch.zeros(1, 60, dtype=torch.long), 10, ValueError, "exceeds max_context_tokens"),
        (torch.full((1, 5), 999, dtype=torch.long), 4, ValueError, "vocabulary"),
    ],
)
def test_generate_input_errors_leave_state_unchanged(fm, ids, n, exc, words):
    ok = fm.generate(torch.tensor([[1, 2, 3]]), 2, eos_token_id=None)
    before = fm.memory_report()
    with pytest.raises(exc, match=words):
        fm.generate(ids, n)
    assert fm.memory_report() == before
    assert ok.shape == (1, 5)


def test_unknown_generate_kwarg(fm):
    with pytest.raises(TypeError, match="unexpected keyword"):
        fm.generate(torch.tensor([[1, 2]]), 2, num_beams=4)
