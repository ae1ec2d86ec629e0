"""Synthetic long prompts made locally (no data sets are downloaded): pass-key retrieval."""

from __future__ import annotations

import random
from dataclasses import dataclass

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_QUESTION = "\n\nWhat is the pass key? The pass key is"  # every pass-key prompt ends with it


@dataclass(frozen=True)
class PassKeyPrompt:
    """A pass-key prompt: ``text`` hides ``key`` at relative ``depth`` of its filler (0 = start,
    1 = end); :func:`passkey_prompt` builds it from ``num_fillers`` filler groups."""

    text: str
    key: str
    depth: float


def passkey_prompt(num_fillers: int, depth: float, seed: int = 0) -> PassKeyPrompt:
    """A plain (non-chat) pass-key prompt: instructions, filler with the key at ``depth``, question.

    Roughly 22 tokens per filler sentence group with the default model's tokenizer.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if num_fillers < 1:
        raise ValueError(f"num_fillers must be >= 1, got {num_fillers}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    at = round(depth * num_fillers)
    body = FILLER * at + needle + FILLER * (num_fillers - at)
    text = (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.\n\n" + body + PASSKEY_QUESTION
    )
    return PassKeyPrompt(text=text, key=key, depth=depth)


def fillers_for_tokens(tokenizer, target_tokens: int) -> int:
    """Number of filler groups that makes a pass-key prompt about ``target_tokens`` long."""
    per = len(tokenizer(FILLER * 20).input_ids) / 20
    overhead = len(tokenizer(passkey_prompt(1, 0.5).text).input_ids) - per
    return max(1, round((target_tokens - overhead) / per))
