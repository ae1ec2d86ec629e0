"""Any local GGUF file of an architecture transformers loads: load_model(PATH.gguf) and --model FILE.gguf,
the tokenizer from the file; anything else is refused up front naming the file."""

import pytest
import torch

import flashmem
from flashmem import cli
from flashmem.models import default_model_path


def test_a_gguf_path_loads_like_the_default_model():
    directory, name = default_model_path()
    model, tok = flashmem.load_model(str(directory / name))
    reference, ref_tok = flashmem.load_default_model()
    ids = ref_tok("The pass key is 12345.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    text = "The grass is green."
    assert tok(text, add_special_tokens=False).input_ids == ref_tok(text, add_special_tokens=False).input_ids


def test_bad_gguf_files_are_refused_naming_them(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ValueError, match="junk.gguf"):
        flashmem.load_model(str(junk))
    with pytest.raises(FileNotFoundError, match="gone.gguf"):
        flashmem.load_model(str(tmp_path / "gone.gguf"))


@pytest.mark.parametrize("name", ["gone.gguf", "junk.gguf"])
def test_cli_refuses_a_bad_gguf_in_one_line(tmp_path, capsys, name):
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 4)
    rc = cli.main(["generate", "--model", str(tmp_path / name), "--passkey-tokens", "300"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and name in err[0] and "Traceback" not in err[0]


def test_cli_runs_a_gguf_file(capsys):
    directory, name = default_model_path()
    rc = cli.main(
        ["generate", "--model", str(directory / name), "--passkey-tokens", "300", "--max-new-tokens", "2"]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "memory report" in out.out
