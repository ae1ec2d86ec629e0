"""Argument checks shared by every layer (this package imports nothing of flashmem's, so all may use it)."""

from __future__ import annotations

import numbers

import torch

BACKENDS = ("auto", "triton", "torch")


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
