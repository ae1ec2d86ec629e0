"""The learned lookahead memory indexer.

Per layer ``l`` and query head ``h`` (KV group ``g(h)``), at refresh position ``t``, for chunk ``c``:

    s[h, c] = (q_pre[h] @ Wq[l, h]) . kc[c, g(h)]  +  a[l, h] * (q_rope[h] . mean_key_rope[c, g(h)]) / sqrt(D)
              +  e[l, h] * quest_bound(q_rope[h], min_key[c, g(h)], max_key[c, g(h)]) / sqrt(D)   (use_bounds)
    kc[c, g] = mean_key[c, g] @ Wk[l, g]                         (the compressed key, [r], stored per chunk)
    z[c] = sum_h w[l, h] * relu(s[h, c] - mean_c' s[h, c'] + b[l, h]) + dist_bias[l, bucket(t, c)] + bias[l]
    score[c] = sigmoid(z[c])

* the first term is the learned, position-free content match (pre-RoPE query, compressed pre-RoPE mean
  key): it is trained on the union of the chunks attended over the next ``lookahead`` steps, so the query
  projection learns to point at what the coming window will read, not only at what ``q_t`` reads;
* the second is the exact mean attention logit of the chunk for the current query (a ``mean_key``
  heuristic term, weighted per head), the third its Quest upper bound (the chunk's best key);
* centring by the mean over the scored chunks makes the per-head threshold ``b`` independent of the
  query's logit offset (softmax is shift-invariant, a fixed ReLU threshold is not);
* ``bucket`` = ``floor(log2(1 + chunks between c and t))`` (16 buckets): a learned distance prior.

Selection: chunks with score > ``threshold`` or the top ``budget`` chunks, always plus sinks and the
recency tail (:func:`select_chunks`). Refresh every ``lookahead`` steps.

Cost per refresh and layer at N chunks: ``N * H_q * (r + 3D) * 2`` FLOPs for the dot products and the bound plus
``O(N * H_q)`` for the rest; the query projection is ``H_q * D * r * 2``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..kernels.checks import check_int
from .heuristics import QueryState
from .summaries import ChunkSummaries

NUM_DISTANCE_BUCKETS = 16
CHECKPOINT_FORMAT = "flashmem-lookahead-indexer/1"
DEFAULT_CHECKPOINT = "smollm2_135m_lookahead.safetensors"


def default_checkpoint_path() -> Path:
    """The trained checkpoint shipped for the embedded default model (package data)."""
    return Path(__file__).resolve().parent / "data" / DEFAULT_CHECKPOINT


@dataclass
class LookaheadConfig:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rank: int = 32
    chunk_size: int = 64
    lookahead: int = 64
    threshold: float = 0.5
    num_sink_chunks: int = 1
    recent_tokens: int = 128
    use_bounds: bool = True

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "num_q_heads",
            "num_kv_heads",
            "head_dim",
            "rank",
            "chunk_size",
            "lookahead",
        ):
            check_int("LookaheadConfig", name, getattr(self, name), 1)
        for name in ("num_sink_chunks", "recent_tokens"):
            check_int("LookaheadConfig", name, getattr(self, name), 0)
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


def distance_buckets(position: int | torch.Tensor, start: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """position: int or [...]; start: [N] -> bucket ids [..., N] in [0, 16)."""
    pos = torch.as_tensor(position, device=start.device, dtype=torch.float32).unsqueeze(-1)
    gap = ((pos - (start.float() + chunk_size)) / chunk_size).clamp_min(0)
    return torch.log2(1 + gap).floor().long().clamp(0, NUM_DISTANCE_BUCKETS - 1)


class LookaheadIndexer(torch.nn.Module):
    """All layers' indexer parameters; ``for_layer(l)`` gives an :class:`Indexer` for one layer.

    Wq: [L, H_q, D, r]; Wk: [L, H_kv, D, r]; a, e, w, b: [L, H_q]; dist_bias: [L, 16]; bias: [L]
    """

    def __init__(self, config: LookaheadConfig, fingerprint: dict | None = None):
        super().__init__()
        self.config = config
        self.fingerprint = fingerprint
        c = config
        g = torch.Generator().manual_seed(0)
        self.Wq = torch.nn.Parameter(
            torch.randn(c.num_layers, c.num_q_heads, c.head_dim, c.rank, generator=g) / math.sqrt(c.head_dim)
        )
        self.Wk = torch.nn.Parameter(
            torch.randn(c.num_layers, c.num_kv_heads, c.head_dim, c.rank, generator=g) / math.sqrt(c.head_dim)
        )
        self.a = torch.nn.Parameter(torch.ones(c.num_layers, c.num_q_heads))
        self.e = torch.nn.Parameter(torch.zeros(c.num_layers, c.num_q_heads))
        self.w = torch.nn.Parameter(torch.ones(c.num_layers, c.num_q_heads))
        self.b = torch.nn.Parameter(torch.zeros(c.num_layers, c.num_q_heads))
        self.dist_bias = torch.nn.Parameter(torch.zeros(c.num_layers, NUM_DISTANCE_BUCKETS))
        self.bias = torch.nn.Parameter(torch.zeros(c.num_layers))

    @torch.no_grad()
    def init_from_keys(self, keys_pre: torch.Tensor) -> None:
        """Initialise Wq = Wk = the top-r principal directions of pre-RoPE keys ``[L, M, H_kv, D]``
        (scaled so that the content term starts as a projected dot product / sqrt(D))."""
        c = self.config
        scale = c.head_dim**-0.25
        for layer in range(c.num_layers):
            for g in range(c.num_kv_heads):
                x = keys_pre[layer, :, g].float()
                _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
                # [D, r'] with r' = min(rank, D, keys): a rank above what the keys span keeps its
                # remaining columns as initialised
                basis = vh[: c.rank].T * scale
                r = basis.shape[1]
                self.Wk[layer, g, :, :r] = basis
                group = c.num_q_heads // c.num_kv_heads
                self.Wq[layer, g * group : (g + 1) * group, :, :r] = basis

    # ---- scoring -------------------------------------------------------------------------------
    def compress(self, layer: int, mean_key: torch.Tensor) -> torch.Tensor:
        """mean_key: [..., N, H_kv, D] pre-RoPE -> compressed keys [..., N, H_kv, r]."""
        return torch.einsum("...ngd,gdr->...ngr", mean_key.float(), self.Wk[layer])

    def logits(
        self,
        layer: int,
        q_pre: torch.Tensor,
        q_rope: torch.Tensor,
        position: int | torch.Tensor,
        mean_key_rope: torch.Tensor,
        compressed: torch.Tensor,
        start: torch.Tensor,
        mask: torch.Tensor | None = None,
        bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Pre-sigmoid scores.

        q_pre, q_rope: [..., H_q, D]; position: int or [...]; mean_key_rope: [N, H_kv, D];
        compressed: [N, H_kv, r]; start: [N]; mask: [..., N] bool of scored chunks (None = all);
        bounds: (min_key, max_key) [N, H_kv, D] post-RoPE, required when ``config.use_bounds``
        -> z [..., N] (masked entries are -inf).
        """
        c = self.config
        group = c.num_q_heads // c.num_kv_heads
        u = torch.einsum("...hd,hdr->...hr", q_pre.float(), self.Wq[layer])  # [..., H_q, r]
        # query heads grouped per KV head: no copy of the chunk side per query head
        ug = u.reshape(*u.shape[:-2], c.num_kv_heads, group, u.shape[-1])  # [..., H_kv, G, r]
        qg = q_rope.float().reshape(
            *q_rope.shape[:-2], c.num_kv_heads, group, c.head_dim
        )  # [..., H_kv, G, D]
        content = torch.einsum("...kgr,nkr->...kgn", ug, compressed.float())  # [..., H_kv, G, N]
        mean_logit = torch.einsum("...kgd,nkd->...kgn", qg, mean_key_rope.float()) / math.sqrt(c.head_dim)
        content = content.flatten(-3, -2)  # [..., H_q, N]
        mean_logit = mean_logit.flatten(-3, -2)
        s = content + self.a[layer].unsqueeze(-1) * mean_logit  # [..., H_q, N]
        if c.use_bounds:
            if bounds is None:
                raise ValueError("this indexer uses Quest bounds: pass bounds=(min_key, max_key)")
            # max(q*lo, q*hi) = relu(q)*hi + min(q, 0)*lo since lo <= hi: two matmuls
            hi = torch.einsum("...kgd,nkd->...kgn", qg.clamp_min(0), bounds[1].float())  # [..., H_kv, G, N]
            lo = torch.einsum("...kgd,nkd->...kgn", qg.clamp_max(0), bounds[0].float())
            bound = (hi + lo).flatten(-3, -2) / math.sqrt(c.head_dim)  # [..., H_q, N]
            s = s + self.e[layer].unsqueeze(-1) * bound
        if mask is None:
            centre = s.mean(dim=-1, keepdim=True)
        else:
            m = mask.unsqueeze(-2).float()
            centre = (s * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1)
        act = torch.relu(s - centre + self.b[layer].unsqueeze(-1))
        z = torch.einsum("...hn,h->...n", act, self.w[layer])
        z = z + self.dist_bias[layer][distance_buckets(position, start, c.chunk_size)] + self.bias[layer]
        if mask is not None:
            z = z.masked_fill(~mask, -math.inf)
        return z

    def record_logits(self, record, layer: int) -> torch.Tensor:
        """Pre-sigmoid scores ``[R, N]`` at every refresh of one layer of a stored record
        (:class:`~flashmem.indexer.records.DocRecord`); chunks that are not candidates get -inf.
        Training and evaluation both score records through here."""
        summ = record.summaries(layer)
        return self.logits(
            layer,
            record.q_pre[layer],
            record.q_rope[layer],
            record.refresh,
            summ.mean_key_rope,
            self.compress(layer, summ.mean_key),
            summ.start,
            record.candidates,
            bounds=summ.bounds() if self.config.use_bounds else None,
        )

    def fields(self) -> tuple[str, ...]:
        """The chunk summary fields :meth:`score_layer` reads: the compressed key (stored when a chunk
        closes, instead of the mean pre-RoPE key it is computed from), the mean post-RoPE key and, with
        ``use_bounds``, the Quest bounds."""
        bounds = ("min_key", "max_key") if self.config.use_bounds else ()
        return ("mean_key_rope", *bounds, "compressed")

    def score_layer(self, layer: int, query: QueryState, summaries: ChunkSummaries) -> torch.Tensor:
        """Scores in (0, 1) of every chunk in ``summaries`` ([..., N]); uses ``summaries.compressed``
        when it holds this indexer's rank, else compresses ``summaries.mean_key``."""
        comp = summaries.compressed
        if comp is None or comp.shape[-1] != self.config.rank:
            comp = self.compress(layer, summaries.field("mean_key"))
        bounds = summaries.bounds() if self.config.use_bounds else None
        z = self.logits(
            layer,
            query.q_pre,
            query.q_rope,
            query.position,
            summaries.field("mean_key_rope"),
            comp,
            summaries.start,
            bounds=bounds,
        )
        return torch.sigmoid(z)

    def for_layer(self, layer: int) -> LayerIndexer:
        if not 0 <= layer < self.config.num_layers:
            raise ValueError(f"layer {layer} out of range 0..{self.config.num_layers - 1}")
        return LayerIndexer(self, layer)

    # ---- checkpoint ----------------------------------------------------------------------------
    def save(self, path: str | Path, extra: dict | None = None) -> tuple[Path, Path]:
        """Write ``path`` (.safetensors tensors) and ``path`` with suffix .json (config, fingerprint)."""
        from safetensors.torch import save_file

        path = Path(path).with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path))
        meta = {"format": CHECKPOINT_FORMAT, "config": asdict(self.config), "fingerprint": self.fingerprint}
        if extra:
            meta["training"] = extra
        jpath = path.with_suffix(".json")
        jpath.write_text(json.dumps(meta, indent=2, sort_keys=True))
        return path, jpath

    @classmethod
    def from_checkpoint(cls, tensors: dict, meta: dict, origin: str = "checkpoint") -> LookaheadIndexer:
        """Build an indexer from a checkpoint's tensors and JSON metadata (see :meth:`save`);
        ``origin`` (the path) names the file in every error. Checks the format, the config, that the
        tensors are exactly this config's parameters with their shapes, and that every value is
        finite: a bad checkpoint is refused here, never half-way through a decode."""
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{origin} is not a flashmem lookahead indexer checkpoint ({found!r})")
        try:
            fields = dict(meta["config"])
            if "tau" in fields:  # checkpoints written before the field took the config's name
                fields["lookahead"] = fields.pop("tau")
            config = LookaheadConfig(**fields)
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{origin}: invalid indexer config ({err})") from None
        indexer = cls(config, fingerprint=meta.get("fingerprint"))
        expected = {k: tuple(v.shape) for k, v in indexer.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if found != expected:
            diff = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
            raise ValueError(
                f"{origin}: tensors do not match the checkpoint's config (differ in {diff}: "
                f"expected {[expected.get(k) for k in diff]}, found {[found.get(k) for k in diff]})"
            )
        for name, t in tensors.items():
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{origin}: tensor {name!r} must hold finite floats")
        indexer.load_state_dict(tensors)
        return indexer.eval()


class LayerIndexer:
    """One layer's view of a :class:`LookaheadIndexer` (implements the ``Indexer`` protocol)."""

    name = "lookahead"

    def __init__(self, parent: LookaheadIndexer, layer: int):
        self.parent = parent
        self.layer = layer
        self.fields = parent.fields()

    @torch.no_grad()
    def score(self, query: QueryState, summaries: ChunkSummaries) -> torch.Tensor:
        return self.parent.score_layer(self.layer, query, summaries)

    @torch.no_grad()
    def compress_mean_key(self, mean_key: torch.Tensor) -> torch.Tensor:
        """mean_key: [n, H_kv, D] pre-RoPE -> compressed keys [n, H_kv, r] fp32 (the ``compress`` a
        :class:`~flashmem.indexer.summaries.ChunkSummaryBuilder` applies when a chunk closes)."""
        return self.parent.compress(self.layer, mean_key)

    @torch.no_grad()
    def compress(self, summaries: ChunkSummaries) -> ChunkSummaries:
        """Fill ``summaries.compressed`` (done once when a chunk closes)."""
        summaries.compressed = self.parent.compress(self.layer, summaries.field("mean_key"))
        return summaries


def select_chunks(
    scores: torch.Tensor,
    position: int,
    chunk_size: int,
    budget: int | None = None,
    threshold: float | None = None,
    num_sink_chunks: int = 1,
    recent_tokens: int = 128,
) -> torch.Tensor:
    """Chunk ids to keep resident for ``[position, position + lookahead)``.

    scores: [N] over the closed chunks 0..N-1. Sinks (first ``num_sink_chunks``) and the recency tail
    (chunks overlapping ``[position - recent_tokens, position)``) are always kept; among the others,
    the top ``budget`` by score, or (``budget=None``) those scoring above ``threshold``; with both, the
    chunks above ``threshold`` capped at ``budget``. Returns sorted int64 ids [M] on the scores' device.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be [N], got shape {tuple(scores.shape)}")
    if budget is None and threshold is None:
        raise ValueError("give a chunk budget, a threshold, or both")
    if budget is not None and budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    n = scores.shape[0]
    idx = torch.arange(n, device=scores.device)
    tail_from = max(0, (position - recent_tokens) // chunk_size)
    always = (idx < num_sink_chunks) | (idx >= tail_from)
    cand = scores.masked_fill(always, -math.inf)
    n_cand = max(0, min(n, tail_from) - min(n, num_sink_chunks))
    if threshold is not None:
        cand = cand.masked_fill(cand <= threshold, -math.inf)
    k = n_cand if budget is None else min(budget, n_cand)
    top = torch.topk(cand, k).indices if k > 0 else idx[:0]
    top = top[torch.isfinite(cand[top])]
    return torch.unique(torch.cat([idx[always], top]))
