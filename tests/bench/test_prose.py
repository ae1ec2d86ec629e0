"""The prose documents of the fidelity benchmarks (bench/prose.py): local natural text, cut into
consecutive pieces of exactly the asked number of tokens."""

import pytest

from bench import prose
from flashmem import load_default_tokenizer


def test_prose_documents_are_consecutive_exact_pieces():
    tok = load_default_tokenizer()
    docs = prose.documents(tok, 3, 500)
    ids = tok("\n\n".join(prose.paragraphs()), add_special_tokens=False).input_ids
    assert [len(d["ids"]) for d in docs] == [500, 500, 500]
    assert [d["file"] for d in docs] == ["prose[0:500]", "prose[500:1000]", "prose[1000:1500]"]
    assert sum((d["ids"] for d in docs), []) == ids[:1500]  # no overlap, no gap
    text = tok.decode(docs[1]["ids"])
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.9 * len(text)  # prose, not code
    assert not set(text) & set("=()[]{}_`<>")


def test_prose_documents_refuse_bad_sizes():
    tok = load_default_tokenizer()
    with pytest.raises(ValueError, match="positive"):
        prose.documents(tok, 0, 100)
    with pytest.raises(ValueError, match="tokens of local prose"):
        prose.documents(tok, 10, 10**7)
