"""Peers: NVIDIA kvpress presses on the same prompts, in their own environment (``.venv-kvpress``).

    python -m bench.run kvpress [--quick] [--setup-only] [--keep-share 0.15] [--json PATH]
    python -m bench.run kvpress --mode trials [--length 4000] [--trials 8] [--keep-share S] [--quick]
    python -m bench.run kvpress --mode fidelity [--text code|prose] [--tokens 4096] [--docs 2]
                                [--new-tokens 256] [--keep-share S1,S2] [--quick]

kvpress needs transformers < 5.3, so it cannot share flashmem's environment: it runs in
``.venv-kvpress`` (made by :mod:`bench.peers.kvpress_env`). This module is the main process: it builds
the prompts (token ids from :mod:`bench.inputs`, so every method reads the same ids) and writes them
to a JSON file; the worker (:mod:`bench.peers.kvpress_worker`, run with the venv's python) loads the
default model with transformers' GGUF loader, applies each press through kvpress's public API (the
press as a context manager around the forward pass: ``with press(model): ...``) and writes a results
JSON that the main process merges.

Presses: StreamingLLM, SnapKV, ExpectedAttention, Knorm, TOVA (``compression_ratio = 1 - keep
share``), and decoding-time compression (``DecodingPress`` around Knorm, target size = keep share x
tokens, every ``--decoding-interval`` (64) steps) where the installed kvpress has it. Two placements
of the question: ``question outside`` (kvpress pipeline default: only the context is compressed, then
the question and the answer are decoded over the compressed cache at their true positions) and
``question inside`` (context + question but its last token prefilled under the press, then that token
fed so the answer starts from logits read over the compressed cache). kvpress's pipeline itself is
not used because it applies the tokenizer's chat template, with which this model fails even under
full attention; the loop above is the pipeline's own generate step on plain ids. DecodingPress runs
with the question inside only: the whole prompt is prefilled uncompressed and the cache is cut while
answering, so with 8 answer tokens and an interval of 64 it never cuts (its kept share says so).

Modes (``--mode``):

* ``passkey`` (default): the heat-map prompts of ``bench/passkey.py`` (lengths x depths);
  writes ``kvpress_passkey.json``.
* ``trials``: exactly the prompts of ``bench/passkey_trials.py`` (trial i: depth (i + 0.5) / trials,
  seed 100 + i, ids = ``tok(prompt.text).input_ids``), split into context and question at a token
  boundary (:func:`bench.inputs.split_question`). Correct = the key string is in the decoded 8 tokens, the rule of
  ``passkey_trials``. The keep share is ``--keep-share`` or flashmem's ``mean_avg_device_share`` in
  ``passkey_trials_<L>k_default.json``; the full-attention answers are read from
  ``passkey_trials_<L>k_full.json`` when it holds these trials, else computed here. The worker also
  decodes every trial under full attention (environment check). Writes
  ``kvpress_passkey_trials_<L>k.json``.
* ``fidelity``: the documents and method of ``bench/fidelity.py``: the main process's full attention
  generates ``--new-tokens`` greedy tokens; the worker computes its own full-attention reference
  teacher-forced on them (its argmax agreement with the main tokens is the environment check), then
  for each press and keep share compresses the document but its last token during prefill, feeds
  that token and the full-attention continuation at their true positions over the compressed cache,
  and compares each step's next-token distribution with the reference: top-1 agreement and mean
  KL(full || press). DecodingPress prefills uncompressed and cuts while decoding. Shares are
  matched, not requested: the kept share of a run is the cache length over the tokens fed, averaged
  over the compared steps, and each prefill press keeps the share of the document that makes this
  average equal the target (:func:`prefill_keep_for_average`): flashmem's average device share on
  that document, per budget, from ``fidelity.json`` (``--keep-share`` targets otherwise); the summary
  says whether every document is within 0.5 percentage points. ``--text prose`` runs the prose
  documents against ``fidelity_prose.json``. Writes ``kvpress_fidelity.json`` /
  ``kvpress_fidelity_prose.json``.

``--quick`` runs one 1,000-token prompt (passkey, trials) or one 640-token document with 16 new
tokens (fidelity) and writes under ``bench/results/quick/``.

The worker imports nothing from flashmem (its environment lacks it). When the environment cannot be
made or the worker fails, the JSON records exactly why (the command and its error output).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench import common, inputs, metrics
from bench.fidelity import TEXTS, load_documents, result_name
from bench.inputs import ANSWER_TOKENS
from bench.peers import kvpress_env
from bench.peers.kvpress_env import REPO
from bench.peers.kvpress_worker import DECODING_INTERVAL, DECODING_PRESS, PLACEMENTS, PRESSES
from flashmem import DEFAULT_MODEL_NAME, load_default_tokenizer


# ---------------------------------------------------------------------------------------------
# tasks for the worker
# ---------------------------------------------------------------------------------------------
def _prompt_task(
    kind: str,
    prompts: list[dict],
    keep_share,
    *,
    new_tokens: int,
    full_tokens: dict | None,
    presses: list[str] | None,
    decoding_interval: int,
) -> dict:
    """The worker's task for pass-key prompts (:mod:`bench.inputs`): ``keep_share(prompt)`` is each
    prompt's share of the KV to keep; ``full_tokens[id]`` the main process's full-attention answer."""
    return {
        "kind": kind,
        "new_tokens": new_tokens,
        "presses": presses or PRESSES + [DECODING_PRESS],
        "placements": PLACEMENTS,
        "decoding_interval": decoding_interval,
        "prompts": [
            {
                "id": p["id"],
                "context_ids": p["context_ids"],
                "question_ids": p["question_ids"],
                "keep_share": keep_share(p),
                "full_tokens": (full_tokens or {}).get(p["id"]),
            }
            for p in prompts
        ],
    }


def run_passkey(
    prompts: list[dict],
    keep_shares: dict,
    *,
    new_tokens: int = ANSWER_TOKENS,
    quick: bool = False,
    full_tokens: dict | None = None,
    decoding_interval: int = DECODING_INTERVAL,
    timeout: int = 7200,
) -> dict:
    """Pass-key prompts (see ``bench.inputs.heatmap_prompts``) with ``keep_shares[str(length)]``."""
    task = _prompt_task(
        "passkey",
        prompts,
        lambda p: keep_shares[str(p["target_tokens"])],
        new_tokens=new_tokens,
        full_tokens=full_tokens,
        presses=None,
        decoding_interval=decoding_interval,
    )
    return kvpress_env.run_worker(task, name="passkey_quick" if quick else "passkey", timeout=timeout)


# ---------------------------------------------------------------------------------------------
# pass-key trials: keep share and full-attention answers from the passkey_trials JSON files
# ---------------------------------------------------------------------------------------------
def length_tag(length: int) -> str:
    """``4000`` -> ``"4k"``: the tag in the names of the pass-key trials result files."""
    return f"{round(length / 1000)}k"


def flashmem_trials_share(path: Path, length: int) -> float | None:
    """``mean_avg_device_share`` of a ``passkey_trials`` JSON run at ``length`` tokens, else None."""
    if not Path(path).is_file():
        return None
    data = json.loads(Path(path).read_text())
    if data.get("length") != length or not data.get("config"):
        return None
    return data.get("mean_avg_device_share")


def full_answers_from_json(path: Path, prompts: list[dict], tok) -> dict[str, dict]:
    """Full-attention answers of a ``passkey_trials`` JSON (``--config {}``) for the prompts it holds:
    the same seed, depth, key and prompt length. ``generated`` tokens are decoded when stored, else
    the stored answer is used; correct is re-derived with the same rule (key in answer)."""
    if not Path(path).is_file():
        return {}
    data = json.loads(Path(path).read_text())
    if data.get("config"):
        return {}  # a budgeted run, not full attention
    by_seed = {r.get("seed"): r for r in data.get("records", [])}
    found = {}
    for p in prompts:
        r = by_seed.get(p["seed"])
        if r is None or r.get("key") != p["key"] or r.get("tokens") != p["tokens"]:
            continue
        if abs(r.get("depth", -1.0) - p["depth"]) > 1e-9:
            continue
        tokens = r.get("generated")
        answer = tok.decode(tokens) if tokens is not None else r.get("answer")
        if answer is None:
            continue
        found[p["id"]] = {
            "answer": answer,
            "correct": p["key"] in answer,
            "tokens": tokens,
            "source": Path(path).name,
        }
    return found


def summarize_trials(records: list[dict]) -> dict[str, dict]:
    """Per method (press and placement): correct/trials and mean kept shares, in first-seen order.

    ``mean_kept_share``: cache length after the last forward pass over the tokens fed (the same
    measure for both placements); ``mean_kept_share_prefill``: the share kept right after the
    compressed prefill (of the context, question outside; of the prompt, question inside)."""
    summary: dict[str, dict] = {}
    for r in records:
        s = summary.setdefault(
            r["method"],
            {
                "press": r["press"],
                "placement": r["placement"],
                "correct": 0,
                "trials": 0,
                "_end": [],
                "_pre": [],
            },
        )
        s["correct"] += bool(r["correct"])
        s["trials"] += 1
        s["_end"].append(r.get("kept_share_end", r["kept_share"]))
        s["_pre"].append(r["kept_share"])
    for s in summary.values():
        end, pre = s.pop("_end"), s.pop("_pre")
        s["accuracy"] = s["correct"] / s["trials"]
        s["mean_kept_share"] = sum(end) / len(end)
        s["mean_kept_share_prefill"] = sum(pre) / len(pre)
    return summary


def run_trials(
    prompts: list[dict],
    keep_share: float,
    *,
    new_tokens: int = ANSWER_TOKENS,
    quick: bool = False,
    full_tokens: dict | None = None,
    presses: list[str] | None = None,
    decoding_interval: int = DECODING_INTERVAL,
    timeout: int = 6 * 3600,
) -> dict:
    """Pass-key trials (see :func:`bench.inputs.trial_prompts`) at one keep share; the worker also
    decodes every trial under full attention."""
    task = _prompt_task(
        "trials",
        prompts,
        lambda p: keep_share,
        new_tokens=new_tokens,
        full_tokens=full_tokens,
        presses=presses,
        decoding_interval=decoding_interval,
    )
    task["full_every_prompt"] = True
    return kvpress_env.run_worker(task, name="trials_quick" if quick else "trials", timeout=timeout)


# ---------------------------------------------------------------------------------------------
# fidelity
# ---------------------------------------------------------------------------------------------
def summarize_fidelity(rows: list[dict]) -> list[dict]:
    """Mean over documents per (method, keep share label), in first-seen order. ``max_share_gap``:
    the largest |kept share - target| over the documents (average shares, both); ``matched``: every
    document within 0.5 percentage points of its target."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["share_label"]), []).append(r)
    out = []
    for (method, label), rs in groups.items():
        n = len(rs)
        gaps = [abs(r["avg_kept_share"] - r["target_avg_share"]) for r in rs if "target_avg_share" in r]
        out.append(
            {
                "method": method,
                "press": rs[0]["press"],
                "share_label": label,
                "keep_share_requested": sum(r["keep_share_requested"] for r in rs) / n,
                "top1_agreement": sum(r["top1_agreement"] for r in rs) / n,
                "mean_kl": sum(r["mean_kl"] for r in rs) / n,
                "max_kl": max(r["max_kl"] for r in rs),
                "mean_avg_kept_share": sum(r["avg_kept_share"] for r in rs) / n,
                "mean_target_avg_share": sum(r["target_avg_share"] for r in rs) / n
                if len(gaps) == n
                else None,
                "max_share_gap": max(gaps) if len(gaps) == n else None,
                "matched": len(gaps) == n and max(gaps) <= MATCH_WITHIN,
                "docs": n,
            }
        )
    return out


def run_fidelity(
    docs: list[dict],
    keep_shares: list[dict],
    *,
    new_tokens: int,
    quick: bool = False,
    presses: list[str] | None = None,
    decoding_interval: int = DECODING_INTERVAL,
    timeout: int = 6 * 3600,
) -> dict:
    """``docs``: ``{"file", "ids", "full_tokens"}``; ``keep_shares``: ``{"label", "share"}``."""
    task = {
        "kind": "fidelity",
        "new_tokens": new_tokens,
        "presses": presses or PRESSES + [DECODING_PRESS],
        "decoding_interval": decoding_interval,
        "keep_shares": keep_shares,
        "docs": docs,
    }
    return kvpress_env.run_worker(task, name="fidelity_quick" if quick else "fidelity", timeout=timeout)


# ---------------------------------------------------------------------------------------------
# RULER-style suite (bench/ruler.py)
# ---------------------------------------------------------------------------------------------
# a logged press run counts for a keep share within 0.05 points of its own: a flashmem release that
# adds a few KB of index (0.2.3's per-head prompt ranks: +0.013 points at 4K) keeps its press rows,
# ten times inside the 0.5-point match the fidelity comparison asks for
KEEP_SHARE_TOLERANCE = 5e-4


def ruler_methods(
    budgets: dict, length: int, presses: list[str] | None = None, placements: list[str] | None = None
) -> list[dict]:
    """The kvpress methods of ``bench/ruler.py`` at one length: every press x placement x target
    share, each keeping flashmem's measured calibration share at that length and target
    (``budgets[length][target]["share"]``). ``spec`` is what the suite's run key hashes."""
    out = []
    for target, cal in budgets[length].items():
        keep = cal["share"]
        for press in presses or PRESSES:
            for placement in placements or PLACEMENTS:
                out.append(
                    {
                        "label": f"kvpress {press} ({placement}) (share {target:.0%})",
                        "kind": "kvpress",
                        "share": target,
                        "press": press,
                        "placement": placement,
                        "keep_share": keep,
                        "spec": {
                            "kind": "kvpress",
                            "press": press,
                            "placement": placement,
                            "keep_share": round(keep, 6),
                        },
                    }
                )
    return out


def run_ruler(
    prompts: list[dict],
    budgets: dict,
    log,
    tok,
    *,
    presses: list[str] | None = None,
    placements: list[str] | None = None,
    timeout: int = 48 * 3600,
) -> tuple[list[tuple], dict]:
    """The presses on the suite's prompts: jobs whose run key is in ``log`` (a ``bench.ruler_log.RunLog``)
    are skipped; the others go to the worker, whose results (streamed to a JSONL as they finish, so
    a run cut short keeps what it did) are scored here and appended to ``log``. Returns ``(run key,
    method label, target share)`` of every job of the selection and the worker's status (why
    nothing ran, when it did not)."""
    from bench import ruler_log

    stream = Path(log.path).with_name(Path(log.path).stem + "_kvpress_stream.jsonl")
    done_runs: dict[tuple, list[dict]] = {}  # (prompt ids, press, placement) -> logged runs
    for r in log.records.values():
        if r.get("kind") == "kvpress" and "keep_share_requested" in r:
            done_runs.setdefault((r["ids_sha"], r["press"], r["placement"]), []).append(r)

    def key_of(p: dict, m: dict) -> str:
        """The run key, or the key of a logged run of the same prompt, press and placement whose keep
        share is within :data:`KEEP_SHARE_TOLERANCE` of this one's (flashmem's calibration share moves
        by a rounding error when a release changes a byte it holds, and the press run stays valid)."""
        key = ruler_log.run_key(p, m)
        if key in log:
            return key
        for r in done_runs.get((p["ids_sha"], m["press"], m["placement"]), []):
            if abs(r["keep_share_requested"] - m["keep_share"]) <= KEEP_SHARE_TOLERANCE:
                return r["key"]
        return key

    keys, by_key = [], {}
    for p in prompts:
        for m in ruler_methods(budgets, p["target_tokens"], presses, placements):
            key = key_of(p, m)
            keys.append((key, m["label"], m["share"]))
            by_key.setdefault(key, (p, m))

    def ingest() -> int:
        """Score and log the streamed results of a worker (this one, or one whose main process was
        stopped before it could read them). Results of jobs outside this selection stay in the
        stream for a later run that selects them; a line cut short is dropped."""
        done, other = 0, []
        if stream.is_file():
            for text in stream.read_text().splitlines():
                try:
                    line = json.loads(text)
                except json.JSONDecodeError:
                    continue
                key = line.get("key") if isinstance(line, dict) else None
                if key in by_key and key not in log:
                    p, m = by_key[key]
                    log.append(ruler_log.record(p, m, key, line, tok))
                    done += 1
                elif key is not None and key not in log:
                    other.append(text)
            if other:
                stream.write_text("".join(t + "\n" for t in other))
            else:
                stream.unlink()
        return done

    recovered = ingest()
    task_prompts = []
    for p in prompts:
        jobs, seen = [], set()
        for m in ruler_methods(budgets, p["target_tokens"], presses, placements):
            key = key_of(p, m)
            if key in log or key in seen:
                continue
            seen.add(key)
            jobs.append(
                {"key": key, "press": m["press"], "placement": m["placement"], "keep_share": m["keep_share"]}
            )
        if jobs:
            full = next(
                (r for r in log.records.values() if r.get("ids_sha") == p["ids_sha"] and r["kind"] == "full"),
                None,
            )
            task_prompts.append(
                {
                    "id": p["id"],
                    "context_ids": p["context_ids"],
                    "question_ids": p["question_ids"],
                    "new_tokens": p["max_new_tokens"],
                    "full_tokens": full["output_tokens"] if full else None,
                    "jobs": jobs,
                }
            )
    if not task_prompts:
        return keys, {
            "status": "ok",
            "reason": "every press result is in the log already",
            "recovered": recovered,
        }
    task = {"kind": "ruler", "prompts": task_prompts, "stream_path": str(stream.resolve())}
    result = kvpress_env.run_worker(task, name="ruler", timeout=timeout)
    done = ingest()
    status = {k: v for k, v in result.items() if k not in ("trials",)}
    status.update(jobs=sum(len(tp["jobs"]) for tp in task_prompts), done=done, recovered=recovered)
    print(f"kvpress: {done} of {status['jobs']} press runs done ({result.get('status')})")
    return keys, status


# ---------------------------------------------------------------------------------------------
# CLI (main process)
# ---------------------------------------------------------------------------------------------
QUICK_FIDELITY = {"tokens": 640, "docs": 1, "new_tokens": 16}
MATCH_WITHIN = 0.005  # shares matched within 0.5 percentage points


def _floats(text: str | None) -> list[float]:
    if text is None:
        return []
    values = [float(x) for x in text.split(",") if x.strip()]
    if not values or not all(0.0 < v <= 1.0 for v in values):
        raise ValueError(f"--keep-share needs shares in (0, 1], got {text!r}")
    return values


def _shown(path: Path) -> str:
    """A path relative to the repository when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _main_passkey(args, p) -> int:
    keep = _floats(args.keep_share)
    if len(keep) > 1:
        p.error("--mode passkey takes one --keep-share")
    lengths = [int(x) for x in (args.lengths or ("1000" if args.quick else "2000,4000,7000")).split(",")]
    depths = [float(x) for x in (args.depths or ("0.5" if args.quick else "0.1,0.3,0.5,0.7,0.9")).split(",")]
    shares = {str(L): keep[0] if keep else None for L in lengths}
    source = "--keep-share"
    if not keep:
        shares, source = {str(L): 0.15 for L in lengths}, "default 0.15"
        pk_json, _ = common.result_paths("passkey", args.quick)
        if pk_json.is_file():
            pk = json.loads(pk_json.read_text())
            for s in pk.get("summaries", [])[1:2]:
                for L in lengths:
                    v = s.get("by_length", {}).get(str(L), {}).get("mean_avg_device_share")
                    if v:
                        shares[str(L)], source = (
                            v,
                            f"flashmem average device share in {pk_json.name} ({s['method']})",
                        )
    model_tok = common.load_default()
    tok = model_tok[1]
    prompts = inputs.heatmap_prompts(tok, lengths, depths, 1)
    if args.only:
        wanted = set(args.only.split(","))
        prompts = [pr for pr in prompts if pr["id"] in wanted]
        if not prompts:
            p.error(f"--only matched no prompt id of lengths {lengths} and depths {depths}")
    full = {}
    for pr in prompts:
        ids = inputs.prompt_ids(pr)
        full[pr["id"]] = common.hf_decode(model_tok[0], ids, ANSWER_TOKENS, collect_logits=False)["tokens"]
    result = run_passkey(
        prompts,
        shares,
        new_tokens=ANSWER_TOKENS,
        quick=args.quick,
        full_tokens=full,
        decoding_interval=args.decoding_interval,
        timeout=args.timeout or 7200,
    )
    for t in result.get("trials", []):
        pr = next(x for x in prompts if x["id"] == t["id"])
        t["correct"] = metrics.extract_digits(t["answer"]) == pr["key"]
        t["key"] = pr["key"]
    summary: dict[str, dict] = {}
    for t in result.get("trials", []):
        s = summary.setdefault(t["method"], {"correct": 0, "trials": 0, "kept_share_sum": 0.0})
        s["correct"] += t["correct"]
        s["trials"] += 1
        s["kept_share_sum"] += t["kept_share"]
    for s in summary.values():
        s["mean_kept_share"] = s.pop("kept_share_sum") / s["trials"]
    full_correct = sum(
        metrics.extract_digits(model_tok[1].decode(full[pr["id"]])) == pr["key"] for pr in prompts
    )
    json_path, _ = common.result_paths("kvpress_passkey", args.quick, args.json)
    data = common.header(
        "kvpress_passkey",
        quick=args.quick,
        model=model_tok[2],
        lengths=lengths,
        depths=depths,
        keep_shares=shares,
        keep_share_source=source,
    )
    data.update(full_attention_correct=f"{full_correct}/{len(prompts)}", summary=summary, peers=result)
    common.write_json(json_path, data)
    for m, s in summary.items():
        print(f"{m}: {s['correct']}/{s['trials']} (kept {s['mean_kept_share']:.2f})")
    if result.get("status") != "ok":
        print(f"kvpress: {result.get('status')}: {result.get('reason')}")
    return 0


def _presses(args, p) -> list[str] | None:
    if not args.presses:
        return None
    names = [x.strip() for x in args.presses.split(",") if x.strip()]
    unknown = [x for x in names if x not in PRESSES + [DECODING_PRESS]]
    if unknown:
        p.error(f"--presses: unknown {unknown}; choose from {PRESSES + [DECODING_PRESS]}")
    return names


def _main_trials(args, p) -> int:
    length = args.length or (1000 if args.quick else 4000)
    trials = args.trials or (1 if args.quick else 8)
    if length < 100 or trials < 1:
        p.error("--length must be >= 100 and --trials >= 1")
    keep = _floats(args.keep_share)
    if len(keep) > 1:
        p.error("--mode trials takes one --keep-share")
    presses = _presses(args, p)
    tag = length_tag(length)
    tok = load_default_tokenizer()
    prompts = inputs.trial_prompts(tok, length, trials)
    by_id = {pr["id"]: pr for pr in prompts}

    fm_path = (
        Path(args.flashmem_json)
        if args.flashmem_json
        else common.RESULTS / f"passkey_trials_{tag}_default.json"
    )
    if keep:
        share, source = keep[0], "--keep-share"
    else:
        share = flashmem_trials_share(fm_path, length)
        if share is not None:
            config = json.loads(fm_path.read_text()).get("config")
            source = f"mean_avg_device_share of {fm_path.name} (flashmem {json.dumps(config)})"
        else:
            share, source = (
                0.15,
                f"default 0.15 (no flashmem passkey_trials results at {length} tokens in {_shown(fm_path)})",
            )
    print(f"keep share {share:.4f}: {source}")

    full_path = Path(args.full_json) if args.full_json else common.RESULTS / f"passkey_trials_{tag}_full.json"
    full = full_answers_from_json(full_path, prompts, tok)
    missing = [pr for pr in prompts if pr["id"] not in full]
    if missing:
        model = common.load_default()[0]
        for pr in missing:
            toks = common.hf_decode(model, inputs.prompt_ids(pr), ANSWER_TOKENS, collect_logits=False)[
                "tokens"
            ]
            answer = tok.decode(toks)
            full[pr["id"]] = {
                "answer": answer,
                "correct": pr["key"] in answer,
                "tokens": toks,
                "source": "computed here (bench.common.hf_decode, DynamicCache)",
            }
    result = run_trials(
        prompts,
        share,
        new_tokens=ANSWER_TOKENS,
        quick=args.quick,
        full_tokens={k: v["tokens"] for k, v in full.items() if v["tokens"]},
        presses=presses,
        decoding_interval=args.decoding_interval,
        timeout=args.timeout or 6 * 3600,
    )
    records = result.get("trials", [])
    for r in records:  # decoded and judged exactly as bench/passkey_trials.py does
        pr = by_id[r["id"]]
        r["answer"] = tok.decode(r["tokens"])
        r["correct"] = pr["key"] in r["answer"]
        r["key"] = pr["key"]
    summary = summarize_trials(records)

    env = []
    for fr in result.get("full_attention", []):
        mine = full[fr["id"]]
        answer = tok.decode(fr["tokens"])
        by_tokens = mine["tokens"] is not None
        env.append(
            {
                "id": fr["id"],
                "worker_answer": answer,
                "main_answer": mine["answer"],
                "compared": "tokens" if by_tokens else "answer text",
                "equal": fr["tokens"] == mine["tokens"] if by_tokens else answer == mine["answer"],
            }
        )
    per_trial = []
    for pr in prompts:
        per_trial.append(
            {
                "id": pr["id"],
                "depth": pr["depth"],
                "seed": pr["seed"],
                "key": pr["key"],
                "tokens": pr["tokens"],
                "full_attention": {"answer": full[pr["id"]]["answer"], "correct": full[pr["id"]]["correct"]},
                "kvpress": {
                    r["method"]: {
                        "answer": r["answer"],
                        "correct": r["correct"],
                        "kept_share": r["kept_share_end"],
                    }
                    for r in records
                    if r["id"] == pr["id"]
                },
            }
        )
    lengths = sorted({pr["tokens"] for pr in prompts})
    q_text = tok.decode(prompts[0]["question_ids"])
    json_path, _ = common.result_paths(f"kvpress_passkey_trials_{tag}", args.quick, args.json)
    data = common.header(
        f"kvpress_passkey_trials_{tag}",
        quick=args.quick,
        model=DEFAULT_MODEL_NAME,
        length=length,
        trials=trials,
        new_tokens=ANSWER_TOKENS,
        keep_share=share,
        keep_share_source=source,
        presses=presses or PRESSES + [DECODING_PRESS],
        placements=PLACEMENTS,
        decoding_interval=args.decoding_interval,
        prompts="bench/passkey_trials.py: trial i at depth (i + 0.5) / trials, seed 100 + i, "
        "ids = tok(prompt.text).input_ids",
        correct_rule="the key string is in the decoded answer (as bench/passkey_trials.py)",
        question_split=f"at a token boundary; question ids decode to {q_text!r} (the first newline "
        "of the question shares a token with the space before it and stays in the context); "
        "context_ids + question_ids == the prompt ids",
    )
    full_correct = sum(f["correct"] for f in full.values())
    data.update(
        prompt_tokens=lengths[0]
        if len(lengths) == 1
        else round(sum(pr["tokens"] for pr in prompts) / trials),
        keep_share=share,
        keep_share_source=source,
        full_attention={
            "correct": full_correct,
            "trials": trials,
            "sources": sorted({f["source"] for f in full.values()}),
        },
        env_check={
            "what": "the worker's full attention (its environment, no press) against the main process's "
            "full-attention answers, trial by trial",
            "equal": sum(e["equal"] for e in env),
            "trials": len(env),
            "per_trial": env,
        },
        summary=summary,
        per_trial=per_trial,
        peers=result,
    )
    common.write_json(json_path, data)
    print(f"full attention: {full_correct}/{trials} ({', '.join(data['full_attention']['sources'])})")
    print(f"environment check: worker full attention equals main on {data['env_check']['equal']}/{len(env)}")
    for m, s in summary.items():
        print(f"{m}: {s['correct']}/{s['trials']} (kept {s['mean_kept_share']:.3f})")
    if result.get("status") != "ok":
        print(f"kvpress: {result.get('status')}: {result.get('reason')}")
        return 1
    return 0


def prefill_keep_for_average(target: float, tokens: int, steps: int) -> float:
    """The share of a ``tokens``-token document's first ``tokens - 1`` tokens a prefill press must
    keep so that its kept share, averaged over the ``steps`` compared steps as the fidelity worker
    measures it, equals ``target``: after step ``i`` the cache holds ``k + 1 + i`` of ``tokens + i``
    tokens fed, so the average is ``k * A + B`` with ``A = mean 1 / (tokens + i)`` and
    ``B = mean (1 + i) / (tokens + i)``, solved for ``k``. Raises ``ValueError`` when no ``k`` in
    ``[0, tokens - 1]`` reaches ``target`` (the continuation alone already holds more)."""
    if tokens < 2 or steps < 1:
        raise ValueError(f"need tokens >= 2 and steps >= 1, got {tokens}, {steps}")
    a = sum(1 / (tokens + i) for i in range(steps)) / steps
    b = sum((1 + i) / (tokens + i) for i in range(steps)) / steps
    k = (target - b) / a
    if not 0 <= k <= tokens - 1:
        raise ValueError(
            f"an average kept share of {target:.4f} over {steps} steps after {tokens} tokens is out of "
            f"reach of a prefill press (from {b:.4f} keeping nothing to {(tokens - 1) * a + b:.4f} keeping all)"
        )
    return k / (tokens - 1)


def fidelity_keep_shares(path: Path) -> list[dict]:
    """One target share per flashmem budget of a ``bench/fidelity.py`` JSON: its mean average device
    share, and per document (``per_doc``: file -> that document's average device share) when the
    rows hold it (``[]`` when the file is missing)."""
    if not Path(path).is_file():
        return []
    data = json.loads(Path(path).read_text())
    out = []
    for s in data.get("summary", []):
        if s.get("mean_avg_device_share"):
            rows = [
                r
                for r in data.get("rows", [])
                if r.get("flashmem_config") == s.get("flashmem_config") and r.get("avg_device_share")
            ]
            out.append(
                {
                    "label": s["method"].replace("flashmem ", ""),
                    "share": s["mean_avg_device_share"],
                    "per_doc": {r["doc"]: r["avg_device_share"] for r in rows},
                    "source": f"mean_avg_device_share of '{s['method']}' in {Path(path).name}",
                }
            )
    return out


def matched_keep_shares(shares: list[dict], docs: list[dict], steps: int) -> list[dict]:
    """The worker's keep shares: for every target (``{"label", "share", "per_doc"?}``) and document,
    the target average share (the document's own when ``per_doc`` has it, else ``share``) and the
    prefill keep share that yields it (:func:`prefill_keep_for_average`)."""
    out = []
    for s in shares:
        targets = {d["file"]: s.get("per_doc", {}).get(d["file"], s["share"]) for d in docs}
        out.append(
            {
                "label": s["label"],
                "share": s["share"],
                "per_doc": {
                    d["file"]: {
                        "target_avg_share": targets[d["file"]],
                        "prefill_keep_share": prefill_keep_for_average(
                            targets[d["file"]], len(d["ids"]), steps
                        ),
                    }
                    for d in docs
                },
            }
        )
    return out


def _main_fidelity(args, p) -> int:
    keep = _floats(args.keep_share)
    presses = _presses(args, p)
    fm_path = (
        Path(args.flashmem_json)
        if args.flashmem_json
        else common.result_paths(result_name("fidelity", args.text or "code"), args.quick)[0]
    )
    fm = json.loads(fm_path.read_text()) if fm_path.is_file() else None
    text = args.text or (fm or {}).get("settings", {}).get("text", "code")
    if keep:
        shares = [{"label": f"keep_share={s:g}", "share": s, "source": "--keep-share"} for s in keep]
    else:
        shares = fidelity_keep_shares(fm_path)
        if not shares:
            p.error(f"no flashmem fidelity results with device shares at {fm_path}: give --keep-share")
    settings = (fm or {}).get("settings", {})
    if args.quick:
        defaults = dict(QUICK_FIDELITY)
    else:
        defaults = {
            "tokens": settings.get("context_tokens") or 4096,
            "docs": len(settings.get("docs") or []) or 2,
            "new_tokens": settings.get("new_tokens") or 256,
        }
    num_tokens = args.tokens or defaults["tokens"]
    num_docs = args.docs or defaults["docs"]
    new_tokens = args.new_tokens or defaults["new_tokens"]
    if min(num_tokens, num_docs, new_tokens) < 1:
        p.error("--tokens, --docs and --new-tokens must be positive")

    model, tok, name = common.load_default()
    docs = load_documents(tok, text, num_docs, num_tokens)
    try:
        worker_shares = matched_keep_shares(shares, docs, new_tokens)
    except ValueError as e:
        p.error(str(e))
    same_as_flashmem = bool(fm) and (
        settings.get("text", "code") == text
        and settings.get("context_tokens") == num_tokens
        and settings.get("docs") == [d["file"] for d in docs]
        and settings.get("new_tokens") == new_tokens
    )
    if fm and not same_as_flashmem:
        print(
            f"note: {fm_path.name} ran {settings.get('docs')} x {settings.get('context_tokens')} tokens, "
            f"{settings.get('new_tokens')} new; this run {[d['file'] for d in docs]} x {num_tokens}, "
            f"{new_tokens} new: its shares are used as given"
        )
    task_docs = []
    for d in docs:
        t0 = time.perf_counter()
        ref = common.hf_decode(model, torch.tensor([d["ids"]]), new_tokens, collect_logits=False)
        task_docs.append({"file": d["file"], "ids": d["ids"], "full_tokens": ref["tokens"]})
        print(f"{d['file']}: full attention {new_tokens} tokens in {time.perf_counter() - t0:.0f} s")
    result = run_fidelity(
        task_docs,
        worker_shares,
        new_tokens=new_tokens,
        quick=args.quick,
        presses=presses,
        decoding_interval=args.decoding_interval,
        timeout=args.timeout or 6 * 3600,
    )
    rows = result.get("rows", [])
    summary = summarize_fidelity(rows)
    checks = result.get("env_check", [])
    json_path, _ = common.result_paths(result_name("kvpress_fidelity", text), args.quick, args.json)
    data = common.header(
        "kvpress_fidelity",
        quick=args.quick,
        model=name,
        text=text,
        context_tokens=num_tokens,
        docs=[d["file"] for d in docs],
        new_tokens=new_tokens,
        keep_shares=shares,
        share_matching="each prefill press keeps the share of the document that makes its kept share, "
        "averaged over the compared steps, equal to the target (flashmem's average device share on "
        "that document: every device byte it holds, over full attention's KV of the tokens so far); "
        "'matched' = within 0.5 percentage points on every document; DecodingPress prefills "
        "uncompressed and cannot be matched",
        presses=presses or PRESSES + [DECODING_PRESS],
        decoding_interval=args.decoding_interval,
        same_documents_as_flashmem=same_as_flashmem,
        flashmem_results=_shown(fm_path) if fm else None,
        method="full attention (main process) generates the greedy continuation; the worker's own full "
        "attention, teacher-forced on it, is the reference; each press is teacher-forced on the same "
        "tokens over its compressed cache; top-1 agreement and mean KL(full || press) per step",
    )
    data.update(
        env_check={
            "what": "argmax of the worker's teacher-forced full attention vs the main process's greedy tokens",
            "docs": checks,
            "all_equal": bool(checks) and all(c["argmax_equals_main_full"] for c in checks),
        },
        summary=summary,
        flashmem=(fm or {}).get("summary"),
        rows=rows,
        peers={k: v for k, v in result.items() if k not in ("rows", "env_check")},
    )
    common.write_json(json_path, data)
    for c in checks:
        print(
            f"environment check {c['doc']}: top-1 = main full tokens on {c['top1_agreement_with_main_full']:.3f}"
        )
    for s in summary:
        print(
            f"{s['method']} @ {s['share_label']}: top-1 {s['top1_agreement']:.3f}, mean KL {s['mean_kl']:.4f}, "
            f"kept {s['mean_avg_kept_share']:.3f}"
        )
    if result.get("status") != "ok":
        print(f"kvpress: {result.get('status')}: {result.get('reason')}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run kvpress", description=__doc__.split("\n")[0])
    p.add_argument(
        "--mode",
        choices=("passkey", "trials", "fidelity"),
        default="passkey",
        help="passkey: heat-map prompts (default); trials: bench/passkey_trials.py prompts; "
        "fidelity: bench/fidelity.py documents, top-1 and KL vs full attention",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="one 1,000-token prompt (passkey, trials); one 640-token document, 16 new tokens (fidelity)",
    )
    p.add_argument("--setup-only", action="store_true", help="create the venv and print its versions")
    p.add_argument(
        "--keep-share",
        default=None,
        help="share of the KV kept (default: flashmem's average device share from its results JSON; "
        "passkey: else 0.15); fidelity: a comma-separated list",
    )
    p.add_argument("--lengths", default=None, help="passkey: prompt lengths")
    p.add_argument("--depths", default=None, help="passkey: key depths")
    p.add_argument("--only", default=None, help="passkey: comma-separated prompt ids (e.g. L2000-d0.20-s0)")
    p.add_argument("--length", type=int, default=None, help="trials: prompt tokens (default 4000)")
    p.add_argument("--trials", type=int, default=None, help="trials: number of trials (default 8)")
    p.add_argument(
        "--text", choices=TEXTS, default=None, help="fidelity: documents, code or prose (default: flashmem's)"
    )
    p.add_argument("--tokens", type=int, default=None, help="fidelity: document tokens (default: flashmem's)")
    p.add_argument("--docs", type=int, default=None, help="fidelity: documents (default: flashmem's)")
    p.add_argument(
        "--new-tokens", type=int, default=None, help="fidelity: compared steps (default: flashmem's)"
    )
    p.add_argument(
        "--flashmem-json",
        default=None,
        help="flashmem results that give the keep shares (trials: passkey_trials_<L>k_default.json; "
        "fidelity: fidelity.json, fidelity_prose.json with --text prose)",
    )
    p.add_argument("--full-json", default=None, help="trials: full-attention passkey_trials JSON")
    p.add_argument("--presses", default=None, help="trials, fidelity: comma-separated subset of the presses")
    p.add_argument(
        "--decoding-interval", type=int, default=DECODING_INTERVAL, help="DecodingPress steps per cut"
    )
    p.add_argument(
        "--timeout", type=int, default=None, help="worker time limit in s (passkey 7200, else 6 h)"
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.setup_only:
        env = kvpress_env.ensure_env()
        print(json.dumps(env, indent=1))
        return 0 if env["ok"] else 1
    try:
        _floats(args.keep_share)
    except ValueError as e:
        p.error(str(e))
    if args.decoding_interval < 1:
        p.error("--decoding-interval must be >= 1")
    if args.mode == "trials":
        return _main_trials(args, p)
    if args.mode == "fidelity":
        return _main_fidelity(args, p)
    return _main_passkey(args, p)


if __name__ == "__main__":
    raise SystemExit(main())
