"""Default model under a 256-token budget for 1,000 decoded tokens (slow: minutes on a CPU)."""

import math

import pytest
import torch

import flashmem
from flashmem.prompts import fillers_for_tokens, passkey_prompt

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("indexer", ["none", "auto"])
def test_budget_256_for_1000_tokens(indexer):
    model, tok = flashmem.load_default_model()
    prompt = passkey_prompt(fillers_for_tokens(tok, 300), 0.5, seed=0)
    ids = tok(prompt.text, return_tensors="pt").input_ids
    n = ids.shape[1]
    full = flashmem.wrap(model, flashmem.FlashMemConfig()).generate(ids, 1000, eos_token_id=None)
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(budget_tokens=256, indexer=indexer))
    out = fm.generate(ids, 1000, eos_token_id=None)
    r = fm.memory_report()
    # budget + compaction interval + window + sinks, rounded up to whole blocks
    bound = math.ceil((256 + 128 + 128 + 4) / 16) * 16 * r["kv_bytes_per_token"]
    assert r["peak_device_kv_bytes"] <= bound
    assert r["blocks_freed"] > 0 and r["compactions"] >= 7
    generated, reference = out[0, n:], full[0, n:]
    assert generated.shape == reference.shape == (1000,)
    # until the cache first reaches budget + interval (384 slots) nothing is evicted, and recalled
    # chunks duplicate resident tokens (masked): those tokens equal full attention exactly
    assert n < 256 + 128
    exact = 256 + 128 - n
    assert torch.equal(generated[:exact], reference[:exact])
    agreement = (generated == reference).float().mean().item()
    print(f"indexer={indexer}: top-1 agreement with full attention {agreement:.3f}, report {r}")
    assert agreement > 0.5
