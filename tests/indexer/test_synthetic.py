import pytest

from flashmem.indexer.synthetic import _split_of, local_documents, synthetic_documents


def fake_tokenizer(text):
    return {"input_ids": text.split()}


def test_synthetic_documents_fit_length_and_hold_needles():
    docs = synthetic_documents(fake_tokenizer, 3, 500, seed=3)
    assert [d[0].split("-")[0] for d in docs] == ["pass_key", "multi_key", "variable_tracking"]
    for _, text in docs:
        n = len(fake_tokenizer(text)["input_ids"])
        assert 400 < n <= 500
    assert "The pass key is" in docs[0][1] and "special magic number" in docs[1][1] and "VAR" in docs[2][1]
    assert synthetic_documents(fake_tokenizer, 3, 500, seed=3) == docs


def test_local_documents_respect_split(tmp_path):
    for i in range(12):
        (tmp_path / f"f{i}.md").write_text(("word " * 900 + "\n") * 1)
    train = local_documents(fake_tokenizer, 50, 1000, split="train", roots=[tmp_path], min_file_tokens=100)
    held = local_documents(fake_tokenizer, 50, 1000, split="heldout", roots=[tmp_path], min_file_tokens=100)
    names_t = {n for d in train for n in d[0].split("+")}
    names_h = {n for d in held for n in d[0].split("+")}
    assert not names_t & names_h
    for name in names_t | names_h:
        assert _split_of(tmp_path / name) == ("train" if name in names_t else "heldout")
    with pytest.raises(ValueError):
        local_documents(fake_tokenizer, 1, 10, split="test", roots=[tmp_path])
