"""What one decode step dispatches: aten ops and host syncs per step against a dense Hugging Face step.

Counted with :class:`flashmem.testing.OpCounter` (a ``TorchDispatchMode``) over 128 decode steps of
a tiny random-init Llama on the CPU (``attention_backend="torch"``), with a token budget, so that
TriAttention compaction runs, and with recall on (Quest, prefetched windows), so that refreshes,
prefetches and window swaps run inside the counted steps; their cost is spread over the steps.

A *host sync* is an op that would block the host on a GPU: a scalar read-back
(``aten._local_scalar_dense``: ``item()``, ``int(t)``), the ops whose output size depends on the data
(``nonzero``, ``masked_select``, ``unique*``, ``is_nonzero``, ``equal``), and every copy between host
and device. On the CPU there are no such copies, so the counter counts what would be one instead:
every tensor made from Python data inside the step (``torch.tensor(...)``, indexing with a list:
``aten.lift_fresh``), an upload, and every ``Tensor.tolist()``, ``.numpy()`` and ``.cpu()`` call, a
read-back. The dense baseline pays two per step (``int(argmax)`` and ``torch.tensor([[token]])``);
flashmem reads the sampled id once per step (the stream callback needs it) and nothing else on an
ordinary step.
"""

import pytest
import torch

import flashmem
from flashmem.calibration import calibrate
from flashmem.testing import DenseDecoder, OpCounter, tiny_model

STEPS = 128


@pytest.fixture(scope="module")
def model_stats(tmp_path_factory):
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16, vocab=128)
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("stats") / "tiny.safetensors"
    calibrate(model, ids, max_tokens=600, tokens_per_forward=300, progress=False).save(path)
    return model, str(path)


def _config(stats, **overrides):
    # the defaults scaled to the tiny model: compaction every 64 tokens, a 32-step recall window,
    # 16-token chunks; prefetched 8 steps ahead, so that the prefetch path's cost is counted too
    settings = dict(
        budget_tokens=96,
        compaction_interval=64,
        recent_tokens=32,
        sink_tokens=4,
        chunk_size=16,
        lookahead=32,
        prefetch_steps=8,
        recall_mode="shared",
        indexer="quest",
        attention_backend="torch",
        stats_path=stats,
    )
    settings.update(overrides)
    return flashmem.FlashMemConfig(**settings)


def flashmem_step_counts(model, config, prompt, steps=STEPS):
    """(ops per step, syncs per step, counter, wrapper) over ``steps`` decode steps: the counts between
    the first and the last token handed to the stream callback (so the prefill is not counted)."""
    fm = flashmem.wrap(model, config)
    counter = OpCounter("cpu")
    marks = []
    with counter:
        fm.generate(
            prompt, steps + 1, eos_token_id=None, stream=lambda t: marks.append((counter.ops, counter.syncs))
        )
    (ops0, syncs0), (ops1, syncs1) = marks[0], marks[-1]
    n = len(marks) - 1
    assert n == steps
    return (ops1 - ops0) / n, (syncs1 - syncs0) / n, fm


def dense_step_counts(model, prompt, steps=STEPS):
    """(ops per step, syncs per step) of greedy decoding the plain Hugging Face way: the model's
    forward over a ``DynamicCache``, ``int(argmax)`` and the id sent back as a tensor."""
    dense = DenseDecoder(model)
    with torch.no_grad():
        logits = dense.step(prompt)
        counter = OpCounter("cpu")
        with counter:
            for _ in range(steps):
                token = int(logits.argmax())
                logits = dense.step(torch.tensor([[token]]))
    return counter.ops / steps, counter.syncs / steps


def test_decode_step_ops_and_syncs_against_dense(model_stats):
    model, stats = model_stats
    prompt = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(1))
    ops, syncs, fm = flashmem_step_counts(model, _config(stats), prompt)
    dense_ops, dense_syncs = dense_step_counts(model, prompt)
    report = fm.memory_report()
    print(
        f"flashmem: {ops:.1f} ops/step, {syncs:.3f} syncs/step ({report['compactions']} compactions, "
        f"{report['recall_refreshes']} recall selections); dense: {dense_ops:.1f} ops/step, "
        f"{dense_syncs:.2f} syncs/step; ratio {ops / dense_ops:.2f}"
    )
    # the control path ran inside the counted steps
    assert report["compactions"] >= 2 and report["recall_refreshes"] >= 4
    assert report["offload"]["prefetches_issued"] >= 3
    assert ops <= 1.5 * dense_ops
    assert syncs <= 1.1


def test_no_sync_at_all_without_a_token_check(model_stats):
    """Without an end-of-sequence id or a stream the ids are read once, at the end: the step itself
    reads nothing back (the refreshes and compactions are the only syncs left)."""
    model, stats = model_stats
    prompt = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(1))
    fm = flashmem.wrap(model, _config(stats))
    counter = OpCounter("cpu")
    with counter:
        out = fm.generate(prompt, STEPS + 1, eos_token_id=None)
    # every sync of the call (prefill included) against one per step
    assert counter.syncs < 0.5 * STEPS
    with_stream = flashmem.wrap(model, _config(stats)).generate(
        prompt, STEPS + 1, eos_token_id=None, stream=lambda t: None
    )
    assert torch.equal(out, with_stream)


def test_the_counter_catches_a_read_back_per_layer(model_stats, monkeypatch):
    """A regression that reads one value back per layer (an ``.item()`` in the attention) breaks the
    sync bound: the test above would fail on it."""
    from flashmem.cache import FlashMemCache

    model, stats = model_stats
    original = FlashMemCache._attend_decode

    def attend(self, layer_idx, query, scaling):
        query.sum().item()
        return original(self, layer_idx, query, scaling)

    monkeypatch.setattr(FlashMemCache, "_attend_decode", attend)
    prompt = torch.randint(0, 128, (1, 400), generator=torch.Generator().manual_seed(1))
    _, syncs, _ = flashmem_step_counts(model, _config(stats), prompt, steps=32)
    assert syncs > 1.1


def test_cuda_graph_is_refused_off_cuda(model_stats):
    model, stats = model_stats
    config = _config(stats, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True .* needs the model on a CUDA device"):
        flashmem.wrap(model, config)


def test_decode_step_bench_skips_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: bench/gpu_check.sh runs the bench")
    from bench import decode_step

    assert decode_step.main([]) == 0
    assert "skipped" in capsys.readouterr().out


def test_default_loads_each_window_at_its_boundary():
    """By default one recall window is on the device (select, copy and wait at the boundary); a
    prefetch is asked for, and holds a second window while it overlaps the current one."""
    assert flashmem.FlashMemConfig().prefetch_steps == 0
    assert flashmem.FlashMemConfig(budget_tokens=256).recall_windows_held == 1
    assert (
        flashmem.FlashMemConfig(lookahead=8, prefetch_steps=4, recall_mode="shared").recall_windows_held == 2
    )
    assert flashmem.FlashMemConfig(lookahead=1).prefetch_steps == 0
    with pytest.raises(ValueError, match="prefetch_steps"):
        flashmem.FlashMemConfig(lookahead=8, prefetch_steps=8)
