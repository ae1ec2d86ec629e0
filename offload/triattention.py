"""TriAttention: calibration statistics, keep-set selection and the compaction policy.

Calibration (one-off, plain text): per layer, query head and complex pair ``f`` (head_dim split into
``F = D/2`` pairs, first half real, second half imaginary, as transformers' ``rotate_half``), the mean
pre-RoPE query ``E q_f`` (complex) and the mean magnitude ``E|q_f|``; plus the rotary frequencies
``omega = model.model.rotary_emb.inv_freq`` ``[F]``.

Rope scaling: ``inv_freq`` is read from the model's own rotary embedding after calibration, so
frequency rescaling (linear, llama3, YaRN) is what the model really applies. Queries are un-rotated
with the model's own cos/sin (:func:`flashmem.hf_compat.unrotate` divides by ``cos^2 + sin^2``), so a
magnitude factor that YaRN folds into cos/sin does not leak into the statistics. Keys in the cache are
post-RoPE and carry that factor, which scales every score of a layer by the same constant and leaves
rankings and z-scores unchanged. "dynamic" rope types that change ``inv_freq`` with the sequence
length are scored with the frequencies seen at calibration (approximate past the calibration length).

Selection: scores ``[N, H_kv]`` (per-layer GQA-aggregated z-scores, see
:func:`flashmem.kernels.triattention_score.aggregate_scores`) -> ``keep_idx [H_kv, keep]`` sorted
slot indices, always including the protected slots (sinks, recent window, optionally the prompt).
Modes: ``per_head`` (layers combined into one keep-set per KV head, shared by all layers) and
``per_layer_per_head`` (``keep_idx [L, H_kv, keep]``).

Scoring never changes a key: cache keys are scored as they are (post-RoPE, see the kernel module for
why no un-rotation is needed) and compaction moves each key with its true position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from ..kernels.triattention_score import (
    aggregate_scores,
    torch_triattention_score,
    triattention_score,
    zscore,
)
from .compaction import compact_sequence
from .paged_cache import PagedKVCache

__all__ = [
    "STATS_FORMAT",
    "TRIATTENTION_MODES",
    "LAYER_REDUCTIONS",
    "TriAttentionStats",
    "QueryStatsAccumulator",
    "calibrate",
    "rope_omega",
    "select_keep",
    "protected_mask",
    "score_layer",
    "EvictionPolicy",
    "TriAttentionPolicy",
    "EVICTION_POLICIES",
    "DEFAULT_STATS_PATH",
    "load_stats_for_model",
    "local_text_token_ids",
]

STATS_FORMAT = "flashmem.triattention_stats"
STATS_VERSION = "1"
TRIATTENTION_MODES = ("per_head", "per_layer_per_head")
LAYER_REDUCTIONS = ("sum", "max")
SCORE_BACKENDS = ("auto", "triton", "torch")


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def _fingerprint_diff(expected: dict, found: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key, "<missing>"), found.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(_fingerprint_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key}: model has {a!r}, stats have {b!r}")
    return diffs


@dataclass
class TriAttentionStats:
    """Calibrated query statistics of one model.

    q_mean_real, q_mean_imag: [L, H_q, F] fp32, the complex mean pre-RoPE query E[q_f];
    q_abs_mean: [L, H_q, F] fp32, E|q_f|; omega: [F] fp32 rotary frequencies w_f;
    num_tokens: tokens seen; fingerprint: :func:`flashmem.hf_compat.model_fingerprint` of the model;
    source: free text naming the calibration text.
    """

    q_mean_real: torch.Tensor
    q_mean_imag: torch.Tensor
    q_abs_mean: torch.Tensor
    omega: torch.Tensor
    num_tokens: int
    fingerprint: dict = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        shape = tuple(self.q_mean_real.shape)
        if len(shape) != 3:
            raise ValueError(f"q_mean_real must be [L, H_q, F], got {shape}")
        for name in ("q_mean_imag", "q_abs_mean"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(getattr(self, name).shape)}")
        if tuple(self.omega.shape) != (shape[2],):
            raise ValueError(f"omega must be [F] = [{shape[2]}], got {tuple(self.omega.shape)}")

    @property
    def num_layers(self) -> int:
        return self.q_mean_real.shape[0]

    @property
    def num_q_heads(self) -> int:
        return self.q_mean_real.shape[1]

    @property
    def head_dim(self) -> int:
        return 2 * self.q_mean_real.shape[2]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q_mean_real, q_mean_imag, q_abs_mean) of one layer, each [H_q, F]."""
        return self.q_mean_real[layer], self.q_mean_imag[layer], self.q_abs_mean[layer]

    def to(self, device: torch.device | str) -> TriAttentionStats:
        return TriAttentionStats(
            self.q_mean_real.to(device),
            self.q_mean_imag.to(device),
            self.q_abs_mean.to(device),
            self.omega.to(device),
            self.num_tokens,
            dict(self.fingerprint),
            self.source,
        )

    def check_fingerprint(self, expected: dict) -> None:
        """Raise ValueError naming every field where ``expected`` and the stats' fingerprint differ."""
        diffs = _fingerprint_diff(expected, self.fingerprint)
        if diffs:
            raise ValueError(
                "TriAttention stats were calibrated for a different model: "
                + "; ".join(diffs)
                + ". Recalibrate with flashmem.offload.triattention.calibrate for this model."
            )

    def save(self, path) -> None:
        """Write safetensors (tensors) with JSON metadata (format, version, num_tokens, fingerprint)."""
        from safetensors.torch import save_file

        tensors = {
            "q_mean_real": self.q_mean_real.detach().to("cpu", torch.float32).contiguous(),
            "q_mean_imag": self.q_mean_imag.detach().to("cpu", torch.float32).contiguous(),
            "q_abs_mean": self.q_abs_mean.detach().to("cpu", torch.float32).contiguous(),
            "omega": self.omega.detach().to("cpu", torch.float32).contiguous(),
        }
        metadata = {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "num_tokens": str(int(self.num_tokens)),
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "source": str(self.source),
        }
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path, expected_fingerprint: dict | None = None) -> TriAttentionStats:
        """Read stats written by :meth:`save` (no unpickling). A fingerprint that differs from
        ``expected_fingerprint`` raises ValueError naming the differing fields."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != STATS_FORMAT:
                raise ValueError(
                    f"{path} is not a TriAttention stats file (metadata format {metadata.get('format')!r}, "
                    f"expected {STATS_FORMAT!r})"
                )
            names = set(handle.keys())
            missing = {"q_mean_real", "q_mean_imag", "q_abs_mean", "omega"} - names
            if missing:
                raise ValueError(f"{path} lacks tensors {sorted(missing)}")
            tensors = {name: handle.get_tensor(name) for name in names}
        stats = cls(
            tensors["q_mean_real"],
            tensors["q_mean_imag"],
            tensors["q_abs_mean"],
            tensors["omega"],
            int(metadata.get("num_tokens", "0")),
            json.loads(metadata.get("fingerprint", "{}")),
            metadata.get("source", ""),
        )
        if expected_fingerprint is not None:
            stats.check_fingerprint(expected_fingerprint)
        return stats


class QueryStatsAccumulator:
    """Streaming sums of pre-RoPE queries per (layer, query head, pair), in float64.

    ``update(layer, queries [T, H_q, D])`` any number of times (each layer sees the same tokens);
    ``finalize(omega, fingerprint)`` -> :class:`TriAttentionStats`.
    """

    def __init__(self, num_layers: int, num_q_heads: int, head_dim: int) -> None:
        for name, value in (("num_layers", num_layers), ("num_q_heads", num_q_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"QueryStatsAccumulator.{name} must be a positive int, got {value!r}")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (real/imaginary halves), got {head_dim}")
        self.num_layers = num_layers
        self.num_q_heads = num_q_heads
        self.head_dim = head_dim
        half = head_dim // 2
        shape = (num_layers, num_q_heads, half)
        self._sum_real = torch.zeros(shape, dtype=torch.float64)
        self._sum_imag = torch.zeros(shape, dtype=torch.float64)
        self._sum_abs = torch.zeros(shape, dtype=torch.float64)
        self._count = [0] * num_layers

    def update(self, layer: int, queries: torch.Tensor) -> None:
        """Add pre-RoPE queries of one layer: queries [T, H_q, D] (any float dtype/device)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        expected = (self.num_q_heads, self.head_dim)
        if queries.dim() != 3 or tuple(queries.shape[1:]) != expected:
            raise ValueError(
                f"queries must be [T, H_q, D] with (H_q, D) = {expected}, got {tuple(queries.shape)}"
            )
        q = queries.detach().to(torch.float64)
        half = self.head_dim // 2
        real, imag = q[..., :half], q[..., half:]  # [T, H_q, F]
        self._sum_real[layer] += real.sum(dim=0).cpu()
        self._sum_imag[layer] += imag.sum(dim=0).cpu()
        self._sum_abs[layer] += torch.sqrt(real * real + imag * imag).sum(dim=0).cpu()
        self._count[layer] += q.shape[0]

    @property
    def num_tokens(self) -> int:
        return min(self._count)

    def finalize(
        self, omega: torch.Tensor, fingerprint: dict | None = None, source: str = ""
    ) -> TriAttentionStats:
        """Means over the tokens seen. omega: [D/2] rotary frequencies."""
        if len(set(self._count)) != 1 or self._count[0] == 0:
            raise ValueError(f"every layer must see the same, non-zero number of tokens; got {self._count}")
        n = float(self._count[0])
        return TriAttentionStats(
            (self._sum_real / n).float(),
            (self._sum_imag / n).float(),
            (self._sum_abs / n).float(),
            omega.detach().to("cpu", torch.float32).reshape(-1).clone(),
            self._count[0],
            dict(fingerprint or {}),
            source,
        )


def rope_omega(model: torch.nn.Module) -> torch.Tensor:
    """The rotary frequencies ``[D/2]`` fp32 the model really applies (``rotary_emb.inv_freq``)."""
    base = getattr(model, "model", model)
    rotary = getattr(base, "rotary_emb", None)
    inv_freq = getattr(rotary, "inv_freq", None)
    if inv_freq is None:
        raise ValueError("the model has no rotary embedding with inv_freq (model.model.rotary_emb.inv_freq)")
    return inv_freq.detach().to("cpu", torch.float32).reshape(-1).clone()


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    *,
    max_tokens: int = 32768,
    window: int = 2048,
    progress: bool = True,
    source: str = "",
) -> TriAttentionStats:
    """Calibrate query statistics on plain text.

    token_ids: [N] int64 (a 2-D [1, N] tensor is flattened). The first ``min(N, max_tokens)`` tokens
    run through the model in windows of ``window`` tokens (positions restart at 0 in each window);
    post-RoPE queries are captured, un-rotated at their true positions with the model's own cos/sin
    and accumulated. Returns :class:`TriAttentionStats` (fingerprint of ``model``, omega from
    ``model.model.rotary_emb.inv_freq``); ``source`` is recorded in the stats' metadata.
    """
    from flashmem.hf_compat import (
        capture_attention_inputs,
        kv_geometry,
        model_fingerprint,
        rotary_cos_sin,
        unrotate,
        validate_model,
    )

    validate_model(model)
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("token_ids must be an integer tensor [N]")
    if token_ids.dim() == 2 and token_ids.shape[0] == 1:
        token_ids = token_ids[0]
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise ValueError(f"token_ids must be a non-empty [N] tensor, got shape {tuple(token_ids.shape)}")
    for name, value in (("max_tokens", max_tokens), ("window", window)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    num_layers, num_q, _, head_dim = kv_geometry(model)
    device = next(model.parameters()).device
    tokens = token_ids[:max_tokens].to(device=device, dtype=torch.long)
    acc = QueryStatsAccumulator(num_layers, num_q, head_dim)
    starts = list(range(0, tokens.numel(), window))
    state: dict = {}

    def on_attention(layer_idx, query, key, value):
        # query: [B=1, H_q, T, D] post-RoPE at positions 0..T-1
        q = unrotate(query[0].float(), state["cos"], state["sin"])  # [H_q, T, D]
        acc.update(layer_idx, q.transpose(0, 1))

    iterator = starts
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(starts, desc="TriAttention calibration", unit="window")
    was_training = model.training
    model.eval()
    try:
        for start in iterator:
            chunk = tokens[start : start + window]
            positions = torch.arange(chunk.numel(), device=device)
            state["cos"], state["sin"] = rotary_cos_sin(model, positions, torch.float32)  # [T, D]
            with capture_attention_inputs(model, on_attention):
                model(input_ids=chunk[None], use_cache=False)
    finally:
        model.train(was_training)
    return acc.finalize(rope_omega(model), model_fingerprint(model), source)


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------
def protected_mask(
    num_slots: int,
    *,
    sink_tokens: int,
    window_tokens: int,
    positions: torch.Tensor | None = None,
    prompt_len: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Slots never evicted: the first ``sink_tokens`` and the last ``window_tokens`` slots (slot order),
    and, when ``prompt_len`` is given, every slot whose position (``positions [N, H_kv]``) is below it.
    Returns [N] bool, or [N, H_kv] bool when the prompt is protected."""
    slots = torch.arange(num_slots, device=device)
    mask = (slots < sink_tokens) | (slots >= num_slots - window_tokens)  # [N]
    if prompt_len is not None:
        if positions is None:
            raise ValueError("protecting the prompt needs the slot positions [N, H_kv]")
        mask = mask[:, None] | ((positions >= 0) & (positions < prompt_len))  # [N, H_kv]
    return mask


def select_keep(scores: torch.Tensor, keep: int, protected: torch.Tensor | None = None) -> torch.Tensor:
    """Top-``keep`` slots per KV head, protected slots first; sorted ascending (slot order).

    scores: [N, H_kv] (higher = keep); protected: [N] or [N, H_kv] bool (or None).
    Returns keep_idx [H_kv, keep] int64. Raises ValueError if ``keep`` exceeds N or a head has more
    protected slots than ``keep`` (that check reads one count back from the device: compaction time
    only, never per decode step).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a [N, H_kv] tensor, got {getattr(scores, 'shape', scores)}")
    num_slots, num_kv_heads = scores.shape
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise ValueError(f"keep must be a non-negative int, got {keep!r}")
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
    if backend not in SCORE_BACKENDS:
        raise ValueError(f"backend must be one of {SCORE_BACKENDS}, got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and keys.device.type == "cuda")
    fn = triattention_score if use_triton else torch_triattention_score
    qr, qi, qa = (x.to(keys.device) for x in stats.layer(layer))
    raw = fn(keys, positions, qr, qi, qa, stats.omega.to(keys.device), t, rotated=rotated)  # [N, H_q]
    return aggregate_scores(raw, keys.shape[1])


# ---------------------------------------------------------------------------------------------
# policy
# ---------------------------------------------------------------------------------------------
@runtime_checkable
class EvictionPolicy(Protocol):
    """Chooses which device slots of a sequence survive a compaction."""

    def select(
        self,
        cache: PagedKVCache,
        seq_id: int,
        step_position: int,
        *,
        prompt_len: int | None = None,
        extra_protected: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """keep_idx [H_kv, keep] or [L, H_kv, keep] sorted slot indices."""
        ...


class TriAttentionPolicy:
    """Prune a sequence back to ``budget_tokens`` slots per KV head once it holds
    ``budget_tokens + compaction_interval``; survivors slide forward and tail blocks are freed.

    stats: calibration of the model (layer/head geometry must match the cache's pool);
    mode: "per_head" (one keep-set per KV head for all layers; layer scores z-scored and combined
    with ``layer_reduce`` "sum" or "max") or "per_layer_per_head"; protect_prompt: never evict slots
    whose position is below ``prompt_len``; keys_rotated: the cache holds post-RoPE keys (as written
    by Hugging Face models); score_backend / compaction_backend: "auto" | "triton" | "torch"
    ("auto": triton on CUDA, torch elsewhere); backend: sets both.
    """

    def __init__(
        self,
        stats: TriAttentionStats,
        *,
        budget_tokens: int,
        compaction_interval: int = 128,
        window_tokens: int = 128,
        sink_tokens: int = 4,
        mode: str = "per_head",
        protect_prompt: bool = False,
        layer_reduce: str = "sum",
        keys_rotated: bool = True,
        score_backend: str = "auto",
        compaction_backend: str = "auto",
        backend: str | None = None,
    ) -> None:
        if backend is not None:
            score_backend = compaction_backend = backend
        if not isinstance(stats, TriAttentionStats):
            raise TypeError(f"stats must be TriAttentionStats, got {type(stats).__name__}")
        for name, value, minimum in (
            ("budget_tokens", budget_tokens, 1),
            ("compaction_interval", compaction_interval, 1),
            ("window_tokens", window_tokens, 0),
            ("sink_tokens", sink_tokens, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"TriAttentionPolicy.{name} must be an int >= {minimum}, got {value!r}")
        if budget_tokens < sink_tokens + window_tokens:
            raise ValueError(
                f"budget_tokens ({budget_tokens}) must be at least sink_tokens + window_tokens "
                f"({sink_tokens} + {window_tokens}); raise the budget or shrink the window"
            )
        if mode not in TRIATTENTION_MODES:
            raise ValueError(f"mode must be one of {TRIATTENTION_MODES}, got {mode!r}")
        if layer_reduce not in LAYER_REDUCTIONS:
            raise ValueError(f"layer_reduce must be one of {LAYER_REDUCTIONS}, got {layer_reduce!r}")
        for name, value in (("score_backend", score_backend), ("compaction_backend", compaction_backend)):
            if value not in SCORE_BACKENDS:
                raise ValueError(f"{name} must be one of {SCORE_BACKENDS}, got {value!r}")
        self.stats = stats
        self.budget_tokens = budget_tokens
        self.compaction_interval = compaction_interval
        self.window_tokens = window_tokens
        self.sink_tokens = sink_tokens
        self.mode = mode
        self.protect_prompt = bool(protect_prompt)
        self.layer_reduce = layer_reduce
        self.keys_rotated = bool(keys_rotated)
        self.score_backend = score_backend
        self.compaction_backend = compaction_backend
        self._stats_device: dict[torch.device, TriAttentionStats] = {}
        self._checked_models: set[int] = set()

    def _check_model(self, model: torch.nn.Module | None) -> None:
        """Once per model object: the stats' fingerprint must match the model's."""
        if model is None or id(model) in self._checked_models or not self.stats.fingerprint:
            return
        from flashmem.hf_compat import model_fingerprint

        self.stats.check_fingerprint(model_fingerprint(model))
        self._checked_models.add(id(model))

    def should_compact(self, num_slots: int) -> bool:
        """True once the sequence holds ``budget_tokens + compaction_interval`` slots (host counter)."""
        return num_slots >= self.budget_tokens + self.compaction_interval

    def _stats_on(self, device: torch.device) -> TriAttentionStats:
        if device not in self._stats_device:
            self._stats_device[device] = self.stats.to(device)
        return self._stats_device[device]

    def _check_cache(self, cache: PagedKVCache) -> None:
        pool = cache.pool
        stats = self.stats
        if (pool.num_layers, pool.head_dim) != (stats.num_layers, stats.head_dim) or (
            stats.num_q_heads % pool.num_kv_heads
        ):
            raise ValueError(
                f"stats (L={stats.num_layers}, H_q={stats.num_q_heads}, D={stats.head_dim}) do not fit the "
                f"cache (L={pool.num_layers}, H_kv={pool.num_kv_heads}, D={pool.head_dim})"
            )

    def layer_scores(self, cache: PagedKVCache, seq_id: int, step_position: int) -> list[torch.Tensor]:
        """Per-layer aggregated scores of the sequence's current slots: L tensors [N, H_kv] fp32."""
        self._check_cache(cache)
        stats = self._stats_on(cache.pool.device)
        slot_index = cache.slot_indices(seq_id)
        out = []
        for layer in range(cache.pool.num_layers):
            keys, _, positions = cache.gather(seq_id, layer, slot_index=slot_index)
            out.append(
                score_layer(
                    keys,
                    None if self.keys_rotated else positions,
                    stats,
                    layer,
                    step_position,
                    rotated=self.keys_rotated,
                    backend=self.score_backend,
                )
            )
        return out

    def _protected(
        self,
        cache: PagedKVCache,
        seq_id: int,
        layer: int,
        num_slots: int,
        prompt_len: int | None,
        extra_protected: torch.Tensor | None,
        slot_index: torch.Tensor,
    ) -> torch.Tensor:
        device = cache.pool.device
        positions = None
        if self.protect_prompt and prompt_len is not None:
            pool = cache.pool
            flat = pool.num_blocks * pool.block_size
            positions = pool.positions[layer].view(flat, pool.num_kv_heads).index_select(0, slot_index)
        mask = protected_mask(
            num_slots,
            sink_tokens=self.sink_tokens,
            window_tokens=self.window_tokens,
            positions=positions,
            prompt_len=prompt_len if positions is not None else None,
            device=device,
        )
        if extra_protected is not None:
            extra = extra_protected.to(device=device, dtype=torch.bool)
            if mask.dim() == 1 and extra.dim() == 2:
                mask = mask[:, None]
            elif mask.dim() == 2 and extra.dim() == 1:
                extra = extra[:, None]
            mask = mask | extra
        return mask

    def select(
        self,
        cache: PagedKVCache,
        seq_id: int,
        step_position: int | None = None,
        *,
        prompt_len: int | None = None,
        extra_protected: torch.Tensor | None = None,
        model: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Choose ``min(budget, num_slots)`` survivors per KV head.

        step_position: position of the scoring step (default: the sequence's logical length);
        prompt_len: prompt length (protected when ``protect_prompt``); extra_protected: [N] or
        [N, H_kv] bool slots the caller pins (e.g. recalled chunks); model: optional, its fingerprint
        is checked against the stats once (scoring itself needs no rotary embedding: cache keys are
        post-RoPE and the rotation folds into the phase). Returns keep_idx [H_kv, keep]
        ("per_head") or [L, H_kv, keep] ("per_layer_per_head"), int64 sorted slot indices.
        """
        self._check_model(model)
        num_slots = cache.num_slots(seq_id)
        if step_position is None:
            step_position = cache.logical_length(seq_id)
        if extra_protected is not None and (
            not isinstance(extra_protected, torch.Tensor) or extra_protected.shape[0] != num_slots
        ):
            raise ValueError(f"extra_protected must be a bool tensor [N] or [N, H_kv] with N = {num_slots}")
        keep = min(self.budget_tokens, num_slots)
        pool = cache.pool
        slot_index = cache.slot_indices(seq_id)
        if keep == num_slots:
            idx = torch.arange(num_slots, device=pool.device).expand(pool.num_kv_heads, num_slots)
            if self.mode == "per_layer_per_head":
                idx = idx.expand(pool.num_layers, pool.num_kv_heads, num_slots)
            return idx.contiguous()
        per_layer = self.layer_scores(cache, seq_id, step_position)
        if self.mode == "per_head":
            stacked = torch.stack([zscore(s, dim=0) for s in per_layer])  # [L, N, H_kv]
            combined = stacked.sum(dim=0) if self.layer_reduce == "sum" else stacked.amax(dim=0)
            protected = self._protected(cache, seq_id, 0, num_slots, prompt_len, extra_protected, slot_index)
            return select_keep(combined, keep, protected)
        keeps = []
        for layer, scores in enumerate(per_layer):
            protected = self._protected(
                cache, seq_id, layer, num_slots, prompt_len, extra_protected, slot_index
            )
            keeps.append(select_keep(scores, keep, protected))
        return torch.stack(keeps)  # [L, H_kv, keep]

    def compact(
        self,
        cache: PagedKVCache,
        seq_id: int,
        t: int | None = None,
        *,
        prompt_len: int | None = None,
        extra_protected: torch.Tensor | None = None,
        model: torch.nn.Module | None = None,
    ) -> int:
        """Score the sequence's slots at step ``t`` (default: its logical length), keep ``budget``
        per KV head and compact (see :meth:`select` for the arguments). Returns the blocks freed, as
        counted by the allocator (0 when the sequence fits the budget)."""
        self._check_model(model)
        num_slots = cache.num_slots(seq_id)
        if num_slots <= self.budget_tokens:
            return 0
        keep_idx = self.select(
            cache, seq_id, t, prompt_len=prompt_len, extra_protected=extra_protected, model=model
        )
        return compact_sequence(cache, seq_id, keep_idx, backend=self.compaction_backend, validate=False)


EVICTION_POLICIES: dict[str, type] = {"triattention": TriAttentionPolicy}


# ---------------------------------------------------------------------------------------------
# shipped stats and the calibration command
# ---------------------------------------------------------------------------------------------
DEFAULT_STATS_PATH = Path(__file__).resolve().parent / "data" / "triattention_default_model.safetensors"


def load_stats_for_model(model: torch.nn.Module, stats_path=None) -> TriAttentionStats:
    """Stats for ``model``: from ``stats_path`` (fingerprint checked), or, when it is None, the stats
    shipped for the embedded default model (an error for any other model: calibrate it first)."""
    from flashmem.hf_compat import model_fingerprint

    fingerprint = model_fingerprint(model)
    if stats_path is not None:
        return TriAttentionStats.load(stats_path, expected_fingerprint=fingerprint)
    if not DEFAULT_STATS_PATH.is_file():
        raise FileNotFoundError(
            f"no shipped TriAttention stats at {DEFAULT_STATS_PATH}; calibrate with "
            "'python -m flashmem.offload.triattention --model default --out PATH' and pass stats_path"
        )
    stats = TriAttentionStats.load(DEFAULT_STATS_PATH)
    diffs = _fingerprint_diff(fingerprint, stats.fingerprint)
    if diffs:
        raise ValueError(
            "budget_tokens needs TriAttention stats calibrated for this model, and the shipped stats are "
            f"for the embedded default model ({'; '.join(diffs)}). Calibrate with "
            "'python -m flashmem.offload.triattention --model PATH --out stats.safetensors' and set stats_path."
        )
    return stats


def local_text_files(min_chars: int = 20_000) -> list[Path]:
    """Long plain-text files (.md/.py/.txt) of the installed transformers and torch packages, sorted
    by path: real text on any machine that runs flashmem, read from disk (nothing downloaded)."""
    import importlib.util

    files: list[Path] = []
    for package in ("transformers", "torch"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(list(spec.submodule_search_locations)[0])
        for pattern in ("*.md", "*.txt", "*.py"):
            for path in sorted(root.rglob(pattern)):
                try:
                    if path.stat().st_size >= min_chars:
                        files.append(path)
                except OSError:
                    continue
    return files


def local_text_token_ids(tokenizer, num_tokens: int, *, skip_files: int = 0) -> tuple[torch.Tensor, str]:
    """``[num_tokens]`` int64 ids of concatenated local text (see :func:`local_text_files`) and a
    description of the files used. ``skip_files`` starts further down the list (held-out text)."""
    files = local_text_files()[skip_files:]
    ids: list[int] = []
    used: list[str] = []
    for path in files:
        if len(ids) >= num_tokens:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
        used.append(f"{path.parent.name}/{path.name}")
    if len(ids) < num_tokens:
        raise ValueError(f"only {len(ids)} tokens of local text found, {num_tokens} requested")
    return torch.tensor(ids[:num_tokens], dtype=torch.long), ", ".join(used)


def main(argv: list[str] | None = None) -> int:
    """``python -m flashmem.offload.triattention --model default --out stats.safetensors``."""
    import argparse

    parser = argparse.ArgumentParser(description="Calibrate TriAttention query statistics on local text.")
    parser.add_argument("--model", default="default", help="'default' or a local checkpoint directory")
    parser.add_argument("--out", default=str(DEFAULT_STATS_PATH), help="output .safetensors path")
    parser.add_argument("--tokens", type=int, default=32768, help="calibration tokens")
    parser.add_argument("--window", type=int, default=2048, help="tokens per forward pass")
    args = parser.parse_args(argv)
    from flashmem.models import load_model

    model, tokenizer = load_model(args.model)
    ids, source = local_text_token_ids(tokenizer, args.tokens)
    stats = calibrate(model, ids, max_tokens=args.tokens, window=args.window, source=f"local text: {source}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    stats.save(args.out)
    print(f"wrote {args.out}: {stats.num_tokens} tokens, L={stats.num_layers}, H_q={stats.num_q_heads}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
