"""Per-document records for training and evaluating indexers: every layer's chunk summaries,
refresh-time queries and window targets of one document (a few MB per 4K-token document; the
attention itself is never stored). Building a record runs the model, so that lives in
:func:`flashmem.indexer_data.extract_document`; this module holds the format and its files."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.checks import check_int
from .summaries import ChunkSummaries


@dataclass
class TargetConfig:
    """How targets are defined; see :mod:`flashmem.indexer.labels`."""

    chunk_size: int = 64
    lookahead: int = 64
    top_p: float = 0.6
    num_sink_chunks: int = 1
    recent_tokens: int = 128
    refresh_stride: int = 256
    first_refresh: int = 1024
    window_stride: int = 1

    def __post_init__(self) -> None:
        for name in ("chunk_size", "lookahead", "refresh_stride", "window_stride"):
            check_int("TargetConfig", name, getattr(self, name), 1)
        for name in ("num_sink_chunks", "recent_tokens", "first_refresh"):
            check_int("TargetConfig", name, getattr(self, name), 0)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def refresh_positions(self, num_tokens: int) -> list[int]:
        return list(range(self.first_refresh, num_tokens - self.lookahead + 1, self.refresh_stride))


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


def save_records(records: list[DocRecord], path: str) -> None:
    torch.save([r.to_dict() for r in records], path)


def load_records(path: str) -> list[DocRecord]:
    return [DocRecord.from_dict(d) for d in torch.load(path, weights_only=True)]
