"""Synthetic long documents (generated locally, nothing downloaded) and local text documents.

Synthetic tasks, each a plain-text document whose tail asks about something far back:

* ``pass_key``: a 5-digit key hidden in repetitive filler;
* ``multi_key``: several ``key-name: value`` needles among filler and distractors;
* ``variable_tracking``: chains of assignments ``VAR A = 12345`` / ``VAR B = VAR A`` spread over filler.

``local_documents`` concatenates text files found on this machine (documentation and source files of
installed packages) into documents of about ``num_tokens`` tokens. A file's split (train / held-out)
is a stable hash of its path, so training and evaluation never share a file.
"""

from __future__ import annotations

import hashlib
import random
import site
import sys
from pathlib import Path

FILLER = [
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "A river runs through the valley, and the old mill turns slowly beside the bridge.",
    "Numbers are written in the ledger every morning before the shop opens its doors.",
    "The committee met on Tuesday and agreed to postpone the decision until spring.",
    "Rain fell on the rooftops of the quiet town while the lamps came on one by one.",
]
WORDS = [
    "alpha",
    "bravo",
    "cedar",
    "delta",
    "ember",
    "falcon",
    "garnet",
    "harbor",
    "indigo",
    "juniper",
    "kepler",
    "lumen",
    "marble",
    "nectar",
    "onyx",
    "pepper",
    "quartz",
    "raven",
    "saffron",
    "tundra",
]


def _filler(rng: random.Random, n_sentences: int) -> list[str]:
    return [rng.choice(FILLER) for _ in range(n_sentences)]


def _fit(tokenizer, parts_fn, num_tokens: int) -> str:
    """Grow the filler until the document reaches ``num_tokens`` tokens (binary search on sentences)."""
    lo, hi = 1, max(2, num_tokens // 8)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenizer(parts_fn(mid))["input_ids"]) <= num_tokens:
            lo = mid
        else:
            hi = mid - 1
    return parts_fn(lo)


def pass_key(tokenizer, num_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    key = rng.randint(10000, 99999)
    frac = rng.random()

    def build(n: int) -> str:
        rr = random.Random(seed)
        s = _filler(rr, n)
        s.insert(int(frac * n), f"The pass key is {key}. Remember it. {key} is the pass key.")
        return (
            "There is a pass key hidden in this text. "
            + " ".join(s)
            + " What is the pass key? The pass key is"
        )

    return _fit(tokenizer, build, num_tokens)


def multi_key(tokenizer, num_tokens: int, seed: int, num_needles: int = 6) -> str:
    rng = random.Random(seed)
    names = rng.sample(WORDS, num_needles)
    values = [rng.randint(100000, 999999) for _ in names]
    fracs = sorted(rng.random() for _ in names)
    asked = rng.randrange(num_needles)

    def build(n: int) -> str:
        rr = random.Random(seed + 1)
        s = _filler(rr, n)
        for i, (name, value, f) in reversed(list(enumerate(zip(names, values, fracs)))):
            s.insert(int(f * n), f"One of the special magic numbers for {name} is: {value}.")
            del i
        return " ".join(s) + f" What is the special magic number for {names[asked]}? The number is"

    return _fit(tokenizer, build, num_tokens)


def variable_tracking(tokenizer, num_tokens: int, seed: int, hops: int = 4) -> str:
    rng = random.Random(seed)
    names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(hops + 1)]
    value = rng.randint(10000, 99999)
    fracs = sorted(rng.random() for _ in range(hops + 1))

    def build(n: int) -> str:
        rr = random.Random(seed + 2)
        s = _filler(rr, n)
        stmts = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)
        ]
        for stmt, f in reversed(list(zip(stmts, fracs))):
            s.insert(int(f * n), stmt)
        return (
            " ".join(s) + f" Question: which value does VAR {names[-1]} hold? Answer: VAR {names[-1]} holds"
        )

    return _fit(tokenizer, build, num_tokens)


SYNTHETIC_TASKS = {"pass_key": pass_key, "multi_key": multi_key, "variable_tracking": variable_tracking}


def synthetic_documents(tokenizer, count: int, num_tokens: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` (name, text) pairs cycling over the synthetic tasks."""
    tasks = list(SYNTHETIC_TASKS.items())
    out = []
    for i in range(count):
        name, fn = tasks[i % len(tasks)]
        out.append((f"{name}-{seed + i}", fn(tokenizer, num_tokens, seed * 1000 + i)))
    return out


def _split_of(path: Path) -> str:
    h = int(hashlib.sha1(str(path.name + str(path.parent.name)).encode()).hexdigest()[:8], 16)
    return "heldout" if h % 5 == 0 else "train"


def local_text_files(
    roots: list[Path] | None = None, suffixes=(".md", ".py", ".txt", ".rst"), *, min_bytes: int = 0
) -> list[Path]:
    """Text files under ``roots`` (default: this interpreter's site-packages) with one of ``suffixes``
    and at least ``min_bytes`` bytes, sorted by path within each root (a root that is a file is taken
    as it is). Symbolic links are skipped, so no file is read twice."""
    if roots is None:
        roots = [Path(p) for p in site.getsitepackages() if Path(p).is_dir()] or [Path(sys.prefix)]
    files: list[Path] = []
    for root in roots:
        if root.is_file():
            files.append(root)
            continue
        for p in sorted(root.rglob("*")):
            try:
                if (
                    p.suffix in suffixes
                    and p.is_file()
                    and not p.is_symlink()
                    and p.stat().st_size >= min_bytes
                ):
                    files.append(p)
            except OSError:
                continue
    return files


def local_documents(
    tokenizer,
    count: int,
    num_tokens: int,
    split: str = "train",
    roots: list[Path] | None = None,
    min_file_tokens: int = 800,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """``count`` documents of about ``num_tokens`` tokens, each from whole local files of ``split``.

    Files with fewer than ``min_file_tokens`` tokens are skipped so that each document has real
    long-range structure (a few large files rather than many fragments)."""
    if split not in ("train", "heldout", "any"):
        raise ValueError(f"split must be 'train', 'heldout' or 'any', got {split!r}")
    files = [p for p in local_text_files(roots) if split == "any" or _split_of(p) == split]
    random.Random(seed).shuffle(files)
    docs: list[tuple[str, str]] = []
    cur, cur_names, cur_len = [], [], 0
    for p in files:
        if len(docs) >= count:
            break
        try:
            if p.stat().st_size < 2000 or p.stat().st_size > 400_000:
                continue
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        n = len(tokenizer(text[: num_tokens * 8])["input_ids"])
        if n < min_file_tokens:
            continue
        cur.append(f"# File: {p.name}\n{text}")
        cur_names.append(p.name)
        cur_len += n
        if cur_len >= num_tokens:
            docs.append(("+".join(cur_names), "\n\n".join(cur)))
            cur, cur_names, cur_len = [], [], 0
    return docs
