"""The inputs every method of an entry reads, built in one place: pass-key prompts (the heat-map grid
of ``passkey`` and the depth-spread trials of ``passkey-trials``, each split into context and
question ids) and the local documents of ``fidelity``. flashmem's entries and the peers
(``bench/peers/``) import them from here, so both read the same token ids.
"""

from __future__ import annotations

import torch

from flashmem.prompts import PASSKEY_QUESTION, PassKeyPrompt, fillers_for_tokens, passkey_prompt

ANSWER_TOKENS = 8  # greedy tokens decoded after a pass-key prompt (no EOS stop)
SKIP_FILES = 40  # documents start past the files the shipped calibration read (held-out text)


# ---------------------------------------------------------------------------------------------
# pass-key prompts
# ---------------------------------------------------------------------------------------------
def heatmap_prompts(tok, lengths: list[int], depths: list[float], seeds_per_cell: int) -> list[dict]:
    """One prompt per (length, depth, seed) of the ``passkey`` entry: the context (instructions and
    filler with the key) and :data:`~flashmem.prompts.PASSKEY_QUESTION` tokenized separately, so a
    peer can compress the context alone; seeds derived from length, depth index and seed index."""
    prompts = []
    q_ids = tok(PASSKEY_QUESTION, add_special_tokens=False).input_ids
    for length in lengths:
        fillers = fillers_for_tokens(tok, length)
        for di, depth in enumerate(depths):
            for s in range(seeds_per_cell):
                seed = length * 1000 + di * 10 + s
                pk = passkey_prompt(fillers, depth, seed=seed)
                ctx_ids = tok(pk.text[: -len(PASSKEY_QUESTION)], add_special_tokens=False).input_ids
                prompts.append(
                    {
                        "id": f"L{length}-d{depth:.2f}-s{s}",
                        "target_tokens": length,
                        "depth": depth,
                        "seed": seed,
                        "key": pk.key,
                        "context_ids": ctx_ids,
                        "question_ids": list(q_ids),
                        "tokens": len(ctx_ids) + len(q_ids),
                    }
                )
    return prompts


def prompt_ids(prompt: dict) -> torch.Tensor:
    """``[1, T]`` ids of a prompt of :func:`heatmap_prompts` / :func:`trial_prompts`: context then
    question."""
    return torch.tensor([prompt["context_ids"] + prompt["question_ids"]], dtype=torch.long)


def trial_passkeys(tok, length: int, trials: int) -> list[tuple[int, PassKeyPrompt]]:
    """``(seed, prompt)`` of every trial of a pass-key trials run at about ``length`` tokens: trial
    ``i`` hides the key at depth ``(i + 0.5) / trials`` with seed ``100 + i``."""
    fillers = fillers_for_tokens(tok, length)
    return [(100 + i, passkey_prompt(fillers, (i + 0.5) / trials, seed=100 + i)) for i in range(trials)]


def trial_prompts(tok, length: int, trials: int) -> list[dict]:
    """The prompts of ``bench.passkey_trials.run(length, trials, ...)`` (ids = ``tok(text).input_ids``),
    each split into context and question at a token boundary (:func:`split_question`)."""
    prompts = []
    for i, (seed, prompt) in enumerate(trial_passkeys(tok, length, trials)):
        ids = tok(prompt.text).input_ids
        context_ids, question_ids = split_question(tok, ids, prompt.text)
        prompts.append(
            {
                "id": f"t{i}-d{prompt.depth:.4f}-s{seed}",
                "trial": i,
                "depth": prompt.depth,
                "seed": seed,
                "key": prompt.key,
                "tokens": len(ids),
                "context_ids": context_ids,
                "question_ids": question_ids,
            }
        )
    return prompts


def split_question(
    tok, ids: list[int], text: str, question: str = PASSKEY_QUESTION
) -> tuple[list[int], list[int]]:
    """Split a prompt's ids into ``(context_ids, question_ids)`` at a token boundary, so that
    ``context_ids + question_ids == ids``.

    ``question_ids`` is the longest run of final tokens that decodes to a tail of ``question``. The
    default tokenizer joins the space ending the filler with the question's first newline into one
    token (``" \\n"``); that token stays in the context, so the question part starts at the second
    newline. Raises ``ValueError`` when ``text`` does not end with ``question``, when ``ids`` do not
    decode back to ``text``, when a token joins context text with the question's words (only leading
    whitespace may fall to the context), or when either part does not encode on its own to its ids.
    """
    if not text.endswith(question):
        raise ValueError(f"the prompt does not end with the question {question!r}")
    if tok.decode(ids) != text:
        raise ValueError("the ids do not decode back to the prompt text")
    k = len(ids)
    while k > 0 and question.endswith(tok.decode(ids[k - 1 :])):
        k -= 1
    context_ids, question_ids = list(ids[:k]), list(ids[k:])
    q_text = tok.decode(question_ids)
    if q_text.lstrip() != question.lstrip():
        raise ValueError(
            f"the tokenizer merges the question into the context: the last tokens that belong to the "
            f"question alone decode to {q_text!r}"
        )
    if context_ids + question_ids != list(ids):
        raise ValueError("context_ids + question_ids differ from the prompt ids")
    c_text = text[: len(text) - len(q_text)]
    if (
        tok(c_text, add_special_tokens=False).input_ids != context_ids
        or tok(q_text, add_special_tokens=False).input_ids != question_ids
    ):
        raise ValueError("the context or the question does not encode on its own to its part of the ids")
    return context_ids, question_ids


# ---------------------------------------------------------------------------------------------
# documents
# ---------------------------------------------------------------------------------------------
def documents(tok, num_docs: int, num_tokens: int) -> list[dict]:
    """The first ``num_docs`` local text files (:func:`flashmem.calibration_text_files`, past the
    first :data:`SKIP_FILES`) with at least ``num_tokens`` tokens, each cut to ``num_tokens``:
    ``{"file", "ids"}``."""
    from flashmem import calibration_text_files

    docs = []
    for path in calibration_text_files()[SKIP_FILES:]:
        if len(docs) >= num_docs:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        ids = tok(text, add_special_tokens=False).input_ids
        if len(ids) >= num_tokens:
            docs.append({"file": f"{path.parent.name}/{path.name}", "ids": ids[:num_tokens]})
    if len(docs) < num_docs:
        raise ValueError(f"only {len(docs)} local documents of {num_tokens} tokens found")
    return docs
