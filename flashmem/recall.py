"""Lookahead recall: which host-mirror chunks the device should hold for the next ``lookahead`` steps.

The controller keeps, per layer, summaries of every closed chunk of ``chunk_size`` tokens (fed with
the keys the cache writes), remembers the latest query of every layer, and on each refresh scores
the chunks of every layer with an indexer (``flashmem.indexer``: a learned lookahead checkpoint or a
heuristic such as ``quest``) and picks ``chunk_budget`` chunks: per layer and KV head
(:meth:`RecallController.select_heads`, each head its own top chunks, ``recall_mode="per_layer_per_head"``)
or one set for the whole model (:meth:`RecallController.select`, the top chunks of the summed layer
scores, ``recall_mode="shared"``).
Chunks that lie entirely inside the sinks or the recent window are never recalled: the working
set holds those tokens already.

Shapes: keys ``[T, H_kv, D]`` post-RoPE; queries ``[H_q, D]`` post-RoPE; cos/sin ``[T, D]``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from flashmem.indexer.chunk_index import fold_query_for_heads as _fold
from flashmem.indexer.heuristics import QueryState, get_indexer, indexer_fields
from flashmem.indexer.lookahead import default_checkpoint_path
from flashmem.indexer.summaries import ChunkSummaryBuilder

from . import hf_compat
from .files import load_indexer, prepared_indexer_path


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def resolve_indexer(name: str, model: torch.nn.Module, num_layers: int, chunk_size: int) -> tuple[str, list]:
    """Per-layer indexers for ``name``: ``"auto"`` (the learned checkpoint ``flashmem prepare
    --train-indexer`` stored for this model, when trained for this chunk size, else ``"quest"``), a
    heuristic name, ``"lookahead"`` (the shipped checkpoint) or a checkpoint path. Errors (unknown
    name, a checkpoint for another model or chunk size) are raised here, before any work.

    ``"auto"`` does not pick the shipped checkpoint: measured on the embedded model at 4K tokens
    (``bench/results/fidelity*.json``), Quest gives its next-token top-1 at the same budget with 2.7
    points less device share (the checkpoint's weights and summaries are device bytes), and the suite's
    answers are the same."""
    if name == "auto":
        path = prepared_indexer_path(model)
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


def _on_device(t: torch.Tensor, device: torch.device) -> bool:
    return t.device.type == device.type and (device.index is None or t.device.index == device.index)


def storage_bytes(tensors, device: torch.device) -> int:
    """Bytes of the distinct storages (as allocated) of ``tensors`` that live on ``device``."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not _on_device(t, device):
            continue
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


class RecallController:
    """Chunk summaries, latest queries and the refresh decision for one sequence.

    Each layer's :class:`~flashmem.indexer.summaries.ChunkSummaryBuilder` stores, in the keys' dtype
    (the model's), only the union of the fields its indexers read (``Indexer.fields``); a chunk index
    gets its ``mean_key_rope`` vectors when chunks close without the builder storing them for it.
    ``capacity_tokens`` (when known) sizes the summary storage once; otherwise it grows by doubling.
    """

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
        recent_tokens: int,
        device: torch.device,
        index_backend: str = "torch",
        index_candidates: int = 0,
        capacity_tokens: int = 0,
        per_head: bool = False,
    ) -> None:
        self.model = model
        self.per_head = per_head
        self.indexers = indexers
        self.chunk_size = chunk_size
        self.chunk_budget = chunk_budget
        self.sink_tokens = sink_tokens
        self.recent_tokens = recent_tokens
        self.device = torch.device(device)
        self.index_candidates = index_candidates
        self.num_kv_heads = num_kv_heads
        self.indexes = []
        dtype = _model_dtype(model)
        if index_candidates:
            from flashmem.indexer.chunk_index import make_chunk_index

            kwargs = {"device": device, "dtype": dtype} if index_backend == "torch" else {}
            self.indexes = [
                make_chunk_index(index_backend, num_kv_heads * head_dim, **kwargs) for _ in indexers
            ]
        self.fields = tuple(sorted({f for ix in indexers for f in indexer_fields(ix)}))
        capacity = max(1, capacity_tokens // chunk_size) if capacity_tokens else 16
        self.builders = [
            ChunkSummaryBuilder(
                num_kv_heads,
                head_dim,
                chunk_size=chunk_size,
                device=device,
                fields=self.fields,
                compress=getattr(ix, "compress_mean_key", None) if "compressed" in self.fields else None,
                extra_fields=("mean_key_rope",) if self.indexes else (),
                on_close=self._index_adder(layer) if self.indexes else None,
                capacity_chunks=capacity,
            )
            for layer, ix in enumerate(indexers)
        ]
        self._queries: torch.Tensor | None = None  # [L, H_q, D] latest query per layer (a copy)
        self._has_query = [False] * len(indexers)
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._observed: torch.Tensor | None = None  # [N] (shared) or [L, H_kv, N] (per head)
        self._prompt_ranks: torch.Tensor | None = None  # per head: the prompt-tail ranks, kept [L, H_kv, N]
        self.refreshes = 0
        self.observed_refreshes = 0
        self.refresh_time_s = 0.0

    def _index_adder(self, layer: int):
        def add(values: dict[str, torch.Tensor]) -> None:
            new = values["mean_key_rope"]  # [closed, H_kv, D]
            self.indexes[layer].add(new.reshape(new.shape[0], -1))

        return add

    # ---- device bytes ----------------------------------------------------------------------------
    def device_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Every tensor recall holds, by part: ``summaries`` (storage as allocated, chunk starts and the
        open chunk's running state), ``chunk_index`` (the torch backend's vectors; faiss holds its
        own memory), ``queries``, ``rotary`` (this step's cos/sin), ``observed`` (the prompt's measured
        attention mass), ``indexer_weights`` (a learned indexer's parameters)."""
        weights = []
        seen = set()
        for ix in self.indexers:
            module = getattr(ix, "parent", ix)
            if isinstance(module, torch.nn.Module) and id(module) not in seen:
                seen.add(id(module))
                weights += list(module.parameters()) + list(module.buffers())
        return {
            "summaries": [t for b in self.builders for t in b.tensors()],
            "chunk_index": [t for ix in self.indexes for t in getattr(ix, "tensors", list)()],
            "queries": [self._queries],
            "rotary": [self._cos, self._sin],
            "observed": [self._observed, self._prompt_ranks],
            "indexer_weights": weights,
        }

    def device_bytes_by_part(self) -> dict[str, int]:
        """:meth:`device_tensors` as bytes on recall's device (distinct storages, as allocated)."""
        return {part: storage_bytes(ts, self.device) for part, ts in self.device_tensors().items()}

    def device_bytes(self) -> int:
        """Every byte recall holds on its device: the distinct storages of :meth:`device_tensors`."""
        return storage_bytes([t for ts in self.device_tensors().values() for t in ts], self.device)

    # ---- fed by the cache ----------------------------------------------------------------------
    def begin_step(self, positions: torch.Tensor) -> None:
        """cos/sin ``[T, D]`` of this step's positions, shared by every layer."""
        self._cos, self._sin = hf_compat.rotary_cos_sin(self.model, positions)

    def on_keys(self, layer: int, keys: torch.Tensor) -> None:
        """Post-RoPE keys ``[T, H_kv, D]`` just written for ``layer`` (the model's dtype)."""
        builder = self.builders[layer]
        pre = None
        if builder.needs_pre_rope:
            pre = hf_compat.unrotate(keys.float(), self._cos[:, None, :], self._sin[:, None, :])
        builder.append(keys, pre)
        if layer == len(self.builders) - 1 and self._cos.shape[0] > 1:
            # every layer has its keys: keep the last position's cos/sin only (a refresh reads that
            # row), not the step's [T, D] (a whole prefill tile)
            self._cos, self._sin = self._cos[-1:].clone(), self._sin[-1:].clone()

    def on_query(self, layer: int, query: torch.Tensor) -> None:
        """Post-RoPE query ``[H_q, D]`` of the step's last token for ``layer``; copied into recall's own
        ``[L, H_q, D]`` buffer (a view would keep the whole step's query tensor alive)."""
        if self._queries is None or self._queries.shape[1:] != query.shape:
            self._queries = torch.empty(
                len(self.indexers), *query.shape, dtype=query.dtype, device=query.device
            )
        self._queries[layer].copy_(query)
        self._has_query[layer] = True

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
        """Peak attention mass ``[H_kv, N]`` of the prompt's last queries on history chunks ``0..N-1``
        (one layer, measured by exact prefill: per KV head, the largest share of one of its query
        heads' attention on each chunk). The next refresh ranks chunks by it instead of asking the
        indexer: at the end of the prompt the real attention is known. Shared recall keeps the maximum
        over layers and heads ``[N]``; per-head recall keeps every layer's ``[L, H_kv, N]``."""
        mass = mass.float()
        if self.per_head:
            shape = (len(self.builders), *mass.shape)
            if self._observed is None or tuple(self._observed.shape) != shape or layer == 0:
                self._observed = torch.zeros(shape, dtype=torch.float32, device=mass.device)
            self._observed[layer].copy_(mass)
            return
        mass = mass.amax(dim=0)
        if self._observed is None or self._observed.shape[0] != mass.shape[0] or layer == 0:
            self._observed = torch.zeros_like(mass)
        torch.maximum(self._observed, mass, out=self._observed)

    # ---- refresh -------------------------------------------------------------------------------
    def candidates(self, position: int, straddling: bool = False) -> tuple[int, int]:
        """Chunk id range ``[lo, hi)`` worth recalling at ``position``: closed chunks past the sinks
        that end before the recent window, and with ``straddling`` also the chunk the window's start
        falls inside (its tokens before the window are otherwise neither recent nor recallable).

        Only a ranking that sees the straddling chunk's older part alone may take it: the prompt-tail
        mass of the exact prefill, which leaves the resident keys out. An indexer scores a chunk by
        all its keys, and the recent ones (resident anyway) would rate it high for tokens the device
        already holds."""
        lo = math.ceil(self.sink_tokens / self.chunk_size) if self.sink_tokens >= self.chunk_size else 0
        window_start = max(0, position - self.recent_tokens)
        ends = -(-window_start // self.chunk_size) if straddling else window_start // self.chunk_size
        hi = min(self.builders[0].num_chunks, ends)
        return lo, max(lo, hi)

    def _observed_ranks(self, position: int) -> tuple[torch.Tensor, int, int] | None:
        """The prompt-tail mass (``[N]`` or ``[L, H_kv, N]``) and the candidate range, when the next
        refresh ranks by it; consumed (the first refresh after the prefill only)."""
        observed = self._observed
        lo, hi = self.candidates(position, straddling=True)
        if observed is None or observed.shape[-1] < hi:
            return None
        self._observed = None
        # a chunk also inherits the peak of the chunk before it: a passage the question looks at
        # (a key, a name) is followed by what it asks for, which may begin in the next chunk
        score = observed.clone()
        score[..., 1:] = torch.maximum(observed[..., 1:], observed[..., :-1])
        return score, lo, hi

    def _layer_scores(
        self, position: int, lo: int, hi: int, candidates, per_head: bool
    ) -> list[torch.Tensor]:
        """Indexer scores of the candidate chunks, per layer: ``[n]`` or with ``per_head`` ``[H_kv, n]``."""
        # the queries are those of the token at position - 1 (the last one decoded)
        cos, sin = hf_compat.rotary_cos_sin(
            self.model, torch.arange(position - 1, position, device=self._queries.device)
        )
        out = []
        h_kv = self.num_kv_heads
        for layer, indexer in enumerate(self.indexers):
            q_rope = self._queries[layer].float()
            q_pre = hf_compat.unrotate(q_rope, cos, sin)
            summaries = self.builders[layer].summaries.select(
                slice(lo, hi) if candidates is None else candidates
            )
            if not per_head or not getattr(indexer, "per_kv_head", False):
                scores = indexer.score(QueryState(q_pre=q_pre, q_rope=q_rope, position=position), summaries)
                out.append(scores.expand(h_kv, -1) if per_head else scores)
                continue
            g = q_rope.shape[0] // h_kv
            out.append(
                torch.stack(
                    [
                        indexer.score(
                            QueryState(
                                q_pre=q_pre[h * g : (h + 1) * g],
                                q_rope=q_rope[h * g : (h + 1) * g],
                                position=position,
                            ),
                            summaries.head(h),
                        )
                        for h in range(h_kv)
                    ]
                )
            )
        return out

    @torch.no_grad()
    def select(self, position: int) -> list[int]:
        """Chunk ids every layer and head holds for ``[position, position + lookahead)``, ranked by
        summed layer scores (shared recall)."""
        if self.per_head:
            raise ValueError("select() is shared recall; this controller recalls per head (select_heads)")
        observed = self._observed_ranks(position)
        if observed is not None:
            score, lo, hi = observed
            if hi <= lo or self.chunk_budget == 0:
                return []
            top = torch.topk(score[lo:hi], min(self.chunk_budget, hi - lo)).indices + lo
            self.refreshes += 1
            self.observed_refreshes += 1
            return sorted(int(c) for c in top.tolist())
        lo, hi = self.candidates(position)
        if hi <= lo or self.chunk_budget == 0 or not self._has_query[0]:
            return []
        k = min(self.chunk_budget, hi - lo)
        candidates = self._retrieve(lo, hi) if self.indexes else None
        total = None
        for scores in self._layer_scores(position, lo, hi, candidates, per_head=False):
            total = scores if total is None else total + scores  # in layer order, as always
        if candidates is not None:
            k = min(k, candidates.numel())
            top = candidates[torch.topk(total, k).indices]
        else:
            top = torch.topk(total, k).indices + lo
        self.refreshes += 1
        return sorted(int(c) for c in top.tolist())

    @torch.no_grad()
    def select_heads(self, position: int) -> torch.Tensor | None:
        """Chunk ids ``[L, H_kv, k]`` (int64, host; ascending per layer and head) that each layer and KV
        head holds for ``[position, position + lookahead)``; None when there is nothing to recall.

        The first refresh after the prompt gives every layer and head the same chunks, the top of the
        prompt-tail mass maximised over layers and heads (as shared recall does): a passage a few
        retrieval heads look at hard (a needle and what follows it) is what the others must see too.
        Later refreshes rank per layer and head by that head's own prompt-tail mass plus the indexer's
        score for its query group (both are shares of attention): what the question made the head
        look at stays a candidate, and what the decoded text turns to can displace it."""
        if not self.per_head:
            raise ValueError("select_heads() is per-head recall; this controller shares one set (select)")
        observed = self._observed_ranks(position)
        L, h_kv = len(self.builders), self.num_kv_heads
        if observed is not None:
            score, lo, hi = observed  # [L, H_kv, N]
            self._prompt_ranks = score
            if hi <= lo or self.chunk_budget == 0:
                return None
            top = torch.topk(score[..., lo:hi].amax(dim=(0, 1)), min(self.chunk_budget, hi - lo)).indices + lo
            self.refreshes += 1
            self.observed_refreshes += 1
            return torch.sort(top).values.cpu().expand(L, h_kv, -1).contiguous()
        lo, hi = self.candidates(position)
        if hi <= lo or self.chunk_budget == 0 or not self._has_query[0]:
            return None
        candidates = self._retrieve(lo, hi) if self.indexes else None
        scores = torch.stack(self._layer_scores(position, lo, hi, candidates, per_head=True))  # [L, H_kv, n]
        prompt = self._prompt_ranks
        if prompt is not None:
            ids = candidates if candidates is not None else torch.arange(lo, hi, device=scores.device)
            known = ids < prompt.shape[-1]  # chunks decoded after the prompt have no prompt-tail mass
            scores = scores + torch.where(known, prompt[..., ids.clamp_max(prompt.shape[-1] - 1)], 0.0)
        k = min(self.chunk_budget, scores.shape[-1])
        top = torch.topk(scores, k, dim=-1).indices
        top = candidates[top] if candidates is not None else top + lo
        self.refreshes += 1
        return torch.sort(top, dim=-1).values.cpu()
