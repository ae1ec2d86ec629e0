"""Indexer evaluation: recall@K of label chunks and covered attention mass at a chunk budget.

For every document, layer and refresh position ``t`` (see :mod:`flashmem.indexer.labels`), each indexer
ranks the candidate chunks; its top ``K`` (``K = ceil(budget * candidates)`` for a fractional budget,
else ``min(budget, candidates)``) give

* ``recall``: |top-K and labels| / |labels| (labels = union over the window of top-p 0.6 sets);
* ``covered_mass``: the fraction of the window's candidate attention mass on the top-K chunks,
  averaged over the window's queries (sinks and the recency tail are resident for everyone and are
  not counted).

Averages are over documents, layers and refresh positions. The oracle ranks by the true window mass,
so its covered mass is the best any selection of K chunks can reach.

The command that runs a model to build the records is ``flashmem eval-indexer``
(:mod:`flashmem.indexer_training`).
"""

from __future__ import annotations

import math
import time

import torch

from .heuristics import HEURISTICS, QueryState, get_indexer
from .lookahead import LookaheadIndexer
from .records import DocRecord


def budget_k(budget: float, n_candidates: torch.Tensor) -> torch.Tensor:
    """K per row: fractional budgets (< 1) scale with the candidates, integers are absolute."""
    if budget <= 0:
        raise ValueError(f"chunk budget must be positive, got {budget}")
    if budget < 1:
        k = torch.ceil(budget * n_candidates.float()).long()
    else:
        k = torch.full_like(n_candidates, int(budget))
    return torch.minimum(k.clamp_min(1), n_candidates)


def record_scores(
    name: str, rec: DocRecord, layer: int, lookahead: LookaheadIndexer | None = None
) -> torch.Tensor:
    """Scores [R, N] of indexer ``name`` for every refresh of one layer of ``rec``."""
    if name == "lookahead":
        if lookahead is None:
            raise ValueError("the lookahead indexer needs a trained LookaheadIndexer")
        with torch.no_grad():
            return lookahead.record_logits(rec, layer)
    summ = rec.summaries(layer)
    q = QueryState(
        rec.q_pre[layer], rec.q_rope[layer], position=int(rec.refresh[-1]), oracle_mass=rec.target[layer]
    )
    return get_indexer(name).score(q, summ)


def selection_metrics(
    scores: torch.Tensor, rec: DocRecord, layer: int, budget: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [R, N] -> (recall [R'], covered mass [R']) over refreshes with candidates and labels."""
    cand = rec.candidates
    n_cand = cand.sum(-1)
    k = budget_k(budget, n_cand)
    s = scores.float().masked_fill(~cand, -math.inf)
    order = torch.argsort(s, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(s.shape[-1]).expand_as(order))
    chosen = (rank < k.unsqueeze(-1)) & cand
    labels = rec.labels[layer]
    n_lab = labels.sum(-1)
    valid = (n_cand > 0) & (n_lab > 0)
    recall = (chosen & labels).sum(-1).float() / n_lab.clamp_min(1)
    mass = (rec.target[layer] * chosen).sum(-1)
    return recall[valid], mass[valid]


def evaluate_records(
    records: list[DocRecord],
    budget: float,
    names: list[str] | None = None,
    lookahead: LookaheadIndexer | None = None,
) -> dict:
    """{indexer: {"recall": ..., "covered_mass": ..., "n": rows}} averaged over docs, layers, refreshes."""
    if names is None:
        names = (["lookahead"] if lookahead is not None else []) + list(HEURISTICS) + ["oracle"]
    out = {}
    for name in names:
        recalls, masses = [], []
        for rec in records:
            for layer in range(rec.target.shape[0]):
                r, m = selection_metrics(record_scores(name, rec, layer, lookahead), rec, layer, budget)
                recalls.append(r)
                masses.append(m)
        if not recalls or sum(x.numel() for x in recalls) == 0:
            raise ValueError(
                "no refresh position has candidate chunks (past the sink chunk and before the recency "
                "tail): the documents are too short for this chunk size and window; use longer documents"
            )
        r = torch.cat(recalls)
        m = torch.cat(masses)
        out[name] = {"recall": float(r.mean()), "covered_mass": float(m.mean()), "n": int(r.numel())}
    if "oracle" in out:
        for v in out.values():
            v["mass_vs_oracle"] = v["covered_mass"] / max(out["oracle"]["covered_mass"], 1e-12)
    return out


def refresh_cost(
    lookahead: LookaheadIndexer, num_chunks: int = 7813, repeats: int = 5, threads: int | None = 1
) -> dict:
    """FLOPs and CPU time of one refresh (all layers, scores + top-64) over ``num_chunks`` chunks
    (500K / 64 = 7813), measured with ``threads`` torch threads (None: the current setting)."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _refresh_cost(lookahead, num_chunks, repeats)
    finally:
        torch.set_num_threads(previous)


def _refresh_cost(lookahead: LookaheadIndexer, num_chunks: int, repeats: int) -> dict:
    c = lookahead.config
    g = torch.Generator().manual_seed(0)
    start = torch.arange(num_chunks) * c.chunk_size
    mk = torch.randn(num_chunks, c.num_kv_heads, c.head_dim, generator=g)
    comp = [lookahead.compress(layer, mk).detach() for layer in range(c.num_layers)]
    q = torch.randn(c.num_q_heads, c.head_dim, generator=g)
    pos = num_chunks * c.chunk_size + c.recent_tokens
    with torch.no_grad():
        lookahead.logits(0, q, q, pos, mk, comp[0], start, bounds=(mk - 1, mk + 1))
        t0 = time.perf_counter()
        for _ in range(repeats):
            for layer in range(c.num_layers):
                torch.topk(
                    torch.sigmoid(
                        lookahead.logits(layer, q, q, pos, mk, comp[layer], start, bounds=(mk - 1, mk + 1))
                    ),
                    64,
                )
        dt = (time.perf_counter() - t0) / repeats
    dims = c.rank + c.head_dim + (2 * c.head_dim if c.use_bounds else 0)  # content, mean logit, bound
    per_layer = num_chunks * c.num_q_heads * dims * 2 + c.num_q_heads * c.head_dim * c.rank * 2
    per_layer += num_chunks * c.num_q_heads * 6  # centring, relu, mixing
    return {
        "num_chunks": num_chunks,
        "flops_per_refresh_all_layers": per_layer * c.num_layers,
        "cpu_seconds_per_refresh_all_layers": dt,
        "cpu_threads": torch.get_num_threads(),
        "amortised_flops_per_decode_step": per_layer * c.num_layers / c.lookahead,
        "compressed_key_bytes_per_chunk_per_layer": c.num_kv_heads * c.rank * 4,
    }
