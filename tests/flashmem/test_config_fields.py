"""FlashMemConfig field types: numpy integers work everywhere (converted to int), every other type
hole is refused up front with a message that says what to pass instead."""

import dataclasses
import json
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

import flashmem
from flashmem.config import FlashMemConfig

HINTS = typing.get_type_hints(FlashMemConfig)
INT_FIELDS = [
    f.name
    for f in dataclasses.fields(FlashMemConfig)
    if int in typing.get_args(HINTS[f.name]) or HINTS[f.name] is int
]


def _budget_config(stats, **kw):
    base = dict(
        budget_tokens=48, block_size=16, max_context_tokens=4096, compaction_interval=16, recent_tokens=16,
        sink_tokens=4, stats_path=stats, max_host_bytes=10**9, chunk_size=16, chunk_budget=2, lookahead=8,
        prefetch_steps=2, indexer="quest", index_candidates=4, prefill_chunk_tokens=16,
        observe_tokens=4, recall_mode="shared",
    )  # fmt: skip
    base.update(kw)
    return FlashMemConfig(**base)


def test_numpy_integers_work_end_to_end(model_and_stats):
    model, stats = model_and_stats
    plain = _budget_config(stats)
    assert set(INT_FIELDS) <= {k for k, v in dataclasses.asdict(plain).items() if isinstance(v, int)}
    numpy = _budget_config(stats, **{name: np.int64(getattr(plain, name)) for name in INT_FIELDS})
    numpy.block_size = np.int32(16)  # an assignment after construction is not converted ...
    numpy = dataclasses.replace(numpy)  # ... but a replace() runs the checks again
    for name in INT_FIELDS:
        assert type(getattr(numpy, name)) is int, name
    assert numpy == plain
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(3))
    outs, reports = [], []
    for config in (plain, numpy):
        fm = flashmem.wrap(model, config)
        outs.append(fm.generate(ids, 24, eos_token_id=None))
        reports.append(fm.memory_report())
    assert torch.equal(outs[0], outs[1])
    assert reports[0]["compactions"] > 0 and reports[0]["offload"]["h2d_bytes"] > 0
    json.dumps(reports[1])  # no numpy scalar leaks into the report


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize(
    "value, exc, words",
    [
        (True, TypeError, "an int.*got bool \\(True\\); pass an int"),
        (16.0, TypeError, "an int.*got float \\(16.0\\); pass the int 16"),
        (16.5, TypeError, "an int.*got float \\(16.5\\); pass a plain int"),
        (float("nan"), TypeError, "an int.*got float \\(nan\\); pass a plain int"),
        ("16", TypeError, "an int.*got str \\('16'\\); pass the int 16, not a string"),
        (np.bool_(True), TypeError, "an int.*got numpy.bool"),
        (torch.tensor(16), TypeError, "an int.*got torch.Tensor"),
        (-1, ValueError, ">= [01], got -1; set it to [01] or more"),
    ],
)
def test_int_fields_refuse_other_types_saying_what_to_pass(name, value, exc, words):
    with pytest.raises(exc, match=f"FlashMemConfig\\.{name} must be {words}"):
        FlashMemConfig(**{name: value})


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"protect_prompt": 1}, TypeError, "protect_prompt must be True or False, got int"),
        ({"protect_prompt": np.bool_(True)}, TypeError, "protect_prompt must be True or False"),
        ({"host_mirror": "yes"}, TypeError, "host_mirror must be True, False or None"),
        ({"prefill": 1}, TypeError, "prefill must be a string"),
        ({"triattention_mode": 0}, TypeError, "triattention_mode must be a string"),
        ({"stats_path": 3}, TypeError, "stats_path must be a non-empty path"),
        ({"stats_path": ""}, TypeError, "stats_path must be a non-empty path"),
        ({"stats_path": "no/such/stats.safetensors"}, ValueError, "stats_path 'no/such/stats.safetensors' is not a file"),
        ({"stats_path": "."}, ValueError, "stats_path '.' is not a file"),
        ({"indexer": ""}, TypeError, "indexer must be a non-empty path"),
        ({"indexer": None}, TypeError, "indexer must be a non-empty path"),
        # an unknown name is refused even without a budget (it used to be ignored until one was set)
        ({"indexer": "nonsense"}, ValueError, "unknown indexer 'nonsense'; choose one of"),
        ({"indexer": "no/such/indexer.safetensors"}, ValueError, "checkpoint 'no/such/indexer.safetensors' is not a file"),
    ],
)  # fmt: skip
def test_other_fields_refuse_bad_values(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        FlashMemConfig(**kwargs)


def test_paths_may_be_path_objects(model_and_stats):
    _, stats = model_and_stats
    config = FlashMemConfig(stats_path=Path(stats), indexer="quest")
    assert config.stats_path == stats


def test_faiss_backend_without_faiss_is_refused_at_config_time(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now fails as if not installed
    with pytest.raises(ValueError, match="needs the faiss package.*index_backend='torch'"):
        FlashMemConfig(budget_tokens=256, index_backend="faiss", index_candidates=8)
