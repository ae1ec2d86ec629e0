"""RULER-style synthetic long-context suite on the default model, offline: full attention vs flashmem
at target device shares vs kvpress presses at the same share.

    python -m bench.run ruler [--quick] [--tasks niah_single_1,...] [--lengths 2048,4096,7168]
                              [--samples 10] [--methods full,flashmem,kvpress] [--shares 0.06,0.12]
                              [--flashmem-config JSON] [--presses SnapKVPress,...] [--threads N]

Prompts (:mod:`bench.ruler_tasks`): 13 tasks (needles, variable tracking, common/frequent words,
QA over local documents), each fitted with the default tokenizer to at most the target length
(template + haystack + question), ``--samples`` per task and length with the needle depth spread
evenly ((i + 0.5) / samples) and fixed seeds. Each prompt is split into context and question ids at
a token boundary (:func:`bench.inputs.split_question`), and every method reads the same ids. Greedy
decoding of the task's answer budget, no EOS stop. Scores as RULER: ``string_match_all`` (the
fraction of the references in the output, case-insensitive) for every task but QA, which takes
``string_match_part`` (1 if any reference is in the output); a task's score is the mean x 100.

Methods:

* ``full``: Hugging Face forward with its ``DynamicCache`` (:func:`bench.common.hf_decode`);
* ``flashmem``: ``FlashMemConfig(budget_tokens=B)``, every other setting at its default, one method
  per target share in ``--shares``: B per length is found on one calibration prompt (niah_single_2,
  depth 0.5) so that ``memory_report()["avg_device_share"]`` (every device byte flashmem holds,
  averaged over the decode steps) is nearest the target; B is at least sink + recent tokens (132),
  and where even that is over the target the nearest feasible share is used and marked
  ``reached: false``. Budgets are cached in ``ruler_budgets.json`` (keyed by length, target and the
  full resolved configuration, so a change of defaults re-calibrates). Every sample records its
  budget and its measured ``avg_device_share``, ``peak_device_share`` and ``avg_device_kv_share``;
* ``--flashmem-config JSON``: an extra flashmem configuration, labelled *tuned*: with a
  ``budget_tokens`` it runs as given, without one its budget is calibrated per share like the default;
* ``kvpress``: presses of NVIDIA kvpress in their own environment (``bench/peers/kvpress_peer.py``
  ``run_ruler``; StreamingLLM, SnapKV, ExpectedAttention, Knorm, TOVA, or ``--presses``) at
  flashmem's measured calibration share per length and target, question outside and inside the
  compressed context; the kept share of a press is of the KV alone, flashmem's counts every device
  byte, so a press keeps at least as much KV as flashmem holds. (The decoding-time press is left
  out: it cuts every 64 generated tokens, so within these answer budgets it would hold the whole
  prompt.) Without the environment the JSON records why.

Correctness first: on the first prompt flashmem without a budget must generate exactly full
attention's tokens (``sanity`` in the JSON; a mismatch stops the run), and every full-attention
output is recorded beside the others.

Resumable: every (method, prompt) result is appended to ``ruler_runs.jsonl``, keyed by a hash of the
prompt ids, the answer budget and the method's resolved configuration, and skipped when it is there
already; ``ruler.json`` (summary per task x length x method, the per-sample records with outputs)
and ``ruler.png`` (heat map) are rebuilt from it for the selected tasks, lengths, samples and
methods. Prompt texts go to ``ruler_prompts.json`` (merged with what is there) and later runs rebuild
a recorded prompt from its text (:func:`make_samples`): the haystacks come from the installed
packages' files, so a package update would otherwise give other prompts than the cached results'. ``--quick`` (part of ``all --quick``): 2 samples
of 2 tasks at 1,024 tokens, full attention and flashmem at the first share, fresh files under
``bench/results/quick/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch

from bench import common, inputs
from bench import ruler_tasks as rt
from bench.ruler_log import RunLog, ids_hash, record, run_key

DEFAULT_LENGTHS = [2048, 4096, 7168]
DEFAULT_SHARES = [0.06, 0.12]
QUICK = {"tasks": ["niah_single_2", "niah_multikey_2"], "lengths": [1024], "samples": 2}
CALIBRATION = {"task": "niah_single_2", "depth": 0.5, "seed": 7, "new_tokens": 8}
MIN_BUDGET = 132  # sink_tokens + recent_tokens at the defaults (4 + 128)
SHARE_TOLERANCE = 0.003


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
def sample_seed(task: str, length: int, index: int, base: int = 0) -> int:
    """A fixed seed per (task, length, sample index), independent of the other samples."""
    digest = hashlib.sha256(f"{base}:{task}:{length}:{index}".encode()).hexdigest()
    return int(digest[:8], 16)


# what ``ruler_prompts.json`` keeps of a prompt: enough to rebuild its ids without the generators
RECORDED_FIELDS = (
    "id",
    "task",
    "target_tokens",
    "depth",
    "seed",
    "units",
    "text",
    "question",
    "references",
    "query",
)


def _prompt(tok, task: str, length: int, depth: float, seed: int, units, text, question, references, query):
    """A prompt's record from its text: ids split into context and question (``context_ids +
    question_ids == ids``)."""
    ids = tok(text).input_ids
    context_ids, question_ids = inputs.split_question(tok, ids, text, question)
    spec = rt.TASKS[task]
    return {
        "task": task,
        "target_tokens": length,
        "depth": depth,
        "seed": seed,
        "units": units,
        "tokens": len(ids),
        "context_tokens": len(context_ids),
        "question_tokens": len(question_ids),
        "references": list(references),
        "query": query,
        "metric": spec.metric,
        "max_new_tokens": spec.max_new_tokens,
        "context_ids": context_ids,
        "question_ids": question_ids,
        "text": text,
        "question": question,
        "ids_sha": ids_hash(context_ids + question_ids),
    }


def fitted_prompt(tok, task: str, length: int, depth: float, seed: int, hint: int | None = None) -> dict:
    """One prompt of ``task`` with as many haystack units as fit in ``length`` tokens, its ids
    split into context and question (``context_ids + question_ids == ids``)."""

    def count(n: int) -> int:
        return len(tok(rt.build(task, n, depth, seed, length).text).input_ids)

    n = rt.fit_units(count, length, first=hint or 8)
    built = rt.build(task, n, depth, seed, length)
    return _prompt(
        tok, task, length, depth, seed, n, built.text, built.question, built.references, built.query
    )


def recorded_prompt(tok, rec: dict) -> dict:
    """A prompt rebuilt from its ``ruler_prompts.json`` entry (its text, not the generators)."""
    p = _prompt(
        tok,
        rec["task"],
        rec["target_tokens"],
        rec["depth"],
        rec["seed"],
        rec.get("units"),
        rec["text"],
        rec["question"],
        rec["references"],
        rec.get("query"),
    )
    p["id"] = rec["id"]
    return p


def load_recorded(path: Path) -> dict[str, dict]:
    """The prompts an earlier run wrote (``ruler_prompts.json``), by id; entries from before the
    file kept their seed are left out (they cannot be told apart from another ``--seed``)."""
    if not path.is_file():
        return {}
    entries = json.loads(path.read_text()).get("prompts", [])
    return {e["id"]: e for e in entries if all(k in e for k in ("task", "target_tokens", "depth", "seed"))}


def save_recorded(path: Path, prompts: list[dict]) -> None:
    """Add ``prompts`` to ``ruler_prompts.json`` (entries of other ids are kept), sorted by id."""
    kept = json.loads(path.read_text()).get("prompts", []) if path.is_file() else []
    by_id = {e["id"]: e for e in kept}
    for p in prompts:
        by_id[p["id"]] = {k: p[k] for k in RECORDED_FIELDS} | {
            k: p[k] for k in ("context_tokens", "question_tokens", "tokens", "ids_sha")
        }
    common.write_json(path, {"prompts": [by_id[k] for k in sorted(by_id)]})


def make_samples(
    tok,
    tasks: list[str],
    lengths: list[int],
    samples: int,
    base_seed: int = 0,
    recorded: dict[str, dict] | None = None,
) -> list[dict]:
    """``samples`` prompts per task and length: sample i at depth (i + 0.5) / samples.

    A prompt in ``recorded`` (:func:`load_recorded`) with the same task, length, depth and seed is
    rebuilt from its recorded text instead of the generators: the haystacks come from the installed
    packages' files, so a package update would otherwise change the prompts under cached results."""
    out = []
    for length in lengths:
        for task in tasks:
            hint = None
            for i in range(samples):
                depth = (i + 0.5) / samples
                pid, seed = f"{task}-L{length}-s{i}", sample_seed(task, length, i, base_seed)
                p = _from_record(tok, recorded, pid, task, length, depth, seed)
                if p is None:
                    p = fitted_prompt(tok, task, length, depth, seed, hint)
                hint = p["units"]
                p.update(id=pid, sample=i)
                out.append(p)
    return out


def calibration_prompt(tok, length: int, recorded: dict[str, dict] | None = None) -> dict:
    """The prompt budgets are calibrated on at ``length`` (recorded as ``calibration-L{length}``)."""
    c, pid = CALIBRATION, f"calibration-L{length}"
    p = _from_record(tok, recorded, pid, c["task"], length, c["depth"], c["seed"])
    if p is None:
        p = fitted_prompt(tok, c["task"], length, c["depth"], c["seed"])
        p["id"] = pid
    return p


def _from_record(tok, recorded: dict[str, dict] | None, pid: str, task, length, depth, seed) -> dict | None:
    """Prompt ``pid`` rebuilt from its record when one has the same task, length, depth and seed."""
    rec = (recorded or {}).get(pid)
    if rec is None or (rec["task"], rec["target_tokens"], rec["seed"]) != (task, length, seed):
        return None
    return recorded_prompt(tok, rec) if abs(rec["depth"] - depth) < 1e-9 else None


def fit_tolerance(target: int) -> float:
    """How far a fitted prompt may fall short of its target: 3%, or 48 tokens (a QA document) for
    short targets."""
    return max(0.03 * target, 48)


def prompt_ids(p: dict) -> torch.Tensor:
    return torch.tensor([p["context_ids"] + p["question_ids"]], dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------
_AUTO_INDEXERS: dict[tuple[int, int], str] = {}


def auto_indexer(model, chunk_size: int | None = None) -> str:
    """What ``indexer="auto"`` resolves to for ``model`` and ``chunk_size`` (None: the default) (the
    wrapper's ``indexer_name``: a prepared checkpoint's name, else ``"quest"``)."""
    import flashmem

    chunk_size = chunk_size or flashmem.FlashMemConfig().chunk_size
    key = (id(model), chunk_size)
    if key not in _AUTO_INDEXERS:
        cfg = flashmem.FlashMemConfig(budget_tokens=MIN_BUDGET, chunk_size=chunk_size)
        _AUTO_INDEXERS[key] = flashmem.wrap(model, cfg).indexer_name
    return _AUTO_INDEXERS[key]


def resolved_config(cfg: dict, model=None) -> dict:
    """Every field of ``FlashMemConfig(**cfg)`` (defaults included) and the values derived from them
    (a default that is computed, such as the chunk budget, changes the key when its rule changes), as
    JSON values, and the flashmem version (a release that changes what a configuration does, such as
    which chunks recall may choose, changes the key). With recall on and ``indexer="auto"``, what it
    resolves to for ``model`` is part of it (``derived["auto_indexer"]``), so a run cached under one
    resolution is not taken for another; the model is then required."""
    import flashmem

    c = flashmem.FlashMemConfig(**cfg)
    fields = dataclasses.asdict(c)
    fields["flashmem_version"] = flashmem.__version__
    fields["derived"] = {
        "effective_chunk_budget": c.effective_chunk_budget,
        "effective_prefill_chunk": c.effective_prefill_chunk,
        "recall_windows_held": c.recall_windows_held,
    }
    if c.recall_enabled and c.indexer == "auto":
        if model is None:
            raise ValueError("indexer='auto' resolves per model: pass the model to resolved_config")
        fields["derived"]["auto_indexer"] = auto_indexer(model, c.chunk_size)
    return json.loads(json.dumps(fields, default=str))


def flashmem_run(model, cfg: dict, ids: torch.Tensor, new_tokens: int) -> dict:
    import flashmem

    t0 = time.perf_counter()
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(**cfg))
    out = fm.generate(ids, new_tokens, eos_token_id=None, progress=False)
    rep = fm.memory_report()
    return {
        "tokens": out[0, ids.shape[1] :].tolist(),
        "seconds": time.perf_counter() - t0,
        "prefill_s": rep["timings"].get("prefill_s"),
        "avg_device_share": rep["avg_device_share"],
        "peak_device_share": rep["peak_device_share"],
        "avg_device_kv_share": rep["avg_device_kv_share"],
        "peak_device_kv_share": rep["peak_device_kv_share"],
        "device_bytes": rep["device_bytes"],
        "full_kv_bytes": rep["full_kv_bytes"],
        "indexer": rep["indexer"],
    }


def full_run(model, ids: torch.Tensor, new_tokens: int) -> dict:
    t0 = time.perf_counter()
    r = common.hf_decode(model, ids, new_tokens, collect_logits=False)
    return {"tokens": r["tokens"], "seconds": time.perf_counter() - t0, "prefill_s": r["prefill_s"]}


def calibrate_budget(
    measure, length: int, target: float, *, lo: int = MIN_BUDGET, max_evals: int = 6
) -> dict:
    """The budget whose measured share (``measure(budget) -> share``) is nearest ``target``: the
    minimum budget first (over the target: infeasible, the nearest share is the minimum's), then
    secant steps on the about linear share(budget), budgets in [lo, length]."""
    evals: dict[int, float] = {}

    def f(b: int) -> float:
        if b not in evals:
            evals[b] = measure(b)
        return evals[b]

    if f(lo) >= target:
        return {"budget_tokens": lo, "share": evals[lo], "reached": False, "evaluations": _evals(evals)}
    b0, b1 = lo, min(length, max(lo + 16, round(lo + (target - evals[lo]) * length)))
    for _ in range(max_evals - 1):
        s1 = f(b1)
        if abs(s1 - target) <= SHARE_TOLERANCE or b1 >= length and s1 < target:
            break
        slope = (s1 - evals[b0]) / (b1 - b0) if b1 != b0 else 0.0
        if slope <= 0:
            break
        b_next = min(length, max(lo, round(b1 + (target - s1) / slope)))
        if b_next in evals:
            break
        b0, b1 = b1, b_next
    best = min(evals, key=lambda b: (abs(evals[b] - target), b))
    reached = abs(evals[best] - target) <= max(SHARE_TOLERANCE, 0.1 * target)
    return {"budget_tokens": best, "share": evals[best], "reached": reached, "evaluations": _evals(evals)}


def _evals(evals: dict[int, float]) -> list[dict]:
    return [{"budget_tokens": b, "share": s} for b, s in sorted(evals.items())]


def budgets_for(
    model, tok, lengths, shares, extra_cfg: dict, cache_path: Path, calibration: dict[int, dict] | None = None
) -> dict:
    """``{length: {share: calibration}}`` for flashmem ``extra_cfg`` + a budget, from the cache file
    when it holds the same length, target, resolved configuration and calibration prompt
    (``calibration``: the prompt per length, default :func:`calibration_prompt`)."""
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    out: dict[int, dict[float, dict]] = {}
    for length in lengths:
        cal = (calibration or {}).get(length) or calibration_prompt(tok, length)
        ids = prompt_ids(cal)
        measured: dict[int, float] = {}  # budget -> share at this length, shared by the targets
        for share in shares:
            key_src = {
                "length": length,
                "target": share,
                "config": resolved_config({**extra_cfg, "budget_tokens": MIN_BUDGET}, model),
                "prompt": cal["ids_sha"],
                "new_tokens": CALIBRATION["new_tokens"],
            }
            key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24]
            if key not in cache:
                t0 = time.perf_counter()

                def measure(b: int, ids=ids, length=length, measured=measured) -> float:
                    if b in measured:
                        return measured[b]
                    r = flashmem_run(model, {**extra_cfg, "budget_tokens": b}, ids, CALIBRATION["new_tokens"])
                    print(
                        f"  calibration L{length}: budget {b} -> avg device share {r['avg_device_share']:.4f}"
                    )
                    measured[b] = r["avg_device_share"]
                    return measured[b]

                res = calibrate_budget(measure, length, share)
                res.update(
                    length=length,
                    target=share,
                    extra_config=extra_cfg,
                    prompt_tokens=cal["tokens"],
                    seconds=round(time.perf_counter() - t0, 1),
                )
                cache[key] = res
                common.write_json(cache_path, cache)
            out.setdefault(length, {})[share] = cache[key]
            c = cache[key]
            note = "" if c["reached"] else " (target not reachable: nearest feasible)"
            print(f"L{length} target {share:.0%}: budget {c['budget_tokens']}, share {c['share']:.4f}{note}")
    return out


def method_list(args, budgets: dict, tuned_budgets: dict | None, tuned_cfg: dict | None) -> list[dict]:
    """The methods of the run, default-config flashmem first: ``{"label", "kind", "share", ...}``;
    :func:`bind` resolves one at a length (its budget and the ``spec`` the run key hashes)."""
    methods = []
    if "flashmem" in args.methods:
        for s in args.shares:
            methods.append(
                {
                    "label": f"flashmem (share {s:.0%})",
                    "kind": "flashmem",
                    "share": s,
                    "extra": {},
                    "budgets": budgets,
                    "default": True,
                }
            )
    if "full" in args.methods:
        methods.append({"label": "full attention", "kind": "full", "share": None})
    if tuned_cfg is not None:
        label = "flashmem tuned (" + ", ".join(f"{k}={v}" for k, v in tuned_cfg.items()) + ")"
        if "budget_tokens" in tuned_cfg:
            methods.append(
                {
                    "label": label,
                    "kind": "flashmem",
                    "share": None,
                    "extra": tuned_cfg,
                    "budgets": None,
                    "default": False,
                }
            )
        else:
            for s in args.shares:
                methods.append(
                    {
                        "label": f"{label} (share {s:.0%})",
                        "kind": "flashmem",
                        "share": s,
                        "extra": tuned_cfg,
                        "budgets": tuned_budgets,
                        "default": False,
                    }
                )
    return methods


def bind(method: dict, length: int, model=None) -> dict:
    """The method at one length: its flashmem configuration and run-key spec (``model``: see
    :func:`resolved_config`)."""
    m = dict(method)
    if m["kind"] == "full":
        m["spec"] = {"kind": "full"}
        return m
    if m["kind"] == "flashmem":
        cfg = dict(m["extra"])
        if m["budgets"] is not None:
            cal = m["budgets"][length][m["share"]]
            cfg["budget_tokens"] = cal["budget_tokens"]
            m["calibration"] = {k: cal[k] for k in ("budget_tokens", "share", "reached")}
        m["config"] = cfg
        m["spec"] = {"kind": "flashmem", "config": resolved_config(cfg, model)}
    return m


def sanity(model, tok, p: dict, log: RunLog) -> dict:
    """flashmem without a budget must equal full attention token for token on ``p``."""
    full_m = bind({"label": "full attention", "kind": "full", "share": None}, p["target_tokens"])
    nob = bind(
        {"label": "flashmem (no budget)", "kind": "flashmem", "share": None, "extra": {}, "budgets": None},
        p["target_tokens"],
    )
    recs = {}
    for m, fn in (
        (full_m, lambda ids, n: full_run(model, ids, n)),
        (nob, lambda ids, n: flashmem_run(model, {}, ids, n)),
    ):
        key = run_key(p, m)
        if key not in log:
            log.append(record(p, m, key, fn(prompt_ids(p), p["max_new_tokens"]), tok))
        recs[m["kind"]] = log.records[key]
    equal = recs["full"]["output_tokens"] == recs["flashmem"]["output_tokens"]
    out = {
        "what": "flashmem without a budget vs full attention (DynamicCache), greedy tokens",
        "prompt": p["id"],
        "tokens_equal": equal,
        "full_output": recs["full"]["output"],
    }
    if not equal:
        raise AssertionError(f"flashmem without a budget differs from full attention on {p['id']}: {out}")
    return out


# ---------------------------------------------------------------------------------------------
# summary, plot
# ---------------------------------------------------------------------------------------------
def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarize(records: list[dict], order: list[str]) -> list[dict]:
    """Per method, length and task: score (mean x 100), n and mean shares; plus per method and
    length the mean over tasks (``task: "average"``). Methods in ``order``."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["length"], r["task"]), []).append(r)
    tasks = [t for t in rt.TASKS if any(k[2] == t for k in groups)]
    rows = []
    for method in order:
        for length in sorted({k[1] for k in groups if k[0] == method}):
            per_task = []
            for task in tasks:
                rs = groups.get((method, length, task))
                if not rs:
                    continue
                row = {
                    "method": method,
                    "length": length,
                    "task": task,
                    "score": 100 * _mean([r["score"] for r in rs]),
                    "n": len(rs),
                    "mean_tokens": _mean([r["tokens"] for r in rs]),
                    "mean_seconds": _mean([r.get("seconds") for r in rs]),
                }
                for k in (
                    "avg_device_share",
                    "peak_device_share",
                    "avg_device_kv_share",
                    "kept_share_end",
                    "budget_tokens",
                ):
                    v = _mean([r.get(k) for r in rs])
                    if v is not None:
                        row[f"mean_{k}"] = v
                per_task.append(row)
            rows += per_task
            if per_task:
                avg = {
                    "method": method,
                    "length": length,
                    "task": "average",
                    "score": _mean([r["score"] for r in per_task]),
                    "n": sum(r["n"] for r in per_task),
                }
                for k in (
                    "mean_avg_device_share",
                    "mean_peak_device_share",
                    "mean_avg_device_kv_share",
                    "mean_kept_share_end",
                    "mean_seconds",
                ):
                    v = _mean([r.get(k) for r in per_task])
                    if v is not None:
                        avg[k] = v
                rows.append(avg)
    return rows


def frontier(summary: list[dict], order: list[str]) -> list[dict]:
    """Accuracy against share, per length: for every method, its mean score over the tasks that every
    method at that length ran (so the means compare like with like) and its mean share: flashmem's
    average device share (every device byte), a press's kept share (KV alone), 1.0 for full attention."""
    out = []
    for length in sorted({r["length"] for r in summary}):
        rows = [r for r in summary if r["length"] == length and r["task"] != "average"]
        methods = [m for m in order if any(r["method"] == m for r in rows)]
        tasks = [
            t
            for t in rt.TASKS
            if all(any(r["method"] == m and r["task"] == t for r in rows) for m in methods)
        ]
        for m in methods:
            mine = [r for r in rows if r["method"] == m and r["task"] in tasks]
            if not mine:
                continue
            shares = [r.get("mean_avg_device_share", r.get("mean_kept_share_end")) for r in mine]
            shares = [x for x in shares if x is not None]
            out.append(
                {
                    "length": length,
                    "method": m,
                    "tasks": tasks,
                    "score": _mean([r["score"] for r in mine]),
                    "share": _mean(shares) if shares else (1.0 if m == "full attention" else None),
                    "share_counts": "every device byte"
                    if any("mean_avg_device_share" in r for r in mine)
                    else ("kept KV tokens" if shares else "the whole KV"),
                }
            )
    return out


def plot_frontier(points: list[dict], path: Path):
    """Mean score against share, one panel per length, one labelled point per method."""
    plt = common.pyplot()
    points = [p for p in points if p["share"] is not None]
    if plt is None or not points:
        return None
    lengths = sorted({p["length"] for p in points})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6.5 * len(lengths), 4.2), squeeze=False)
    for ax, length in zip(axes[0], lengths):
        mine = [p for p in points if p["length"] == length]
        for p in mine:
            kind = p["method"].split(" ")[0]
            marker = {"flashmem": "o", "kvpress": "s", "full": "*"}.get(kind, "^")
            ax.scatter(100 * p["share"], p["score"], marker=marker, s=60 if marker != "*" else 140)
            ax.annotate(
                p["method"],
                (100 * p["share"], p["score"]),
                fontsize=6,
                xytext=(4, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel(
            "device share, % (flashmem: every device byte; presses: kept KV; log scale)", fontsize=8
        )
        ax.set_ylabel(f"mean score over {len(mine[0]['tasks'])} tasks run by every method", fontsize=8)
        ax.set_ylim(-3, 103)
        ax.set_title(f"RULER-style suite at {length:,} tokens: accuracy vs share", fontsize=9)
        ax.grid(alpha=0.3)
    return common.save_figure(fig, path)


def plot(summary: list[dict], order: list[str], path: Path):
    plt = common.pyplot()
    if plt is None or not summary:
        return None
    import numpy as np

    lengths = sorted({r["length"] for r in summary})
    tasks = [t for t in list(rt.TASKS) + ["average"] if any(r["task"] == t for r in summary)]
    methods = [m for m in order if any(r["method"] == m for r in summary)]
    fig, axes = plt.subplots(
        len(lengths),
        1,
        figsize=(max(6.0, 2.5 + 0.7 * len(tasks)), (1.2 + 0.35 * len(methods)) * len(lengths)),
        squeeze=False,
    )
    by = {(r["method"], r["length"], r["task"]): r["score"] for r in summary}
    for ax, length in zip(axes[:, 0], lengths):
        grid = np.array([[by.get((m, length, t), np.nan) for t in tasks] for m in methods], dtype=float)
        ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for i in range(len(methods)):
            for j in range(len(tasks)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(
            range(len(tasks)), [t.replace("niah_", "") for t in tasks], rotation=40, ha="right", fontsize=7
        )
        ax.set_yticks(range(len(methods)), methods, fontsize=7)
        ax.set_title(f"RULER-style tasks at {length:,} tokens (score, %)", fontsize=9)
    return common.save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _list(text: str, kind=str) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.run ruler", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 samples of 2 tasks at 1,024 tokens (smoke)")
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(rt.TASKS)}")
    p.add_argument("--lengths", default=None, help="target prompt tokens (default 2048,4096,7168)")
    p.add_argument("--samples", type=int, default=None, help="prompts per task and length (default 10)")
    p.add_argument("--methods", default="full,flashmem,kvpress", help="subset of full,flashmem,kvpress")
    p.add_argument("--shares", default=None, help="flashmem target avg device shares (default 0.06,0.12)")
    p.add_argument("--flashmem-config", default=None, help="an extra (tuned) FlashMemConfig as JSON")
    p.add_argument("--presses", default=None, help="kvpress presses (default: the five of the worker)")
    p.add_argument(
        "--placements",
        default=None,
        help="kvpress question placements: 'question outside', 'question inside' (default: both)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the prompts")
    p.add_argument("--kvpress-timeout", type=int, default=48 * 3600)
    p.add_argument("--json", default=None, help="summary path (default bench/results[/quick]/ruler.json)")
    args = p.parse_args(argv)
    if args.placements:
        from bench.peers.kvpress_worker import PLACEMENTS

        bad = [x for x in _list(args.placements) if x not in PLACEMENTS]
        if bad:
            p.error(f"--placements: unknown {bad}; choose from {PLACEMENTS}")
    args.tasks = _list(args.tasks) if args.tasks else (QUICK["tasks"] if args.quick else list(rt.TASKS))
    unknown = [t for t in args.tasks if t not in rt.TASKS]
    if unknown:
        p.error(f"unknown tasks {unknown}; choose from {', '.join(rt.TASKS)}")
    args.lengths = (
        _list(args.lengths, int) if args.lengths else (QUICK["lengths"] if args.quick else DEFAULT_LENGTHS)
    )
    args.samples = args.samples or (QUICK["samples"] if args.quick else 10)
    args.methods = _list(args.methods)
    if args.quick and "--methods" not in (argv or []):
        args.methods = ["full", "flashmem"]
    bad = [m for m in args.methods if m not in ("full", "flashmem", "kvpress")]
    if bad:
        p.error(f"unknown methods {bad}; choose from full,flashmem,kvpress")
    args.shares = _list(args.shares, float) if args.shares else DEFAULT_SHARES
    if args.quick and args.shares == DEFAULT_SHARES:
        args.shares = DEFAULT_SHARES[:1]
    if not all(0 < s < 1 for s in args.shares):
        p.error("--shares must lie in (0, 1)")
    if args.samples < 1 or min(args.lengths) < 256:
        p.error("--samples must be >= 1 and --lengths >= 256")
    args.tuned = None
    if args.flashmem_config is not None:
        try:
            (args.tuned,) = common.parse_configs(args.flashmem_config, [])
        except ValueError as e:
            p.error(str(e))
    return args


def paths(args) -> dict[str, Path]:
    json_path, png = common.result_paths("ruler", args.quick, args.json)
    folder = json_path.parent
    return {
        "json": json_path,
        "png": png,
        "frontier_png": png.with_name(png.stem + "_frontier.png"),
        "jsonl": folder / "ruler_runs.jsonl",
        "budgets": folder / "ruler_budgets.json",
        "prompts": folder / "ruler_prompts.json",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = paths(args)
    log = RunLog(where["jsonl"], fresh=args.quick)
    model, tok, model_name = common.load_default()
    t0 = time.perf_counter()
    recorded = {} if args.quick else load_recorded(where["prompts"])
    prompts = make_samples(tok, args.tasks, args.lengths, args.samples, args.seed, recorded)
    calibration = {length: calibration_prompt(tok, length, recorded) for length in args.lengths}
    reused = sum(p["id"] in recorded for p in [*prompts, *calibration.values()])
    print(
        f"{len(prompts)} prompts ready in {time.perf_counter() - t0:.1f} s "
        f"({reused} of {len(prompts) + len(calibration)} with calibration rebuilt from {where['prompts'].name})"
    )
    save_recorded(where["prompts"], [*prompts, *calibration.values()])
    for p in prompts:
        if abs(p["tokens"] - p["target_tokens"]) > fit_tolerance(p["target_tokens"]):
            raise AssertionError(f"{p['id']}: {p['tokens']} tokens, not within 3% of {p['target_tokens']}")
    check = sanity(model, tok, min(prompts, key=lambda p: p["tokens"]), log)
    print(f"sanity: flashmem without a budget equals full attention on {check['prompt']}")

    need_budgets = "flashmem" in args.methods or "kvpress" in args.methods  # presses keep flashmem's share
    budgets = (
        budgets_for(model, tok, args.lengths, args.shares, {}, where["budgets"], calibration)
        if need_budgets
        else {}
    )
    tuned_budgets = None
    if args.tuned is not None and "budget_tokens" not in args.tuned:
        tuned_budgets = budgets_for(
            model, tok, args.lengths, args.shares, args.tuned, where["budgets"], calibration
        )
    methods = method_list(args, budgets, tuned_budgets, args.tuned)

    wanted: list[tuple[str, str, float | None]] = []  # (run key, method label, target share)
    for p in prompts:
        for method in methods:
            m = bind(method, p["target_tokens"], model)
            key = run_key(p, m)
            wanted.append((key, m["label"], m.get("share")))
            if key in log:
                continue
            ids = prompt_ids(p)
            if m["kind"] == "full":
                run = full_run(model, ids, p["max_new_tokens"])
            else:
                run = flashmem_run(model, m["config"], ids, p["max_new_tokens"])
            rec = record(p, m, key, run, tok)
            log.append(rec)
            share = f", share {rec['avg_device_share']:.3f}" if "avg_device_share" in rec else ""
            print(
                f"{p['id']} {m['label']}: {rec['output']!r} score {rec['score']:.2f} "
                f"({rec['seconds']:.1f} s{share})",
                flush=True,
            )

    kvpress_status = None
    if "kvpress" in args.methods:
        from bench.peers import kvpress_peer

        presses = _list(args.presses) if args.presses else None
        kv_keys, kvpress_status = kvpress_peer.run_ruler(
            prompts,
            budgets,
            log,
            tok,
            presses=presses,
            placements=_list(args.placements) if args.placements else None,
            timeout=args.kvpress_timeout,
        )
        wanted += kv_keys

    # two methods may share a run (two targets that both fall to the minimum budget): each keeps its label
    records = [
        {**log.records[k], "method": label, "share_target": share} for k, label, share in wanted if k in log
    ]
    order = [m["label"] for m in methods if m.get("default")] + [
        m["label"] for m in methods if not m.get("default")
    ]
    order += [x for x in dict.fromkeys(r["method"] for r in records) if x not in order]
    summary = summarize(records, order)
    data = common.header(
        "ruler",
        quick=args.quick,
        model=model_name,
        lengths=args.lengths,
        tasks={
            t: {
                "what": rt.TASKS[t].what,
                "metric": rt.TASKS[t].metric,
                "max_new_tokens": rt.TASKS[t].max_new_tokens,
            }
            for t in args.tasks
        },
        samples=args.samples,
        methods=order,
        shares=args.shares,
        budgets={str(L): {f"{s:g}": v for s, v in b.items()} for L, b in budgets.items()},
        tuned_config=args.tuned,
        tuned_budgets={str(L): {f"{s:g}": v for s, v in b.items()} for L, b in (tuned_budgets or {}).items()},
        flashmem_defaults=resolved_config({}),
        flashmem_auto_indexer=auto_indexer(model),
        decode="greedy, the task's answer budget of new tokens, no EOS stop",
        scoring="string_match_all (fraction of references in the output, case-insensitive) for every task "
        "but qa_1/qa_2 (string_match_part: 1 if any reference is in the output); score = mean x 100",
        shares_note="flashmem: memory_report()['avg_device_share'] (every device byte held, averaged over "
        "decode steps); kvpress: kept KV tokens over tokens fed (KV alone)",
        results_log=str(where["jsonl"].name),
        prompts_file=str(where["prompts"].name),
    )
    data.update(
        sanity=check,
        kvpress=kvpress_status,
        summary=summary,
        frontier=frontier(summary, order),
        prompts=[
            {
                k: p[k]
                for k in (
                    "id",
                    "task",
                    "target_tokens",
                    "sample",
                    "depth",
                    "seed",
                    "units",
                    "tokens",
                    "context_tokens",
                    "question_tokens",
                    "references",
                    "query",
                    "metric",
                    "max_new_tokens",
                    "ids_sha",
                )
            }
            for p in prompts
        ],
        records=records,
    )
    common.write_json(where["json"], data)
    plot(summary, order, where["png"])
    plot_frontier(data["frontier"], where["frontier_png"])
    for r in summary:
        if r["task"] == "average":
            share = r.get("mean_avg_device_share", r.get("mean_kept_share_end"))
            extra = f", share {share:.3f}" if share is not None else ""
            secs = r.get("mean_seconds")
            print(
                f"L{r['length']} {r['method']}: average score {r['score']:.1f}{extra}"
                + (f", {secs:.1f} s per prompt" if secs else "")
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
