"""The RULER-style suite (bench/ruler.py, bench/ruler_tasks.py) without a model forward: the
generators (deterministic, references in the context, the question last), the length fit with the
default tokenizer, the split into context and question ids, the two scores, the budget search, the
resumable results log, the whole entry with stub decoders, and the kvpress ruler mode with a stub
worker and, in-process, a stub press on a tiny random model."""

import dataclasses
import json
import random
import sys
import types
from collections import Counter

import pytest
import torch

import flashmem
from bench import ruler, ruler_log, ruler_tasks
from bench.peers import kvpress_env, kvpress_peer, kvpress_worker

TASKS = list(ruler_tasks.TASKS)


@pytest.fixture(scope="module")
def tok():
    from flashmem import load_default_tokenizer

    return load_default_tokenizer()


# ---------------------------------------------------------------------------------------------
# generators
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic_for_a_seed(task):
    a = ruler_tasks.build(task, 30, 0.3, 11, 2048)
    b = ruler_tasks.build(task, 30, 0.3, 11, 2048)
    c = ruler_tasks.build(task, 30, 0.3, 12, 2048)
    assert a == b
    assert a.references != c.references
    # keys and values are drawn before the haystack: fitting the haystack does not change them
    assert ruler_tasks.build(task, 40, 0.3, 11, 2048).references == a.references


@pytest.mark.parametrize("task", TASKS)
def test_references_are_in_the_context_and_the_question_comes_last(task):
    for seed, depth in ((1, 0.05), (2, 0.5), (3, 0.95)):
        b = ruler_tasks.build(task, 25, depth, seed, 2048)
        assert b.text == b.context + b.question and b.question.startswith("\n\n")
        assert b.references and all(r in b.context for r in b.references)
        if b.query:
            assert b.query in b.question
        if ruler_tasks.TASKS[task].metric == "all" and task not in ("cwe", "fwe", "vt"):
            # a needle's value is not given away by the question
            assert not any(r in b.question for r in b.references)


def test_word_tasks_answers_are_the_most_frequent_words():
    cwe = ruler_tasks.build("cwe", 60, 0.5, 4, 4096)
    entries = cwe.context.split("\n\n", 1)[1].split()
    words = entries[1::2]  # "1. word 2. word ..."
    counts = Counter(words)
    assert {w for w, _ in counts.most_common(10)} == set(cwe.references)
    assert min(counts[w] for w in cwe.references) == ruler_tasks.cwe_common_freq(4096) == 20
    fwe = ruler_tasks.build("fwe", 500, 0.5, 4, 2048)
    counts = Counter(fwe.context.split("\n\n", 1)[1].split())
    top = [w for w, _ in counts.most_common(3)]
    assert top == fwe.references and counts[top[2]] > counts.most_common(4)[3][1]


def test_needle_depth_and_distractors():
    n = 50
    first = ruler_tasks.build("niah_single_2", n, 0.0, 5, 2048)
    last = ruler_tasks.build("niah_single_2", n, 1.0, 5, 2048)
    needle = f"is: {first.references[0]}."
    assert first.context.index(needle) < len(first.context) * 0.2
    assert last.context.index(needle) > len(last.context) * 0.8
    mk = ruler_tasks.build("niah_multikey_1", n, 0.5, 5, 2048)
    assert mk.context.count("One of the special magic numbers for") == 4
    mv = ruler_tasks.build("niah_multivalue", n, 0.5, 5, 2048)
    assert mv.context.count(f"for {mv.query} is:") == 4 and len(set(mv.references)) == 4
    hay = ruler_tasks.build("niah_multikey_2", n, 0.5, 5, 2048)
    assert hay.context.count("One of the special magic numbers for") == n + 1
    vt = ruler_tasks.build("vt", n, 0.5, 5, 2048)
    names = vt.references
    assert f"VAR {names[0]} = {vt.query}." in vt.context
    assert all(f"VAR {b} = VAR {a}." in vt.context for a, b in zip(names, names[1:]))
    qa2 = ruler_tasks.build("qa_2", 20, 0.5, 5, 2048)
    assert f"lies in the country of {qa2.references[0]}." in qa2.context


def test_insert_at_places_by_depth():
    units = [str(i) for i in range(10)]
    out = ruler_tasks.insert_at(units, [(1.0, "END"), (0.0, "START"), (0.5, "MID")])
    assert out[0] == "START" and out[-1] == "END" and out.index("MID") == 6 and len(out) == 13


# ---------------------------------------------------------------------------------------------
# scores, fit, budgets
# ---------------------------------------------------------------------------------------------
def test_string_match_all_and_part():
    refs = ["1234567", "ABCDE", "quiet"]
    assert ruler_tasks.score("all", " 1234567 and abcde", refs) == pytest.approx(2 / 3)
    assert ruler_tasks.score("all", "nothing", refs) == 0.0
    assert ruler_tasks.score("all", "QUIET abcde 1234567", refs) == 1.0
    assert ruler_tasks.score("part", " abcde", refs) == 1.0
    assert ruler_tasks.score("part", "none of them", refs) == 0.0
    assert ruler_tasks.score("part", "Tamgaria.", ["tamgaria"]) == 1.0
    with pytest.raises(ValueError):
        ruler_tasks.score("exact", "x", refs)
    with pytest.raises(ValueError):
        ruler_tasks.score("all", "x", [])


def test_fit_units_finds_the_largest_count_within_the_target():
    rng = random.Random(0)
    steps = [rng.randint(18, 26) for _ in range(2000)]
    calls = []

    def count(n):
        calls.append(n)
        return 40 + sum(steps[:n])

    for target in (300, 2048, 7168):
        n = ruler_tasks.fit_units(count, target)
        assert count(n) <= target < count(n + 1)
    assert len(calls) < 80  # secant steps, not a scan
    with pytest.raises(ValueError, match="over the target"):
        ruler_tasks.fit_units(count, 50)


def test_calibrate_budget_finds_the_share_or_the_nearest_feasible():
    def measure(b):  # an overhead and one KV token per budget token over 4,096 tokens
        return 0.02 + b / 4096 + (b % 16) * 1e-5

    r = ruler.calibrate_budget(measure, 4096, 0.12)
    assert r["reached"] and abs(r["share"] - 0.12) <= ruler.SHARE_TOLERANCE
    assert len(r["evaluations"]) <= 6
    r = ruler.calibrate_budget(measure, 4096, 0.03)
    assert r == {**r, "budget_tokens": ruler.MIN_BUDGET, "reached": False}
    assert len(r["evaluations"]) == 1  # the minimum is over the target: no further runs
    assert r["share"] == pytest.approx(measure(ruler.MIN_BUDGET))


@pytest.mark.parametrize("length", [2048])
def test_prompts_fit_the_target_and_split_at_a_token_boundary(tok, length):
    prompts = ruler.make_samples(tok, TASKS, [length], 1)
    assert [p["task"] for p in prompts] == TASKS
    for p in prompts:
        ids = tok(p["text"]).input_ids
        assert p["context_ids"] + p["question_ids"] == ids and p["tokens"] == len(ids)
        assert abs(p["tokens"] - length) <= 0.03 * length and p["tokens"] <= length, p["id"]
        assert tok.decode(p["question_ids"]).strip() == p["question"].strip()
        context = tok.decode(p["context_ids"])
        assert all(r in context for r in p["references"]), p["id"]
        assert p["depth"] == 0.5
    again = ruler.make_samples(tok, TASKS[:2], [length], 1)
    assert [p["ids_sha"] for p in again] == [p["ids_sha"] for p in prompts[:2]]


def test_recorded_prompts_are_rebuilt_from_their_text(tok, tmp_path, monkeypatch):
    """The haystacks come from the installed packages' files: once a prompt is recorded, a later
    run takes its text from the record, not from the generators (a package update must not change
    the prompts under cached results); another seed, or a prompt not recorded, is generated."""
    tasks, path = ["niah_single_2", "qa_1"], tmp_path / "ruler_prompts.json"
    first = ruler.make_samples(tok, tasks, [512], 2)
    cal = ruler.calibration_prompt(tok, 512)
    ruler.save_recorded(path, first + [cal])
    recorded = ruler.load_recorded(path)
    assert set(recorded) == {p["id"] for p in first} | {"calibration-L512"}

    real_build = ruler.rt.build

    def updated_package(task, n, depth, seed, length):  # other local text: other prompts
        b = real_build(task, n, depth, seed, length)
        return dataclasses.replace(b, context="Changed. " + b.context)

    monkeypatch.setattr(ruler.rt, "build", updated_package)
    again = ruler.make_samples(tok, tasks, [512], 2, recorded=recorded)
    assert [p["ids_sha"] for p in again] == [p["ids_sha"] for p in first]
    assert [(p["id"], p["sample"], p["depth"]) for p in again] == [
        (p["id"], p["sample"], p["depth"]) for p in first
    ]
    assert again[0]["context_ids"] + again[0]["question_ids"] == tok(first[0]["text"]).input_ids
    assert ruler.calibration_prompt(tok, 512, recorded)["ids_sha"] == cal["ids_sha"]
    fresh = ruler.make_samples(tok, tasks, [512], 2)
    assert all(a["ids_sha"] != b["ids_sha"] for a, b in zip(fresh, first))
    other_seed = ruler.make_samples(tok, tasks[:1], [512], 2, base_seed=1, recorded=recorded)
    assert all(p["text"].startswith("Changed. ") for p in other_seed)
    # saving another selection keeps what was recorded before
    ruler.save_recorded(path, other_seed[:1])
    assert set(ruler.load_recorded(path)) == set(recorded)
    assert ruler.load_recorded(path)[other_seed[0]["id"]]["seed"] == other_seed[0]["seed"]


# ---------------------------------------------------------------------------------------------
# the results log and the entry end to end with stub decoders
# ---------------------------------------------------------------------------------------------
def test_run_log_keeps_records_and_ignores_a_line_cut_short(tmp_path):
    path = tmp_path / "runs.jsonl"
    log = ruler_log.RunLog(path)
    log.append({"key": "a", "score": 1.0})
    log.append({"key": "b", "score": 0.0})
    path.write_text(path.read_text() + '{"key": "c", "sco')  # a run killed while writing
    log = ruler_log.RunLog(path)
    assert "a" in log and "b" in log and "c" not in log
    log.append({"key": "c", "score": 0.5})
    assert ruler_log.RunLog(path).records["c"]["score"] == 0.5
    assert ruler_log.RunLog(path, fresh=True).records == {}


def test_run_key_depends_on_ids_budget_and_resolved_config(monkeypatch):
    from flashmem.testing import tiny_model

    model = tiny_model("llama")
    p = {"ids_sha": "x", "max_new_tokens": 12}
    m = ruler.bind(
        {"label": "l", "kind": "flashmem", "share": None, "extra": {"budget_tokens": 256}, "budgets": None},
        2048,
        model,
    )
    k = ruler_log.run_key(p, m)
    assert k == ruler_log.run_key(dict(p), ruler.bind(dict(m), 2048, model))
    assert k != ruler_log.run_key({**p, "ids_sha": "y"}, m)
    assert k != ruler_log.run_key({**p, "max_new_tokens": 13}, m)
    other = ruler.bind({**m, "extra": {"budget_tokens": 257}}, 2048, model)
    assert k != ruler_log.run_key(p, other)
    assert m["spec"]["config"]["recent_tokens"] == 128  # defaults are part of the key
    # so is the flashmem version: a release that changes what a configuration does is not cached as
    # the one before
    monkeypatch.setattr(flashmem, "__version__", "0.0.0-test")
    assert k != ruler_log.run_key(p, ruler.bind(dict(m), 2048, model))
    monkeypatch.undo()
    # what indexer="auto" resolves to is part of the key: a run cached under one resolution is not
    # taken for another (a prepared checkpoint, or a change of the rule)
    assert m["spec"]["config"]["derived"]["auto_indexer"] == "quest"
    monkeypatch.setitem(ruler._AUTO_INDEXERS, (id(model), 64), "lookahead:indexer.safetensors")
    assert k != ruler_log.run_key(p, ruler.bind(dict(m), 2048, model))
    with pytest.raises(ValueError, match="pass the model"):
        ruler.bind(dict(m), 2048)
    # without recall (no budget) or with an explicit indexer the resolution does not enter the key
    for extra in ({}, {"budget_tokens": 256, "indexer": "quest"}):
        spec = ruler.bind({**m, "extra": extra}, 2048)["spec"]["config"]
        assert "auto_indexer" not in spec["derived"]


@pytest.fixture
def stub_entry(monkeypatch, tok, tmp_path):
    """bench.ruler.main with stub decoders: full attention answers every reference, flashmem without
    a budget copies full attention, with a budget answers nothing; shares from a linear law."""
    import bench.common as common

    prompts_by_ids: dict = {}
    real_make = ruler.make_samples

    def make(*a, **k):
        out = real_make(*a, **k)
        for p in out:
            prompts_by_ids[tuple(p["context_ids"] + p["question_ids"])] = p
        return out

    def answer(ids):
        p = prompts_by_ids.get(tuple(ids[0].tolist()))
        return tok(" " + " ".join(p["references"])).input_ids if p else tok(" none").input_ids

    calls = []

    def full_run(model, ids, n):
        calls.append("full")
        return {"tokens": answer(ids), "seconds": 0.1, "prefill_s": 0.05}

    def flashmem_run(model, cfg, ids, n):
        calls.append(("flashmem", cfg.get("budget_tokens")))
        if not cfg:
            return {"tokens": answer(ids), "seconds": 0.1}
        share = 0.05 + cfg["budget_tokens"] / ids.shape[1]
        return {
            "tokens": tok(" 0").input_ids,
            "seconds": 0.2,
            "avg_device_share": share,
            "peak_device_share": share + 0.01,
            "avg_device_kv_share": share - 0.04,
        }

    monkeypatch.setattr(ruler, "make_samples", make)
    monkeypatch.setattr(ruler, "full_run", full_run)
    monkeypatch.setattr(ruler, "flashmem_run", flashmem_run)
    from flashmem.testing import tiny_model

    model = tiny_model("llama")  # never run (the decoders are stubs): resolves indexer="auto"
    monkeypatch.setattr(common, "load_default", lambda: (model, tok, "stub model"))
    monkeypatch.setattr(ruler, "fitted_prompt", _cached(ruler.fitted_prompt))
    return calls, tmp_path / "ruler.json"


def _cached(fn):
    memo = {}

    def wrapped(*a, **k):
        key = (a[1:], tuple(sorted(k.items())))
        if key not in memo:
            memo[key] = fn(*a, **k)
        return json.loads(json.dumps(memo[key]))

    return wrapped


def test_entry_end_to_end_and_resumes(stub_entry, tmp_path):
    calls, out = stub_entry
    argv = [
        "--tasks",
        "niah_single_1,qa_1",
        "--lengths",
        "512",
        "--samples",
        "2",
        "--methods",
        "full,flashmem",
        "--shares",
        "0.4,0.6",
        "--json",
        str(out),
    ]
    assert ruler.main(argv) == 0
    first = list(calls)
    assert first[:2] == ["full", ("flashmem", None)]  # the sanity check comes first
    assert first.count("full") == 4  # 2 tasks x 2 samples
    data = json.loads(out.read_text())
    assert data["sanity"]["tokens_equal"] is True
    assert data["settings"]["methods"][:2] == ["flashmem (share 40%)", "flashmem (share 60%)"]
    rows = {(r["method"], r["task"]): r for r in data["summary"]}
    assert rows[("full attention", "niah_single_1")]["score"] == 100.0
    assert rows[("full attention", "average")]["score"] == 100.0
    assert rows[("flashmem (share 40%)", "qa_1")]["score"] == 0.0
    cal = data["settings"]["budgets"]["512"]
    assert cal["0.4"]["reached"] and abs(cal["0.4"]["share"] - 0.4) <= ruler.SHARE_TOLERANCE
    fm = [r for r in data["records"] if r["method"] == "flashmem (share 40%)"]
    assert len(fm) == 4 and all(r["budget_tokens"] == cal["0.4"]["budget_tokens"] for r in fm)
    assert all("avg_device_share" in r and "peak_device_share" in r for r in fm)
    # accuracy against share: one point per method over the tasks every method ran
    fr = {x["method"]: x for x in data["frontier"]}
    assert fr["full attention"]["share"] == 1.0 and fr["full attention"]["score"] == 100.0
    assert fr["flashmem (share 40%)"]["tasks"] == ["niah_single_1", "qa_1"]
    per_task = [rows[("flashmem (share 40%)", t)]["mean_avg_device_share"] for t in ("niah_single_1", "qa_1")]
    assert fr["flashmem (share 40%)"]["share"] == pytest.approx(sum(per_task) / 2)
    assert fr["flashmem (share 40%)"]["score"] == pytest.approx(
        rows[("flashmem (share 40%)", "average")]["score"]
    )
    assert out.with_name(out.stem + "_frontier.png").is_file()
    assert len(data["prompts"]) == 4 and all("references" in p for p in data["prompts"])
    texts = json.loads((tmp_path / "ruler_prompts.json").read_text())["prompts"]
    assert all(t["text"].endswith(t["question"]) for t in texts)
    # the README section: one table per length, default-config flashmem first, measured shares
    from bench import readme

    table = readme.ruler(tmp_path)
    lines = [x for x in table.splitlines() if x.startswith("| ")]
    assert lines[0].startswith("| method | device share | S1 | QA1 | mean |")
    assert (
        lines[1].startswith("| flashmem (share 40%) | 4") and "| full attention | 100% | 100 | 100 |" in table
    )
    assert "not run yet" in readme.ruler(tmp_path / "none")
    # a rerun finds everything in the log (and the budgets in their cache): nothing runs again
    calls.clear()
    assert ruler.main(argv) == 0
    assert calls == []
    assert json.loads(out.read_text())["summary"] == data["summary"]
    # one more sample: only its runs are new
    assert ruler.main(argv[:5] + ["3"] + argv[6:]) == 0
    assert calls.count("full") == 6  # depths change with the count, so every prompt is new


def test_two_targets_on_one_budget_run_once_and_keep_both_labels(stub_entry):
    calls, out = stub_entry
    argv = [
        "--tasks",
        "niah_single_1",
        "--lengths",
        "512",
        "--samples",
        "2",
        "--methods",
        "flashmem",
        "--shares",
        "0.1,0.2",
        "--json",
        str(out),
    ]
    assert ruler.main(argv) == 0
    assert calls.count(("flashmem", ruler.MIN_BUDGET)) == 1 + 2  # calibration once, then each prompt once
    data = json.loads(out.read_text())
    assert not data["settings"]["budgets"]["512"]["0.1"]["reached"]
    rows = {(r["method"], r["task"]): r for r in data["summary"]}
    assert rows[("flashmem (share 10%)", "niah_single_1")]["n"] == 2
    assert rows[("flashmem (share 20%)", "niah_single_1")]["n"] == 2


def test_quick_mode_settings():
    args = ruler.parse(["--quick"])
    assert args.methods == ["full", "flashmem"] and args.shares == [0.06] and args.samples == 2
    assert args.lengths == [1024] and len(args.tasks) == 2
    assert ruler.parse([]).methods == ["full", "flashmem", "kvpress"]
    with pytest.raises(SystemExit):
        ruler.parse(["--tasks", "nope"])


# ---------------------------------------------------------------------------------------------
# kvpress ruler mode
# ---------------------------------------------------------------------------------------------
def _fake_prompt(i, ctx, q, refs):
    return {
        "id": f"p{i}",
        "target_tokens": 512,
        "context_ids": ctx,
        "question_ids": q,
        "max_new_tokens": 3,
        "ids_sha": ruler_log.ids_hash(ctx + q),
        "references": refs,
        "metric": "all",
        "task": "niah_single_1",
        "sample": i,
        "tokens": len(ctx) + len(q),
    }


def test_kvpress_ruler_scores_the_stream_and_skips_what_is_done(monkeypatch, tmp_path, tok):
    prompts = [_fake_prompt(i, [1, 2, 3, 4], [5, 6], ["123"]) for i in range(2)]
    prompts[1]["context_ids"] = [7, 8, 9]
    prompts[1]["ids_sha"] = ruler_log.ids_hash([7, 8, 9, 5, 6])
    budgets = {512: {0.3: {"share": 0.31, "budget_tokens": 100, "reached": True}}}
    log = ruler_log.RunLog(tmp_path / "runs.jsonl")
    seen = []

    def fake_worker(task, *, name, timeout):
        seen.append(task)
        with open(task["stream_path"], "a") as f:
            for p in task["prompts"]:
                for job in p["jobs"]:
                    good = job["placement"] == "question inside"
                    line = {
                        "key": job["key"],
                        "tokens": tok(" 123" if good else " 9").input_ids,
                        "kept_share": 0.3,
                        "kept_share_end": 0.29,
                        "keep_share_requested": job["keep_share"],
                        "seconds": 1.0,
                    }
                    f.write(json.dumps(line) + "\n")
        return {"status": "ok", "env_check": None}

    monkeypatch.setattr(kvpress_env, "run_worker", fake_worker)
    # a stream left by a worker whose main process was stopped: its result is kept, its job not sent
    first = kvpress_peer.ruler_methods(budgets, 512, ["KnormPress", "TOVAPress"])[0]
    left = {
        "key": ruler_log.run_key(prompts[0], first),
        "tokens": tok(" 9").input_ids,
        "kept_share_end": 0.29,
        "keep_share_requested": 0.31,
    }
    # and a result of a job outside this selection (another press) stays for a run that selects it
    other = {**left, "key": "another press's run"}
    (tmp_path / "runs_kvpress_stream.jsonl").write_text(
        json.dumps(left) + "\n" + json.dumps(other) + "\n" + '{"key": "cut sho'
    )
    keys, status = kvpress_peer.run_ruler(prompts, budgets, log, tok, presses=["KnormPress", "TOVAPress"])
    assert len(keys) == 2 * 2 * 2 and status["recovered"] == 1
    kept = (tmp_path / "runs_kvpress_stream.jsonl").read_text().splitlines()
    assert [json.loads(t)["key"] for t in kept] == ["another press's run"]
    assert status["done"] == 7 and status["jobs"] == 7
    task = seen[0]
    assert task["kind"] == "ruler" and task["prompts"][0]["jobs"][0]["keep_share"] == 0.31
    recs = [{**log.records[k], "method": label} for k, label, _ in keys]
    inside = [r for r in recs if r["placement"] == "question inside"]
    assert all(r["score"] == 1.0 for r in inside) and all(r["kept_share_end"] == 0.29 for r in recs)
    assert {r["method"] for r in recs} >= {"kvpress KnormPress (question inside) (share 30%)"}
    keys2, status2 = kvpress_peer.run_ruler(prompts, budgets, log, tok, presses=["KnormPress", "TOVAPress"])
    assert keys2 == keys and len(seen) == 1  # everything in the log: the worker is not started
    # flashmem's calibration share moved by a few hundredths of a point (a release added a few KB of
    # index): the logged press runs of the same prompts still count; a real change of share runs them
    # again
    nudged = {512: {0.3: {**budgets[512][0.3], "share": 0.31 + 3e-4}}}
    keys3, _ = kvpress_peer.run_ruler(
        prompts, budgets=nudged, log=log, tok=tok, presses=["KnormPress", "TOVAPress"]
    )
    assert [k for k, _, _ in keys3] == [k for k, _, _ in keys] and len(seen) == 1
    moved = {512: {0.3: {**budgets[512][0.3], "share": 0.32}}}
    keys4, _ = kvpress_peer.run_ruler(
        prompts, budgets=moved, log=log, tok=tok, presses=["KnormPress", "TOVAPress"]
    )
    assert len(seen) == 2 and not {k for k, _, _ in keys4} & {k for k, _, _ in keys}


STUB = """
import contextlib

SEEN = []  # tokens of each forward pass run under the press


class KnormPress:
    def __init__(self, compression_ratio=0.0):
        self.compression_ratio = compression_ratio

    @contextlib.contextmanager
    def __call__(self, model):
        def seen(module, args, kwargs):
            SEEN.append(kwargs["input_ids"].shape[1])

        hook = model.model.register_forward_pre_hook(seen, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()
"""


def test_kvpress_worker_ruler_kind_with_a_keep_all_press(monkeypatch, tmp_path):
    """The worker's ruler kind on a tiny random Llama with a stub press that keeps everything: both
    placements decode full attention's tokens; presses the stub lacks are skipped."""
    from flashmem.testing import tiny_model

    model = tiny_model("llama", layers=2, seed=0)
    stub = types.ModuleType("kvpress")
    exec(STUB, stub.__dict__)
    monkeypatch.setitem(sys.modules, "kvpress", stub)

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    monkeypatch.setattr(kvpress_worker, "_load_model", lambda: (model.eval(), Tok()))
    monkeypatch.setattr(kvpress_worker, "_worker_versions", lambda: {})
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, model.config.vocab_size, (40,), generator=g).tolist()
    q = torch.randint(0, model.config.vocab_size, (6,), generator=g).tolist()
    stream = tmp_path / "stream.jsonl"
    jobs = [
        {"key": f"k{i}", "press": press, "placement": pl, "keep_share": 0.5}
        for i, (press, pl) in enumerate(
            [
                ("KnormPress", "question outside"),
                ("KnormPress", "question inside"),
                ("SnapKVPress", "question inside"),
            ]
        )
    ]
    task = {
        "kind": "ruler",
        "stream_path": str(stream),
        "prompts": [{"id": "p0", "context_ids": ctx, "question_ids": q, "new_tokens": 4, "jobs": jobs}],
    }
    out = kvpress_worker._worker_ruler(task)
    lines = [json.loads(x) for x in stream.read_text().splitlines()]
    assert [x["key"] for x in lines] == ["k0", "k1"] and out["skipped_presses"] == ["SnapKVPress"]
    full = out["env_check"]["tokens"]
    assert len(full) == 4 and all(x["tokens"] == full for x in lines)
    assert all(x["kept_share_end"] == 1.0 for x in lines)
    # the press saw the context alone (question outside), then context + question but its last token
    assert stub.SEEN == [len(ctx), len(ctx) + len(q) - 1]


def test_frontier_compares_over_the_tasks_every_method_ran():
    summary = [
        {"method": "a", "length": 4, "task": "niah_single_1", "score": 100.0, "mean_avg_device_share": 0.1},
        {"method": "a", "length": 4, "task": "qa_1", "score": 0.0, "mean_avg_device_share": 0.3},
        {"method": "a", "length": 4, "task": "average", "score": 50.0, "mean_avg_device_share": 0.2},
        {"method": "b", "length": 4, "task": "niah_single_1", "score": 50.0, "mean_kept_share_end": 0.2},
        {"method": "full attention", "length": 4, "task": "niah_single_1", "score": 80.0},
        {"method": "full attention", "length": 4, "task": "qa_1", "score": 20.0},
    ]
    fr = {p["method"]: p for p in ruler.frontier(summary, ["a", "b", "full attention"])}
    assert fr["a"]["tasks"] == ["niah_single_1"]  # b did not run qa_1: it is left out for everyone
    assert (fr["a"]["score"], fr["a"]["share"], fr["a"]["share_counts"]) == (100.0, 0.1, "every device byte")
    assert (fr["b"]["score"], fr["b"]["share"], fr["b"]["share_counts"]) == (50.0, 0.2, "kept KV tokens")
    assert (fr["full attention"]["score"], fr["full attention"]["share"]) == (80.0, 1.0)
