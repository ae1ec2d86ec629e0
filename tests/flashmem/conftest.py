"""Shared fixtures of the wrapper tests."""

import pytest
import torch

import flashmem
from flashmem.calibration import calibrate
from flashmem.testing import tiny_model


@pytest.fixture(scope="module")
def model_and_stats(tmp_path_factory):
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16, vocab=128)
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids, max_tokens=600, tokens_per_forward=300, progress=False)
    path = tmp_path_factory.mktemp("stats") / "tiny.safetensors"
    stats.save(path)
    return model, str(path)


@pytest.fixture(scope="module")
def budget_config(model_and_stats):
    """``make(*presets, **overrides) -> FlashMemConfig`` for the tiny model under a small budget:
    48 tokens kept, compacted every 16, a 16-token window, 4 sinks, 16-token chunks, the fixture's
    stats; preset dicts, then keywords, override those."""
    stats = model_and_stats[1]

    def make(*presets: dict, **overrides) -> flashmem.FlashMemConfig:
        settings = dict(
            budget_tokens=48,
            compaction_interval=16,
            recent_tokens=16,
            sink_tokens=4,
            stats_path=stats,
            chunk_size=16,
        )
        for preset in presets:
            settings.update(preset)
        settings.update(overrides)
        return flashmem.FlashMemConfig(**settings)

    return make


def _dense_generate(model, ids, n):
    """Hugging Face greedy generate with its default ``DynamicCache``: (sequences ``[1, T + n]``,
    logits ``[n, vocab]``)."""
    out = model.generate(
        ids,
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out.sequences, torch.stack([lg[0] for lg in out.logits])


@pytest.fixture
def dense_generate():
    """The reference every exactness test compares flashmem with (see :func:`_dense_generate`)."""
    return _dense_generate
