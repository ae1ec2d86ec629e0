import pytest
import torch

from flashmem.indexer.chunk_index import (
    FaissChunkIndex,
    TorchChunkIndex,
    fold_query_for_heads,
    make_chunk_index,
)
from flashmem.indexer.heuristics import QueryState, get_indexer
from flashmem.indexer.summaries import ChunkSummaryBuilder, summarize_chunks


def _keys(T=203, H=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, D, generator=g), torch.randn(T, H, D, generator=g)


def test_summaries_match_direct_computation():
    kr, kp = _keys()
    s = summarize_chunks(kr, kp, chunk_size=16, start_position=32)
    assert s.num_chunks == 203 // 16
    for c in range(s.num_chunks):
        sl = slice(16 * c, 16 * (c + 1))
        for h in range(2):
            torch.testing.assert_close(s.mean_key[c, h], kp[sl, h].mean(0))
            torch.testing.assert_close(s.mean_key_rope[c, h], kr[sl, h].mean(0))
            for d in range(8):
                assert s.min_key[c, h, d] == min(kr[sl, h, d].tolist())
                assert s.max_key[c, h, d] == max(kr[sl, h, d].tolist())
        assert s.start[c] == 32 + 16 * c


def test_builder_incremental_equals_batch():
    kr, kp = _keys()
    b = ChunkSummaryBuilder(num_kv_heads=2, head_dim=8, chunk_size=16)
    closed = 0
    for lo, hi in [(0, 5), (5, 40), (40, 41), (41, 203)]:
        closed += b.append(kr[lo:hi], kp[lo:hi])
    assert closed == b.num_chunks == 12 and b.num_tokens == 203
    ref = summarize_chunks(kr, kp, 16)
    for name in ("mean_key", "mean_key_rope", "min_key", "max_key", "start"):
        torch.testing.assert_close(getattr(b.summaries, name), getattr(ref, name))
    with pytest.raises(ValueError):
        b.append(kr[:3, :1], kp[:3, :1])


def test_quest_bound_is_upper_bound_and_mean_key_is_mean_logit():
    kr, kp = _keys(T=64, H=1, D=8)
    s = summarize_chunks(kr, kp, 16)
    q = torch.randn(1, 8)
    qs = QueryState(q_pre=q, q_rope=q, position=64)
    bound = get_indexer("quest", head_reduce="max").score(qs, s)
    mean = get_indexer("mean_key", head_reduce="max").score(qs, s)
    for c in range(4):
        logits = kr[16 * c : 16 * (c + 1), 0] @ q[0]
        assert bound[c] >= logits.max() - 1e-5
        torch.testing.assert_close(mean[c], logits.mean())
    assert get_indexer("recency").score(qs, s).argmax() == 3
    with pytest.raises(ValueError):
        get_indexer("nope")


@pytest.mark.parametrize("nlist", [None, 4])
def test_torch_and_faiss_agree(nlist):
    pytest.importorskip("faiss")
    torch.manual_seed(0)
    dim, n = 24, 500
    vecs = torch.randn(n, dim)
    queries = torch.randn(7, dim)
    ti = make_chunk_index("torch", dim, capacity=8)
    fi = FaissChunkIndex(dim, nlist=nlist, nprobe=4)  # nprobe = nlist: IVF search is exhaustive
    for lo in range(0, n, 130):
        ti.add(vecs[lo : lo + 130])
        fi.add(vecs[lo : lo + 130])
    assert len(ti) == len(fi) == n
    ts, tids = ti.search(queries, 10)
    fs, fids = fi.search(queries, 10)
    assert torch.equal(tids, fids)
    torch.testing.assert_close(ts, fs, rtol=1e-5, atol=1e-5)
    assert torch.equal(tids, torch.topk(queries @ vecs.T, 10).indices)


def test_chunk_index_errors_and_fold():
    ti = TorchChunkIndex(4)
    with pytest.raises(ValueError):
        ti.add(torch.randn(3, 5))
    with pytest.raises(ValueError):
        make_chunk_index("annoy", 4)
    q = torch.randn(6, 8)  # 6 query heads, 2 KV heads
    k = torch.randn(5, 2, 8)
    direct = torch.stack([sum(q[h] @ k[c, h // 3] for h in range(6)) for c in range(5)])
    torch.testing.assert_close(k.reshape(5, -1) @ fold_query_for_heads(q, 2), direct)
