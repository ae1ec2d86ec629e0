"""Concurrent use: wrappers of one model decode from several threads without touching the model; one
wrapper used from two threads at once refuses the second call instead of corrupting the first."""

import threading

import pytest
import torch

import flashmem
from flashmem.testing import tiny_model

TIMEOUT_S = 60


def _model_state(model):
    """What plain Hugging Face use depends on: the attention choice of every config, and outputs."""
    configs = [model.config, getattr(model.config, "text_config", None)]
    impl = [getattr(c, "_attn_implementation", None) for c in configs if c is not None]
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        logits = model(ids).logits
    out = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    return impl, logits, out


def _assert_same_state(before, after):
    assert after[0] == before[0]
    assert torch.equal(after[1], before[1])
    assert torch.equal(after[2], before[2])


def _run_threads(*targets):
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


@pytest.mark.parametrize("family, impl", [("llama", "sdpa"), ("qwen3", "eager")])
def test_two_wrappers_of_one_model_decode_in_two_threads(family, impl):
    model = tiny_model(family, attn_implementation=impl)
    before = _model_state(model)
    prompts = [torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in (37, 52)]
    configs = [flashmem.FlashMemConfig(prefill_chunk_tokens=8), flashmem.FlashMemConfig()]
    wrappers = [flashmem.wrap(model, c) for c in configs]
    sequential = [fm.generate(p, 12, eos_token_id=None) for fm, p in zip(wrappers, prompts)]
    _assert_same_state(before, _model_state(model))

    # A deterministic interleaving that an attention switch on the shared config cannot survive:
    # thread 1 starts its first forward while thread 0 is inside its own (layer 0), and leaves it
    # only after thread 0 has finished its prefill (stream callback).
    inside = [threading.Event(), threading.Event()]
    first_left = threading.Event()
    seen = threading.local()

    def layer0_hook(module, args):
        if not getattr(seen, "entered", False):
            seen.entered = True
            inside[seen.who].set()
            if seen.who == 0:
                assert inside[1].wait(TIMEOUT_S)

    def norm_hook(module, args, output):
        if seen.who == 1 and not getattr(seen, "left", False):
            seen.left = True
            assert first_left.wait(TIMEOUT_S)

    hooks = [
        model.model.layers[0].register_forward_pre_hook(layer0_hook),
        model.model.norm.register_forward_hook(norm_hook),
    ]
    results = [None, None]

    def job(i):
        def run():
            seen.who = i
            if i == 1:
                assert inside[0].wait(TIMEOUT_S)
            results[i] = wrappers[i].generate(
                prompts[i], 12, eos_token_id=None, stream=lambda _t: first_left.set() if i == 0 else None
            )

        return run

    try:
        errors = _run_threads(job(0), job(1))
    finally:
        for h in hooks:
            h.remove()
    assert not errors, errors
    _assert_same_state(before, _model_state(model))
    for got, want in zip(results, sequential):
        assert torch.equal(got, want)

    # free-running: several rounds, no ordering imposed
    def free(i, out):
        def run():
            out[i] = wrappers[i].generate(prompts[i], 12, eos_token_id=None)

        return run

    for _ in range(3):
        results = [None, None]
        errors = _run_threads(free(0, results), free(1, results))
        assert not errors, errors
        for got, want in zip(results, sequential):
            assert torch.equal(got, want)
    _assert_same_state(before, _model_state(model))


def test_plain_model_use_in_another_thread_while_a_wrapper_is_inside_its_forward():
    model = tiny_model("qwen2")
    before = _model_state(model)
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(prefill_chunk_tokens=16))
    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    want = fm.generate(prompt, 10, eos_token_id=None)
    inside = threading.Event()
    plain_done = threading.Event()
    plain = []
    decoder = threading.local()

    def pause_in_layer1(module, args):  # the wrapper's thread waits inside its first forward
        if getattr(decoder, "pause", False):
            decoder.pause = False
            inside.set()
            assert plain_done.wait(TIMEOUT_S)

    def decode():
        decoder.pause = True
        got.append(fm.generate(prompt, 10, eos_token_id=None))

    def use_plain():
        assert inside.wait(TIMEOUT_S)
        try:
            plain.append(_model_state(model))
        finally:
            plain_done.set()

    got = []
    hook = model.model.layers[1].register_forward_pre_hook(pause_in_layer1)
    try:
        errors = _run_threads(decode, use_plain)
    finally:
        hook.remove()
    assert not errors, errors
    assert torch.equal(got[0], want)
    _assert_same_state(before, plain[0])
    _assert_same_state(before, _model_state(model))


def test_one_wrapper_from_two_threads_refuses_the_second_call():
    model = tiny_model("llama")
    before = _model_state(model)
    fm = flashmem.wrap(model, flashmem.FlashMemConfig())
    prompt = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(7))
    want = fm.generate(prompt, 10, eos_token_id=None)
    report_before = fm.memory_report()
    inside = threading.Event()
    release = threading.Event()

    def on_token(_t):
        if not inside.is_set():
            inside.set()
            assert release.wait(TIMEOUT_S)

    got, refused = [], []

    def first():
        got.append(fm.generate(prompt, 10, eos_token_id=None, stream=on_token))

    def second():
        assert inside.wait(TIMEOUT_S)
        try:
            for call in (
                lambda: fm.generate(prompt[:, :5], 3, eos_token_id=None),
                fm.memory_report,
            ):
                with pytest.raises(RuntimeError) as info:
                    call()
                refused.append(str(info.value))
        finally:
            release.set()

    errors = _run_threads(first, second)
    assert not errors, errors
    assert "already generating" in refused[0] and "its own flashmem.wrap" in refused[0]
    assert "another thread" in refused[1]
    assert torch.equal(got[0], want)
    assert fm.memory_report()["logical_tokens"] == report_before["logical_tokens"]
    # re-entering from the wrapper's own stream callback is refused the same way
    with pytest.raises(RuntimeError, match="already generating"):
        fm.generate(prompt, 3, eos_token_id=None, stream=lambda _t: fm.generate(prompt, 1))
    assert torch.equal(fm.generate(prompt, 10, eos_token_id=None), want)
    _assert_same_state(before, _model_state(model))
