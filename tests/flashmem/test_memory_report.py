"""memory_report() figures equal an independent count from the block pool."""

import math

import torch

import flashmem
from flashmem.testing import tiny_model


def test_report_matches_independent_pool_count():
    model = tiny_model("qwen2", layers=3, q_heads=4, kv_heads=2, head_dim=16)
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(block_size=16))
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(0))
    fm.generate(ids, 20, eos_token_id=None)
    report = fm.memory_report()
    pool = fm.pool

    # independent count: blocks referenced by the sequence's table, and the allocator's free list
    table = fm.cache.paged.block_table(fm.cache.seq_id)
    in_use = [b for b in range(pool.num_blocks) if pool.is_allocated(b)]
    assert sorted(table) == in_use
    assert report["blocks_in_use"] == len(in_use) == pool.num_blocks - pool.num_free

    # bytes from first principles: layers x (K+V) x block_size x H_kv x D x element size
    elem = torch.empty((), dtype=model.dtype).element_size()
    block_bytes = 3 * 2 * 16 * 2 * 16 * elem
    assert report["kv_block_bytes"] == block_bytes
    assert report["device_kv_bytes"] == len(in_use) * block_bytes
    tokens = 50 + 19  # the last generated token is never fed back
    assert report["logical_tokens"] == tokens == report["device_slots"]
    assert len(in_use) == math.ceil(tokens / 16)
    assert report["full_kv_bytes"] == tokens * 3 * 2 * 2 * 16 * elem
    assert report["peak_pool_kv_bytes"] == pool.peak_blocks_in_use * block_bytes
    # the exact prefill held one layer's prompt K/V ([H_kv, T, D] each) beside the pool's prompt blocks
    prefill_buffer = 2 * 2 * 50 * 16 * elem
    assert report["peak_device_kv_bytes"] == max(
        pool.peak_blocks_in_use * block_bytes, math.ceil(50 / 16) * block_bytes + prefill_buffer
    )
    assert report["blocks_freed"] == 0
    assert report["host_kv_bytes"] == 0
    # the K/V tensors the pool really holds: capacity = every block of every layer
    held = sum(
        k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in zip(pool.keys, pool.values)
    )
    assert report["pool_capacity_bytes"] == held


def test_report_before_generate_is_an_error():
    fm = flashmem.wrap(tiny_model("llama"), flashmem.FlashMemConfig())
    try:
        fm.memory_report()
    except RuntimeError as e:
        assert "after generate" in str(e)
    else:
        raise AssertionError("memory_report() before generate() must raise")
