"""The `flashmem` command line on the embedded default model."""

import json

from flashmem.cli import main


def test_generate_prints_answer_and_memory_report(tmp_path, capsys):
    report = tmp_path / "report.json"
    rc = main(["generate", "--model", "default", "--passkey-tokens", "600", "--max-new-tokens", "8",
               "--budget-tokens", "256", "--report-json", str(report)])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "answer:" in out and "memory report" in out and "device KV now / peak" in out
    assert "device bytes now / peak" in out and "KV alone now / peak / avg" in out
    data = json.loads(report.read_text())
    r = data["report"]
    assert r["budget_tokens"] == 256 and r["host_kv_bytes"] == r["full_kv_bytes"]
    assert r["peak_device_kv_bytes"] < r["full_kv_bytes"]


def test_generate_rejects_missing_prompt(tmp_path, capsys):
    assert main(["generate", "--model", "default", "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert "prompt file not found" in capsys.readouterr().err
    assert main(["generate", "--model", "default"]) == 2
    assert "--prompt-file" in capsys.readouterr().err


def test_non_local_model_is_refused_without_download(capsys):
    assert main(["generate", "--model", "someone/some-model", "--passkey-tokens", "100"]) == 2
    assert "never downloads" in capsys.readouterr().err
