"""Natural text from the local files: the prose of the text files of the installed packages
(:func:`flashmem.calibration_text_files` past the :data:`bench.inputs.SKIP_FILES` that calibration
read), i.e. runs of comment and docstring lines without code characters. Nothing is downloaded.

Used by the RULER-style tasks (haystack sentences, words, QA documents) and by the fidelity
benchmarks' ``--text prose`` documents (:func:`documents`); ``--text code`` reads the files
themselves (:func:`bench.inputs.documents`).
"""

from __future__ import annotations

import functools

from bench.inputs import SKIP_FILES
from flashmem import calibration_text_files

_CODE_CHARS = set('=()[]{}_`<>*\\/@|#:"$%^~')


def _prose_line(line: str) -> str | None:
    s = line.strip().lstrip("#").strip().strip("\"'")
    if len(s.split()) < 4 or set(s) & _CODE_CHARS or s.startswith(("-", ">>>", "...")):
        return None
    if sum(c.isalpha() for c in s) < 0.75 * len(s):
        return None
    return s


@functools.lru_cache(maxsize=1)
def paragraphs(min_words: int = 20, max_chars: int = 400_000) -> tuple[str, ...]:
    """Distinct prose paragraphs of the local text files (past the held-out calibration files):
    runs of consecutive prose lines (no code characters, mostly letters) of ``min_words`` or more,
    in file order, until ``max_chars`` characters are collected."""
    out: list[str] = []
    seen: set[str] = set()
    total = 0
    for path in calibration_text_files()[SKIP_FILES:]:
        run: list[str] = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines() + [""]:
            s = _prose_line(line)
            if s is not None:
                run.append(s)
                continue
            para = " ".join(run)
            run = []
            if len(para.split()) >= min_words and para not in seen:
                seen.add(para)
                out.append(para)
                total += len(para)
        if total >= max_chars:
            break
    if total < 100_000:
        raise RuntimeError(f"only {total} characters of local prose found (100,000 needed)")
    return tuple(out)


@functools.lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """The sentences of :func:`paragraphs` (split after '.', '?' or '!' before a space)."""
    out = []
    for para in paragraphs():
        start = 0
        for i, c in enumerate(para):
            if c in ".?!" and (i + 1 == len(para) or para[i + 1] == " "):
                s = para[start : i + 1].strip()
                if len(s.split()) >= 3:
                    out.append(s)
                start = i + 1
        tail = para[start:].strip()
        if len(tail.split()) >= 3:
            out.append(tail + ".")
    return tuple(out)


@functools.lru_cache(maxsize=1)
def english_words() -> tuple[str, ...]:
    """Distinct lowercase words of 4 to 10 letters of the local prose, in order of appearance."""
    seen: dict[str, None] = {}
    for para in paragraphs():
        for w in para.split():
            w = w.strip(".,;:!?'").lower()
            if 4 <= len(w) <= 10 and w.isalpha() and w.isascii():
                seen.setdefault(w, None)
    return tuple(seen)


def documents(tok, num_docs: int, num_tokens: int) -> list[dict]:
    """``num_docs`` documents of exactly ``num_tokens`` tokens of local prose: the paragraphs of
    :func:`paragraphs` joined by blank lines, in order, cut into consecutive, non-overlapping pieces
    (document ``i`` starts where ``i - 1`` ended): ``{"file", "ids"}``, ``file`` naming the piece."""
    if min(num_docs, num_tokens) < 1:
        raise ValueError(f"num_docs and num_tokens must be positive, got {num_docs}, {num_tokens}")
    ids = tok("\n\n".join(paragraphs()), add_special_tokens=False).input_ids
    need = num_docs * num_tokens
    if len(ids) < need:
        raise ValueError(f"only {len(ids)} tokens of local prose found, {need} needed")
    return [
        {
            "file": f"prose[{i * num_tokens}:{(i + 1) * num_tokens}]",
            "ids": ids[i * num_tokens : (i + 1) * num_tokens],
        }
        for i in range(num_docs)
    ]
