"""Per-document records for training and evaluating indexers: one prefill of the model with its own
full attention, from which every layer's chunk summaries, refresh-time queries and window targets are
kept (a few MB per 4K-token document; the attention itself is never stored)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hf_compat import capture_attention_inputs, kv_geometry, rotary_cos_sin, unrotate
from .labels import combine_layers, layer_window_targets
from .summaries import ChunkSummaries, summarize_chunks


@dataclass
class TargetConfig:
    """How targets are defined; see :mod:`flashmem.indexer.labels`."""

    chunk_size: int = 64
    tau: int = 64
    top_p: float = 0.6
    num_sink_chunks: int = 1
    recent_tokens: int = 128
    refresh_stride: int = 256
    first_refresh: int = 1024
    window_stride: int = 1

    def __post_init__(self) -> None:
        for name in ("chunk_size", "tau", "refresh_stride"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_sink_chunks < 0 or self.recent_tokens < 0 or self.first_refresh < 0:
            raise ValueError("num_sink_chunks, recent_tokens and first_refresh must be >= 0")

    def refresh_positions(self, num_tokens: int) -> list[int]:
        return list(range(self.first_refresh, num_tokens - self.tau + 1, self.refresh_stride))


@dataclass
class DocRecord:
    """Everything indexers need about one document (L layers, R refreshes, N chunks).

    q_pre, q_rope: [L, R, H_q, D] queries of the refresh tokens
    mean_key, mean_key_rope, min_key, max_key: [L, N, H_kv, D] chunk summaries
    start: [N] int64 chunk starts; refresh: [R] int64
    candidates: [R, N] bool; target: [L, R, N] window candidate mass; labels: [L, R, N] bool
    labels_all: [R, N] bool labels combined over layers; target_all: [R, N]
    """

    name: str
    q_pre: torch.Tensor
    q_rope: torch.Tensor
    mean_key: torch.Tensor
    mean_key_rope: torch.Tensor
    min_key: torch.Tensor
    max_key: torch.Tensor
    start: torch.Tensor
    refresh: torch.Tensor
    candidates: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor
    labels_all: torch.Tensor
    target_all: torch.Tensor
    chunk_size: int

    def summaries(self, layer: int) -> ChunkSummaries:
        return ChunkSummaries(
            self.mean_key[layer],
            self.mean_key_rope[layer],
            self.min_key[layer],
            self.max_key[layer],
            self.start,
            self.chunk_size,
        )

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    @staticmethod
    def from_dict(d: dict) -> DocRecord:
        return DocRecord(**d)


def _layer_scaling(model: torch.nn.Module, layer: int, head_dim: int) -> float:
    base = getattr(model, "model", model)
    try:
        return float(base.layers[layer].self_attn.scaling)
    except (AttributeError, IndexError, TypeError):
        return head_dim**-0.5


@torch.no_grad()
def extract_document(
    model: torch.nn.Module, input_ids: torch.Tensor, cfg: TargetConfig, name: str = ""
) -> DocRecord:
    """Prefill ``input_ids`` [T] with full attention and build the document's record."""
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be [T], got shape {tuple(input_ids.shape)}")
    T = input_ids.shape[0]
    refresh = cfg.refresh_positions(T)
    if not refresh:
        raise ValueError(
            f"a {T}-token document has no refresh position (first_refresh={cfg.first_refresh}, tau={cfg.tau})"
        )
    num_layers, _, _, head_dim = kv_geometry(model)
    device = next(model.parameters()).device
    cos, sin = rotary_cos_sin(model, torch.arange(T, device=device))  # [T, D]
    ref_idx = torch.tensor(refresh, device=device)
    out: dict[int, tuple] = {}

    def on_layer(layer, q, k, v):
        q, k = q[0].float(), k[0].float()  # [H_q, T, D], [H_kv, T, D]
        k_pre = unrotate(k, cos, sin)
        q_sel = q[:, ref_idx]  # [H_q, R, D]
        q_pre = unrotate(q_sel, cos[ref_idx], sin[ref_idx])
        summ = summarize_chunks(k.transpose(0, 1), k_pre.transpose(0, 1), cfg.chunk_size)
        tgt = layer_window_targets(
            q,
            k,
            refresh,
            cfg.chunk_size,
            cfg.tau,
            cfg.top_p,
            cfg.num_sink_chunks,
            cfg.recent_tokens,
            scaling=_layer_scaling(model, layer, head_dim),
            window_stride=cfg.window_stride,
        )
        out[layer] = (q_pre.transpose(0, 1).cpu(), q_sel.transpose(0, 1).cpu(), summ, tgt)

    base = getattr(model, "model", model)  # skip the LM head: only attention inputs are needed
    with capture_attention_inputs(model, on_layer):
        base(input_ids=input_ids.unsqueeze(0).to(device), use_cache=False)
    if sorted(out) != list(range(num_layers)):
        raise RuntimeError(f"captured layers {sorted(out)}, expected 0..{num_layers - 1}")
    layers = [out[i] for i in range(num_layers)]
    comb = combine_layers([x[3] for x in layers], cfg.top_p)
    return DocRecord(
        name=name,
        q_pre=torch.stack([x[0] for x in layers]),
        q_rope=torch.stack([x[1] for x in layers]),
        mean_key=torch.stack([x[2].mean_key for x in layers]).cpu(),
        mean_key_rope=torch.stack([x[2].mean_key_rope for x in layers]).cpu(),
        min_key=torch.stack([x[2].min_key for x in layers]).cpu(),
        max_key=torch.stack([x[2].max_key for x in layers]).cpu(),
        start=layers[0][2].start.cpu(),
        refresh=torch.tensor(refresh, dtype=torch.int64),
        candidates=layers[0][3].candidates,
        target=torch.stack([x[3].target for x in layers]),
        labels=torch.stack([x[3].labels for x in layers]),
        labels_all=comb.labels,
        target_all=comb.target,
        chunk_size=cfg.chunk_size,
    )


def save_records(records: list[DocRecord], path: str) -> None:
    torch.save([r.to_dict() for r in records], path)


def load_records(path: str) -> list[DocRecord]:
    return [DocRecord.from_dict(d) for d in torch.load(path, weights_only=True)]
