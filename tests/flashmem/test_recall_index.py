"""Recall's device index: only the fields the indexer reads, in the model's dtype, counted byte for
byte by ``RecallController.device_bytes()``."""

import pytest
import torch

import flashmem
from flashmem.indexer.lookahead import LookaheadConfig, LookaheadIndexer
from flashmem.recall import RecallController
from flashmem.testing import tiny_model


def _walk_tensors(obj, found, seen, skip=("model",)):
    """Every tensor reachable from ``obj``'s attributes (lists, dicts, objects; a module's parameters
    and buffers), without entering the model recall scores for."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, torch.nn.Module):
        found.extend(obj.parameters())
        found.extend(obj.buffers())
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk_tensors(v, found, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _walk_tensors(v, found, seen)
    elif type(obj).__module__.startswith("flashmem"):
        for k, v in vars(obj).items():
            if k not in skip:
                _walk_tensors(v, found, seen)


def independent_count(recall, device):
    found = []
    _walk_tensors(recall, found, set())
    storages = {}
    for t in found:
        if t.device == torch.device(device):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _config(stats, **kw):
    base = dict(
        budget_tokens=48,
        compaction_interval=16,
        recent_tokens=16,
        sink_tokens=4,
        stats_path=stats,
        chunk_size=16,
        chunk_budget=2,
    )
    base.update(kw)
    return flashmem.FlashMemConfig(**base)


@pytest.mark.parametrize("indexer,index_candidates", [("quest", 0), ("mean_key", 0), ("quest", 3)])
def test_device_bytes_is_every_tensor_recall_holds(model_and_stats, indexer, index_candidates):
    model, stats = model_and_stats
    fm = flashmem.wrap(model, _config(stats, indexer=indexer, index_candidates=index_candidates))
    ids = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(0))
    fm.generate(ids, 40, eos_token_id=None)
    recall = fm.recall
    assert recall.refreshes > 0
    total = recall.device_bytes()
    assert total == independent_count(recall, "cpu")
    parts = recall.device_bytes_by_part()
    assert sum(parts.values()) == total
    L, H, D = fm.num_layers, fm.num_kv_heads, fm.head_dim
    esz = torch.empty((), dtype=fm.dtype).element_size()
    n_fields = {"quest": 2, "mean_key": 1}[indexer]
    # per chunk and KV head: quest's bounds as two int8 codes per dimension and one fp32 scale; the mean
    # key in the model's dtype
    per_chunk_head = {"quest": 2 * D + 4, "mean_key": D * esz}[indexer]
    cap = recall.builders[0].capacity_chunks
    assert recall.builders[0].num_chunks == (150 + 39) // 16 <= cap
    # summaries: the indexer's fields only, plus chunk starts and the open chunk's running state (one
    # [H, D] per computed field, in the model's dtype (fp32 here): the chunk index's mean key is computed,
    # not stored)
    running = n_fields + (index_candidates > 0)
    assert parts["summaries"] == L * (cap * (H * per_chunk_head + 8) + running * H * D * 4)
    # the latest query per layer, not the step's whole query tensor
    assert parts["queries"] == L * fm.num_q_heads * D * esz
    assert parts["rotary"] == 2 * D * 4  # this (decode) step's cos/sin
    if index_candidates:
        assert parts["chunk_index"] == L * recall.indexes[0].tensors()[0].shape[0] * H * D * esz
        assert recall.builders[0].summaries.mean_key_rope is None  # the index holds its own vectors
    else:
        assert parts["chunk_index"] == 0


def test_queries_after_a_prefill_tile_are_copies(model_and_stats):
    """After the exact prefill, recall holds ``[L, H_q, D]`` queries, not views that pin each layer's
    ``[1, H_q, T, D]`` prefill query, and one position's cos/sin, not the last tile's ``[T, D]``."""
    model, stats = model_and_stats
    fm = flashmem.wrap(model, _config(stats, indexer="quest"))
    ids = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(1))
    fm.generate(ids, 1, eos_token_id=None)  # prefill only: the first token comes from its logits
    parts = fm.recall.device_bytes_by_part()
    assert parts["queries"] == fm.num_layers * fm.num_q_heads * fm.head_dim * 4
    assert parts["rotary"] == 2 * fm.head_dim * 4  # the last position's cos/sin, not the last tile's
    assert fm.recall.device_bytes() == independent_count(fm.recall, "cpu")


def test_learned_indexer_stores_compressed_keys_not_mean_keys():
    model = tiny_model("llama", layers=2, q_heads=4, kv_heads=2, head_dim=16, vocab=128)
    look = LookaheadIndexer(LookaheadConfig(num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=16, rank=8))
    recall = RecallController(
        model,
        [look.for_layer(i) for i in range(2)],
        num_kv_heads=2,
        head_dim=16,
        chunk_size=16,
        chunk_budget=2,
        sink_tokens=4,
        recent_tokens=16,
        device=torch.device("cpu"),
        capacity_tokens=200,
    )
    assert recall.fields == ("compressed", "max_key", "mean_key_rope", "min_key")
    g = torch.Generator().manual_seed(0)
    for start, n in [(0, 100), (100, 1), (101, 60)]:
        recall.begin_step(torch.arange(start, start + n))
        for layer in range(2):
            recall.on_keys(layer, torch.randn(n, 2, 16, generator=g))
            recall.on_query(layer, torch.randn(4, 16, generator=g))
    b = recall.builders[0]
    assert b.num_chunks == 10 and b.capacity_chunks == 12 and b.growths == 0  # sized once (200 // 16)
    s = b.summaries
    assert s.mean_key is None and s.compressed.shape == (10, 2, 8)
    assert len(recall.select(161)) == 2
    parts = recall.device_bytes_by_part()
    # mean_key_rope [12, 2, 16] and compressed [12, 2, 8] in fp32, min and max [12, 2, 16] in int8 with one
    # fp32 scale [12, 2], + starts + the open chunk's sums and bounds
    per_layer = 12 * (2 * 16 * 4 + 2 * 16 * 2 + 2 * 4 + 2 * 8 * 4 + 8) + 4 * 2 * 16 * 4
    assert parts["summaries"] == 2 * per_layer
    assert parts["indexer_weights"] == sum(p.numel() * 4 for p in look.parameters())
    assert recall.device_bytes() == independent_count(recall, "cpu")
