"""How an output is compared with full attention's: next-token distributions (top-1 agreement, KL),
token agreement, the pass key in an answer. torch only: the kvpress worker, which runs in its own
environment without flashmem, uses the same measure as the entries.
"""

from __future__ import annotations

import re

import torch


def compare_logits(ref: torch.Tensor, test: torch.Tensor) -> dict:
    """Top-1 agreement and KL(ref || test) of next-token distributions, step by step, in float64;
    ``ref``, ``test``: ``[N, vocab]`` logits of the same N steps."""
    if ref.shape != test.shape:
        raise ValueError(f"logits differ in shape: {tuple(ref.shape)} vs {tuple(test.shape)}")
    n = ref.shape[0]
    if n == 0:
        nan = float("nan")
        return {"positions": 0, "top1_agreement": nan, "mean_kl": nan, "max_kl": nan}
    log_p = torch.log_softmax(ref.double(), dim=-1)
    log_q = torch.log_softmax(test.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [N]
    agree = (ref.argmax(-1) == test.argmax(-1)).double()
    return {
        "positions": n,
        "top1_agreement": float(agree.mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
    }


def token_agreement(ref: list[int], test: list[int]) -> float:
    """Share of positions (over the shorter list) where the two token lists agree."""
    n = min(len(ref), len(test))
    return sum(a == b for a, b in zip(ref[:n], test[:n])) / n if n else float("nan")


def extract_digits(text: str) -> str:
    """The first 5-digit number in ``text`` (a pass key), or ``""``."""
    m = re.search(r"\d{5}", text)
    return m.group(0) if m else ""
