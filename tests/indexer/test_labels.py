import pytest
import torch

from flashmem.indexer.labels import (
    brute_force_chunk_attention_mass,
    chunk_attention_mass,
    combine_layers,
    layer_window_targets,
    top_p_mask,
)
from flashmem.testing import tiny_model


@pytest.mark.parametrize("T,chunk", [(200, 16), (97, 8)])
def test_blockwise_mass_equals_brute_force(T, chunk):
    torch.manual_seed(0)
    q = torch.randn(4, T, 16) * 2
    k = torch.randn(2, T, 16) * 2
    pos = torch.arange(T)
    ref = brute_force_chunk_attention_mass(q, k, pos, chunk)
    got = chunk_attention_mass(q, k, pos, chunk, query_block=37, key_block=3 * chunk)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.sum(-1), torch.ones(T, 4))


def test_top_p_mask():
    p = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.0, 0.0, 0.0, 0.0]])
    m = top_p_mask(p, 0.6)
    assert m.tolist() == [[False, True, True, False], [False, False, False, False]]
    assert top_p_mask(torch.tensor([0.7, 0.3]), 0.6).tolist() == [True, False]


def test_labels_on_tiny_model_equal_brute_force():
    from flashmem.hf_compat import capture_attention_inputs

    model = tiny_model("llama", vocab=100, max_positions=1024)
    captured = {}
    with torch.no_grad(), capture_attention_inputs(model, lambda l, q, k, v: captured.__setitem__(l, (q, k))):
        model(torch.randint(0, 100, (1, 300)))
    refresh = [128, 160, 200]
    per_layer = []
    for layer in range(2):
        q, k = captured[layer]
        got = layer_window_targets(q[0], k[0], refresh, chunk_size=16, lookahead=32, recent_tokens=32)
        ref = layer_window_targets(
            q[0], k[0], refresh, chunk_size=16, lookahead=32, recent_tokens=32, brute_force=True
        )
        torch.testing.assert_close(got.window_mass, ref.window_mass, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.labels, ref.labels)
        assert got.labels.any()
        assert not (got.labels & ~got.candidates).any()
        # candidates at t=128: chunks 1..5 ((128 - 32) // 16 = 6, sink chunk 0 excluded)
        assert got.candidates[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
        torch.testing.assert_close(got.target.sum(-1), torch.ones(3))
        # the union over the window contains each query's own top-p set
        for r in range(3):
            for s in range(32):
                assert not (top_p_mask(ref.window_mass[r, s], 0.6) & ~got.labels[r]).any()
        per_layer.append(got)
    comb = combine_layers(per_layer)
    mean = (per_layer[0].window_mass + per_layer[1].window_mass) / 2
    assert torch.equal(comb.labels, top_p_mask(mean, 0.6).any(dim=1))
