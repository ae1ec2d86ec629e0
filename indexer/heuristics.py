"""The ``Indexer`` protocol, heuristic indexers, the oracle, and the registry by name.

An indexer scores the closed chunks of ONE layer for a query state at refresh position ``t``:
``Indexer.score(query, summaries) -> [..., N]`` (higher = more likely needed in ``[t, t + lookahead)``).
Scores are per layer: per-head scores are reduced over the layer's query heads (``head_reduce``):

* ``"softmax_mean"`` (default): softmax over chunks per query head (logits scaled by ``1/sqrt(D)``),
  then mean over heads: an estimate of the layer's attention-mass share per chunk;
* ``"max"``: max over heads of the raw per-head score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .summaries import SUMMARY_FIELDS, ChunkSummaries


@dataclass
class QueryState:
    """What an indexer may look at when it refreshes at position ``position`` (one layer).

    q_pre:  [..., H_q, D] pre-RoPE query of the token at ``position``
    q_rope: [..., H_q, D] the same query after RoPE (Quest and mean-key heuristics need it)
    position: absolute position of that token (host int)
    hidden: [..., hidden_size] decode-time hidden state entering the layer, or None
    oracle_mass: [..., N] true attention mass per chunk over the window (oracle only), or None
    """

    q_pre: torch.Tensor
    q_rope: torch.Tensor
    position: int
    hidden: torch.Tensor | None = None
    oracle_mass: torch.Tensor | None = None


@runtime_checkable
class Indexer(Protocol):
    """``fields``: the chunk summary fields ``score`` reads (see :mod:`flashmem.indexer.summaries`); the
    recall controller stores only the union of its indexers' fields. An indexer may also set
    ``per_kv_head = True``: ``score`` then ranks chunks for one KV head when given that head's query
    group ``[G, D]`` and that head's summaries (:meth:`ChunkSummaries.head`), which per-head recall uses;
    without it per-head recall gives every head of a layer the layer's ranking."""

    name: str
    fields: tuple[str, ...]

    def score(self, query: QueryState, summaries: ChunkSummaries) -> torch.Tensor:
        """query: QueryState with q [..., H_q, D]; summaries of N chunks -> scores [..., N]."""
        ...


def indexer_fields(indexer) -> tuple[str, ...]:
    """The summary fields ``indexer`` reads (every field computable from keys if it declares none)."""
    return tuple(getattr(indexer, "fields", SUMMARY_FIELDS))


def _group_query(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[..., H_q, D] -> [..., H_kv, G, D] (query head h reads KV head h // G): the chunk side is never
    copied per query head."""
    h_q = q.shape[-2]
    if h_q % num_kv_heads:
        raise ValueError(f"{h_q} query heads are not a multiple of {num_kv_heads} KV heads")
    return q.reshape(*q.shape[:-2], num_kv_heads, h_q // num_kv_heads, q.shape[-1])


def _grouped_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [..., H_q, D] (fp32), k [N, H_kv, D] (any float dtype) -> q_h . k_{g(h)} [..., H_q, N] in fp32."""
    qg = _group_query(q, k.shape[1])  # [..., H_kv, G, D]
    out = torch.einsum("...kgd,nkd->...kgn", qg, k.to(qg.dtype))  # [..., H_kv, G, N]
    return out.flatten(-3, -2)


def reduce_heads(per_head: torch.Tensor, head_reduce: str, head_dim: int) -> torch.Tensor:
    """per_head: [..., H_q, N] logits -> [..., N]."""
    if per_head.shape[-1] == 0:
        return per_head.sum(dim=-2)
    if head_reduce == "softmax_mean":
        return torch.softmax(per_head / math.sqrt(head_dim), dim=-1).mean(dim=-2)
    if head_reduce == "max":
        return per_head.amax(dim=-2)
    raise ValueError(f"head_reduce must be 'softmax_mean' or 'max', got {head_reduce!r}")


def _check(query: QueryState, summaries: ChunkSummaries, fields: tuple[str, ...]) -> None:
    for name in fields:
        d = summaries.field(name).shape[-1]
        if query.q_rope.shape[-1] != d:
            raise ValueError(f"query head_dim {query.q_rope.shape[-1]} != summary head_dim {d}")


class MeanKeyIndexer:
    """Dot product of the post-RoPE query with each chunk's mean post-RoPE key: the exact mean logit
    over the chunk (``prerope=True`` uses pre-RoPE query and mean key instead, ignoring position)."""

    per_kv_head = True  # scoring one KV head's query group against that head's summaries is valid

    def __init__(self, head_reduce: str = "softmax_mean", prerope: bool = False):
        self.head_reduce = head_reduce
        self.prerope = prerope
        self.name = "mean_key_prerope" if prerope else "mean_key"
        self.fields = ("mean_key",) if prerope else ("mean_key_rope",)

    def score(self, query: QueryState, summaries: ChunkSummaries) -> torch.Tensor:
        _check(query, summaries, self.fields)
        q = (query.q_pre if self.prerope else query.q_rope).float()
        logits = _grouped_logits(q, summaries.field(self.fields[0]))  # [..., H_q, N]
        return reduce_heads(logits, self.head_reduce, q.shape[-1])


class QuestIndexer:
    """Quest upper bound ``sum_d max(q_d * min_d, q_d * max_d)`` with post-RoPE query and bounds."""

    name = "quest"
    fields = ("min_key", "max_key")
    per_kv_head = True

    def __init__(self, head_reduce: str = "softmax_mean"):
        self.head_reduce = head_reduce

    def score(self, query: QueryState, summaries: ChunkSummaries) -> torch.Tensor:
        _check(query, summaries, self.fields)
        q = query.q_rope.float()
        lo, hi = summaries.bounds()  # fp32 [N, H_kv, D], dequantized from the int8 codes
        # max(q*lo, q*hi) summed over d = relu(q) . hi + min(q, 0) . lo (lo <= hi)
        bound = _grouped_logits(q.clamp_min(0), hi) + _grouped_logits(q.clamp_max(0), lo)  # [..., H_q, N]
        return reduce_heads(bound, self.head_reduce, q.shape[-1])


class RecencyIndexer:
    """Most recent chunks first (ignores the query)."""

    name = "recency"
    fields: tuple[str, ...] = ()
    per_kv_head = True

    def score(self, query: QueryState, summaries: ChunkSummaries) -> torch.Tensor:
        s = summaries.start.to(query.q_rope.dtype)
        return s.expand(*query.q_rope.shape[:-2], s.shape[0]).clone()


class OracleIndexer:
    """True attention mass per chunk over the window (``QueryState.oracle_mass``); evaluation only."""

    name = "oracle"
    fields: tuple[str, ...] = ()

    def score(self, query: QueryState, summaries: ChunkSummaries) -> torch.Tensor:
        if query.oracle_mass is None:
            raise ValueError(
                "the oracle indexer needs QueryState.oracle_mass (true attention mass per chunk)"
            )
        if query.oracle_mass.shape[-1] != summaries.num_chunks:
            raise ValueError(
                f"oracle_mass has {query.oracle_mass.shape[-1]} chunks, summaries have {summaries.num_chunks}"
            )
        return query.oracle_mass


INDEXERS: dict[str, type] = {}


def register_indexer(name: str, factory) -> None:
    """Make ``get_indexer(name)`` build indexers with ``factory(**kwargs)``."""
    INDEXERS[name] = factory


def get_indexer(name: str, **kwargs) -> Indexer:
    """Build a registered indexer by name (``mean_key``, ``mean_key_prerope``, ``quest``, ``recency``,
    ``oracle``, ``lookahead``)."""
    if name not in INDEXERS:
        raise ValueError(f"unknown indexer {name!r}; choose one of {sorted(INDEXERS)}")
    return INDEXERS[name](**kwargs)


register_indexer("mean_key", lambda **kw: MeanKeyIndexer(prerope=False, **kw))
register_indexer("mean_key_prerope", lambda **kw: MeanKeyIndexer(prerope=True, **kw))
register_indexer("quest", QuestIndexer)
register_indexer("recency", RecencyIndexer)
register_indexer("oracle", OracleIndexer)

HEURISTICS = ("mean_key", "mean_key_prerope", "quest", "recency")
