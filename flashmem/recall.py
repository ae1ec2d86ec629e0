"""Lookahead recall: which host-mirror chunks the device should hold for the next ``lookahead`` steps.

The controller keeps, per layer, summaries of every closed chunk of ``chunk_size`` tokens (fed with
the keys the cache writes), remembers the latest query of every layer, and on each refresh scores
the chunks of every layer with an indexer (``flashmem.indexer``: a learned lookahead checkpoint or a
heuristic such as ``quest``), sums the per-layer scores and picks the top ``chunk_budget`` chunks.
Chunks that lie entirely inside the sinks or the recent window are never recalled: the working
set holds those tokens already.

Shapes: keys ``[T, H_kv, D]`` post-RoPE; queries ``[H_q, D]`` post-RoPE; cos/sin ``[T, D]``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from flashmem.indexer.chunk_index import fold_query_for_heads as _fold
from flashmem.indexer.heuristics import QueryState, get_indexer
from flashmem.indexer.lookahead import default_checkpoint_path
from flashmem.indexer.summaries import ChunkSummaryBuilder

from . import hf_compat
from .files import load_indexer, prepared_indexer_path


def resolve_indexer(name: str, model: torch.nn.Module, num_layers: int, chunk_size: int) -> tuple[str, list]:
    """Per-layer indexers for ``name``: ``"auto"`` (the learned checkpoint ``flashmem prepare`` stored
    for this model, else the shipped one, when trained for this model and this chunk size, else
    ``"quest"``), a heuristic name, ``"lookahead"`` or a
    checkpoint path. Errors (unknown name, a checkpoint for another model or chunk size) are raised
    here, before any work."""
    if name == "auto":
        for path in (prepared_indexer_path(model), default_checkpoint_path()):
            if path.is_file():
                try:
                    return _learned(path, model, num_layers, chunk_size)
                except ValueError:
                    pass
        name = "quest"
    if name == "lookahead":
        return _learned(default_checkpoint_path(), model, num_layers, chunk_size)
    if name.endswith((".safetensors", ".json")) or Path(name).is_file():
        return _learned(Path(name), model, num_layers, chunk_size)
    return name, [get_indexer(name) for _ in range(num_layers)]


def _learned(path: Path, model: torch.nn.Module, num_layers: int, chunk_size: int) -> tuple[str, list]:
    device = next(model.parameters()).device
    learned = load_indexer(path, hf_compat.model_fingerprint(model), device=device)
    if learned.config.chunk_size != chunk_size:
        raise ValueError(
            f"indexer checkpoint {Path(path).name} was trained for {learned.config.chunk_size}-token chunks, "
            f"the config asks for chunk_size={chunk_size}; train one for this chunk size or pick a heuristic"
        )
    return f"lookahead:{Path(path).name}", [learned.for_layer(layer) for layer in range(num_layers)]


class RecallController:
    """Chunk summaries, latest queries and the refresh decision for one sequence."""

    def __init__(
        self,
        model: torch.nn.Module,
        indexers: list,
        *,
        num_kv_heads: int,
        head_dim: int,
        chunk_size: int,
        chunk_budget: int,
        sink_tokens: int,
        window_tokens: int,
        device: torch.device,
        index_backend: str = "torch",
        index_candidates: int = 0,
    ) -> None:
        self.model = model
        self.indexers = indexers
        self.chunk_size = chunk_size
        self.chunk_budget = chunk_budget
        self.sink_tokens = sink_tokens
        self.window_tokens = window_tokens
        self.builders = [
            ChunkSummaryBuilder(num_kv_heads, head_dim, chunk_size=chunk_size, device=device)
            for _ in indexers
        ]
        self._queries: list[torch.Tensor | None] = [None] * len(indexers)
        self.index_candidates = index_candidates
        self.num_kv_heads = num_kv_heads
        self.indexes = []
        if index_candidates:
            from flashmem.indexer.chunk_index import make_chunk_index

            kwargs = {"device": device} if index_backend == "torch" else {}
            self.indexes = [
                make_chunk_index(index_backend, num_kv_heads * head_dim, **kwargs) for _ in indexers
            ]
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._observed: torch.Tensor | None = None
        self.refreshes = 0
        self.observed_refreshes = 0
        self.refresh_time_s = 0.0

    # ---- fed by the cache ----------------------------------------------------------------------
    def begin_step(self, positions: torch.Tensor) -> None:
        """cos/sin ``[T, D]`` of this step's positions, shared by every layer."""
        self._cos, self._sin = hf_compat.rotary_cos_sin(self.model, positions)

    def on_keys(self, layer: int, keys: torch.Tensor) -> None:
        """Post-RoPE keys ``[T, H_kv, D]`` just written for ``layer``."""
        cos = self._cos[:, None, :]
        sin = self._sin[:, None, :]
        pre = hf_compat.unrotate(keys.float(), cos, sin)
        builder = self.builders[layer]
        closed = builder.append(keys.float(), pre)
        if closed and self.indexes:
            new = builder.summaries.mean_key_rope[builder.num_chunks - closed :]  # [closed, H_kv, D]
            self.indexes[layer].add(new.reshape(closed, -1))

    def on_query(self, layer: int, query: torch.Tensor) -> None:
        """Post-RoPE query ``[H_q, D]`` of the step's last token for ``layer``."""
        self._queries[layer] = query

    def _retrieve(self, lo: int, hi: int) -> torch.Tensor:
        """Union over layers of each layer's ``index_candidates`` best chunks in ``[lo, hi)`` by the
        mean-key inner product, found by the chunk index (torch or faiss); sorted int64 ids."""
        found = []
        for layer, index in enumerate(self.indexes):
            query = _fold(self._queries[layer].float(), self.num_kv_heads)
            # search a little wider than needed: chunks outside [lo, hi) are dropped afterwards
            _, ids = index.search(
                query[None], min(len(index), self.index_candidates + (len(index) - (hi - lo)))
            )
            ids = ids[0].to(self._queries[layer].device)
            found.append(ids[(ids >= lo) & (ids < hi)][: self.index_candidates])
        return torch.unique(torch.cat(found))

    def observe_mass(self, layer: int, mass: torch.Tensor) -> None:
        """True attention mass ``[N]`` of the prompt's last queries on history chunks ``0..N-1`` (one
        layer, measured by exact prefill). The next refresh ranks chunks by its sum over layers
        instead of asking the indexer: at the end of the prompt the real attention is known."""
        if self._observed is None or self._observed.shape[0] != mass.shape[0] or layer == 0:
            self._observed = torch.zeros_like(mass, dtype=torch.float32)
        self._observed += mass.float()

    # ---- refresh -------------------------------------------------------------------------------
    def candidates(self, position: int) -> tuple[int, int]:
        """Chunk id range ``[lo, hi)`` worth recalling at ``position``: closed chunks past the sinks and
        before the recent window."""
        lo = math.ceil(self.sink_tokens / self.chunk_size) if self.sink_tokens >= self.chunk_size else 0
        window_start = max(0, position - self.window_tokens)
        hi = min(self.builders[0].num_chunks, window_start // self.chunk_size)
        return lo, max(lo, hi)

    @torch.no_grad()
    def select(self, position: int) -> list[int]:
        """Chunk ids to hold for ``[position, position + lookahead)``, ranked by summed layer scores."""
        lo, hi = self.candidates(position)
        if hi <= lo or self.chunk_budget == 0 or self._queries[0] is None:
            return []
        k = min(self.chunk_budget, hi - lo)
        observed, self._observed = self._observed, None
        if observed is not None and observed.shape[0] >= hi:
            top = torch.topk(observed[lo:hi], k).indices + lo
            self.refreshes += 1
            self.observed_refreshes += 1
            return sorted(int(c) for c in top.tolist())
        cos = self._cos[-1:]
        sin = self._sin[-1:]
        candidates = self._retrieve(lo, hi) if self.indexes else None
        total = None
        for layer, indexer in enumerate(self.indexers):
            q_rope = self._queries[layer].float()
            q_pre = hf_compat.unrotate(q_rope, cos, sin)
            summaries = self.builders[layer].summaries.select(
                slice(lo, hi) if candidates is None else candidates
            )
            scores = indexer.score(QueryState(q_pre=q_pre, q_rope=q_rope, position=position), summaries)
            total = scores if total is None else total + scores
        if candidates is not None:
            k = min(k, candidates.numel())
            top = candidates[torch.topk(total, k).indices]
        else:
            top = torch.topk(total, k).indices + lo
        self.refreshes += 1
        return sorted(int(c) for c in top.tolist())
