"""Shared fixtures of the wrapper tests."""

import pytest
import torch

from flashmem.calibration import calibrate
from flashmem.testing import tiny_model


@pytest.fixture(scope="module")
def model_and_stats(tmp_path_factory):
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16, vocab=128)
    ids = torch.randint(0, 128, (600,), generator=torch.Generator().manual_seed(0))
    stats = calibrate(model, ids, max_tokens=600, window=300, progress=False)
    path = tmp_path_factory.mktemp("stats") / "tiny.safetensors"
    stats.save(path)
    return model, str(path)
