"""Randomised fault test: 600 seeded random FlashMemConfig settings (valid and invalid, every field,
boundaries included) crossed with tiny prompts on a tiny model.

An independent oracle below states the documented rules. A setting it calls valid must generate
without raising; one it calls invalid must be refused with ValueError/TypeError before any work (at
FlashMemConfig(), wrap() or the start of generate(): no forward of the model has run and a refused
generate() leaves the wrapper as it was). Afterwards the model's plain Hugging Face outputs are
unchanged. Runs in well under a minute on one CPU thread.
"""

import dataclasses
import importlib.util
import math
import os
import random

import numpy as np
import pytest
import torch

import flashmem
from flashmem.indexer.heuristics import HEURISTICS

N_CASES = 600
INT_FIELDS = {  # field: minimum
    "budget_tokens": 1,
    "block_size": 1,
    "max_context_tokens": 1,
    "compaction_interval": 1,
    "recent_tokens": 0,
    "sink_tokens": 0,
    "max_host_bytes": 1,
    "chunk_size": 1,
    "chunk_budget": 0,
    "lookahead": 1,
    "prefetch_steps": 0,
    "index_candidates": 0,
    "prefill_chunk_tokens": 1,
    "observe_tokens": 0,
}
OPTIONAL = {"budget_tokens", "max_host_bytes", "chunk_budget", "prefill_chunk_tokens"}
CHOICES = {
    "triattention_mode": ("per_head", "per_layer_per_head"),
    "attention_backend": ("auto", "triton", "torch"),
    "index_backend": ("torch", "faiss"),
    "prefill": ("exact", "sparse"),
    "recall_mode": ("per_layer_per_head", "shared"),
}
INDEXERS = ("auto", "none", "lookahead", *HEURISTICS)
HAS_FAISS = importlib.util.find_spec("faiss") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# numpy integers are accepted (and stored as int) once FlashMemConfig converts them
NUMPY_INTS = isinstance(flashmem.FlashMemConfig(block_size=np.int64(16)).block_size, int)


def _is_int(v) -> bool:
    if isinstance(v, np.integer):
        return NUMPY_INTS
    return isinstance(v, int) and not isinstance(v, bool)


def _draw(rng: random.Random, stats: str) -> dict:
    """One setting. Mode "valid": valid values, conflicts between fields repaired; "raw": valid values
    as drawn (conflicts between fields stay); "bad": a repaired valid setting with one or two fields
    then set to invalid or boundary values (so each bad value meets an otherwise valid setting)."""
    mode = rng.choices(["valid", "raw", "bad"], weights=[50, 15, 35])[0]
    kw = {name: rng.choice(good) for name, (good, _) in sorted(FIELDS.items()) if name not in OWN_DRAW}
    kw["stats_path"] = stats if kw["stats_path"] == "tiny" else None
    sink, window = kw["sink_tokens"], kw["recent_tokens"]
    if kw["budget_tokens"] == "rel":  # at and around the boundary sink + window
        kw["budget_tokens"] = sink + window + rng.choice([-1, 0, 0, 1, 3, 9, 30, 80])
    if kw["prefetch_steps"] == "rel":
        kw["prefetch_steps"] = kw["lookahead"] + rng.choice([-1, 0])
    if mode != "raw":
        if kw["budget_tokens"] is None and rng.random() < 0.6:
            kw["budget_tokens"] = sink + window + rng.choice([0, 1, 5, 20])
        if kw["budget_tokens"] is None:
            kw["prefill"] = "exact"
        else:
            kw["budget_tokens"] = max(kw["budget_tokens"], sink + window)
            kw["max_context_tokens"] = max(kw["max_context_tokens"], kw["budget_tokens"])
        kw["prefetch_steps"] = min(kw["prefetch_steps"], kw["lookahead"] - 1)
        if recall_enabled(kw):
            kw["triattention_mode"] = "per_head"
        needs_mirror = kw["prefill"] == "exact" and kw["triattention_mode"] == "per_head"
        if (recall_enabled(kw) or needs_mirror) and kw["host_mirror"] is False:
            kw["host_mirror"] = None
        if kw["index_backend"] == "faiss" and not kw["index_candidates"]:
            kw["index_candidates"] = 4
    if mode == "bad":
        for name in rng.sample(
            sorted(f for f in FIELDS if FIELDS[f][1] and f not in OWN_DRAW), rng.choice([1, 1, 2])
        ):
            value = rng.choice(FIELDS[name][1])
            if value == "rel":  # prefetch_steps at the lookahead boundary
                value = kw["lookahead"] + rng.choice([-1, 0])
            kw[name] = value
    # fields added later draw from their own generator, so the main draw (and the coverage floors the
    # seed gives) stays what it was
    for name in OWN_DRAW:
        good, bad = FIELDS[name]
        own = _OWN_RNGS[name]
        kw[name] = own.choice(bad) if mode == "bad" and own.random() < 0.05 else own.choice(good)
    if mode != "raw" and kw["recall_mode"] in CHOICES["recall_mode"] and _is_int(kw["prefetch_steps"]):
        if kw["prefetch_steps"] > 0:
            kw["recall_mode"] = "shared"  # only shared recall prefetches
    if NUMPY_INTS and rng.random() < 0.1:
        ints = [k for k, v in kw.items() if k in INT_FIELDS and _is_int(v)]
        if ints:
            k = rng.choice(ints)
            kw[k] = np.int64(kw[k])
    return kw


FIELDS = {  # name: (values that are valid on their own, invalid or boundary values)
    "budget_tokens": ([None, None, None, "rel", "rel", "rel"], [0, -3, 2.5, True, "200"]),
    "block_size": ([1, 4, 8, 16, 16, 16], [0, -1, 16.0, False]),
    "max_context_tokens": ([524_288, 524_288, 4096, 96, 200], [0, -1, "big", 1.0]),
    "compaction_interval": ([1, 4, 8, 16, 16, 32, 128], [0, -2, 16.5]),
    "recent_tokens": ([0, 8, 8, 16, 32], [-1, 8.0, None]),
    "sink_tokens": ([0, 4, 4, 16], [-1, "4"]),
    "protect_prompt": ([False, False, True], [1, "yes", None]),
    "triattention_mode": ([None, "per_head", "per_head", "per_layer_per_head"], ["global", "", 0]),
    "stats_path": (["tiny"] * 9 + [None], [None]),
    "attention_backend": (["auto"] * 60 + ["torch"] * 38 + ["triton"], ["cuda", "TORCH", None]),
    "host_mirror": ([None, None, True, False], [1, "on"]),
    "max_host_bytes": ([None, None, 10**12], [0, -1, 1.5, 1]),  # 1 byte: refused at generate
    "chunk_size": ([16, 16, 32, 64], [0, -16, 16.0]),
    "chunk_budget": ([None, None, 0, 1, 3], [-1, 1.0]),
    "lookahead": ([1, 4, 8, 64], [0, -4, "8"]),
    "prefetch_steps": ([0, 0, 0, 1, "rel"], [-1, 0.5, "rel"]),
    "indexer": (
        ["auto", "none", "quest", "quest", "recency", "mean_key", "mean_key_prerope"],
        ["oracle", "nope", "", 3, "lookahead"],
    ),
    "index_backend": (["torch"] * 9 + ["faiss"], ["annoy", None]),
    "index_candidates": ([0, 0, 0, 1, 4], [-1, 2.0]),
    "prefill": (["exact", "exact", "sparse"], ["dense", None]),
    "prefill_chunk_tokens": ([None, None, 1, 7, 64], [0, -7, 7.5]),
    "observe_tokens": ([16, 0, 1, 1000], [-1, 1.5]),
    "cuda_graph": ([False] * 19 + [True], [1, "yes", None]),
    "recall_mode": (["per_layer_per_head", "per_layer_per_head", "shared"], ["per_token", None]),
}
OWN_DRAW = ("cuda_graph", "recall_mode")
_OWN_RNGS = {"cuda_graph": random.Random(11), "recall_mode": random.Random(12)}


def config_error(kw: dict) -> bool:
    """True when FlashMemConfig must refuse ``kw`` (the documented rules, restated independently)."""
    for name, minimum in INT_FIELDS.items():
        v = kw[name]
        if v is None and name in OPTIONAL:
            continue
        if not _is_int(v) or v < minimum:
            return True
    if kw["prefetch_steps"] >= kw["lookahead"]:
        return True
    if kw["prefetch_steps"] and kw["recall_mode"] == "per_layer_per_head":
        return True  # only shared recall prefetches
    kw = dict(kw)
    if kw["triattention_mode"] is None:  # the default: per layer, per KV head under shared recall
        kw["triattention_mode"] = "per_head" if kw["recall_mode"] == "shared" else "per_layer_per_head"
    for name, choices in CHOICES.items():
        if kw[name] not in choices:
            return True
    if not isinstance(kw["protect_prompt"], bool) or not isinstance(kw["host_mirror"], (bool, type(None))):
        return True
    if not isinstance(kw["cuda_graph"], bool):
        return True
    if not isinstance(kw["indexer"], str) or not kw["indexer"]:
        return True
    if kw["index_backend"] == "faiss" and not kw["index_candidates"]:
        return True
    budget = kw["budget_tokens"]
    if budget is not None and (
        budget < kw["sink_tokens"] + kw["recent_tokens"] or budget > kw["max_context_tokens"]
    ):
        return True
    if recall_enabled(kw):
        if (
            kw["chunk_size"] % kw["block_size"]
            or not mirror_enabled(kw)
            or (kw["triattention_mode"] != "per_head" and kw["recall_mode"] == "shared")
        ):
            return True
    if budget is not None and kw["prefill"] == "exact" and kw["triattention_mode"] == "per_head":
        if not mirror_enabled(kw):  # the exact prefill reads the per_head keep-set from the mirror
            return True
    return kw["prefill"] == "sparse" and budget is None


def mirror_enabled(kw: dict) -> bool:
    return kw["budget_tokens"] is not None if kw["host_mirror"] is None else kw["host_mirror"]


def recall_enabled(kw: dict) -> bool:
    budget, chunk_budget = kw["budget_tokens"], kw["chunk_budget"]
    if budget is None or kw["indexer"] == "none":
        return False
    effective = chunk_budget if chunk_budget is not None else max(1, budget // (2 * kw["chunk_size"]))
    return effective > 0


def wrap_error(kw: dict) -> bool:
    """True when wrap() must refuse a setting FlashMemConfig accepts (on this tiny model, here)."""
    if kw["indexer"] not in INDEXERS:
        return True
    if kw["index_backend"] == "faiss" and not HAS_FAISS:
        return True
    if kw["attention_backend"] == "triton" and not INTERPRET:
        return True  # a CPU model
    if kw["cuda_graph"]:
        return True  # a CPU model: no CUDA graph
    if kw["budget_tokens"] is not None and kw["stats_path"] is None and kw["prefill"] == "sparse":
        return True  # no stats fit this model, and only the exact prefill derives them from the prompt
    return recall_enabled(kw) and kw["indexer"] == "lookahead"  # shipped checkpoint: another model


def generate_error(kw: dict, prompt: int, new: int) -> bool:
    """True when generate() must refuse these inputs under a setting wrap() accepted."""
    if prompt + new > kw["max_context_tokens"]:
        return True
    if mirror_enabled(kw) and kw["max_host_bytes"] == 1:
        return True
    budget = kw["budget_tokens"]
    return budget is not None and kw["protect_prompt"] and prompt + kw["recent_tokens"] > budget


def test_every_field_has_a_generator():
    assert {f.name for f in dataclasses.fields(flashmem.FlashMemConfig)} == set(FIELDS), (
        "a FlashMemConfig field was added or removed: give it valid and invalid values in FIELDS "
        "and its rules in the oracle"
    )


def test_random_settings_never_crash_and_bad_ones_are_refused_before_any_work(model_and_stats):
    model, stats = model_and_stats
    rng = random.Random(7)
    for name, seed in (("cuda_graph", 11), ("recall_mode", 12)):
        _OWN_RNGS[name].seed(seed)
    probe = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain_before = model(probe).logits
    impl_before = model.config._attn_implementation
    forwards = [0]
    hook = model.register_forward_pre_hook(lambda m, a: forwards.__setitem__(0, forwards[0] + 1))
    tally = {"config": 0, "wrap": 0, "generate": 0, "valid": 0, "compacted": 0, "recalled": 0}
    failures = []
    try:
        for case in range(N_CASES):
            kw = _draw(rng, stats)
            prompt_len = rng.choice([1, 2, 5, 17, 40, 90, 150, 150, 200])
            chunk = kw["prefill_chunk_tokens"]
            if chunk is None and kw["prefill"] == "sparse":
                chunk = kw["compaction_interval"]
            if _is_int(chunk) and chunk < 4:
                prompt_len = min(prompt_len, 17)  # one-token prefill forwards: keep the run short
            new = rng.choice([0, 1, 3, 6])
            ids = torch.randint(0, 128, (1, prompt_len), generator=torch.Generator().manual_seed(case))
            where = f"case {case}: {kw}, prompt {prompt_len}, new {new}"
            forwards[0] = 0
            expect = (
                "config"
                if config_error(kw)
                else "wrap"
                if wrap_error(kw)
                else "generate"
                if generate_error(kw, prompt_len, new)
                else None
            )
            stage = "config"
            try:
                config = flashmem.FlashMemConfig(**kw)
                stage = "wrap"
                fm = flashmem.wrap(model, config)
                stage = "generate"
                out = fm.generate(ids, new, eos_token_id=None)
            except (ValueError, TypeError) as exc:
                order = ["config", "wrap", "generate"]
                if expect is None or order.index(stage) > order.index(expect):
                    failures.append(f"{where}: expected {expect or 'success'}, {stage} raised {exc!r}")
                elif forwards[0]:
                    failures.append(f"{where}: refused after {forwards[0]} forwards: {exc!r}")
                elif stage == "generate" and (fm.pool is not None or fm.cache is not None):
                    failures.append(f"{where}: a refused generate() changed the wrapper")
                else:
                    tally[stage] += 1
                continue
            except Exception as exc:  # noqa: BLE001 - every unexpected exception is a finding
                failures.append(f"{where}: {stage} raised {type(exc).__name__}: {exc}")
                continue
            if expect is not None:
                failures.append(f"{where}: expected a refusal at {expect}, generate succeeded")
                continue
            tally["valid"] += 1
            if out.shape != (1, prompt_len + new) or not torch.equal(out[:, :prompt_len], ids):
                failures.append(f"{where}: output {tuple(out.shape)}")
            r = fm.memory_report()
            tally["compacted"] += r["compactions"] > 0
            tally["recalled"] += r["recall_refreshes"] > 0
            if r["peak_blocks_in_use"] > r["pool_blocks"]:
                failures.append(f"{where}: peak {r['peak_blocks_in_use']} > pool {r['pool_blocks']}")
    finally:
        hook.remove()
    assert not failures, f"{len(failures)} of {N_CASES} cases failed:\n" + "\n".join(failures[:20])
    print(tally)
    # the draw exercises every outcome
    assert tally["valid"] >= N_CASES // 3 and tally["config"] >= N_CASES // 5
    assert (
        tally["wrap"] >= 10
        and tally["generate"] >= 10
        and tally["compacted"] >= 40
        and tally["recalled"] >= 20
    )
    assert model.config._attn_implementation == impl_before
    with torch.no_grad():
        assert torch.equal(model(probe).logits, plain_before)


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_numbers_are_refused(value):
    with pytest.raises((ValueError, TypeError)):
        flashmem.FlashMemConfig(budget_tokens=value)
