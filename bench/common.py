"""Shared helpers of the benchmark entries: machine stamp, result paths, JSON/PNG writing, the kernel
timer, flashmem settings from JSON, model loading (the default model, or random-init models from
:func:`flashmem.testing.tiny_model`), and the two decode loops every entry compares: plain Hugging
Face (``DynamicCache``, :class:`flashmem.testing.DenseDecoder`) and flashmem (:func:`flashmem.wrap`).

Teacher forcing: :func:`flashmem_decode` with ``forced=`` passes the tokens to the public
``generate(..., forced_tokens=...)`` and checks that the returned tokens are exactly the forced ones.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_RESULTS = RESULTS / "quick"


# ---------------------------------------------------------------------------------------------
# stamps and files
# ---------------------------------------------------------------------------------------------
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - a missing optional package is reported as None
        return None
    return getattr(mod, "__version__", None)


def machine_stamp() -> dict:
    """Platform, CPU, GPU (if any) and library versions of this process."""
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "memory_bytes": props.total_memory, "cuda": torch.version.cuda}
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": load,
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "flashmem": _version("flashmem"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }


def header(benchmark: str, *, quick: bool, model: str, **settings) -> dict:
    """The stamp every result file starts with: what ran, where, on which model and settings."""
    return {
        "benchmark": benchmark,
        "quick": quick,
        "created_unix": int(time.time()),
        "argv": list(sys.argv),
        "machine": machine_stamp(),
        "model": model,
        "settings": settings,
    }


def result_paths(name: str, quick: bool, json_path: str | Path | None = None) -> tuple[Path, Path]:
    """(json, png) paths: ``--json`` if given (PNG beside it), else ``bench/results[/quick]/<name>``."""
    if json_path is not None:
        path = Path(json_path)
    else:
        path = (QUICK_RESULTS if quick else RESULTS) / f"{name}.json"
    return path, path.with_suffix(".png")


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    print(f"wrote {path}")
    return path


def pyplot():
    """matplotlib.pyplot with the Agg backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written")
        return None
    return plt


def save_figure(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
    return path


def median_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median milliseconds per call of ``fn`` over ``iters`` calls after ``warmup`` calls: on CUDA
    from events recorded around each call (back to back, one synchronize at the end), elsewhere from
    the wall clock."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


# ---------------------------------------------------------------------------------------------
# flashmem settings
# ---------------------------------------------------------------------------------------------
def parse_configs(text: str | None, default: list[dict]) -> list[dict]:
    """``--flashmem-config`` JSON: one object or a list of objects, each the keyword arguments of a
    :class:`flashmem.FlashMemConfig`. Every entry is validated (constructed) before any work."""
    import flashmem

    if text is None:
        configs = [dict(c) for c in default]
    else:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--flashmem-config is not valid JSON ({e}): {text!r}") from None
        configs = value if isinstance(value, list) else [value]
        if not configs or not all(isinstance(c, dict) for c in configs):
            raise ValueError("--flashmem-config must be a JSON object or a non-empty list of objects")
    for c in configs:
        try:
            flashmem.FlashMemConfig(**c)
        except TypeError as e:
            raise ValueError(f"--flashmem-config entry {c} is not a FlashMemConfig: {e}") from None
    return configs


def config_label(cfg: dict) -> str:
    if not cfg:
        return "flashmem (no budget)"
    # a stats file is an environment detail (tiny models get their own); stats from the prompt a choice
    parts = [f"{k}={v}" for k, v in cfg.items() if k != "stats_path" or v == "prompt"]
    return "flashmem " + ",".join(parts)


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
_DEFAULT_MODEL: list = []


def load_default():
    """The embedded default model, loaded once per process (``all`` shares it between entries; no
    entry modifies it: ``wrap`` installs its attention only for the duration of each call)."""
    import flashmem
    from flashmem import DEFAULT_MODEL_NAME

    if not _DEFAULT_MODEL:
        t0 = time.perf_counter()
        model, tok = flashmem.load_default_model()
        print(f"loaded {DEFAULT_MODEL_NAME} in {time.perf_counter() - t0:.1f} s")
        _DEFAULT_MODEL.extend([model, tok])
    return _DEFAULT_MODEL[0], _DEFAULT_MODEL[1], DEFAULT_MODEL_NAME


class _Encoding(dict):
    """A tokenizer's output: ``enc.input_ids`` and ``enc["input_ids"]`` alike."""

    __getattr__ = dict.__getitem__


class ByteTokenizer:
    """Text <-> ids as bytes modulo the vocabulary: lets the entries run end to end on a tiny
    random-init model (smoke tests; its answers mean nothing)."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors=None):
        ids = [b % self.vocab for b in text.encode("utf-8")]
        return _Encoding(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) % 128 for i in ids).decode("ascii", errors="replace")


def load_bench_model(name: str, max_positions: int = 65_536):
    """``"default"``: the embedded model (no stats path needed); ``"tiny"``: a tiny random-init Llama
    with a byte tokenizer and calibrated stats. Returns ``(model, tokenizer, description, stats_path)``."""
    if name == "default":
        model, tok, desc = load_default()
        return model, tok, desc, None
    if name == "tiny":
        model, stats_path, desc = tiny_bench_model(max_positions)
        return model, ByteTokenizer(model.config.vocab_size), desc + ", byte tokenizer", stats_path
    raise ValueError(f"--model must be 'default' or 'tiny', got {name!r}")


# random-init Llamas of the entries that need no trained weights (flashmem.testing.tiny_model keywords)
RANDOM_LLAMAS = {
    # long-context and prefetch-overlap on a CPU: cheap arithmetic, 1M positions
    "tiny": dict(layers=2, q_heads=4, kv_heads=2, head_dim=16, vocab=512, rope_theta=1_000_000.0,
                 max_positions=1_048_576),
    # long-context --llama8b (CUDA): Llama-3.1-8B's shape
    "llama8b": dict(layers=32, q_heads=32, kv_heads=8, head_dim=128, vocab=128256, intermediate_size=14336,
                    rope_theta=500000.0, max_positions=1_048_576),
    # prefetch-overlap on CUDA
    "8layer": dict(layers=8, q_heads=16, kv_heads=8, head_dim=128, vocab=32000, intermediate_size=5632,
                   rope_theta=500000.0, max_positions=131072),
}  # fmt: skip


def random_llama(shape: str, device: str | torch.device, dtype: torch.dtype):
    """``flashmem.testing.tiny_model("llama", seed=0)`` of one of :data:`RANDOM_LLAMAS`' shapes, its
    weights drawn on ``device`` and cast to ``dtype``."""
    from flashmem.testing import tiny_model

    return tiny_model("llama", **RANDOM_LLAMAS[shape], device=device, dtype=dtype)


_TINY_STATS: dict[tuple, str] = {}


def tiny_bench_model(max_positions: int = 262_144, *, layers: int = 2, seed: int = 0, **kw):
    """A tiny random-init Llama (``flashmem.testing.tiny_model``) and a path to TriAttention stats
    calibrated for it on random tokens (needed for a budget: the shipped stats fit the default model
    only). Returns ``(model, stats_path, description)``."""
    from flashmem import calibrate
    from flashmem.testing import tiny_model

    model = tiny_model("llama", layers=layers, seed=seed, max_positions=max_positions, **kw)
    key = (max_positions, layers, seed, tuple(sorted(kw.items())))
    path = _TINY_STATS.get(key)
    if path is None or not Path(path).is_file():
        ids = torch.randint(
            0, model.config.vocab_size, (2048,), generator=torch.Generator().manual_seed(seed)
        )
        stats = calibrate(
            model, ids, max_tokens=2048, tokens_per_forward=512, progress=False, source="random tokens"
        )
        path = str(Path(tempfile.mkdtemp(prefix="flashmem-bench-")) / "tiny_stats.safetensors")
        stats.save(path)
        _TINY_STATS[key] = path
    c = model.config
    desc = (
        f"tiny random-init Llama (layers={c.num_hidden_layers}, q_heads={c.num_attention_heads}, "
        f"kv_heads={c.num_key_value_heads}, head_dim={c.head_dim}, vocab={c.vocab_size}, fp32)"
    )
    return model, path, desc


# ---------------------------------------------------------------------------------------------
# the two decode loops
# ---------------------------------------------------------------------------------------------
def _greedy(logits: torch.Tensor) -> int:
    return int(logits.argmax())


def snapshot_after_prefill(fm, store: list[dict]) -> None:
    """For generate's ``stream`` callback: the first token arrives right after prefill, before any
    decode step; keep that moment's report timings and offload counters in ``store`` (once)."""
    if not store:
        rep = fm.memory_report()
        store.append({"timings": dict(rep["timings"]), "offload": rep.get("offload") or {}})


def decode_breakdown(before: dict, after: dict) -> dict:
    """Where a decode step's time goes, in ms per step, from the report after prefill (``before``,
    see :func:`snapshot_after_prefill`) and at the end (``after``): recall refreshes (indexer scoring +
    chunk requests + waits), compaction, host-to-device copy time and stall time (of those, as the
    transfer engine measured them), and the rest: the model's forward with flashmem's attention."""
    steps = after["decode_steps"]
    if not steps:
        return {}
    t0, t1 = before["timings"], after["timings"]
    o0, o1 = before.get("offload") or {}, after.get("offload") or {}

    def d(a: dict, b: dict, key: str) -> float:
        return float(b.get(key, 0.0)) - float(a.get(key, 0.0))

    decode = t1["decode_s"] - t0["decode_s"]
    recall = d(t0, t1, "recall_s")
    compaction = d(t0, t1, "compaction_s")
    ms = 1000.0 / steps
    return {
        "steps": steps,
        "total": decode * ms,
        "recall_refresh": recall * ms,
        "compaction": compaction * ms,
        "forward_and_attention": (decode - recall - compaction) * ms,
        "h2d_copy_time_in_recall": d(o0, o1, "h2d_time_s") * ms,
        "stall_time_in_recall": d(o0, o1, "stall_time_s") * ms,
        "h2d_bytes_per_step": d(o0, o1, "h2d_bytes") / steps,
        "chunks_loaded": d(o0, o1, "chunks_loaded"),
    }


@torch.no_grad()
def hf_decode(
    model, ids: torch.Tensor, max_new_tokens: int, *, forced: list[int] | None = None, collect_logits=True
) -> dict:
    """Full attention: plain Hugging Face forward with its default ``DynamicCache``
    (:class:`flashmem.testing.DenseDecoder`), greedy.

    ids: ``[1, T]``. Returns tokens (``list[int]``, ``max_new_tokens`` of them, no EOS stop),
    logits ``[N, vocab]`` fp32 (``logits[i]`` predicts token ``i``), prefill_s, step_s (per decode
    step) and kv_bytes (the DynamicCache's key/value bytes at the end)."""
    from flashmem.testing import DenseDecoder

    if forced is not None and len(forced) < max_new_tokens:
        raise ValueError(f"forced holds {len(forced)} tokens, {max_new_tokens} needed")
    dense = DenseDecoder(model)
    t0 = time.perf_counter()
    logits = dense.step(ids).float()
    prefill_s = time.perf_counter() - t0
    tokens, all_logits, step_s = [], [], []
    for i in range(max_new_tokens):
        if collect_logits:
            all_logits.append(logits)
        token = forced[i] if forced is not None else _greedy(logits)
        tokens.append(token)
        if i == max_new_tokens - 1:
            break
        t0 = time.perf_counter()
        logits = dense.step(torch.tensor([[token]], device=ids.device)).float()
        step_s.append(time.perf_counter() - t0)
    _, kv_bytes = dense.kv_bytes()
    return {
        "tokens": tokens,
        "logits": torch.stack(all_logits) if all_logits else None,
        "prefill_s": prefill_s,
        "step_s": step_s,
        "kv_bytes": kv_bytes,
    }


@torch.no_grad()
def flashmem_decode(
    model,
    cfg: dict,
    ids: torch.Tensor,
    max_new_tokens: int,
    *,
    forced: list[int] | None = None,
    collect_logits: bool = True,
    stats_path: str | None = None,
) -> dict:
    """flashmem: ``wrap(model, FlashMemConfig(**cfg)).generate(ids, N, eos_token_id=None)``.

    With ``forced`` the given tokens are fed instead of greedy ones (see the module docstring).
    Returns tokens, logits ``[N, vocab]`` (or None), report (``memory_report()``), trace (device KV
    bytes after every decode step: the report's ``device_kv_trace`` when it has one, else read from
    the allocator in the ``stream`` callback), trace_source, wall_s, step_s (seconds between successive
    tokens: one decode step each), decode_timings (the report's timings spent in the decode steps
    only; compaction and recall during prefill are excluded)."""
    import flashmem

    kwargs = dict(cfg)
    if stats_path is not None and kwargs.get("budget_tokens") is not None:
        kwargs.setdefault("stats_path", stats_path)
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(**kwargs))
    callback_trace: list[int] = []
    stamps: list[float] = []

    after_prefill: list[dict] = []

    def on_token(_token: int) -> None:
        stamps.append(time.perf_counter())
        snapshot_after_prefill(fm, after_prefill)
        pool = getattr(fm, "pool", None)
        if pool is not None:
            callback_trace.append(int(pool.device_kv_bytes))

    t0 = time.perf_counter()
    out = fm.generate(
        ids,
        max_new_tokens,
        eos_token_id=None,
        collect_logits=collect_logits,
        stream=on_token,
        progress=False,
        forced_tokens=forced,
    )
    wall = time.perf_counter() - t0
    tokens = out[0, ids.shape[1] :].tolist()
    if forced is not None and tokens != list(forced[: len(tokens)]):
        raise RuntimeError("teacher forcing failed: flashmem generated other tokens than the forced ones")
    report = fm.memory_report()
    trace = report.get("device_kv_trace")
    source = "memory_report()['device_kv_trace'] (after each decode step)"
    if not trace:
        trace, source = callback_trace, "allocator read in generate's stream callback (after each token)"
    return {
        "tokens": tokens,
        "logits": fm.step_logits,
        "report": report,
        "trace": [int(x) for x in trace],
        "trace_source": source,
        "wall_s": wall,
        # time between successive tokens = one decode step (forward, compaction, recall)
        "step_s": [b - a for a, b in zip(stamps, stamps[1:])],
        # seconds spent in the decode steps only (the report's timings minus those after prefill)
        "decode_timings": {
            k: v - (after_prefill[0]["timings"].get(k, 0.0) if after_prefill else 0.0)
            for k, v in report["timings"].items()
            if k != "prefill_s"
        },
    }
