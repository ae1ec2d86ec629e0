"""Settings and arguments flashmem cannot honour are refused at wrap() or at the start of generate(),
before any work, and leave the wrapper as it was (issue 11, item 4: the points that read no file)."""

import sys

import numpy as np
import pytest
import torch

import flashmem
from flashmem import wrapper as wrapper_module
from flashmem.testing import tiny_model


@pytest.fixture()
def no_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError


@pytest.mark.parametrize("budget", [None, 200])
def test_faiss_backend_without_faiss_is_refused_before_any_work(model_and_stats, no_faiss, budget):
    model, stats = model_and_stats
    with pytest.raises(
        ValueError, match=r"index_backend='faiss' needs the faiss package.*index_backend='torch'"
    ):
        config = flashmem.FlashMemConfig(
            budget_tokens=budget, stats_path=stats, index_backend="faiss", index_candidates=4, indexer="quest"
        )
        flashmem.wrap(model, config)


def test_memory_report_around_a_failed_generate_is_a_clear_runtime_error(model_and_stats, monkeypatch):
    model, stats = model_and_stats
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(budget_tokens=200, stats_path=stats, indexer="quest"))
    with pytest.raises(RuntimeError, match="after generate"):
        fm.memory_report()
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(0))
    ok = fm.generate(ids, 4, eos_token_id=None)

    # a failure while the per-sequence state is being built (what a missing faiss did in generate)
    def broken(*args, **kwargs):
        raise ImportError("simulated")

    monkeypatch.setattr(wrapper_module, "RecallController", broken)
    with pytest.raises(ImportError, match="simulated"):
        fm.generate(ids, 4, eos_token_id=None)
    with pytest.raises(RuntimeError, match="last one raised"):
        fm.memory_report()
    monkeypatch.undo()
    # ... and a failure mid-decode (the caller's stream callback)
    with pytest.raises(KeyError):
        fm.generate(ids, 4, eos_token_id=None, stream=lambda t: {}[t])
    with pytest.raises(RuntimeError, match="last one raised"):
        fm.memory_report()
    assert torch.equal(fm.generate(ids, 4, eos_token_id=None), ok)
    assert fm.memory_report()["logical_tokens"] == 303


@pytest.mark.parametrize("budget", [None, 200])
@pytest.mark.parametrize("name", ["nonsense", "oracle", "Quest"])
def test_unknown_indexer_is_refused_with_or_without_a_budget(model_and_stats, budget, name):
    model, stats = model_and_stats
    with pytest.raises(ValueError, match="unknown indexer|evaluation only"):
        config = flashmem.FlashMemConfig(budget_tokens=budget, stats_path=stats, indexer=name)
        flashmem.wrap(model, config)


def test_model_without_a_language_model_head_is_refused_at_wrap():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no language-model head"):
        flashmem.wrap(model.model, flashmem.FlashMemConfig())


@pytest.fixture(scope="module")
def fm_done():
    fm = flashmem.wrap(tiny_model("llama", vocab=128), flashmem.FlashMemConfig())
    fm.generate(torch.tensor([[1, 2, 3]]), 2, eos_token_id=None)
    return fm


def _refused(fm, exc, words, **kwargs):
    before = fm.memory_report()
    calls = []
    prefill = fm._prefill
    fm._prefill = lambda *a, **k: calls.append(1) or prefill(*a, **k)
    try:
        with pytest.raises(exc, match=words):
            fm.generate(torch.tensor([[4, 5, 6, 7]]), 3, **kwargs)
    finally:
        del fm._prefill
    assert not calls, "refused after prefill started"
    assert fm.memory_report() == before


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"forced_tokens": [1, 128, 2]}, ValueError, "outside the vocabulary"),
        ({"forced_tokens": torch.tensor([5, -1, 2])}, ValueError, "outside the vocabulary"),
        ({"forced_tokens": [1, 2.5, 3]}, TypeError, "forced_tokens must be token ids"),
        ({"forced_tokens": torch.tensor([1.0, 2.0, 3.0])}, TypeError, "integer token ids"),
        ({"eos_token_id": "x"}, TypeError, "eos_token_id must be token ids"),
        ({"eos_token_id": ["a", "b"]}, TypeError, "eos_token_id must be token ids"),
        ({"eos_token_id": [1, 2.0]}, TypeError, "eos_token_id must be token ids"),
        ({"eos_token_id": True}, TypeError, "eos_token_id must be token ids"),
        ({"stream": "print"}, TypeError, "stream must be a callable"),
        ({"do_sample": True, "seed": "7"}, TypeError, "seed must be an int"),
        ({"do_sample": True, "top_p": "0.5"}, ValueError, "top_p"),
        ({"do_sample": True, "temperature": float("nan")}, ValueError, "temperature"),
        ({"do_sample": True, "top_k": 2.0}, ValueError, "top_k"),
    ],
)
def test_bad_generate_arguments_are_refused_before_prefill(fm_done, kwargs, exc, words):
    _refused(fm_done, exc, words, **kwargs)


def test_integer_like_eos_and_forced_ids_are_accepted(fm_done):
    free = fm_done.generate(torch.tensor([[4, 5, 6, 7]]), 3, eos_token_id=None)
    first = int(free[0, 4])
    for eos in (np.int64(first), [np.int32(first)], torch.tensor([first]), (first, 127)):
        assert fm_done.generate(torch.tensor([[4, 5, 6, 7]]), 3, eos_token_id=eos).shape[1] == 5
    forced = fm_done.generate(
        torch.tensor([[4, 5, 6, 7]]), 3, eos_token_id=None, forced_tokens=np.array([9, 8, 7])
    )
    assert forced[0, 4:].tolist() == [9, 8, 7]


def test_triton_backend_on_a_cpu_model_without_the_interpreter_is_refused_at_wrap(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="attention_backend='triton'.*CUDA.*'auto' or 'torch'"):
        flashmem.wrap(tiny_model("llama"), flashmem.FlashMemConfig(attention_backend="triton"))
    flashmem.wrap(tiny_model("llama"), flashmem.FlashMemConfig(attention_backend="auto"))  # torch on a CPU
