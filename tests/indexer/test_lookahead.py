import math

import pytest
import torch

from flashmem.files import load_indexer
from flashmem.hf_compat import model_fingerprint
from flashmem.indexer.evaluate import evaluate_records, refresh_cost
from flashmem.indexer.heuristics import QueryState
from flashmem.indexer.lookahead import LookaheadConfig, LookaheadIndexer, distance_buckets, select_chunks
from flashmem.indexer.records import TargetConfig
from flashmem.indexer.summaries import summarize_chunks
from flashmem.indexer.train import fit
from flashmem.indexer_data import extract_document


def _tiny(layers=2, heads=4, kv=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=100,
        max_position_embeddings=2048,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharpen attention so that chunks differ in mass
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


TCFG = TargetConfig(chunk_size=16, tau=16, first_refresh=128, refresh_stride=48, recent_tokens=32)


@pytest.fixture(scope="module")
def tiny_records():
    model = _tiny()
    g = torch.Generator().manual_seed(1)
    recs = [
        extract_document(model, torch.randint(0, 100, (400,), generator=g), TCFG, name=f"d{i}")
        for i in range(3)
    ]
    return model, recs


def test_record_shapes(tiny_records):
    model, recs = tiny_records
    r = recs[0]
    L, R, N = 2, len(TCFG.refresh_positions(400)), 400 // 16
    assert r.q_pre.shape == (L, R, 4, 16) and r.mean_key.shape == (L, N, 2, 16)
    assert r.target.shape == (L, R, N) and r.labels.shape == (L, R, N)
    torch.testing.assert_close(r.target.sum(-1), torch.ones(L, R))


def test_scores_match_between_batched_and_layer_view(tiny_records):
    model, recs = tiny_records
    rec = recs[0]
    c = LookaheadConfig(2, 4, 2, 16, rank=8, chunk_size=16, tau=16)
    idx = LookaheadIndexer(c).eval()
    with torch.no_grad():
        idx.e.normal_()  # exercise the Quest-bound term
    summ = rec.summaries(1)
    z = idx.logits(
        1,
        rec.q_pre[1],
        rec.q_rope[1],
        rec.refresh,
        summ.mean_key_rope,
        idx.compress(1, summ.mean_key),
        summ.start,
        bounds=(summ.min_key, summ.max_key),
    )
    for r in range(len(rec.refresh)):
        q = QueryState(rec.q_pre[1, r], rec.q_rope[1, r], position=int(rec.refresh[r]))
        s = idx.for_layer(1).score(q, summ)
        torch.testing.assert_close(s, torch.sigmoid(z[r]), rtol=1e-5, atol=1e-6)
        assert s.shape == (summ.num_chunks,) and ((s > 0) & (s < 1)).all()


def test_training_improves_over_init_and_roundtrips(tiny_records, tmp_path):
    model, recs = tiny_records
    c = LookaheadConfig(2, 4, 2, 16, rank=8, chunk_size=16, tau=16)
    idx = LookaheadIndexer(c, fingerprint=model_fingerprint(model))
    idx.init_from_keys(torch.cat([r.mean_key for r in recs], dim=1))
    before = evaluate_records(recs, 0.2, names=["lookahead"], lookahead=idx)["lookahead"]["covered_mass"]
    hist = fit(idx, recs, recs, steps=30, lr=1e-2, budget=0.2, eval_every=10, progress=False)
    after = evaluate_records(recs, 0.2, names=["lookahead", "oracle"], lookahead=idx)
    assert after["lookahead"]["covered_mass"] >= before
    assert after["lookahead"]["covered_mass"] <= after["oracle"]["covered_mass"] + 1e-6
    assert hist["best_val_covered_mass"] == pytest.approx(after["lookahead"]["covered_mass"])

    path, meta = idx.save(tmp_path / "ix.safetensors", extra={"note": "t"})
    assert path.is_file() and meta.is_file()
    back = load_indexer(path, model_fingerprint(model))
    for k, v in idx.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    again = evaluate_records(recs, 0.2, names=["lookahead"], lookahead=back)
    assert again["lookahead"]["covered_mass"] == after["lookahead"]["covered_mass"]

    other = _tiny(layers=3)
    with pytest.raises(ValueError, match="another model"):
        load_indexer(path, model_fingerprint(other))
    with pytest.raises(FileNotFoundError):
        load_indexer(tmp_path / "missing.safetensors")


def test_select_chunks_keeps_sinks_and_tail():
    scores = torch.tensor([0.0, 0.9, 0.1, 0.8, 0.7, 0.2, 0.95, 0.3, 0.1, 0.1])
    # position 640, chunk 64, recent 128 -> tail from chunk 8; sinks: chunk 0
    ids = select_chunks(scores, 640, 64, budget=2, num_sink_chunks=1, recent_tokens=128)
    assert ids.tolist() == [0, 1, 6, 8, 9]
    ids = select_chunks(scores, 640, 64, threshold=0.75)
    assert ids.tolist() == [0, 1, 3, 6, 8, 9]
    ids = select_chunks(scores, 640, 64, budget=1, threshold=0.75)
    assert ids.tolist() == [0, 6, 8, 9]
    with pytest.raises(ValueError):
        select_chunks(scores, 640, 64)


def test_distance_buckets_and_config_errors():
    start = torch.arange(5) * 64
    b = distance_buckets(5 * 64, start, 64)
    assert b.tolist() == [int(math.log2(1 + g)) for g in [4, 3, 2, 1, 0]]
    with pytest.raises(ValueError, match="multiple"):
        LookaheadConfig(2, 5, 2, 16)
    with pytest.raises(ValueError, match="rank"):
        LookaheadConfig(2, 4, 2, 16, rank=0)


def test_refresh_cost_reports_flops():
    idx = LookaheadIndexer(LookaheadConfig(2, 4, 2, 16, rank=8))
    cost = refresh_cost(idx, num_chunks=1000, repeats=1)
    assert cost["flops_per_refresh_all_layers"] > 1000 * 4 * 24 * 2 * 2 - 1
    assert cost["cpu_seconds_per_refresh_all_layers"] > 0


def test_compressed_key_in_summaries():
    idx = LookaheadIndexer(LookaheadConfig(1, 4, 2, 16, rank=8))
    kr = torch.randn(64, 2, 16)
    s = idx.for_layer(0).compress(summarize_chunks(kr, kr, 16))
    assert s.compressed.shape == (4, 2, 8)
    torch.testing.assert_close(s.compressed[2, 1], s.mean_key[2, 1] @ idx.Wk[0, 1].detach())
