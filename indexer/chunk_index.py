"""Chunk index: a growing set of per-chunk vectors searched by inner product.

``ChunkIndex`` protocol: ``add(vectors [n, dim])`` appends chunks (ids continue from ``len``),
``search(queries [m, dim], k) -> (scores [m, k], ids [m, k] int64)`` returns the top-``k`` inner
products in descending order. Backends:

* ``"torch"`` (default): vectors live on the summaries' device in a preallocated buffer that grows by
  doubling (stored in ``dtype``: recall passes the model's); search is a matmul plus ``topk``.
* ``"faiss"``: exact ``IndexFlatIP`` (or ``IndexIVFFlat`` with ``nlist`` for very long contexts;
  approximate, trained on the first ``train_size`` vectors added). Uses faiss-gpu when it is installed
  and the vectors are on CUDA, faiss-cpu otherwise. Vectors cross the bridge as fp32 (faiss takes no
  bf16); on GPU faiss returns at most 2048 results per query.

A vector per chunk is usually a summary flattened over KV heads, e.g. ``mean_key_rope.reshape(N, -1)``
searched with the query folded per KV group (see :func:`fold_query_for_heads`), which makes the inner
product the sum over query heads of ``q_h . mean_key_{g(h)}``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

FAISS_GPU_MAX_K = 2048


@runtime_checkable
class ChunkIndex(Protocol):
    dim: int

    def __len__(self) -> int: ...

    def add(self, vectors: torch.Tensor) -> None:
        """vectors: [n, dim]; appended with ids len .. len + n - 1."""
        ...

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries: [m, dim] -> (scores [m, k'], ids [m, k'] int64), k' = min(k, len)."""
        ...


def _check_vectors(x: torch.Tensor, dim: int, what: str) -> None:
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"{what} must be [n, {dim}], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {x.dtype}")


def _check_k(k: int) -> None:
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")


class TorchChunkIndex:
    """Exact inner-product search with torch on ``device`` (vectors stored in ``dtype``)."""

    def __init__(
        self,
        dim: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        capacity: int = 1024,
    ):
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self._buf = torch.empty(max(capacity, 1), dim, device=device, dtype=dtype)
        self._n = 0  # host-side counter

    def __len__(self) -> int:
        return self._n

    @property
    def vectors(self) -> torch.Tensor:
        return self._buf[: self._n]

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this index holds (its vector storage as allocated: ``[capacity, dim]``)."""
        return [self._buf]

    def add(self, vectors: torch.Tensor) -> None:
        _check_vectors(vectors, self.dim, "vectors")
        n = vectors.shape[0]
        if self._n + n > self._buf.shape[0]:
            grown = torch.empty(
                max(2 * self._buf.shape[0], self._n + n),
                self.dim,
                device=self._buf.device,
                dtype=self._buf.dtype,
            )
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : self._n + n] = vectors.to(self._buf.device, self._buf.dtype)
        self._n += n

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_vectors(queries, self.dim, "queries")
        _check_k(k)
        k = min(k, self._n)
        scores = queries.to(self._buf.device, self._buf.dtype) @ self.vectors.T  # [m, N]
        top = torch.topk(scores.float(), k, dim=1)
        return top.values, top.indices.to(torch.int64)


def _import_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the faiss chunk index needs faiss; install it with `pip install flashmem[faiss]` "
            "(faiss-cpu) or install faiss-gpu"
        ) from exc
    return faiss


class FaissChunkIndex:
    """faiss inner-product index: exact ``IndexFlatIP`` (``nlist=None``) or ``IndexIVFFlat``."""

    def __init__(
        self,
        dim: int,
        nlist: int | None = None,
        nprobe: int = 16,
        train_size: int | None = None,
        use_gpu: bool | None = None,
    ):
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        if nlist is not None and nlist <= 0:
            raise ValueError(f"nlist must be positive or None, got {nlist}")
        faiss = _import_faiss()
        self.dim = dim
        self.nlist = nlist
        self.nprobe = nprobe
        self.train_size = train_size if train_size is not None else (39 * nlist if nlist else 0)
        self._faiss = faiss
        has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        self.use_gpu = has_gpu if use_gpu is None else (use_gpu and has_gpu)
        if nlist is None:
            index = faiss.IndexFlatIP(dim)
        else:
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            self._quantizer = quantizer
        if self.use_gpu:  # pragma: no cover - needs faiss-gpu
            self._res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._res, 0, index)
        self._index = index
        self._pending: list[torch.Tensor] = []  # IVF: vectors held until enough to train
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def tensors(self) -> list[torch.Tensor]:
        """The torch tensors this index holds (vectors waiting for IVF training, on the host); faiss's
        own storage (host, or GPU memory of faiss-gpu) is not a torch tensor and is not listed."""
        return list(self._pending)

    @staticmethod
    def _np(x: torch.Tensor):
        return x.detach().to("cpu", torch.float32).contiguous().numpy()

    def add(self, vectors: torch.Tensor) -> None:
        _check_vectors(vectors, self.dim, "vectors")
        self._n += vectors.shape[0]
        if self.nlist is not None and not self._index.is_trained:
            self._pending.append(vectors.detach().to("cpu", torch.float32))
            held = torch.cat(self._pending)
            if held.shape[0] < max(self.train_size, self.nlist):
                return
            self._index.train(self._np(held))
            self._pending = []
            vectors = held
        self._index.add(self._np(vectors))

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_vectors(queries, self.dim, "queries")
        _check_k(k)
        k = min(k, self._n)
        if self.use_gpu and k > FAISS_GPU_MAX_K:  # pragma: no cover - needs faiss-gpu
            raise ValueError(f"faiss-gpu returns at most {FAISS_GPU_MAX_K} results per query; asked for {k}")
        if self._pending:
            # IVF not trained yet: too few vectors; search them exactly.
            held = torch.cat(self._pending)
            top = torch.topk(queries.detach().to("cpu", torch.float32) @ held.T, k, dim=1)
            return top.values.to(queries.device), top.indices.to(queries.device, torch.int64)
        if self.nlist is not None:
            self._index.nprobe = self.nprobe
        scores, ids = self._index.search(self._np(queries), k)
        return (
            torch.from_numpy(scores).to(queries.device),
            torch.from_numpy(ids).to(queries.device, torch.int64),
        )


def make_chunk_index(backend: str, dim: int, **kwargs) -> ChunkIndex:
    """``backend``: ``"torch"`` (kwargs: device, dtype, capacity) or ``"faiss"`` (nlist, nprobe, use_gpu)."""
    if backend == "torch":
        return TorchChunkIndex(dim, **kwargs)
    if backend == "faiss":
        return FaissChunkIndex(dim, **kwargs)
    raise ValueError(f"unknown chunk index backend {backend!r}; choose 'torch' or 'faiss'")


def fold_query_for_heads(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """q: [..., H_q, D] -> [..., H_kv * D]: query heads summed per KV group, so that the inner product
    with a chunk vector ``[H_kv * D]`` equals ``sum_h q_h . k_{g(h)}``."""
    h_q, d = q.shape[-2], q.shape[-1]
    if h_q % num_kv_heads:
        raise ValueError(f"{h_q} query heads are not a multiple of {num_kv_heads} KV heads")
    g = h_q // num_kv_heads
    return q.reshape(*q.shape[:-2], num_kv_heads, g, d).sum(dim=-2).reshape(*q.shape[:-2], num_kv_heads * d)
