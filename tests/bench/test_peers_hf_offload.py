"""The Hugging Face offloaded-cache peer's decode loop: on CPU it runs as plain full attention
(offloading off) and must equal the shared full-attention loop; offloading itself needs CUDA."""

import pytest
import torch

from bench import common
from bench.peers import hf_offload
from flashmem.testing import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=3, seed=4)


def test_full_attention_loop_matches_shared_loop(model):
    ids = torch.randint(0, model.config.vocab_size, (1, 37), generator=torch.Generator().manual_seed(2))
    ref = common.hf_decode(model, ids, 9, collect_logits=False)
    got = hf_offload.hf_cache_decode(model, ids, 9, offloading=False)
    assert got["tokens"] == ref["tokens"]
    assert len(got["step_s"]) == 8 and len(got["device_kv_trace"]) == 8
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # K and V, fp32
    # the cache holds T + steps - 1 tokens at the end, all of them on the (CPU) device
    assert got["full_kv_bytes_end"] == (37 + 8) * per_token
    assert got["device_kv_bytes_end"] == got["full_kv_bytes_end"]
    assert got["device_kv_trace"] == [(37 + k) * per_token for k in range(1, 9)]
    assert got["device_share_end"] == 1.0


def test_offloading_refused_without_cuda_before_work(model):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the offloaded cache can run here")
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        hf_offload.hf_cache_decode(model, ids, 3, offloading=True)
    assert "no CUDA" in hf_offload.skip_reason()


def test_bad_arguments(model):
    with pytest.raises(ValueError, match=r"\[1, T\]"):
        hf_offload.hf_cache_decode(model, torch.zeros(2, 5, dtype=torch.long), 3, offloading=False)
    with pytest.raises(ValueError, match="steps"):
        hf_offload.hf_cache_decode(model, torch.zeros(1, 5, dtype=torch.long), 0, offloading=False)
