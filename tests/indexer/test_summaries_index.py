import pytest
import torch

from flashmem.indexer.chunk_index import (
    FaissChunkIndex,
    TorchChunkIndex,
    fold_query_for_heads,
    make_chunk_index,
)
from flashmem.indexer.heuristics import QueryState, get_indexer
from flashmem.indexer.summaries import ChunkSummaries, ChunkSummaryBuilder, summarize_chunks


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
        assert s.start[c] == 32 + 16 * c
    # the bounds: int8 codes, one scale per chunk and head, rounded outward by at most one step
    assert s.min_key.dtype == s.max_key.dtype == torch.int8 and s.bound_scale.shape == (s.num_chunks, 2)
    lo, hi = s.bounds()
    blocks = kr[: 16 * s.num_chunks].reshape(s.num_chunks, 16, 2, 8)
    true_lo, true_hi = blocks.amin(1), blocks.amax(1)
    step = s.bound_scale[..., None]
    assert (lo <= true_lo).all() and (hi >= true_hi).all()
    assert (true_lo - lo <= step * 1.0001).all() and (hi - true_hi <= step * 1.0001).all()
    amax = torch.maximum(true_lo.abs(), true_hi.abs()).amax(-1)
    torch.testing.assert_close(s.bound_scale, amax / 126)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantized_bounds_are_outward_on_hard_values(dtype):
    """Exact multiples of the scale, zeros, a row of zeros, equal bounds, tiny and huge magnitudes: the
    dequantized bounds (computed in fp32 as ChunkSummaries.bounds does) still enclose the float bounds,
    every code fits int8, and a row of zeros keeps scale 1."""
    from flashmem.indexer.summaries import quantize_bounds

    g = torch.Generator().manual_seed(5)
    lo = torch.randn(64, 3, 16, generator=g) * torch.logspace(-6, 4, 64)[:, None, None]
    hi = lo + torch.rand(64, 3, 16, generator=g) * lo.abs()
    lo[0], hi[0] = 0.0, 0.0  # a row of zeros
    lo[1, :, :4] = hi[1, :, :4] = 1.0  # equal bounds
    amax = torch.maximum(lo[2].abs(), hi[2].abs()).amax(-1, keepdim=True)
    lo[2], hi[2] = (torch.arange(16) - 8.0) * amax / 126, (torch.arange(16) - 7.0) * amax / 126  # multiples
    lo, hi = lo.to(dtype), hi.to(dtype)
    lo_c, hi_c, scale = quantize_bounds(lo, hi)
    assert lo_c.dtype == hi_c.dtype == torch.int8 and scale.dtype == torch.float32
    assert (lo_c.float() * scale[..., None] <= lo.float()).all()
    assert (hi_c.float() * scale[..., None] >= hi.float()).all()
    assert lo_c.min() >= -127 and hi_c.max() <= 127
    assert (scale[0] == 1).all() and (lo_c[0] == 0).all() and (hi_c[0] == 0).all()


def test_builder_incremental_equals_batch():
    kr, kp = _keys()
    b = ChunkSummaryBuilder(num_kv_heads=2, head_dim=8, chunk_size=16)
    closed = 0
    for lo, hi in [(0, 5), (5, 40), (40, 41), (41, 203)]:
        closed += b.append(kr[lo:hi], kp[lo:hi])
    assert closed == b.num_chunks == 12 and b.num_tokens == 203
    ref = summarize_chunks(kr, kp, 16)
    for name in ("mean_key", "mean_key_rope", "min_key", "max_key", "bound_scale", "start"):
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


# ---- fields, model dtype, in-place storage ---------------------------------------------------------
def _chunked_append(builder, kr, kp, sizes=(1, 3, 70, 1, 1, 200)):
    """Append ``kr``/``kp`` in uneven pieces (single tokens like decode, tiles like prefill)."""
    lo, i = 0, 0
    while lo < kr.shape[0]:
        hi = min(kr.shape[0], lo + sizes[i % len(sizes)])
        builder.append(kr[lo:hi], None if kp is None else kp[lo:hi])
        lo, i = hi, i + 1


def test_indexers_declare_fields_and_builder_stores_only_those():
    from flashmem.indexer.lookahead import LookaheadConfig, LookaheadIndexer

    look = LookaheadIndexer(LookaheadConfig(num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=8, rank=4))
    declared = {
        "quest": ("min_key", "max_key"),
        "mean_key": ("mean_key_rope",),
        "mean_key_prerope": ("mean_key",),
        "recency": (),
    }
    for name, fields in declared.items():
        assert get_indexer(name).fields == fields
    assert look.for_layer(0).fields == ("mean_key_rope", "min_key", "max_key", "compressed")
    kr, kp = _keys(T=200, D=8)
    q = torch.randn(4, 8)
    qs = QueryState(q_pre=q, q_rope=q, position=200)
    full = summarize_chunks(kr, kp, 16)
    for name, fields in declared.items():
        b = ChunkSummaryBuilder(2, 8, chunk_size=16, fields=fields)
        _chunked_append(b, kr, kp if b.needs_pre_rope else None)
        s = b.summaries
        for f in ("mean_key", "mean_key_rope", "min_key", "max_key", "compressed"):
            assert (getattr(s, f) is not None) == (f in fields), (name, f)
        assert b.needs_pre_rope == (name == "mean_key_prerope")
        # the stored bytes are the declared fields only: [capacity, H, D] each (fp32 means; int8 bounds
        # and one fp32 scale per head), the int64 chunk starts, and one [H, D] running sum or bound per
        # field for the open chunk
        bounds = len([f for f in fields if f in ("min_key", "max_key")])
        per_chunk = 2 * 8 * 4 * (len(fields) - bounds) + 2 * 8 * bounds + 2 * 4 * (bounds > 0)
        assert sum(t.untyped_storage().nbytes() for t in b.tensors()) == b.capacity_chunks * (
            per_chunk + 8
        ) + 2 * 8 * 4 * len(fields)
        torch.testing.assert_close(get_indexer(name).score(qs, s), get_indexer(name).score(qs, full))
    layer = look.for_layer(0)
    b = ChunkSummaryBuilder(2, 8, chunk_size=16, fields=layer.fields, compress=layer.compress_mean_key)
    _chunked_append(b, kr, kp)
    assert b.summaries.mean_key is None and b.summaries.compressed.shape == (12, 2, 4)
    torch.testing.assert_close(layer.score(qs, b.summaries), layer.score(qs, full), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="min_key"):
        get_indexer("quest").score(qs, ChunkSummaries(None, full.mean_key_rope, None, None, full.start, 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_dtype_summaries_score_like_fp32(dtype):
    """Summaries stored in the keys' dtype (means accumulated in fp32, rounded once) rank and score the
    chunks like fp32 summaries of the same keys."""
    from flashmem.indexer.lookahead import LookaheadConfig, LookaheadIndexer

    g = torch.Generator().manual_seed(1)
    T, H, D, C = 64 * 96, 2, 32, 64
    per_chunk = torch.randn(T // C, H, D, generator=g).repeat_interleave(C, 0)  # chunks that differ
    kr = torch.randn(T, H, D, generator=g) + per_chunk
    kp = torch.randn(T, H, D, generator=g) + 0.5
    kr, kp = kr.to(dtype), kp.to(dtype)
    look = LookaheadIndexer(LookaheadConfig(num_layers=1, num_q_heads=8, num_kv_heads=H, head_dim=D, rank=8))
    look.e.data.fill_(0.5)
    indexers = [get_indexer(n) for n in ("quest", "mean_key", "mean_key_prerope")] + [look.for_layer(0)]
    for ix in indexers:
        comp = getattr(ix, "compress_mean_key", None)
        low = ChunkSummaryBuilder(H, D, chunk_size=C, fields=ix.fields, compress=comp)
        ref = ChunkSummaryBuilder(H, D, chunk_size=C, fields=ix.fields, compress=comp, dtype=torch.float32)
        for b in (low, ref):  # token by token first (decode), then tiles (prefill)
            _chunked_append(
                b, kr if b is low else kr.float(), kp if b is low else kp.float(), (1,) * 300 + (500,)
            )
        for f in ix.fields:  # means in the keys' dtype, bounds as int8 codes
            assert getattr(low.summaries, f).dtype == (torch.int8 if f in ("min_key", "max_key") else dtype)
        worst = 0.0
        for seed in range(8):
            q = torch.randn(8, D, generator=torch.Generator().manual_seed(seed))
            qs = QueryState(q_pre=q, q_rope=q, position=T)
            a, b = ix.score(qs, low.summaries), ix.score(qs, ref.summaries)
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=5e-3, atol=1e-5)
            worst = max(worst, ((a - b).abs() / b.abs().clamp_min(1e-6)).max().item())
            top_a, top_b = set(torch.topk(a, 16).indices.tolist()), set(torch.topk(b, 16).indices.tolist())
            assert len(top_a & top_b) >= 15, (ix.name, seed)
        # bounds of low-precision keys are exact in that precision, so their int8 codes agree too
        if ix.name == "quest":
            assert worst < 1e-6


def test_builder_appends_in_place_and_grows_by_doubling():
    kr, kp = _keys(T=16 * 40 + 5, D=8)
    b = ChunkSummaryBuilder(2, 8, chunk_size=16, fields=("min_key", "max_key"), capacity_chunks=4)
    ptrs = set()
    views_before = None
    for t in range(kr.shape[0]):
        b.append(kr[t : t + 1])
        if b.num_chunks:
            ptrs.add(b.summaries.max_key.data_ptr())
        if b.num_chunks == 3 and views_before is None:
            views_before = b.summaries
    # 40 chunks from capacity 4: 4 -> 8 -> 16 -> 32 -> 64, one allocation per size, never per chunk
    assert b.capacity_chunks == 64 and b.growths == 4 and len(ptrs) == 5
    s = b.summaries
    assert s.num_chunks == 40
    for name, nbytes in (("min_key", 64 * 2 * 8), ("max_key", 64 * 2 * 8), ("bound_scale", 64 * 2 * 4)):
        v = getattr(s, name)
        assert v.untyped_storage().data_ptr() == b._store[name].untyped_storage().data_ptr()  # a view
        assert v.untyped_storage().nbytes() == nbytes  # int8 codes, fp32 scales
    batch = summarize_chunks(kr, kp, 16)
    torch.testing.assert_close(s.max_key, batch.max_key)
    torch.testing.assert_close(s.bound_scale, batch.bound_scale)
    torch.testing.assert_close(views_before.max_key, s.max_key[:3])


@pytest.mark.parametrize("head_reduce", ["softmax_mean", "max"])
def test_grouped_quest_equals_the_per_head_expanded_bound(head_reduce):
    """Quest scores each query head against its KV head's bounds without copying the bounds per
    query head; the scores equal the per-head formula ``sum_d max(q_d lo_d, q_d hi_d)`` over bounds
    expanded to every query head (``repeat_interleave``), GQA 4 query heads per KV head."""
    h_q, h_kv, d = 8, 2, 16
    kr, kp = _keys(T=160, H=h_kv, D=d, seed=3)
    s = summarize_chunks(kr.to(torch.bfloat16), kp.to(torch.bfloat16), 16)
    q = torch.randn(h_q, d, generator=torch.Generator().manual_seed(4))
    got = get_indexer("quest", head_reduce=head_reduce).score(QueryState(q_pre=q, q_rope=q, position=160), s)
    group = h_q // h_kv
    lo, hi = (b.repeat_interleave(group, dim=1) for b in s.bounds())  # [N, H_q, D]
    per_head = torch.maximum(q[None] * lo, q[None] * hi).sum(-1).T  # [H_q, N]
    if head_reduce == "max":
        ref = per_head.amax(0)
    else:
        ref = torch.softmax(per_head / d**0.5, dim=-1).mean(0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
