"""TriAttention calibration statistics: the format, its file layout and the streaming accumulator.

Per layer, query head and complex pair ``f`` (head_dim split into ``F = D/2`` pairs, first half real,
second half imaginary, as transformers' ``rotate_half``): the mean pre-RoPE query ``E q_f`` (complex)
and the mean magnitude ``E|q_f|``; plus the rotary frequencies ``omega`` ``[F]`` the model applies.
Computing them runs a model, so that lives in :mod:`flashmem.calibration`; reading a file goes through
:mod:`flashmem.files` (one checked reader), which hands the tensors to
:meth:`TriAttentionStats.from_tensors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..kernels.checks import check_int

STATS_FORMAT = "flashmem.triattention_stats"
STATS_VERSION = "1"
STATS_TENSORS = ("q_mean_real", "q_mean_imag", "q_abs_mean", "omega")
DEFAULT_STATS_PATH = Path(__file__).resolve().parent / "data" / "triattention_default_model.safetensors"


def fingerprint_diff(expected: dict, found: dict, prefix: str = "") -> list[str]:
    """Fields where two model fingerprints differ, as ``"key: model has A, file has B"`` lines."""
    diffs = []
    for key in sorted(set(expected) | set(found)):
        a, b = expected.get(key, "<missing>"), found.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs.extend(fingerprint_diff(a, b, f"{prefix}{key}."))
        elif a != b:
            diffs.append(f"{prefix}{key}: model has {a!r}, file has {b!r}")
    return diffs


@dataclass
class TriAttentionStats:
    """Calibrated query statistics of one model.

    q_mean_real, q_mean_imag: [L, H_q, F] fp32, the complex mean pre-RoPE query E[q_f];
    q_abs_mean: [L, H_q, F] fp32, E|q_f|; omega: [F] fp32 rotary frequencies w_f;
    num_tokens: tokens seen; fingerprint: the model fingerprint dict (``flashmem.hf_compat.model_fingerprint``);
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
        diffs = fingerprint_diff(expected, self.fingerprint)
        if diffs:
            raise ValueError(
                "TriAttention stats were calibrated for a different model: "
                + "; ".join(diffs)
                + ". Recalibrate for this model with `flashmem calibrate`."
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
    def from_tensors(cls, tensors: dict, metadata: dict, origin: str = "stats") -> TriAttentionStats:
        """Build stats from a file's tensors and metadata (see :meth:`save`); ``origin`` (the path)
        names the file in every error. Checks the format, the tensor names and shapes, and that every
        value is finite: a bad file is refused here, never half-way through a decode."""
        if metadata.get("format") != STATS_FORMAT:
            raise ValueError(
                f"{origin} is not a TriAttention stats file (metadata format {metadata.get('format')!r}, "
                f"expected {STATS_FORMAT!r})"
            )
        missing = set(STATS_TENSORS) - set(tensors)
        if missing:
            raise ValueError(f"{origin} lacks tensors {sorted(missing)}")
        for name in STATS_TENSORS:
            t = tensors[name]
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{origin}: tensor {name!r} must hold finite floats")
        try:
            num_tokens = int(metadata.get("num_tokens", "0"))
            fingerprint = json.loads(metadata.get("fingerprint", "{}"))
        except ValueError as err:
            raise ValueError(f"{origin}: unreadable metadata ({err})") from None
        if not isinstance(fingerprint, dict):
            raise ValueError(f"{origin}: the fingerprint metadata must be a JSON object")
        try:
            return cls(
                *(tensors[name].float() for name in STATS_TENSORS),
                num_tokens,
                fingerprint,
                metadata.get("source", ""),
            )
        except ValueError as err:
            raise ValueError(f"{origin}: {err}") from None


class QueryStatsAccumulator:
    """Streaming sums of pre-RoPE queries per (layer, query head, pair), in float64.

    ``update(layer, queries [T, H_q, D])`` any number of times (each layer sees the same tokens);
    ``finalize(omega, fingerprint)`` -> :class:`TriAttentionStats`; ``layer_stats(layer, omega)`` -> the
    statistics of one layer so far (``[1, H_q, F]``), e.g. to score that layer's keys before the later
    layers have seen their queries (the exact prefill derives stats from the prompt this way).
    device: where the sums live (float64, ``3 x L x H_q x D/2`` elements; see :attr:`device_bytes`);
    queries on another device are reduced there first and only the ``[H_q, D/2]`` sums move.
    """

    def __init__(
        self, num_layers: int, num_q_heads: int, head_dim: int, *, device: torch.device | str = "cpu"
    ) -> None:
        for name, value in (("num_layers", num_layers), ("num_q_heads", num_q_heads), ("head_dim", head_dim)):
            check_int("QueryStatsAccumulator", name, value, 1)
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (real/imaginary halves), got {head_dim}")
        self.num_layers = num_layers
        self.num_q_heads = num_q_heads
        self.head_dim = head_dim
        half = head_dim // 2
        shape = (num_layers, num_q_heads, half)
        self._sum_real = torch.zeros(shape, dtype=torch.float64, device=device)
        self._sum_imag = torch.zeros(shape, dtype=torch.float64, device=device)
        self._sum_abs = torch.zeros(shape, dtype=torch.float64, device=device)
        self._count = [0] * num_layers

    @property
    def device_bytes(self) -> int:
        """Bytes of the three float64 sums (on :attr:`device`)."""
        return 3 * self._sum_real.numel() * self._sum_real.element_size()

    @property
    def device(self) -> torch.device:
        return self._sum_real.device

    def update(self, layer: int, queries: torch.Tensor) -> None:
        """Add pre-RoPE queries of one layer: queries [T, H_q, D] (any float dtype/device)."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        expected = (self.num_q_heads, self.head_dim)
        if queries.dim() != 3 or tuple(queries.shape[1:]) != expected:
            raise ValueError(
                f"queries must be [T, H_q, D] with (H_q, D) = {expected}, got {tuple(queries.shape)}"
            )
        q = queries.detach()
        q = q.to(torch.promote_types(q.dtype, torch.float32))  # no fp64 copy of a large tile
        half = self.head_dim // 2
        real, imag = q[..., :half], q[..., half:]  # [T, H_q, F]
        device = self.device
        self._sum_real[layer] += real.sum(dim=0, dtype=torch.float64).to(device)
        self._sum_imag[layer] += imag.sum(dim=0, dtype=torch.float64).to(device)
        self._sum_abs[layer] += torch.hypot(real, imag).sum(dim=0, dtype=torch.float64).to(device)
        self._count[layer] += q.shape[0]

    @property
    def num_tokens(self) -> int:
        return min(self._count)

    def _means(self, layers: slice, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(
            (s[layers] / float(n)).float().cpu() for s in (self._sum_real, self._sum_imag, self._sum_abs)
        )

    def layer_stats(
        self, layer: int, omega: torch.Tensor, fingerprint: dict | None = None, source: str = ""
    ) -> TriAttentionStats:
        """The statistics of layer ``layer`` alone (``[1, H_q, F]``), over the tokens it has seen; the
        same values :meth:`finalize` gives for that layer when every layer has seen those tokens."""
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range [0, {self.num_layers})")
        n = self._count[layer]
        if n == 0:
            raise ValueError(f"layer {layer} has seen no queries yet")
        return TriAttentionStats(
            *self._means(slice(layer, layer + 1), n),
            omega.detach().to("cpu", torch.float32).reshape(-1).clone(),
            n,
            dict(fingerprint or {}),
            source,
        )

    def finalize(
        self, omega: torch.Tensor, fingerprint: dict | None = None, source: str = ""
    ) -> TriAttentionStats:
        """Means over the tokens seen. omega: [D/2] rotary frequencies."""
        if len(set(self._count)) != 1 or self._count[0] == 0:
            raise ValueError(f"every layer must see the same, non-zero number of tokens; got {self._count}")
        return TriAttentionStats(
            *self._means(slice(None), self._count[0]),
            omega.detach().to("cpu", torch.float32).reshape(-1).clone(),
            self._count[0],
            dict(fingerprint or {}),
            source,
        )
