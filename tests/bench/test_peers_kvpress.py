"""The kvpress peer (bench/peers/) without its environment: the context/question split of the
pass-key trials prompts (default tokenizer only, no weights), the logit comparison on handmade
logits, the teacher-forced decode loop on a tiny model, and the summaries and file readers."""

import json
import math

import pytest
import torch

from bench import common, inputs, metrics
from bench.inputs import split_question
from bench.peers import kvpress_env, kvpress_peer, kvpress_worker
from flashmem.prompts import PASSKEY_QUESTION as QUESTION
from flashmem.prompts import fillers_for_tokens, passkey_prompt


@pytest.fixture(scope="module")
def tok():
    return kvpress_peer.load_default_tokenizer()


# ---------------------------------------------------------------------------------------------
# the split
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [300, 1000, 4000, 7000])
def test_split_reproduces_the_trials_ids(tok, length):
    fillers = fillers_for_tokens(tok, length)
    for depth, seed in ((0.0625, 100), (0.5, 103), (0.9375, 107), (1.0, 5)):
        prompt = passkey_prompt(fillers, depth, seed=seed)
        ids = tok(prompt.text, return_tensors="pt").input_ids[0].tolist()  # as passkey_trials
        ctx, q = split_question(tok, ids, prompt.text)
        assert ctx + q == ids
        # the question's words are all in the question part; only its first newline, which the
        # tokenizer joins with the space before it, stays in the context
        assert tok.decode(q) == QUESTION[1:]
        assert tok.decode(ctx) + tok.decode(q) == prompt.text
        assert tok.decode(ctx).endswith(" \n")
        assert prompt.key in tok.decode(ctx) and prompt.key not in tok.decode(q)


def test_trial_prompts_follow_passkey_trials(tok):
    prompts = inputs.trial_prompts(tok, 1000, 4)
    assert [p["depth"] for p in prompts] == [0.125, 0.375, 0.625, 0.875]
    assert [p["seed"] for p in prompts] == [100, 101, 102, 103]
    fillers = fillers_for_tokens(tok, 1000)
    for p in prompts:
        prompt = passkey_prompt(fillers, p["depth"], seed=p["seed"])
        assert p["key"] == prompt.key
        assert p["context_ids"] + p["question_ids"] == tok(prompt.text).input_ids
        assert p["tokens"] == len(p["context_ids"]) + len(p["question_ids"])
    assert len({p["id"] for p in prompts}) == 4
    assert kvpress_peer.length_tag(4000) == "4k" and kvpress_peer.length_tag(7000) == "7k"


class ChunkTokenizer:
    """Cuts text into fixed-size character chunks: token boundaries that ignore words."""

    def __init__(self, size: int) -> None:
        self.size, self.vocab = size, {}

    def __call__(self, text: str, add_special_tokens: bool = True):
        from types import SimpleNamespace

        pieces = [text[i : i + self.size] for i in range(0, len(text), self.size)]
        return SimpleNamespace(input_ids=[self.vocab.setdefault(x, len(self.vocab)) for x in pieces])

    def decode(self, ids) -> str:
        back = {v: k for k, v in self.vocab.items()}
        return "".join(back[i] for i in ids)


def test_split_raises_when_the_question_merges_into_the_context():
    # a chunk holds context text and whitespace only: the split moves past it
    t = ChunkTokenizer(5)
    text = "abc" + QUESTION
    ctx, q = split_question(t, t(text).input_ids, text)
    assert t.decode(q) == QUESTION[2:] and t.decode(ctx) == "abc\n\n"
    # a chunk holds context text and the question's first letter: no split keeps the words whole
    t = ChunkTokenizer(10)
    text = "abcdefg" + QUESTION
    with pytest.raises(ValueError, match="merges the question into the context"):
        split_question(t, t(text).input_ids, text)
    with pytest.raises(ValueError, match="does not end with the question"):
        split_question(t, t("no question").input_ids, "no question")
    with pytest.raises(ValueError, match="decode back"):
        split_question(t, t(text).input_ids[:-1], text)


# ---------------------------------------------------------------------------------------------
# fidelity math (bench.metrics: the worker's and the entries' measure)
# ---------------------------------------------------------------------------------------------
def test_compare_logits_on_handmade_logits():
    ln = math.log
    # step 0: p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); argmax 0 == 0
    # step 1: p = (1/5, 4/5), q = (4/5, 1/5): KL = 3/5 ln 4; argmax 1 != 0
    # step 2: identical: KL 0, argmax 1 == 1
    ref = torch.tensor([[ln(1.0) + 1e-9, 0.0], [0.0, ln(4.0)], [0.0, 2.0]])
    test = torch.tensor([[ln(3.0), 0.0], [ln(4.0), 0.0], [0.0, 2.0]])
    m = metrics.compare_logits(ref, test)
    kl = [0.5 * ln(4 / 3), 0.6 * ln(4.0), 0.0]
    assert m["positions"] == 3
    assert m["top1_agreement"] == pytest.approx(2 / 3)
    assert m["mean_kl"] == pytest.approx(sum(kl) / 3, abs=1e-8)
    assert m["max_kl"] == pytest.approx(max(kl), abs=1e-8)
    # a shift of all logits of a step changes nothing
    same = metrics.compare_logits(ref, ref + torch.tensor([[5.0], [-3.0], [0.5]]))
    assert same["top1_agreement"] == 1.0 and abs(same["mean_kl"]) < 1e-12
    # logits of different step counts are an error, not a silent cut; no steps give NaNs
    a = torch.randn(7, 50, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="shape"):
        metrics.compare_logits(a, a[:3])
    empty = metrics.compare_logits(a[:0], a[:0])
    assert empty["positions"] == 0 and math.isnan(empty["mean_kl"])


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
def test_teacher_forced_decode_matches_full_attention_at_true_positions():
    from transformers import DynamicCache

    from flashmem.testing import tiny_model

    model = tiny_model("llama", layers=2, seed=0)
    ids = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(5))
    forced = torch.randint(0, 128, (10,), generator=torch.Generator().manual_seed(6)).tolist()
    ref = common.hf_decode(model, ids, 10, forced=forced)
    with torch.no_grad():
        cache = DynamicCache()
        model.model(input_ids=ids[:, :-1], past_key_values=cache)
        run = kvpress_worker._decode_after(
            model, cache, ids[:, -1:], 49, 10, torch.no_grad(), forced=forced, keep_logits=True
        )
    assert run["tokens"] == forced and run["logits"].shape == (10, 128)
    m = metrics.compare_logits(ref["logits"], run["logits"])
    assert m["top1_agreement"] == 1.0 and m["max_kl"] < 1e-9
    assert run["lengths"] == list(range(50, 60))  # one more cached token per step, none dropped
    # greedy (no forcing) follows its own argmax
    with torch.no_grad():
        cache = DynamicCache()
        model.model(input_ids=ids[:, :-1], past_key_values=cache)
        greedy = kvpress_worker._decode_after(model, cache, ids[:, -1:], 49, 6, torch.no_grad())
    assert greedy["tokens"] == common.hf_decode(model, ids, 6)["tokens"] and greedy["logits"] is None


# ---------------------------------------------------------------------------------------------
# summaries and readers
# ---------------------------------------------------------------------------------------------
def _record(i, press, placement, correct, kept, end):
    return {
        "id": f"t{i}",
        "method": f"kvpress {press} ({placement})",
        "press": press,
        "placement": placement,
        "correct": correct,
        "kept_share": kept,
        "kept_share_end": end,
    }


def test_summarize_trials():
    records = [
        _record(0, "KnormPress", "question outside", True, 0.10, 0.12),
        _record(0, "KnormPress", "question inside", False, 0.11, 0.11),
        _record(1, "KnormPress", "question outside", False, 0.10, 0.14),
        _record(1, "KnormPress", "question inside", True, 0.11, 0.13),
        _record(2, "KnormPress", "question outside", True, 0.10, 0.13),
    ]
    s = kvpress_peer.summarize_trials(records)
    assert list(s) == ["kvpress KnormPress (question outside)", "kvpress KnormPress (question inside)"]
    out, ins = s.values()
    assert (out["correct"], out["trials"], ins["correct"], ins["trials"]) == (2, 3, 1, 2)
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert out["mean_kept_share"] == pytest.approx(0.13) and ins["mean_kept_share"] == pytest.approx(0.12)
    assert out["mean_kept_share_prefill"] == pytest.approx(0.10)
    assert out["press"] == "KnormPress" and ins["placement"] == "question inside"


def test_summarize_fidelity():
    def row(doc, press, label, top1, kl, kept, target=0.1):
        return {
            "doc": doc,
            "method": f"kvpress {press}",
            "press": press,
            "share_label": label,
            "keep_share_requested": 0.1,
            "target_avg_share": target,
            "top1_agreement": top1,
            "mean_kl": kl,
            "max_kl": 2 * kl,
            "avg_kept_share": kept,
        }

    rows = [
        row("a", "TOVAPress", "budget_tokens=256", 0.9, 0.2, 0.10),
        row("b", "TOVAPress", "budget_tokens=256", 0.7, 0.4, 0.14, target=0.138),
        row("a", "TOVAPress", "budget_tokens=512", 1.0, 0.1, 0.2, target=0.19),
        row("a", "KnormPress", "budget_tokens=256", 0.5, 1.0, 0.1),
    ]
    s = kvpress_peer.summarize_fidelity(rows)
    assert [(x["method"], x["share_label"], x["docs"]) for x in s] == [
        ("kvpress TOVAPress", "budget_tokens=256", 2),
        ("kvpress TOVAPress", "budget_tokens=512", 1),
        ("kvpress KnormPress", "budget_tokens=256", 1),
    ]
    assert s[0]["top1_agreement"] == pytest.approx(0.8) and s[0]["mean_kl"] == pytest.approx(0.3)
    assert s[0]["max_kl"] == pytest.approx(0.8) and s[0]["mean_avg_kept_share"] == pytest.approx(0.12)
    assert s[0]["max_share_gap"] == pytest.approx(0.002) and s[0]["matched"]
    assert s[1]["max_share_gap"] == pytest.approx(0.01) and not s[1]["matched"]  # 1 point off
    assert s[0]["mean_target_avg_share"] == pytest.approx(0.119)


def test_keep_shares_and_full_answers_from_json(tmp_path, tok):
    prompts = [
        {"id": "t0", "seed": 100, "depth": 0.25, "key": "12345", "tokens": 50},
        {"id": "t1", "seed": 101, "depth": 0.75, "key": "67890", "tokens": 50},
    ]
    flashmem = tmp_path / "fm.json"
    flashmem.write_text(
        json.dumps({"length": 4000, "config": {"budget_tokens": 256}, "mean_avg_device_share": 0.11})
    )
    assert kvpress_peer.flashmem_trials_share(flashmem, 4000) == 0.11
    assert kvpress_peer.flashmem_trials_share(flashmem, 2000) is None  # another length
    assert kvpress_peer.flashmem_trials_share(tmp_path / "missing.json", 4000) is None

    generated = tok(" 67890. The").input_ids
    full = tmp_path / "full.json"
    records = [
        {"seed": 100, "depth": 0.25, "key": "12345", "tokens": 50, "answer": " 12345. The", "correct": True},
        {"seed": 101, "depth": 0.75, "key": "67890", "tokens": 50, "answer": "stale", "generated": generated},
    ]
    full.write_text(json.dumps({"length": 4000, "config": {}, "records": records}))
    got = kvpress_peer.full_answers_from_json(full, prompts, tok)
    assert got["t0"]["answer"] == " 12345. The" and got["t0"]["correct"] and got["t0"]["tokens"] is None
    assert got["t1"]["answer"] == " 67890. The" and got["t1"]["tokens"] == generated  # tokens win
    # a record of another prompt (different length) is not used
    records[0]["tokens"] = 51
    full.write_text(json.dumps({"length": 4000, "config": {}, "records": records}))
    assert set(kvpress_peer.full_answers_from_json(full, prompts, tok)) == {"t1"}
    # a budgeted run is not full attention
    full.write_text(json.dumps({"length": 4000, "config": {"budget_tokens": 256}, "records": records}))
    assert kvpress_peer.full_answers_from_json(full, prompts, tok) == {}


def test_fidelity_keep_shares(tmp_path):
    path = tmp_path / "fidelity.json"
    c256, c512 = {"budget_tokens": 256}, {"budget_tokens": 512}
    summary = [
        {"method": "flashmem budget_tokens=256", "flashmem_config": c256, "mean_avg_device_share": 0.09},
        {"method": "flashmem budget_tokens=512", "flashmem_config": c512, "mean_avg_device_share": 0.15},
    ]
    rows = [
        {"doc": "a", "flashmem_config": c256, "avg_device_share": 0.08},
        {"doc": "b", "flashmem_config": c256, "avg_device_share": 0.10},
        {"doc": "a", "flashmem_config": c512, "avg_device_share": 0.15},
    ]
    path.write_text(json.dumps({"summary": summary, "rows": rows}))
    shares = kvpress_peer.fidelity_keep_shares(path)
    assert [(s["label"], s["share"]) for s in shares] == [
        ("budget_tokens=256", 0.09),
        ("budget_tokens=512", 0.15),
    ]
    assert shares[0]["per_doc"] == {"a": 0.08, "b": 0.10} and shares[1]["per_doc"] == {"a": 0.15}
    assert "fidelity.json" in shares[0]["source"]
    assert kvpress_peer.fidelity_keep_shares(tmp_path / "none.json") == []


@pytest.mark.parametrize(("target", "tokens", "steps"), [(0.107, 4096, 256), (0.3, 777, 33), (0.05, 4096, 1)])
def test_prefill_keep_gives_the_target_average(target, tokens, steps):
    """The keep share, applied as a press applies it (int(kept) of the first tokens - 1) and measured
    as the worker measures it (cache length k + 1 + i over tokens + i fed, averaged over the steps),
    hits the target within one token's share."""
    keep = kvpress_peer.prefill_keep_for_average(target, tokens, steps)
    k = int((tokens - 1) * keep)
    measured = sum((k + 1 + i) / (tokens + i) for i in range(steps)) / steps
    assert abs(measured - target) <= 1 / tokens
    assert keep < target  # the continuation, kept in full, raises the average above the prefill share


def test_prefill_keep_refuses_an_unreachable_target():
    with pytest.raises(ValueError, match="out of reach"):
        kvpress_peer.prefill_keep_for_average(0.01, 1000, 256)  # the 256 new tokens alone hold more
    with pytest.raises(ValueError, match="out of reach"):
        kvpress_peer.prefill_keep_for_average(1.2, 1000, 10)


def test_matched_keep_shares_per_document():
    docs = [{"file": "a", "ids": list(range(1000))}, {"file": "b", "ids": list(range(2000))}]
    shares = [{"label": "budget_tokens=256", "share": 0.12, "per_doc": {"a": 0.10}}]
    (got,) = kvpress_peer.matched_keep_shares(shares, docs, 50)
    assert got["per_doc"]["a"]["target_avg_share"] == 0.10  # the document's own flashmem share
    assert got["per_doc"]["b"]["target_avg_share"] == 0.12  # none recorded: the mean
    for f, n in (("a", 1000), ("b", 2000)):
        want = kvpress_peer.prefill_keep_for_average(got["per_doc"][f]["target_avg_share"], n, 50)
        assert got["per_doc"][f]["prefill_keep_share"] == pytest.approx(want)


def test_trials_mode_end_to_end_with_a_stub_worker(monkeypatch, tmp_path, tok):
    """The main process of --mode trials: prompts, keep share and full answers from the flashmem
    JSONs, the worker's tokens judged with the key-in-answer rule, summary and environment check."""
    prompts = inputs.trial_prompts(tok, 300, 2)
    fm, full = tmp_path / "fm.json", tmp_path / "full.json"
    fm.write_text(json.dumps({"length": 300, "config": {"budget_tokens": 64}, "mean_avg_device_share": 0.3}))
    full.write_text(
        json.dumps(
            {
                "length": 300,
                "config": {},
                "records": [
                    {**{k: p[k] for k in ("seed", "depth", "key", "tokens")}, "answer": f" {p['key']}. The"}
                    for p in prompts
                ],
            }
        )
    )
    seen = {}

    def fake_worker(task, *, name, timeout):
        seen.update(task=task, name=name)
        trials, full_runs = [], []
        for i, p in enumerate(task["prompts"]):
            key = prompts[i]["key"]
            right, wrong = tok(f" {key}. The").input_ids, tok(" 00000.").input_ids
            full_runs.append({"id": p["id"], "tokens": right})
            for placement, toks, end in (("question outside", right, 0.32), ("question inside", wrong, 0.31)):
                trials.append(
                    {
                        "id": p["id"],
                        "method": f"kvpress KnormPress ({placement})",
                        "press": "KnormPress",
                        "placement": placement,
                        "kept_share": 0.3,
                        "kept_share_end": end,
                        "answer": "ignored: the main process decodes the tokens",
                        "tokens": toks,
                    }
                )
        return {"status": "ok", "trials": trials, "full_attention": full_runs}

    monkeypatch.setattr(kvpress_env, "run_worker", fake_worker)
    monkeypatch.setattr(kvpress_peer, "load_default_tokenizer", lambda: tok)
    out = tmp_path / "out.json"
    argv = ["--mode", "trials", "--length", "300", "--trials", "2", "--json", str(out)]
    argv += ["--flashmem-json", str(fm), "--full-json", str(full), "--presses", "KnormPress"]
    assert kvpress_peer.main(argv) == 0
    task = seen["task"]
    assert task["kind"] == "trials" and task["presses"] == ["KnormPress"] and task["full_every_prompt"]
    assert [p["keep_share"] for p in task["prompts"]] == [0.3, 0.3]
    assert [p["context_ids"] + p["question_ids"] for p in task["prompts"]] == [
        p["context_ids"] + p["question_ids"] for p in prompts
    ]
    data = json.loads(out.read_text())
    assert data["keep_share"] == 0.3 and "fm.json" in data["keep_share_source"]
    assert data["full_attention"]["correct"] == 2 and data["full_attention"]["sources"] == ["full.json"]
    assert data["env_check"]["equal"] == 2 and data["env_check"]["per_trial"][0]["compared"] == "answer text"
    s = data["summary"]
    assert s["kvpress KnormPress (question outside)"]["correct"] == 2
    assert s["kvpress KnormPress (question inside)"]["correct"] == 0
    assert s["kvpress KnormPress (question outside)"]["mean_kept_share"] == pytest.approx(0.32)
    assert data["prompt_tokens"] == prompts[0]["tokens"]
    t0 = data["per_trial"][0]
    assert (
        t0["full_attention"]["correct"] and t0["kvpress"]["kvpress KnormPress (question outside)"]["correct"]
    )


# ---------------------------------------------------------------------------------------------
# the worker, run as the peer runs it (a subprocess: python -m bench.peers.kvpress_worker)
# ---------------------------------------------------------------------------------------------
STUB_KVPRESS = '''"""A stand-in for kvpress: one press that keeps everything."""
import contextlib


class KnormPress:
    def __init__(self, compression_ratio=0.0):
        self.compression_ratio = compression_ratio

    @contextlib.contextmanager
    def __call__(self, model):
        yield
'''


@pytest.mark.slow  # the worker loads the default model (about a minute on 2 CPU cores)
def test_worker_runs_in_a_subprocess_with_a_stub_kvpress(monkeypatch, tmp_path, tok):
    """run_worker starts the worker module with the environment's python from the repository root;
    here the environment is this one with a stub kvpress (one press that keeps the whole cache, so
    its answers must equal full attention's); the presses the stub lacks are skipped."""
    import sys
    from pathlib import Path

    stub = tmp_path / "site"
    (stub / "kvpress").mkdir(parents=True)
    (stub / "kvpress" / "__init__.py").write_text(STUB_KVPRESS)
    (stub / "kvpress-0.0.0.dist-info").mkdir()
    (stub / "kvpress-0.0.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: kvpress\nVersion: 0.0.0\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(stub))
    monkeypatch.setattr(kvpress_env, "_venv_python", lambda: Path(sys.executable))
    monkeypatch.setattr(kvpress_env, "ensure_env", lambda: {"ok": True, "versions": {}, "log": []})
    (prompt,) = inputs.heatmap_prompts(tok, [100], [0.5], 1)
    out = kvpress_peer.run_passkey([prompt], {"100": 0.5}, new_tokens=3, timeout=600)
    assert out["status"] == "ok", out.get("reason")
    assert out["worker_versions"]["kvpress"] == "0.0.0"
    assert set(out["skipped_presses"]) == set(kvpress_worker.PRESSES + [kvpress_worker.DECODING_PRESS]) - {
        "KnormPress"
    }
    full = out["full_attention"][0]["tokens"]
    assert len(full) == 3
    assert [t["placement"] for t in out["trials"]] == kvpress_worker.PLACEMENTS
    for t in out["trials"]:
        assert t["tokens"] == full and t["kept_share_end"] == 1.0
