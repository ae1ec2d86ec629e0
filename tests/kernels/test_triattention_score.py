"""TriAttention scoring: Triton kernel vs literal reference, the RoPE identity behind the formula,
post-RoPE folding, GQA aggregation and input checks."""

from __future__ import annotations

import pytest
import torch

from flashmem.hf_compat import rotary_cos_sin, rotate
from flashmem.kernels.triattention_score import (
    OFFSETS,
    aggregate_scores,
    reference_triattention_score,
    torch_triattention_score,
    triattention_score,
)
from flashmem.testing import tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _omega(half: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(half, dtype=torch.float64) / half)


def make_case(n, num_kv, group, head_dim, dtype, *, seed=0, max_pos=4000, t=None):
    gen = torch.Generator().manual_seed(seed)
    half = head_dim // 2
    num_q = num_kv * group
    keys = torch.randn(n, num_kv, head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, max_pos, (n, num_kv), generator=gen, dtype=torch.int32)
    qr = torch.randn(num_q, half, generator=gen)
    qi = torch.randn(num_q, half, generator=gen)
    qa = torch.sqrt(qr * qr + qi * qi) + torch.rand(num_q, half, generator=gen)
    omega = _omega(half).float()
    t = max_pos + 17 if t is None else t
    return [x.to(DEVICE) for x in (keys, positions, qr, qi, qa, omega)] + [t]


def _tol(ref: torch.Tensor, dtype: torch.dtype) -> dict:
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    rel = 2e-5 if dtype == torch.float32 else 2e-4
    return dict(atol=rel * max(scale, 1.0) * 10, rtol=rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("n", [1, 15, 17, 63, 1000])
def test_kernel_matches_reference(n, head_dim, dtype):
    torch.manual_seed(n + head_dim)
    keys, positions, qr, qi, qa, omega, t = make_case(n, 2, 3, head_dim, dtype, seed=n * 7 + head_dim)
    out = torch.full((n, 6), float("nan"), device=DEVICE)
    got = triattention_score(keys, positions, qr, qi, qa, omega, t, group_size=3, out=out)
    assert got.data_ptr() == out.data_ptr()
    ref = reference_triattention_score(keys, positions, qr, qi, qa, omega, t, group_size=3)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, ref, **_tol(ref, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,group", [(17, 1), (63, 4), (1000, 2)])
def test_kernel_matches_reference_post_rope_mode(n, group, dtype):
    keys, _, qr, qi, qa, omega, t = make_case(n, 3, group, 64, dtype, seed=n + group)
    out = torch.full((n, 3 * group), float("nan"), device=DEVICE)
    got = triattention_score(keys, None, qr, qi, qa, omega, 123_456, rotated=True, out=out)
    ref = reference_triattention_score(keys, None, qr, qi, qa, omega, 123_456, rotated=True)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, ref, **_tol(ref, dtype))


@pytest.mark.parametrize("rotated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,head_dim", [(1, 32), (17, 64), (1000, 128)])
def test_torch_path_matches_reference(n, head_dim, dtype, rotated):
    """The CPU fast path (the kernel's algebra in torch) against the literal formula."""
    keys, positions, qr, qi, qa, omega, t = make_case(n, 2, 2, head_dim, dtype, seed=n)
    got = torch_triattention_score(
        keys, None if rotated else positions, qr, qi, qa, omega, t, rotated=rotated
    )
    ref = reference_triattention_score(keys, positions, qr, qi, qa, omega, t, rotated=rotated)
    assert got.dtype == torch.float32 and got.shape == (n, 4)
    torch.testing.assert_close(got, ref, **_tol(ref, dtype))


def _rope_cos_sin(omega: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    angles = positions.to(torch.float64)[:, None] * omega.to(torch.float64)[None, :]  # [T, F]
    angles = torch.cat([angles, angles], dim=-1)  # [T, D]
    return torch.cos(angles), torch.sin(angles)


@pytest.mark.parametrize("seed", range(4))
def test_trig_term_is_mean_dot_product_of_rotated_vectors(seed):
    """PROPERTY: with E|q| = |E q| (no spread term) the score is the mean over the offsets d of
    <RoPE(E q, t + d), RoPE(k, p)>, for random keys, positions and head sizes."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = [16, 32, 64, 128][seed]
    half = head_dim // 2
    num_kv, group = 1 + seed % 2, 1 + seed % 3
    num_q = num_kv * group
    n = 9 + seed
    keys = torch.randn(n, num_kv, head_dim, generator=gen, dtype=torch.float64)
    positions = torch.randint(0, 50_000, (n, num_kv), generator=gen, dtype=torch.int32)
    q_mean = torch.randn(num_q, head_dim, generator=gen, dtype=torch.float64)
    qr, qi = q_mean[:, :half], q_mean[:, half:]
    q_abs = torch.sqrt(qr * qr + qi * qi)
    omega = _omega(half, theta=float(10 ** (4 + seed % 3)))
    t = 60_000 + seed

    expected = torch.zeros(n, num_q, dtype=torch.float64)
    for h in range(num_q):
        kv = h // group
        cos_k, sin_k = _rope_cos_sin(omega, positions[:, kv])
        k_rot = rotate(keys[:, kv], cos_k, sin_k)  # [n, D]
        for d in OFFSETS:
            cos_q, sin_q = _rope_cos_sin(omega, torch.tensor([t + d]))
            q_rot = rotate(q_mean[h][None], cos_q, sin_q)  # [1, D]
            expected[:, h] += (k_rot * q_rot).sum(-1) / len(OFFSETS)

    ref = reference_triattention_score(
        keys.float(), positions, qr.float(), qi.float(), q_abs.float(), omega, t
    )
    torch.testing.assert_close(ref.double(), expected, atol=1e-4, rtol=1e-4)
    got = triattention_score(
        keys.float().to(DEVICE),
        positions.to(DEVICE),
        qr.float().to(DEVICE),
        qi.float().to(DEVICE),
        q_abs.float().to(DEVICE),
        omega.float().to(DEVICE),
        t,
    )
    # the kernel evaluates w (t - p) in float32, like the model's own rotary embedding
    torch.testing.assert_close(got.double().cpu(), expected, atol=5e-3 * float(expected.abs().max()), rtol=0)

    # the spread term adds exactly sum_f (E|q_f| - |E q_f|) |k_f|
    extra = torch.rand(num_q, half, generator=gen, dtype=torch.float64)
    with_spread = reference_triattention_score(
        keys.float(), positions, qr.float(), qi.float(), (q_abs + extra).float(), omega, t
    )
    k_abs = torch.sqrt(keys[..., :half] ** 2 + keys[..., half:] ** 2).repeat_interleave(group, dim=1)
    torch.testing.assert_close(
        (with_spread - ref).double(), (extra[None] * k_abs).sum(-1), atol=1e-4, rtol=1e-4
    )


def _llama_rotary(head_dim: int, rope_parameters: dict):
    """A one-layer tiny Llama whose rotary embedding uses ``rope_parameters``."""
    return tiny_model(
        "llama", layers=1, q_heads=2, kv_heads=1, head_dim=head_dim, max_positions=8192,
        rope_parameters=rope_parameters,
    )  # fmt: skip


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 100000.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    ],
)
def test_property_with_model_rotary_embedding(rope):
    """The same identity with a real rotary embedding (default and llama3-scaled): omega = inv_freq."""
    head_dim, n = 64, 12
    model = _llama_rotary(head_dim, rope)
    omega = model.model.rotary_emb.inv_freq.float()
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(n, 1, head_dim, generator=gen)
    positions = torch.randint(0, 3000, (n, 1), generator=gen, dtype=torch.int32)
    q_mean = torch.randn(2, head_dim, generator=gen)
    qr, qi = q_mean[:, :32], q_mean[:, 32:]
    t = 3100
    cos_k, sin_k = rotary_cos_sin(model, positions[:, 0])
    k_rot = rotate(keys[:, 0], cos_k, sin_k)
    expected = torch.zeros(n, 2)
    for d in OFFSETS:
        cos_q, sin_q = rotary_cos_sin(model, torch.tensor([t + d]))
        expected += (k_rot[:, None, :] * rotate(q_mean, cos_q, sin_q)[None]).sum(-1) / len(OFFSETS)
    ref = reference_triattention_score(keys, positions, qr, qi, torch.sqrt(qr**2 + qi**2), omega, t)
    # the rotary embedding computes angles up to ~7e4 rad in float32
    torch.testing.assert_close(ref, expected, atol=2e-2 * float(expected.abs().max()), rtol=0)


def test_post_rope_keys_score_like_unrotated_keys_at_their_positions():
    """Folding the rotation into the phase: scores of post-RoPE keys (rotated=True, no positions)
    equal scores of the pre-RoPE keys at their positions, for kernel and reference."""
    head_dim, n, num_kv, group = 64, 40, 3, 3
    model = _llama_rotary(head_dim, {"rope_type": "default", "rope_theta": 100000.0})
    keys, positions, qr, qi, qa, _, _ = make_case(
        n, num_kv, group, head_dim, torch.float32, seed=5, max_pos=2000
    )
    omega = model.model.rotary_emb.inv_freq.float().to(DEVICE)
    post = torch.empty_like(keys)
    for h in range(num_kv):
        cos, sin = rotary_cos_sin(model, positions[:, h].cpu())
        post[:, h] = rotate(keys[:, h].cpu(), cos, sin).to(DEVICE)
    t = 2500
    pre_ref = reference_triattention_score(keys, positions, qr, qi, qa, omega, t)
    post_ref = reference_triattention_score(post, None, qr, qi, qa, omega, t, rotated=True)
    tol = dict(atol=1e-3 * float(pre_ref.abs().max()), rtol=0)
    torch.testing.assert_close(post_ref, pre_ref, **tol)
    post_kernel = triattention_score(post, None, qr, qi, qa, omega, t, rotated=True)
    pre_kernel = triattention_score(keys, positions, qr, qi, qa, omega, t)
    torch.testing.assert_close(post_kernel, pre_ref, **tol)
    torch.testing.assert_close(pre_kernel, pre_ref, **tol)


def test_aggregate_scores_zscores_then_maxes_over_group():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 6, generator=gen) * torch.arange(1, 7) + torch.arange(6) * 10
    agg = aggregate_scores(scores, 2)
    assert agg.shape == (50, 2)
    z = (scores - scores.mean(0)) / scores.std(0, correction=0)
    expected = torch.stack([z[:, 0:3].amax(1), z[:, 3:6].amax(1)], dim=1)
    torch.testing.assert_close(agg, expected, atol=1e-5, rtol=1e-5)
    # a single candidate has z-score 0 (no NaN)
    assert torch.equal(aggregate_scores(scores[:1], 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="multiple"):
        aggregate_scores(scores, 4)


def test_bad_inputs_raise_clear_errors():
    keys, positions, qr, qi, qa, omega, t = make_case(8, 2, 2, 32, torch.float32)
    with pytest.raises(TypeError, match="float32"):
        triattention_score(keys.to(torch.int32), positions, qr, qi, qa, omega, t)
    with pytest.raises(ValueError, match="positions"):
        triattention_score(keys, None, qr, qi, qa, omega, t)
    with pytest.raises(ValueError, match="group_size"):
        triattention_score(keys, positions, qr, qi, qa, omega, t, group_size=3)
    with pytest.raises(ValueError, match="head_dim"):
        triattention_score(keys[..., :30], positions, qr, qi, qa, omega, t)
    with pytest.raises(ValueError, match="omega"):
        triattention_score(keys, positions, qr, qi, qa, omega[:-1], t)
    with pytest.raises(TypeError, match="int"):
        triattention_score(keys, positions, qr, qi, qa, omega, 3.5)
    with pytest.raises(ValueError, match="out"):
        triattention_score(keys, positions, qr, qi, qa, omega, t, out=torch.empty(8, 3))
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.randn(8, 2, 64, device=DEVICE)[..., ::2]
        triattention_score(strided, positions, qr, qi, qa, omega, t)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernel math is checked on a GPU only")
def test_kernel_bf16_on_cuda():
    keys, positions, qr, qi, qa, omega, t = make_case(1000, 4, 4, 128, torch.bfloat16)
    got = triattention_score(keys, positions, qr, qi, qa, omega, t)
    ref = reference_triattention_score(keys, positions, qr, qi, qa, omega, t)
    torch.testing.assert_close(got, ref, atol=1e-3 * float(ref.abs().max()), rtol=1e-3)
