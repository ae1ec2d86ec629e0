"""TriAttention token scores from key geometry and calibrated query statistics (no attention scores).

Notation: head_dim ``D`` is split into ``F = D/2`` complex pairs, pair ``f`` being
``(x[f], x[f + F])`` (real, imaginary), the convention of transformers' ``rotate_half``; RoPE at
position ``p`` multiplies pair ``f`` by ``exp(i w_f p)``. For a pre-RoPE key ``k`` at position ``p``
scored at step ``t``, query head ``h`` with calibrated mean query ``E q`` and mean magnitude ``E|q|``:

    S_h(k) = mean_{d in OFFSETS} sum_f |E q_f| |k_f| cos(w_f (t - p + d) + arg E q_f - arg k_f)
             + sum_f (E|q_f| - |E q_f|) |k_f|,          OFFSETS = {1, 2, 4, ..., 65536} (17 offsets)

The first (trigonometric) term is the mean over ``d`` of the real dot product between the mean query
rotated to position ``t + d`` and the key rotated to its own position ``p``; the second is an upper
bound of what the query's spread around its mean can add.

Post-RoPE keys need no un-rotation: a key rotated to its position ``p`` has
``arg k_f(post) = arg k_f(pre) + w_f p`` and the same ``|k_f|``, so
``cos(w_f (t - p + d) + arg E q_f - arg k_f(pre)) = cos(w_f (t + d) + arg E q_f - arg k_f(post))``.
With ``rotated=True`` the keys are taken as post-RoPE (rotated at their true positions) and their
positions are not needed. When the rotary embedding also scales cos/sin by an attention factor
(YaRN), post-RoPE keys are that factor longer and every score is multiplied by the same constant,
which leaves rankings and z-scores unchanged.

How the kernel evaluates the mean over offsets: with ``z_f = |E q_f| e^{i arg E q_f} mean_d e^{i w_f d}``
(computed once per call in float64 on the host side, ``[H_q, F]``) the trigonometric term is
``sum_f Re(e^{i w_f delta} z_f conj(k_f))`` with ``delta = t - p`` (pre-RoPE keys) or, for post-RoPE
keys, with ``e^{i w_f t}`` folded into ``z`` in float64, so the kernel is a dot product per key and
head. Only the pre-RoPE path evaluates ``w_f (t - p)`` in float32 (the same precision the model's own
rotary embedding uses for ``w_f p``).

Shapes:
    keys:        [N, H_kv, D]  fp32 / fp16 / bf16 (last dim contiguous)
    positions:   [N, H_kv]     int32 or int64 (pre-RoPE keys only)
    q_mean_real, q_mean_imag, q_abs_mean: [H_q, F] (one layer of the calibration statistics)
    omega:       [F]           RoPE angular frequencies w_f (the rotary embedding's ``inv_freq``)
    result:      [N, H_q]      fp32 raw scores; query head ``h`` reads KV head ``h // (H_q // H_kv)``
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from .checks import check_float_tensor, check_triton_device

__all__ = [
    "OFFSETS",
    "triattention_score",
    "reference_triattention_score",
    "torch_triattention_score",
    "aggregate_scores",
    "zscore",
]

#: The future offsets ``d`` averaged over: 1, 2, 4, ..., 65536.
OFFSETS: tuple[int, ...] = tuple(2**i for i in range(17))


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
# runtime sizes change during a decode (table length, splits, positions): not specialised on
# (== 1, divisible by 16), so a new value never recompiles the kernel mid-decode
@triton.jit(do_not_specialize=["t_step", "num_tokens"])
def _triattention_score_kernel(
    k_ptr,
    pos_ptr,
    zr_ptr,
    zi_ptr,
    spread_ptr,
    omega_ptr,
    out_ptr,
    t_step,
    num_tokens,
    stride_kn,
    stride_kh,
    stride_pn,
    stride_ph,
    stride_zh,
    stride_on,
    stride_oh,
    GROUP: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
    HAS_POS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)

    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] token rows
    mask_n = offs_n < num_tokens
    offs_f = tl.arange(0, BLOCK_F)  # [BLOCK_F] complex pair index
    mask_f = offs_f < HALF
    mask_nf = mask_n[:, None] & mask_f[None, :]  # [BLOCK_N, BLOCK_F]

    k_rows = k_ptr + offs_n[:, None] * stride_kn + kv_head * stride_kh  # [BLOCK_N, 1]
    k_real = tl.load(k_rows + offs_f[None, :], mask=mask_nf, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_F]
    k_imag = tl.load(k_rows + (offs_f + HALF)[None, :], mask=mask_nf, other=0.0).to(tl.float32)
    k_abs = tl.sqrt(k_real * k_real + k_imag * k_imag)  # [BLOCK_N, BLOCK_F]

    if HAS_POS:
        # Pre-RoPE keys: rotate the key by w_f (t - p) once per key and pair, shared by the group.
        positions = tl.load(pos_ptr + offs_n * stride_pn + kv_head * stride_ph, mask=mask_n, other=0)
        delta = (t_step - positions.to(tl.int64)).to(tl.float32)  # [BLOCK_N]
        omega = tl.load(omega_ptr + offs_f, mask=mask_f, other=0.0)  # [BLOCK_F]
        angle = delta[:, None] * omega[None, :]  # [BLOCK_N, BLOCK_F]
        cos_a = tl.cos(angle)
        sin_a = tl.sin(angle)
        # Re(e^{i a} z conj(k)) = Re(z conj(k e^{-i a})); k e^{-i a} = (kr c + ki s, ki c - kr s)
        rot_real = k_real * cos_a + k_imag * sin_a
        rot_imag = k_imag * cos_a - k_real * sin_a
    else:
        rot_real = k_real
        rot_imag = k_imag

    for g in tl.static_range(GROUP):
        q_head = kv_head * GROUP + g
        z_real = tl.load(zr_ptr + q_head * stride_zh + offs_f, mask=mask_f, other=0.0)  # [BLOCK_F]
        z_imag = tl.load(zi_ptr + q_head * stride_zh + offs_f, mask=mask_f, other=0.0)  # [BLOCK_F]
        spread = tl.load(spread_ptr + q_head * stride_zh + offs_f, mask=mask_f, other=0.0)  # [BLOCK_F]
        # Re(z conj(k)) = zr kr + zi ki
        terms = z_real[None, :] * rot_real + z_imag[None, :] * rot_imag + spread[None, :] * k_abs
        score = tl.sum(terms, axis=1)  # [BLOCK_N]
        tl.store(out_ptr + offs_n * stride_on + q_head * stride_oh, score, mask=mask_n)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
def _check_stats(
    q_mean_real: torch.Tensor, q_mean_imag: torch.Tensor, q_abs_mean: torch.Tensor, omega: torch.Tensor
) -> tuple[int, int]:
    for name, t in (
        ("q_mean_real", q_mean_real),
        ("q_mean_imag", q_mean_imag),
        ("q_abs_mean", q_abs_mean),
        ("omega", omega),
    ):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if q_mean_real.dim() != 2:
        raise ValueError(f"q_mean_real must be [H_q, D/2], got shape {tuple(q_mean_real.shape)}")
    shape = tuple(q_mean_real.shape)
    for name, t in (("q_mean_imag", q_mean_imag), ("q_abs_mean", q_abs_mean)):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have the shape of q_mean_real {shape}, got {tuple(t.shape)}")
    if tuple(omega.shape) != (shape[1],):
        raise ValueError(f"omega must be [D/2] = [{shape[1]}], got {tuple(omega.shape)}")
    return shape


def _check_inputs(
    keys: torch.Tensor,
    positions: torch.Tensor | None,
    q_mean_real: torch.Tensor,
    q_mean_imag: torch.Tensor,
    q_abs_mean: torch.Tensor,
    omega: torch.Tensor,
    t: int,
    group_size: int | None,
    rotated: bool,
) -> tuple[int, int, int, int]:
    """Validate and return ``(N, H_kv, H_q, F)``."""
    check_float_tensor("keys", keys)
    if keys.dim() != 3:
        raise ValueError(f"keys must be [N, H_kv, D], got shape {tuple(keys.shape)}")
    num_tokens, num_kv_heads, head_dim = keys.shape
    if head_dim % 2:
        raise ValueError(f"head_dim must be even (pairs of real/imaginary parts), got {head_dim}")
    num_q_heads, half = _check_stats(q_mean_real, q_mean_imag, q_abs_mean, omega)
    if half * 2 != head_dim:
        raise ValueError(f"stats describe head_dim {2 * half}, keys have head_dim {head_dim}")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"H_q ({num_q_heads}) must be a positive multiple of H_kv ({num_kv_heads})")
    if group_size is not None and group_size != num_q_heads // num_kv_heads:
        raise ValueError(
            f"group_size {group_size} disagrees with H_q / H_kv = {num_q_heads} / {num_kv_heads}"
        )
    if isinstance(t, bool) or not isinstance(t, numbers.Integral):
        raise TypeError(f"t must be an int (the position of the scoring step), got {t!r}")
    if not isinstance(rotated, bool):
        raise TypeError(f"rotated must be a bool, got {rotated!r}")
    if not rotated:
        if positions is None:
            raise ValueError("pre-RoPE keys need their positions; pass positions [N, H_kv] or rotated=True")
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
        if positions.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"positions must be int32 or int64, got {positions.dtype}")
        if tuple(positions.shape) != (num_tokens, num_kv_heads):
            raise ValueError(
                f"positions must be [N, H_kv] = {(num_tokens, num_kv_heads)}, got {tuple(positions.shape)}"
            )
    for name, other in (
        ("positions", positions if not rotated else None),
        ("q_mean_real", q_mean_real),
        ("q_mean_imag", q_mean_imag),
        ("q_abs_mean", q_abs_mean),
        ("omega", omega),
    ):
        if other is not None and other.device != keys.device:
            raise ValueError(
                f"{name} is on {other.device}, keys are on {keys.device}; move them to one device"
            )
    return num_tokens, num_kv_heads, num_q_heads, half


def _offset_mean(omega64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean_d cos(w_f d)``, ``mean_d sin(w_f d)`` over :data:`OFFSETS`, float64 ``[F]`` each."""
    # 2 ** i exactly (made on the device: no tensor from Python data, no host-to-device copy)
    offsets = torch.exp2(torch.arange(len(OFFSETS), dtype=torch.float64, device=omega64.device))
    angles = omega64[:, None] * offsets[None, :]  # [F, 17]
    return torch.cos(angles).mean(dim=1), torch.sin(angles).mean(dim=1)


def _coefficients(
    q_mean_real: torch.Tensor,
    q_mean_imag: torch.Tensor,
    q_abs_mean: torch.Tensor,
    omega: torch.Tensor,
    t: int,
    rotated: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head coefficients ``z`` (real, imag) and the spread ``E|q| - |E q|``, fp32 ``[H_q, F]``."""
    device = omega.device
    float64_ok = device.type != "mps"
    work = torch.float64 if float64_ok else torch.float32
    qr = q_mean_real.to(work)
    qi = q_mean_imag.to(work)
    w = omega.to(work)
    mean_cos, mean_sin = _offset_mean(w)  # [F]
    # z = Eq * mean_d e^{i w d}
    zr = qr * mean_cos - qi * mean_sin  # [H_q, F]
    zi = qr * mean_sin + qi * mean_cos
    if rotated:
        # fold e^{i w t} into z: keys already carry e^{i w p}
        angle = w * float(t)
        c, s = torch.cos(angle), torch.sin(angle)
        zr, zi = zr * c - zi * s, zr * s + zi * c
    spread = q_abs_mean.to(work) - torch.sqrt(qr * qr + qi * qi)
    return (
        zr.to(torch.float32).contiguous(),
        zi.to(torch.float32).contiguous(),
        spread.to(torch.float32).contiguous(),
    )


def triattention_score(
    keys: torch.Tensor,
    positions: torch.Tensor | None,
    q_mean_real: torch.Tensor,
    q_mean_imag: torch.Tensor,
    q_abs_mean: torch.Tensor,
    omega: torch.Tensor,
    t: int,
    *,
    group_size: int | None = None,
    rotated: bool = False,
    out: torch.Tensor | None = None,
    block_n: int = 64,
) -> torch.Tensor:
    """Raw TriAttention scores of ``N`` keys for every query head (Triton).

    keys: [N, H_kv, D] (pre-RoPE, or post-RoPE with ``rotated=True``); positions: [N, H_kv] int
    (ignored, may be None, when ``rotated``); q_mean_real / q_mean_imag / q_abs_mean: [H_q, D/2];
    omega: [D/2]; t: position of the scoring step; group_size: H_q / H_kv (checked when given).
    Returns (or fills ``out``) [N, H_q] float32. Math in float32 whatever the key dtype.
    """
    num_tokens, num_kv_heads, num_q_heads, half = _check_inputs(
        keys, positions, q_mean_real, q_mean_imag, q_abs_mean, omega, t, group_size, rotated
    )
    device = keys.device
    check_triton_device("triattention_score", device, "reference_triattention_score")
    if keys.stride(-1) != 1:
        raise ValueError(f"keys must have a contiguous last dim (stride 1), got strides {keys.stride()}")
    if block_n < 1 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two, got {block_n}")
    if out is None:
        out = torch.empty((num_tokens, num_q_heads), dtype=torch.float32, device=device)
    elif (
        not isinstance(out, torch.Tensor)
        or out.dtype != torch.float32
        or tuple(out.shape) != (num_tokens, num_q_heads)
        or out.device != device
    ):
        raise ValueError(f"out must be a float32 tensor of shape {(num_tokens, num_q_heads)} on {device}")
    if num_tokens == 0:
        return out
    zr, zi, spread = _coefficients(q_mean_real, q_mean_imag, q_abs_mean, omega, t, rotated)
    omega32 = omega.to(torch.float32).contiguous()
    if rotated:
        pos = zr  # never read (HAS_POS is False)
        stride_pn = stride_ph = 0
    else:
        pos = positions
        stride_pn, stride_ph = positions.stride()
    grid = (triton.cdiv(num_tokens, block_n), num_kv_heads)
    _triattention_score_kernel[grid](
        keys,
        pos,
        zr,
        zi,
        spread,
        omega32,
        out,
        int(t),
        num_tokens,
        keys.stride(0),
        keys.stride(1),
        stride_pn,
        stride_ph,
        zr.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=num_q_heads // num_kv_heads,
        HALF=half,
        BLOCK_N=block_n,
        BLOCK_F=triton.next_power_of_2(half),
        HAS_POS=not rotated,
    )
    return out


def torch_triattention_score(
    keys: torch.Tensor,
    positions: torch.Tensor | None,
    q_mean_real: torch.Tensor,
    q_mean_imag: torch.Tensor,
    q_abs_mean: torch.Tensor,
    omega: torch.Tensor,
    t: int,
    *,
    group_size: int | None = None,
    rotated: bool = False,
) -> torch.Tensor:
    """The kernel's algebra in plain torch (float32, any device): the fast path where Triton is not
    used (CPU decode loops). Same arguments as :func:`triattention_score`; returns [N, H_q] fp32."""
    num_tokens, num_kv_heads, num_q_heads, half = _check_inputs(
        keys, positions, q_mean_real, q_mean_imag, q_abs_mean, omega, t, group_size, rotated
    )
    group = num_q_heads // num_kv_heads
    zr, zi, spread = _coefficients(q_mean_real, q_mean_imag, q_abs_mean, omega, t, rotated)  # [H_q, F]
    k = keys.to(torch.float32)
    k_real, k_imag = k[..., :half], k[..., half:]  # [N, H_kv, F]
    k_abs = torch.sqrt(k_real * k_real + k_imag * k_imag)
    if not rotated:
        delta = (t - positions.to(torch.int64)).to(torch.float32)  # [N, H_kv]
        angle = delta[..., None] * omega.to(torch.float32)  # [N, H_kv, F]
        cos_a, sin_a = torch.cos(angle), torch.sin(angle)
        k_real, k_imag = k_real * cos_a + k_imag * sin_a, k_imag * cos_a - k_real * sin_a
    shape = (num_kv_heads, group, half)
    zr, zi, spread = zr.view(shape), zi.view(shape), spread.view(shape)
    scores = (
        torch.einsum("nkf,kgf->nkg", k_real, zr)
        + torch.einsum("nkf,kgf->nkg", k_imag, zi)
        + torch.einsum("nkf,kgf->nkg", k_abs, spread)
    )  # [N, H_kv, G]
    return scores.reshape(num_tokens, num_q_heads)


def reference_triattention_score(
    keys: torch.Tensor,
    positions: torch.Tensor | None,
    q_mean_real: torch.Tensor,
    q_mean_imag: torch.Tensor,
    q_abs_mean: torch.Tensor,
    omega: torch.Tensor,
    t: int,
    *,
    group_size: int | None = None,
    rotated: bool = False,
) -> torch.Tensor:
    """The formula of the module docstring evaluated literally (magnitudes, arguments, 17 cosines per
    pair) in float64 on any device. Same arguments as :func:`triattention_score`; returns [N, H_q] fp32."""
    num_tokens, num_kv_heads, num_q_heads, half = _check_inputs(
        keys, positions, q_mean_real, q_mean_imag, q_abs_mean, omega, t, group_size, rotated
    )
    work = torch.float64 if keys.device.type != "mps" else torch.float32
    group = num_q_heads // num_kv_heads
    k = keys.to(work).repeat_interleave(group, dim=1)  # [N, H_q, D]
    k_real, k_imag = k[..., :half], k[..., half:]
    k_abs = torch.sqrt(k_real * k_real + k_imag * k_imag)  # [N, H_q, F]
    k_arg = torch.atan2(k_imag, k_real)
    qr, qi = q_mean_real.to(work), q_mean_imag.to(work)
    q_abs = torch.sqrt(qr * qr + qi * qi)  # [H_q, F]
    q_arg = torch.atan2(qi, qr)
    w = omega.to(work)  # [F]
    if rotated:
        delta = torch.full((num_tokens, num_q_heads), float(t), dtype=work, device=keys.device)
    else:
        delta = float(t) - positions.to(work).repeat_interleave(group, dim=1)  # [N, H_q]
    trig = torch.zeros((num_tokens, num_q_heads), dtype=work, device=keys.device)
    for d in OFFSETS:
        phase = w * (delta[..., None] + d) + q_arg - k_arg  # [N, H_q, F]
        trig += (q_abs * k_abs * torch.cos(phase)).sum(dim=-1)
    trig /= len(OFFSETS)
    spread = (q_abs_mean.to(work) - q_abs) * k_abs  # [N, H_q, F]
    return (trig + spread.sum(dim=-1)).to(torch.float32)


def zscore(scores: torch.Tensor, dim: int = 0, eps: float = 1e-6) -> torch.Tensor:
    """``(x - mean) / std`` along ``dim`` (population std; a constant column becomes 0)."""
    mean = scores.mean(dim=dim, keepdim=True)
    std = scores.std(dim=dim, keepdim=True, correction=0)
    return (scores - mean) / (std + eps)


def aggregate_scores(scores: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """GQA aggregation: z-score each query head's scores over the candidate tokens, then take the max
    over the query heads of each KV group. scores: [N, H_q] -> [N, H_kv] fp32."""
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a [N, H_q] tensor, got {getattr(scores, 'shape', scores)}")
    num_tokens, num_q_heads = scores.shape
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
        raise ValueError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"H_q ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    z = zscore(scores.to(torch.float32), dim=0)
    return z.view(num_tokens, num_kv_heads, num_q_heads // num_kv_heads).amax(dim=-1)
