"""`flashmem` user errors: one line on stderr, exit status 2, no traceback, and, wherever the model is
not needed to see the mistake, before the model is loaded."""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import pytest
import torch

import flashmem.models
from flashmem import cli
from flashmem.config import FlashMemConfig


def _one_line_error(argv, capsys, after_load: bool = False) -> str:
    """main's status is 2 and stderr holds the one error line (after the "loaded MODEL" progress line
    when the error needs the model to be found)."""
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    if after_load:
        assert lines[0].startswith("loaded "), err
        lines = lines[1:]
    assert len(lines) == 1, err
    assert lines[0].startswith("flashmem: error: ")
    return lines[0]


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test: the error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(flashmem.models, "load_model", refuse)


def _files(path: Path) -> list[str]:
    return sorted(os.listdir(path))


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory no new file can be made in (as root a chmod does not stop writes: /sys does)."""
    if os.geteuid() != 0:
        d = tmp_path / "read-only"
        d.mkdir()
        d.chmod(0o500)
        yield d
        d.chmod(0o700)
        return
    try:
        tempfile.TemporaryFile(dir="/sys").close()
    except OSError:
        yield Path("/sys")
        return
    pytest.skip("no unwritable directory on this machine")


PASSKEY = ["generate", "--passkey-tokens", "300"]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--passkey-tokens", "-5"], "--passkey-tokens: must be >= 1, got -5"),
        (["--passkey-tokens", "0"], "--passkey-tokens: must be >= 1, got 0"),
        (["--passkey-tokens", "x"], "--passkey-tokens: invalid int value"),
        ([], "--prompt-file --passkey-tokens is required"),
        (["--passkey-tokens", "300", "--prompt-file", "p.txt"], "not allowed with"),
        (["--passkey-tokens", "300", "--depth", "2"], "--depth: must be in \\[0, 1\\]"),
        (["--passkey-tokens", "300", "--depth", "nan"], "--depth: must be in \\[0, 1\\]"),
        (["--passkey-tokens", "300", "--max-new-tokens", "-1"], "--max-new-tokens: must be >= 0"),
        (["--passkey-tokens", "300", "--seed", "x"], "--seed: invalid int value"),
        (["--passkey-tokens", "300", "--dtype", "int8"], "--dtype: invalid choice"),
        # FlashMemConfig's refusals, reported under the option's name
        (["--passkey-tokens", "300", "--block-size", "0"], "--block-size must be >= 1, got 0"),
        (["--passkey-tokens", "300", "--budget-tokens", "0"], "--budget-tokens must be >= 1"),
        (["--passkey-tokens", "300", "--budget-tokens", "100"], "--budget-tokens \\(100\\) must be at least"),
        (["--passkey-tokens", "300", "--recent-tokens", "-1"], "--recent-tokens must be >= 0"),
        (["--passkey-tokens", "300", "--chunk-size", "0"], "--chunk-size must be >= 1"),
        (
            ["--passkey-tokens", "300", "--lookahead", "8", "--prefetch-steps", "8"],
            "--prefetch-steps \\(8\\)",
        ),
        (
            ["--passkey-tokens", "300", "--prefill-chunk-tokens", "0"],
            "--prefill-chunk-tokens must be >= 1",
        ),
        (["--passkey-tokens", "300", "--observe-tokens", "-1"], "--observe-tokens must be >= 0"),
        (["--passkey-tokens", "300", "--max-host-bytes", "0"], "--max-host-bytes must be >= 1"),
        (["--passkey-tokens", "300", "--prefill", "sparse"], "prefill='sparse' needs budget_tokens"),
        (["--passkey-tokens", "300", "--index-backend", "faiss"], "set index_candidates > 0"),
        (["--passkey-tokens", "300", "--indexer", "nonsense"], "--indexer: unknown indexer 'nonsense'"),
        (["--passkey-tokens", "300", "--indexer", "gone.safetensors"], "--indexer: checkpoint 'gone"),
        (
            ["--passkey-tokens", "300", "--stats", "gone.safetensors"],
            "--stats-path 'gone.safetensors' is not",
        ),
        (["--passkey-tokens", "300", "--block-size", "1.5"], "--block-size: invalid int value"),
        (["--passkey-tokens", "300", "--triattention-mode", "global"], "--triattention-mode: invalid choice"),
        (["--passkey-tokens", "300", "--device", "meta"], "--device meta: flashmem runs on cpu or cuda"),
        (["--passkey-tokens", "300", "--device", "nonsense"], "--device 'nonsense': not a device"),
    ],
)
def test_bad_option_values_are_one_line_before_the_model_loads(extra, words, capsys, no_model, tmp_path):
    line = _one_line_error(["generate", *extra], capsys)
    assert re.search(words, line), line


def test_cuda_without_cuda_is_one_line(capsys, no_model):
    if torch.cuda.is_available():
        name, words = f"cuda:{torch.cuda.device_count()}", "CUDA device"
    else:
        name, words = "cuda", "CUDA is not available on this machine; use --device cpu"
    assert words in _one_line_error([*PASSKEY, "--device", name], capsys)


def test_missing_model_directory_and_non_checkpoint(tmp_path, capsys, no_model):
    assert "never downloads" in _one_line_error([*PASSKEY, "--model", str(tmp_path / "gone")], capsys)
    assert "no config.json" in _one_line_error([*PASSKEY, "--model", str(tmp_path)], capsys)


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "prompt file not found"),
        ("dir", "not a file"),
        (b"\xff\xfe caf\xe9", "not UTF-8 text (byte 0xff at offset 0); save it as UTF-8"),
        (b"", "the prompt is empty"),
        (b" \n\t\n", "the prompt is empty"),
    ],
)
def test_bad_prompt_files_are_one_line_before_the_model_loads(tmp_path, content, words, capsys, no_model):
    path = tmp_path / "prompt.txt"
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    assert words in _one_line_error(["generate", "--prompt-file", str(path)], capsys)


def _bad_output_paths(tmp_path, unwritable_dir):
    (tmp_path / "a-file").write_text("x")
    return [
        (tmp_path / "missing" / "out.json", "does not exist"),
        (tmp_path / "a-file" / "out.json", "does not exist"),
        (tmp_path, "is a directory"),
        (unwritable_dir / "out.json", "cannot write there"),
    ]


@pytest.mark.parametrize(
    "command",
    [
        [*PASSKEY, "--report-json"],
        ["calibrate", "--text", "README.md", "--out"],
        ["train-indexer", "--out"],
    ],
)
def test_unwritable_outputs_fail_before_any_work(command, tmp_path, unwritable_dir, capsys, no_model):
    for path, words in _bad_output_paths(tmp_path, unwritable_dir):
        before = _files(tmp_path), _files(unwritable_dir)
        line = _one_line_error([*command, str(path)], capsys)
        assert words in line and str(path) in line
        assert (_files(tmp_path), _files(unwritable_dir)) == before  # the check leaves nothing behind


def test_writable_output_check_creates_nothing(tmp_path):
    cli.check_output_path("--out", str(tmp_path / "new.json"))
    existing = tmp_path / "old.json"
    existing.write_text("kept")
    cli.check_output_path("--out", str(existing))
    assert _files(tmp_path) == ["old.json"] and existing.read_text() == "kept"


@pytest.mark.parametrize(
    "argv, words",
    [
        (["calibrate", "--text", "gone.txt", "--out", "s.safetensors"], "text source not found"),
        (["calibrate", "--text", "EMPTY", "--out", "s.safetensors"], "no text in it"),
        (["calibrate", "--text", "README.md", "--out", "s.safetensors", "--max-tokens", "0"], "must be >= 1"),
        (["calibrate", "--out", "s.safetensors"], "--text"),
        (["train-indexer", "--model", "gone-model", "--out", "i.safetensors"], "never downloads"),
        (["eval-indexer", "--model", "gone-model", "--text", "README.md"], "never downloads"),
        (["frobnicate"], "invalid choice"),
        ([], "required: COMMAND"),
    ],
)
def test_other_commands_are_one_line(argv, words, tmp_path, capsys, no_model, monkeypatch):
    (tmp_path / "EMPTY").write_text("\n\n")
    (tmp_path / "README.md").write_text("some text")
    monkeypatch.chdir(tmp_path)
    assert words in _one_line_error(argv, capsys)


# ---- errors found once the model is there: a tiny model with a byte-level tokenizer ----------------
class ByteTokenizer:
    """Text -> UTF-8 bytes modulo the tiny model's 128-token vocabulary."""

    def __call__(self, text, return_tensors=None):
        ids = [b % 128 for b in text.encode("utf-8")]
        return types.SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(32 + int(i) % 95) for i in ids)


@pytest.fixture
def tiny_loaded(model_and_stats, monkeypatch):
    model, stats = model_and_stats
    monkeypatch.setattr(flashmem.models, "load_model", lambda *a, **k: (model, ByteTokenizer()))
    return stats


def test_errors_after_loading_are_one_line(tiny_loaded, capsys):
    budget = ["--stats", tiny_loaded, "--budget-tokens", "48", "--compaction-interval", "16",
              "--recent-tokens", "16", "--chunk-size", "16"]  # fmt: skip
    cases = [
        (["--passkey-tokens", "50"], "the shortest pass-key prompt is"),
        (["--passkey-tokens", "400", "--max-context-tokens", "200"], "raise --max-context-tokens"),
        (["--passkey-tokens", "400", *budget, "--max-host-bytes", "1000"], "host mirror"),
        (["--passkey-tokens", "400", *budget, "--protect-prompt"], "protect_prompt keeps all"),
    ]
    for extra, words in cases:
        assert words in _one_line_error(["generate", *extra], capsys, after_load=True)


def test_new_config_options_reach_the_cache(tiny_loaded, tmp_path, capsys):
    report = tmp_path / "report.json"
    rc = cli.main(["generate", "--passkey-tokens", "400", "--max-new-tokens", "6", "--stats", tiny_loaded,
               "--budget-tokens", "48", "--compaction-interval", "16", "--recent-tokens", "16",
               "--chunk-size", "16", "--block-size", "8", "--indexer", "quest", "--prefill-chunk-tokens",
               "64", "--observe-tokens", "4", "--host-mirror", "--report-json", str(report)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    r = json.loads(report.read_text())["report"]
    assert r["block_size"] == 8 and r["budget_tokens"] == 48
    assert r["host_kv_bytes"] == r["full_kv_bytes"] > r["peak_device_kv_bytes"]


# ---- the parser itself ------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _options_without_help(parser: argparse.ArgumentParser) -> list[str]:
    return [
        "/".join(a.option_strings) or a.dest
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
    ]


class _Captured(Exception):
    pass


def _parser_of(argv, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``cli.main(argv)`` parses its arguments with (stopped right there)."""
    seen = {}

    def capture(self, args=None, namespace=None):
        seen["parser"] = self
        raise _Captured

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_Captured):
            cli.main(argv)
    return seen["parser"]


def test_every_option_of_every_command_has_help(monkeypatch):
    parser = _parser_of(["generate"], monkeypatch)
    missing = _options_without_help(parser)
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing += [f"command {c.dest}" for c in action._choices_actions if not (c.help or "").strip()]
    for name, sub in _subparsers(parser).items():
        missing += [f"{name} {option}" for option in _options_without_help(sub)]
    assert not missing, missing


@pytest.mark.parametrize("command", ["train-indexer", "eval-indexer"])
def test_forwarded_commands_options_have_help(command, monkeypatch):
    assert not _options_without_help(_parser_of([command], monkeypatch))


def test_every_config_field_is_a_generate_option(monkeypatch):
    generate = _subparsers(_parser_of(["generate"], monkeypatch))["generate"]
    by_dest = {a.dest: a for a in generate._actions}
    for field in dataclasses.fields(FlashMemConfig):
        action = by_dest.get(field.name)
        option = "--" + field.name.replace("_", "-")
        assert action is not None and option in action.option_strings, (
            f"no {option} for FlashMemConfig.{field.name}"
        )
        assert action.default == field.default, field.name  # the CLI default is the dataclass's own


def test_options_build_the_config_they_name():
    argv = ["generate", "--passkey-tokens", "300", "--budget-tokens", "512", "--block-size", "32",
            "--chunk-size", "64", "--host-mirror", "--protect-prompt", "--prefill-chunk-tokens", "128",
            "--observe-tokens", "0", "--prefill", "sparse", "--lookahead", "32", "--prefetch-steps", "4",
            "--indexer", "recency", "--max-host-bytes", "123456789", "--recall-mode", "shared"]  # fmt: skip
    config = cli.config_from_args(cli.build_parser().parse_args(argv))
    assert config == FlashMemConfig(
        budget_tokens=512, block_size=32, chunk_size=64, host_mirror=True, protect_prompt=True,
        prefill_chunk_tokens=128, observe_tokens=0, prefill="sparse", lookahead=32, prefetch_steps=4,
        indexer="recency", max_host_bytes=123456789, recall_mode="shared",
    )  # fmt: skip
    no_mirror = cli.build_parser().parse_args(["generate", "--passkey-tokens", "300", "--no-host-mirror"])
    assert cli.config_from_args(no_mirror).host_mirror is False


def test_console_entry_exits_2_with_one_line(tmp_path):
    """The real process: status 2, one stderr line, no traceback."""
    run = subprocess.run(
        [sys.executable, "-m", "flashmem.cli", "generate", "--model", str(tmp_path / "gone"),
         "--passkey-tokens", "100"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines() == [
        f"flashmem: error: --model {tmp_path / 'gone'}: not a local directory or .gguf file; flashmem never "
        "downloads weights (use 'default' for the embedded model, or the path of a saved checkpoint)"
    ]
