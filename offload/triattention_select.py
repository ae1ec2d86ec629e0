"""TriAttention keep-set selection: protected slots, top-k per KV head, one layer's scores.

Scores ``[N, H_kv]`` (per-layer GQA-aggregated z-scores, see
:func:`flashmem.kernels.triattention_score.aggregate_scores`) -> ``keep_idx [H_kv, keep]`` sorted slot
indices, always including the protected slots (sinks, recent window, optionally the prompt).
Scoring never changes a key: cache keys are scored as they are (post-RoPE, see the kernel module for
why no un-rotation is needed).
"""

from __future__ import annotations

import torch

from ..kernels.checks import check_int, resolve_backend
from ..kernels.triattention_score import aggregate_scores, torch_triattention_score, triattention_score
from .triattention_stats import TriAttentionStats


def protected_mask(
    num_slots: int,
    *,
    sink_tokens: int,
    recent_tokens: int,
    positions: torch.Tensor | None = None,
    prompt_len: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Slots never evicted: the first ``sink_tokens`` and the last ``recent_tokens`` slots (slot order),
    and, when ``prompt_len`` is given, every slot whose position (``positions [N, H_kv]``) is below it.
    Returns [N] bool, or [N, H_kv] bool when the prompt is protected."""
    slots = torch.arange(num_slots, device=device)
    mask = (slots < sink_tokens) | (slots >= num_slots - recent_tokens)  # [N]
    if prompt_len is not None:
        if positions is None:
            raise ValueError("protecting the prompt needs the slot positions [N, H_kv]")
        mask = mask[:, None] | ((positions >= 0) & (positions < prompt_len))  # [N, H_kv]
    return mask


def select_keep(
    scores: torch.Tensor,
    keep: int,
    protected: torch.Tensor | None = None,
    *,
    protected_bound: int | None = None,
) -> torch.Tensor:
    """Top-``keep`` slots per KV head, protected slots first; sorted ascending (slot order).

    scores: [N, H_kv] (higher = keep); protected: [N] or [N, H_kv] bool (or None).
    Returns keep_idx [H_kv, keep] int64. Raises ValueError if ``keep`` exceeds N or a head has more
    protected slots than ``keep`` (that check reads one count back from the device: compaction time
    only, never per decode step; a caller that knows a host-side bound on the protected slots per
    head, ``protected_bound <= keep``, skips the read-back).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a [N, H_kv] tensor, got {getattr(scores, 'shape', scores)}")
    num_slots, num_kv_heads = scores.shape
    check_int("select_keep", "keep", keep, 0)
    if keep > num_slots:
        raise ValueError(f"cannot keep {keep} slots out of {num_slots}")
    work = scores.to(torch.float32)
    if protected is not None:
        if protected.dtype != torch.bool:
            raise TypeError(f"protected must be a bool mask, got {protected.dtype}")
        if protected.dim() == 1:
            protected = protected[:, None]
        if (
            protected.dim() != 2
            or protected.shape[0] != num_slots
            or protected.shape[1] not in (1, num_kv_heads)
        ):
            raise ValueError(f"protected must be [N] or [N, H_kv] = {(num_slots, num_kv_heads)}")
        protected = protected.to(work.device).expand(num_slots, num_kv_heads)
        if protected_bound is not None and protected_bound <= keep:
            most = 0  # bounded on the host: nothing to read back
        else:
            most = int(protected.sum(dim=0).max()) if num_slots else 0
        if most > keep:
            raise ValueError(
                f"{most} protected slots (sinks + window + prompt) exceed the keep budget {keep}; raise the "
                "budget, shrink the window/sinks, or do not protect the prompt"
            )
        work = torch.where(protected, torch.full_like(work, float("inf")), work)
    work = torch.nan_to_num(work, nan=float("-inf"), posinf=float("inf"))
    top = torch.topk(work.t(), keep, dim=1, largest=True, sorted=False).indices  # [H_kv, keep]
    return torch.sort(top, dim=1).values


def score_layer(
    keys: torch.Tensor,
    positions: torch.Tensor | None,
    stats: TriAttentionStats,
    layer: int,
    t: int,
    *,
    rotated: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """GQA-aggregated scores of one layer's keys: keys [N, H_kv, D] (post-RoPE when ``rotated``),
    positions [N, H_kv] (pre-RoPE keys only) -> [N, H_kv] fp32 (z-scored per query head, max per group).
    backend: "triton" (the kernel), "torch" (the same algebra in torch) or "auto" (triton on CUDA)."""
    use_triton = resolve_backend(backend, keys.device) == "triton"
    fn = triattention_score if use_triton else torch_triattention_score
    qr, qi, qa = (x.to(keys.device) for x in stats.layer(layer))
    raw = fn(keys, positions, qr, qi, qa, stats.omega.to(keys.device), t, rotated=rotated)  # [N, H_q]
    return aggregate_scores(raw, keys.shape[1])


# ---------------------------------------------------------------------------------------------
# policy
