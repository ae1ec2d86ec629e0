import json

import pytest

pytestmark = pytest.mark.slow


def test_shipped_checkpoint_and_eval_cli(tmp_path, capsys):
    from flashmem.files import load_indexer
    from flashmem.hf_compat import model_fingerprint
    from flashmem.indexer.lookahead import default_checkpoint_path
    from flashmem.indexer_training import eval_main as main
    from flashmem.models import load_default_model

    model, tok = load_default_model()
    load_indexer(default_checkpoint_path(), model_fingerprint(model))
    text = tmp_path / "doc.txt"
    text.write_text(" ".join(f"Line {i}: the value of item {i} is {i * 7 % 13}." for i in range(400)))
    assert main(["--text", str(text), "--chunk-budget", "0.1", "--max-tokens", "1536"]) == 0
    out = json.loads(capsys.readouterr().out)
    res = out["indexers"]
    assert set(res) >= {"lookahead", "mean_key", "quest", "recency", "oracle"}
    for v in res.values():
        assert 0.0 <= v["covered_mass"] <= res["oracle"]["covered_mass"] + 1e-6
