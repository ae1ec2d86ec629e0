"""Argument checks shared by every layer (this package imports nothing of flashmem's, so all may use it)."""

from __future__ import annotations

import functools
import numbers
import os

import torch

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_int(owner: str, name: str, value, minimum: int = 0, *, allow_none: bool = False) -> None:
    """Raise ``TypeError`` unless ``value`` is an integer (not a bool; numpy integers pass), and
    ``ValueError`` if it is below ``minimum``. ``owner`` names the class or function in the message."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")


def resolve_backend(name: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA, ``"torch"`` elsewhere; ``"triton"``/``"torch"`` pass through."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if torch.device(device).type == "cuda" else "torch"
    return name


def check_float_tensor(name: str, value) -> None:
    """Raise ``TypeError`` unless ``value`` is a float32, float16 or bfloat16 tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {value.dtype}")


def check_triton_device(kernel: str, device: torch.device, reference: str) -> None:
    """Raise ``ValueError`` unless a Triton kernel can run on ``device``: CUDA, or any device while
    Triton runs under its interpreter (``TRITON_INTERPRET=1``, read at call time)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"{kernel} needs CUDA tensors (got {device}); on CPU set TRITON_INTERPRET=1 before "
            f"triton is imported, or use {reference}"
        )


@functools.lru_cache(maxsize=1)
def _pinning_possible() -> bool:
    """Page-locked host memory exists only where CUDA does (asked once: is_pinned() dispatches an op
    per tensor, and the accounting runs every decode step)."""
    return torch.cuda.is_available()


def device_tensor_bytes(tensors, device: torch.device | str) -> int:
    """Bytes of the distinct storages behind ``tensors`` (an iterable; None entries skipped) that
    live on ``device``: what holding them costs there, views and repeats counted once."""
    device = torch.device(device)
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if (
            t is None
            or t.device.type != device.type
            or (device.index is not None and t.device.index != device.index)
        ):
            continue
        if t.device.type == "cpu" and _pinning_possible() and t.is_pinned():
            continue  # page-locked host memory: a host buffer, not the device's
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total
