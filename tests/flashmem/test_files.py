"""Every file flashmem reads goes through one checked reader: a bad file is refused up front, with an
error that names it, and never loads into something that fails half-way through a decode."""

import json

import pytest
import torch
from safetensors.torch import save_file

import flashmem
from flashmem.files import load_indexer, load_stats
from flashmem.hf_compat import model_fingerprint
from flashmem.indexer import LookaheadConfig, LookaheadIndexer
from flashmem.offload import TriAttentionStats
from flashmem.testing import tiny_model


def _stats_file(tmp_path, name="stats.safetensors", **overrides):
    gen = torch.Generator().manual_seed(0)
    t = {
        "q_mean_real": torch.randn(2, 4, 8, generator=gen),
        "q_mean_imag": torch.randn(2, 4, 8, generator=gen),
        "q_abs_mean": torch.rand(2, 4, 8, generator=gen) + 2,
        "omega": torch.rand(8, generator=gen),
    }
    t.update(overrides)
    path = tmp_path / name
    TriAttentionStats(*(t[k] for k in ("q_mean_real", "q_mean_imag", "q_abs_mean", "omega")), 100).save(path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_bytes(b""), "is empty"),
        (
            lambda p: p.write_bytes(b"\x00\x01not a safetensors file at all" * 10),
            "not a readable safetensors",
        ),
        (
            lambda p: p.write_bytes(_stats_file(p.parent, "good.safetensors").read_bytes()[:-40]),
            "not a readable",
        ),
        (lambda p: p.mkdir(), "not a regular file"),
    ],
    ids=["empty", "corrupted", "truncated", "directory"],
)
def test_bad_stats_files_are_refused_naming_the_path(tmp_path, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(ValueError, match=message) as err:
        load_stats(path)
    assert str(path) in str(err.value)


def test_missing_stats_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gone.safetensors")):
        load_stats(tmp_path / "gone.safetensors")


def test_stats_with_nan_or_wrong_shapes_are_refused(tmp_path):
    nan = torch.full((2, 4, 8), float("nan"))
    with pytest.raises(ValueError, match="finite"):
        load_stats(_stats_file(tmp_path, "nan.safetensors", q_mean_real=nan))
    path = tmp_path / "shapes.safetensors"
    good = _stats_file(tmp_path)
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
        meta = h.metadata()
    tensors["omega"] = torch.rand(5)  # not [F]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=str(path)):
        load_stats(path)


def test_stats_refused_at_config_time_before_any_work(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"junk" * 8)
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=str(path)):
        flashmem.wrap(model, flashmem.FlashMemConfig(budget_tokens=256, stats_path=str(path)))


def _checkpoint(tmp_path, model):
    c = LookaheadConfig(2, 4, 2, 16, rank=8, chunk_size=16, lookahead=16)
    path, meta = LookaheadIndexer(c, fingerprint=model_fingerprint(model)).save(tmp_path / "ix.safetensors")
    return path, meta


def test_indexer_checkpoint_with_other_shapes_is_refused_at_load(tmp_path):
    """A hand-edited checkpoint whose fingerprint matches but whose tensors do not fit its config
    used to load and crash mid-decode."""
    model = tiny_model("llama")
    path, meta = _checkpoint(tmp_path, model)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors["Wq"] = tensors["Wq"][..., :4].contiguous()  # rank 4, config says 8
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="do not match") as err:
        load_indexer(path, model_fingerprint(model))
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="do not match"):
        flashmem.wrap(
            model,
            flashmem.FlashMemConfig(budget_tokens=64, recent_tokens=16, chunk_size=16, indexer=str(path)),
        )


def test_indexer_checkpoint_with_bad_metadata_or_nan_is_refused(tmp_path):
    model = tiny_model("llama")
    path, meta = _checkpoint(tmp_path, model)
    meta.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON") as err:
        load_indexer(path, model_fingerprint(model))
    assert str(meta) in str(err.value)
    path, meta = _checkpoint(tmp_path, model)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    tensors["a"] = torch.full_like(tensors["a"], float("inf"))
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="finite"):
        load_indexer(path, model_fingerprint(model))
    data = json.loads(meta.read_text())
    data["format"] = "something else"
    meta.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a flashmem lookahead indexer checkpoint"):
        load_indexer(path)
