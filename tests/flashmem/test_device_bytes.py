"""Every device byte the wrapper holds is counted: memory_report()["device_bytes"] against an
independent count of the tensors reachable from the wrapper (the model's own weights and the host
side, the mirror and pinned staging, left out)."""

import math

import pytest
import torch

import flashmem


def _reachable_device_bytes(fm, device) -> dict[str, int]:
    """Bytes of the distinct tensor storages on ``device`` reachable from ``fm``'s attributes, by the
    attribute path they were first found under; the model, the host mirror and the transfer engine's
    host staging buffers are not walked (host memory, even where the "device" is the CPU)."""
    skip = {id(fm.model)}
    if fm.mirror is not None:
        skip.add(id(fm.mirror))
    seen_objects, seen_storages = set(), set()
    found: dict[str, int] = {}
    stack = [("fm", fm)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen_objects or id(obj) in skip:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device != device or obj.is_pinned():
                continue
            storage = obj.untyped_storage()
            if storage.data_ptr() in seen_storages:
                continue
            seen_storages.add(storage.data_ptr())
            found[path] = storage.nbytes()
            continue
        if isinstance(obj, torch.nn.Module):  # a learned indexer: its weights and buffers
            stack.extend((f"{path}.{k}", v) for k, v in obj.state_dict(keep_vars=True).items())
            continue
        if type(obj).__name__ == "_Staging":
            continue  # the transfer engine's host staging buffers (page-locked on CUDA)
        if isinstance(obj, dict):
            stack.extend((f"{path}[{k!r}]", v) for k, v in obj.items())
        elif isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(obj))
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("flashmem"):
            stack.extend((f"{path}.{k}", v) for k, v in vars(obj).items())
        elif hasattr(obj, "__slots__") and type(obj).__module__.startswith("flashmem"):
            stack.extend((f"{path}.{k}", getattr(obj, k)) for k in obj.__slots__ if hasattr(obj, k))
    return found


def _check(fm, tolerance: float) -> dict:
    report = fm.memory_report()
    parts = report["device_bytes"]
    assert set(parts) >= {"kv", "kv_reserved", "index", "staging", "scratch_peak", "total", "peak_total"}
    assert parts["total"] == parts["kv_reserved"] + parts["index"] + parts["staging"] + parts["outputs"]
    assert parts["peak_total"] >= parts["total"] and parts["peak_total"] >= parts["scratch_peak"]
    pool = fm.pool
    positions = pool.num_layers * pool.num_blocks * pool.block_size * pool.num_kv_heads * 4  # int32
    assert parts["kv"] == report["device_kv_bytes"] <= parts["kv_reserved"]
    assert parts["kv_reserved"] == report["pool_capacity_bytes"] + positions
    found = _reachable_device_bytes(fm, fm.device)
    counted = sum(found.values())
    assert abs(counted - parts["total"]) <= tolerance * counted, (
        parts,
        sorted(found.items(), key=lambda x: -x[1])[:12],
    )
    full = report["full_kv_bytes"]
    assert report["device_share"] == pytest.approx(parts["total"] / full)
    assert report["peak_device_share"] == pytest.approx(parts["peak_total"] / full)
    return report


@pytest.mark.parametrize(
    "indexer, recall_mode", [("quest", "shared"), ("quest", "per_layer_per_head"), ("none", "shared")]
)
def test_total_equals_an_independent_count(model_and_stats, indexer, recall_mode):
    model, stats = model_and_stats
    config = flashmem.FlashMemConfig(
        budget_tokens=64,
        stats_path=stats,
        chunk_size=16,
        recent_tokens=16,
        indexer=indexer,
        index_candidates=0,
        recall_mode=recall_mode,
    )
    fm = flashmem.wrap(model, config)
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(5))
    fm.generate(ids, 40, eos_token_id=None)
    report = _check(fm, tolerance=0.0)
    parts = report["device_bytes"]
    if indexer == "quest":
        assert parts["index"] > 0
    # scratch: the exact prefill held one layer's prompt K/V and the hidden states of the prompt
    layer_kv = 2 * 700 * 2 * 16 * 4
    hidden = 700 * model.config.hidden_size * 4
    assert parts["scratch_peak"] >= layer_kv + hidden
    assert parts["peak_total"] >= parts["scratch_peak"] + math.ceil(64 / 16) * report["kv_block_bytes"]


@pytest.mark.slow
def test_default_model_total_within_5_percent_of_the_count():
    model, tok = flashmem.load_default_model()
    ids, _ = flashmem.local_text_token_ids(tok, 6700, skip_files=40)
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(budget_tokens=256))
    fm.generate(ids[None], 65, eos_token_id=None, progress=False)
    _check(fm, tolerance=0.05)
