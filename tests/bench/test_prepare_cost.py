import pytest

from bench.prepare_cost import forward_flops


def test_forward_flops_counts_weights_and_causal_attention():
    # 2 passes of 4 tokens + a pass of 2: 2 x params x 10 tokens, plus 4 x hidden x layers x pairs
    # with pairs = 2 x 4 x 4 / 2 + 2 x 2 / 2 = 18
    assert forward_flops(100.0, 3, 8, tokens=10, tokens_per_forward=4) == 2 * 100 * 10 + 4 * 8 * 3 * 18
    assert forward_flops(1.0, 1, 1, tokens=4, tokens_per_forward=4) == pytest.approx(2 * 4 + 4 * 8)
