"""Training/evaluation targets from the model's own full attention, computed block-wise.

Definitions (one layer, refresh position ``t``, window ``[t, t + lookahead)``):

* chunks are full ``chunk_size``-token chunks; the *candidates* at ``t`` are chunks
  ``num_sink_chunks <= c < (t - recent_tokens) // chunk_size``: the sink chunk(s) and the recency tail
  (the last ``recent_tokens`` tokens before ``t`` plus everything decoded in the window) are always
  resident, so the indexer's job is only the candidates;
* for each query ``s`` in the window, ``p[s, c]`` = the layer's attention mass on chunk ``c``
  (mean over query heads), renormalised over the candidates;
* ``target[c] = mean_s p[s, c]``: the fraction of the window's candidate mass chunk ``c`` holds (the
  covered-mass metric of a selection is the sum of ``target`` over it, so the oracle is its top-k);
* ``labels[c]`` = union over ``s`` of the top-p (0.6) set of ``p[s, :]``;
* combined over layers: ``p`` averaged over layers, then the same top-p union.

Attention mass is computed with queries in blocks and keys in chunk-aligned blocks, accumulating the
softmax statistics (running max and sum) as flash attention does: no ``[T, T]`` matrix is ever built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _expand_kv(k: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    h_kv = k.shape[0]
    if num_q_heads % h_kv:
        raise ValueError(f"{num_q_heads} query heads are not a multiple of {h_kv} KV heads")
    return k.repeat_interleave(num_q_heads // h_kv, dim=0)


def chunk_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    query_positions: torch.Tensor,
    chunk_size: int,
    scaling: float | None = None,
    query_block: int = 256,
    key_block: int = 1024,
) -> torch.Tensor:
    """Causal attention mass per key chunk, block-wise.

    q: [H_q, M, D] post-RoPE queries at ``query_positions`` [M] (int); k: [H_kv, T, D] post-RoPE keys at
    positions 0..T-1. Query ``s`` attends keys ``<= s``. Returns mass [M, H_q, ceil(T / chunk_size)]
    (fp32; each row sums to 1 over chunks).
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q must be [H_q, M, D] and k [H_kv, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if query_positions.shape != (q.shape[1],):
        raise ValueError(f"query_positions must be [{q.shape[1]}], got {tuple(query_positions.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    H, M, D = q.shape
    T = k.shape[1]
    scaling = D**-0.5 if scaling is None else scaling
    n_chunks = -(-T // chunk_size)
    key_block = max(chunk_size, key_block // chunk_size * chunk_size)
    kq = _expand_kv(k.float(), H)  # [H_q, T, D]
    qf = q.float()
    pos = query_positions.to(q.device, torch.int64)
    out = torch.empty(M, H, n_chunks, dtype=torch.float32, device=q.device)
    key_pos_all = torch.arange(T, device=q.device)
    for qs in range(0, M, query_block):
        qe = min(M, qs + query_block)
        qb = qf[:, qs:qe]  # [H, Bq, D]
        qpos = pos[qs:qe]  # [Bq]
        bq = qe - qs
        m = torch.full((H, bq), -math.inf, device=q.device)
        denom = torch.zeros(H, bq, device=q.device)
        acc = torch.zeros(H, bq, n_chunks, device=q.device)
        max_pos = int(qpos.max()) if bq else -1
        for ks in range(0, min(T, max_pos + 1), key_block):
            ke = min(T, ks + key_block)
            logits = torch.einsum("hqd,hkd->hqk", qb, kq[:, ks:ke]) * scaling  # [H, Bq, Bk]
            causal = key_pos_all[ks:ke].unsqueeze(0) > qpos.unsqueeze(1)  # [Bq, Bk]
            logits = logits.masked_fill(causal, -math.inf)
            m_new = torch.maximum(m, logits.amax(dim=-1))  # [H, Bq]
            rescale = torch.exp(m - m_new)
            e = torch.exp(logits - m_new.unsqueeze(-1))  # [H, Bq, Bk]
            denom = denom * rescale + e.sum(dim=-1)
            acc.mul_(rescale.unsqueeze(-1))
            pad = (-(ke - ks)) % chunk_size
            if pad:
                e = torch.nn.functional.pad(e, (0, pad))
            c0 = ks // chunk_size
            per_chunk = e.reshape(H, bq, -1, chunk_size).sum(dim=-1)  # [H, Bq, chunks in block]
            acc[:, :, c0 : c0 + per_chunk.shape[-1]] += per_chunk
            m = m_new
        out[qs:qe] = (acc / denom.unsqueeze(-1)).transpose(0, 1)
    return out


def brute_force_chunk_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    query_positions: torch.Tensor,
    chunk_size: int,
    scaling: float | None = None,
) -> torch.Tensor:
    """Reference for :func:`chunk_attention_mass` through full attention matrices (tests only)."""
    H, M, D = q.shape
    T = k.shape[1]
    scaling = D**-0.5 if scaling is None else scaling
    kq = _expand_kv(k.float(), H)
    logits = torch.einsum("hqd,hkd->hqk", q.float(), kq) * scaling
    causal = torch.arange(T).unsqueeze(0) > query_positions.long().unsqueeze(1)
    probs = torch.softmax(logits.masked_fill(causal, -math.inf), dim=-1)  # [H, M, T]
    n_chunks = -(-T // chunk_size)
    chunk_of = torch.arange(T) // chunk_size
    out = torch.zeros(H, M, n_chunks)
    out.index_add_(2, chunk_of, probs)
    return out.transpose(0, 1)


def top_p_mask(p: torch.Tensor, top_p: float) -> torch.Tensor:
    """Smallest set of entries (largest first) whose sum reaches ``top_p`` of each row's total.

    p: [..., N] non-negative -> bool [..., N]. Rows summing to 0 select nothing.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    vals, order = torch.sort(p, dim=-1, descending=True)
    total = vals.sum(dim=-1, keepdim=True)
    before = torch.cumsum(vals, dim=-1) - vals  # mass strictly before each entry
    keep_sorted = (before < top_p * total) & (vals > 0)
    mask = torch.zeros_like(keep_sorted)
    return mask.scatter(-1, order, keep_sorted)


def num_candidates(t: int, chunk_size: int, recent_tokens: int) -> int:
    """Chunks ``c < (t - recent_tokens) // chunk_size`` lie entirely before the recency tail at ``t``."""
    return max(0, (t - recent_tokens) // chunk_size)


@dataclass
class WindowTargets:
    """Targets at ``R`` refresh positions over ``N`` chunks (candidates first, zeros elsewhere).

    refresh:    [R] int64 refresh positions t
    candidates: [R, N] bool candidate chunks at t
    window_mass:[R, W, N] per-query candidate mass p[s, c] (rows sum to 1 over candidates)
    target:     [R, N] mean over the window of window_mass
    labels:     [R, N] bool union over the window of the top-p sets
    """

    refresh: torch.Tensor
    candidates: torch.Tensor
    window_mass: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor


def candidate_mask(
    refresh: list[int], n_chunks: int, chunk_size: int, recent_tokens: int, num_sink_chunks: int
) -> torch.Tensor:
    """[R, n_chunks] bool: candidate chunks at each refresh position."""
    idx = torch.arange(n_chunks)
    rows = [(idx >= num_sink_chunks) & (idx < num_candidates(t, chunk_size, recent_tokens)) for t in refresh]
    return torch.stack(rows) if rows else torch.zeros(0, n_chunks, dtype=torch.bool)


def targets_from_mass(
    window_mass_raw: torch.Tensor, candidates: torch.Tensor, refresh: torch.Tensor, top_p: float
) -> WindowTargets:
    """window_mass_raw: [R, W, N] layer mass (mean over heads) of each window query; candidates [R, N]."""
    masked = window_mass_raw * candidates.unsqueeze(1)
    total = masked.sum(dim=-1, keepdim=True)
    p = torch.where(total > 0, masked / total.clamp_min(1e-30), torch.zeros_like(masked))
    labels = top_p_mask(p, top_p).any(dim=1)
    return WindowTargets(refresh, candidates, p, p.mean(dim=1), labels)


def layer_window_targets(
    q_rope: torch.Tensor,
    k_rope: torch.Tensor,
    refresh: list[int],
    chunk_size: int = 64,
    lookahead: int = 64,
    top_p: float = 0.6,
    num_sink_chunks: int = 1,
    recent_tokens: int = 128,
    scaling: float | None = None,
    brute_force: bool = False,
    window_stride: int = 1,
) -> WindowTargets:
    """Targets of one layer. q_rope: [H_q, T, D], k_rope: [H_kv, T, D] post-RoPE at positions 0..T-1;
    ``refresh`` positions with ``t + lookahead <= T``. Chunks: N = T // chunk_size full chunks.
    ``window_stride > 1`` uses every ``window_stride``-th query of each window (a cheaper approximation;
    1 is the exact definition)."""
    if window_stride <= 0 or lookahead % window_stride:
        raise ValueError(
            f"window_stride must be a positive divisor of lookahead={lookahead}, got {window_stride}"
        )
    T = k_rope.shape[1]
    for t in refresh:
        if t < 0 or t + lookahead > T:
            raise ValueError(f"refresh position {t} with lookahead {lookahead} does not fit in {T} tokens")
    n = T // chunk_size
    offsets = range(0, lookahead, window_stride)
    positions = torch.tensor([t + j for t in refresh for j in offsets], dtype=torch.int64)
    q_sel = q_rope[:, positions]
    fn = brute_force_chunk_attention_mass if brute_force else chunk_attention_mass
    mass = fn(q_sel, k_rope, positions, chunk_size, scaling)[:, :, :n]  # [R*W, H, N]
    mass = mass.mean(dim=1).reshape(len(refresh), len(offsets), n)
    cand = candidate_mask(refresh, n, chunk_size, recent_tokens, num_sink_chunks)
    return targets_from_mass(mass, cand, torch.tensor(refresh, dtype=torch.int64), top_p)


def combine_layers(per_layer: list[WindowTargets], top_p: float = 0.6) -> WindowTargets:
    """Targets of the layer-averaged mass (labels: top-p of the mean over layers, union over the window)."""
    if not per_layer:
        raise ValueError("combine_layers needs at least one layer")
    mean = torch.stack([w.window_mass for w in per_layer]).mean(dim=0)
    return targets_from_mass(mean, per_layer[0].candidates, per_layer[0].refresh, top_p)
