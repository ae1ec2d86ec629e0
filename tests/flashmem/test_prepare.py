"""``flashmem prepare``: stats (and an indexer) stored in the user cache keyed by the model fingerprint,
found there first by ``stats_path=None`` and ``indexer="auto"`` (stats: prepared > shipped > prompt;
indexer: prepared > quest).
A temporary cache directory, a tiny model and a byte tokenizer: no network."""

import json
import types

import pytest
import torch

import flashmem
from flashmem import cli, files, hf_compat
from flashmem.calibration import calibrate
from flashmem.indexer.lookahead import LookaheadConfig, LookaheadIndexer
from flashmem.preparation import prepare
from flashmem.testing import tiny_model

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 20


class ByteTokenizer:
    """Token id = byte value modulo the tiny vocabulary."""

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = [b % 128 for b in text.encode("utf-8")]
        return types.SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors else ids)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMEM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _small(**kw):
    return flashmem.FlashMemConfig(**{"budget_tokens": 48, "recent_tokens": 16, "chunk_size": 16, **kw})


def test_prepared_stats_are_stored_by_fingerprint_and_found_first(cache_dir):
    model = tiny_model("qwen3")
    assert flashmem.wrap(model, _small()).stats_source == "prompt"  # nothing prepared yet
    report = prepare(
        model, ByteTokenizer(), text=TEXT, max_tokens=600, tokens_per_forward=300, progress=False
    )
    fp = hf_compat.model_fingerprint(model)
    directory = files.prepared_dir(fp)
    assert directory.parent == cache_dir and len(directory.name) == 64  # sha256 hex
    assert report["stats"] == str(directory / "triattention_stats.safetensors")
    assert json.loads((directory / "fingerprint.json").read_text()) == fp

    want = calibrate(
        model,
        ByteTokenizer()(TEXT, return_tensors="pt").input_ids[0],
        max_tokens=600,
        tokens_per_forward=300,
        progress=False,
    )
    fm = flashmem.wrap(model, _small())
    assert fm.stats_source == report["stats"]
    for name in ("q_mean_real", "q_mean_imag", "q_abs_mean", "omega"):
        assert torch.equal(getattr(fm.policy.stats, name), getattr(want, name))
    fm.generate(torch.randint(0, 128, (1, 100)), 3, eos_token_id=None, progress=False)
    assert fm.memory_report()["triattention_stats"] == report["stats"]
    # another model (other fingerprint) does not see them
    assert flashmem.wrap(tiny_model("qwen3", layers=3), _small()).stats_source == "prompt"
    # a given stats_path still wins
    other = cache_dir.parent / "given.safetensors"
    want.save(other)
    assert flashmem.wrap(model, _small(stats_path=str(other))).stats_source == str(other)


def test_auto_indexer_finds_the_prepared_checkpoint(cache_dir):
    model = tiny_model("llama")
    assert flashmem.wrap(model, _small()).indexer_name == "quest"
    layers, hq, hkv, d = hf_compat.kv_geometry(model)
    indexer = LookaheadIndexer(
        LookaheadConfig(layers, hq, hkv, d, rank=8, chunk_size=16, lookahead=64),
        fingerprint=hf_compat.model_fingerprint(model),
    )
    path = files.prepared_indexer_path(model)
    path.parent.mkdir(parents=True)
    indexer.save(path)
    assert flashmem.wrap(model, _small()).indexer_name == "lookahead:indexer.safetensors"
    # trained for other chunks: auto falls back rather than failing
    assert flashmem.wrap(model, _small(chunk_size=32)).indexer_name == "quest"


def test_prepare_command(cache_dir, tmp_path, monkeypatch, capsys):
    model = tiny_model("mistral")
    checkpoint = tmp_path / "ckpt"
    model.config.save_pretrained(checkpoint)
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    monkeypatch.setattr(cli, "_load", lambda args, device: (model, ByteTokenizer()))
    argv = ["prepare", "--model", str(checkpoint), "--text", str(text), "--max-tokens", "500", "--quiet"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stats_tokens"] == 500 and "indexer" not in report
    assert report["stats"] == str(files.prepared_stats_path(model))
    assert flashmem.wrap(model, _small()).stats_source == report["stats"]
    assert cli.main(["prepare", "--model", str(tmp_path / "nothing")]) == 2
