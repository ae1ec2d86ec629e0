"""500K-token context end to end: prefill + decode with a bounded device KV pool.

    python -m bench.long_context [--tokens 500000] [--new-tokens 256] [--quick] [--json PATH]

A tiny random-init Llama-style model (so the arithmetic is fast on a CPU) is prefilled with
``--tokens`` random token ids and decodes ``--new-tokens`` tokens through ``flashmem.wrap`` with a
token budget, sparse prefill and lookahead recall. Before anything is timed, a short run of the same
configuration with a budget that covers the whole context is checked against dense attention
(identical greedy tokens). Reported, from the allocator: peak and average device KV share of the
full KV (prefill included), host mirror bytes against the full KV bytes (nothing lost), blocks
freed, prefill and decode throughput, and the per-phase time breakdown. On CUDA the same runs with
a Llama-3.1-8B-shaped random-init model in bf16 (``--llama8b``) at 128K and 500K tokens.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import flashmem
from bench import common
from flashmem import calibrate

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import transformers
    import triton

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    return info


def stats_for(model, path: Path) -> str:
    ids = torch.randint(0, model.config.vocab_size, (2048,), generator=torch.Generator().manual_seed(1))
    calibrate(
        model,
        ids.to(next(model.parameters()).device),
        max_tokens=2048,
        tokens_per_forward=1024,
        progress=False,
    ).save(path)
    return str(path)


def check_exact(model, stats: str) -> bool:
    """Correctness first: budget covering everything, recall on, sparse prefill -> equals dense."""
    ids = torch.randint(0, model.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(2))
    ids = ids.to(next(model.parameters()).device)
    dense = flashmem.wrap(model, flashmem.FlashMemConfig()).generate(ids, 20, eos_token_id=None)
    fm = flashmem.wrap(
        model,
        flashmem.FlashMemConfig(budget_tokens=1024, stats_path=stats, prefill="sparse", indexer="quest"),
    )
    return bool(torch.equal(fm.generate(ids, 20, eos_token_id=None), dense))


def run(model, stats: str, tokens: int, new_tokens: int, config_kwargs: dict) -> dict:
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(3))
    config = flashmem.FlashMemConfig(
        stats_path=stats, max_context_tokens=tokens + new_tokens, **config_kwargs
    )
    fm = flashmem.wrap(model, config)
    after_prefill: list[dict] = []
    t0 = time.perf_counter()
    out = fm.generate(
        ids.to(device),
        new_tokens,
        eos_token_id=None,
        progress=True,
        stream=lambda _token: common.snapshot_after_prefill(fm, after_prefill),
    )
    wall = time.perf_counter() - t0
    r = fm.memory_report()
    trace = r.pop("device_kv_trace")
    timings = r["timings"]
    breakdown = common.decode_breakdown(after_prefill[0], r)
    return {
        "context_tokens": tokens,
        "new_tokens": int(out.shape[1] - tokens),
        "config": config_kwargs,
        "wall_s": wall,
        "prefill_tokens_per_s": tokens / timings["prefill_s"],
        "decode_tokens_per_s": r["decode_steps"] / timings["decode_s"] if timings["decode_s"] else None,
        "peak_device_share": r["peak_device_share"],
        "avg_device_share": r["avg_device_share"],
        "peak_device_kv_share": r["peak_device_kv_share"],
        "avg_device_kv_share": r["avg_device_kv_share"],
        "device_bytes": r["device_bytes"],
        "traffic": r["traffic"],
        "peak_device_kv_bytes": r["peak_device_kv_bytes"],
        "full_kv_bytes": r["full_kv_bytes"],
        "host_kv_bytes": r["host_kv_bytes"],
        "host_equals_full": r["host_kv_bytes"] == r["full_kv_bytes"],
        "blocks_freed": r["blocks_freed"],
        "compactions": r["compactions"],
        "recall_refreshes": r["recall_refreshes"],
        "timings": timings,
        "decode_breakdown_ms_per_step": breakdown,
        "offload": r.get("offload"),
        "device_kv_trace_decode_max": max(trace) if trace else None,
        # device KV bytes after prefill (index 0) and after every decode step (index k: T + k tokens)
        "device_kv_trace": trace,
        "report": {k: v for k, v in r.items() if k != "offload"},
    }


def plot_trace(result: dict, png: Path) -> None:
    """Device KV bytes after prefill and every decode step against the full cache's line (log scale:
    at 500K tokens the two differ by two orders of magnitude)."""
    plt = common.pyplot()
    trace = result.get("device_kv_trace") or []
    if plt is None or not trace:
        return
    per_token = result["report"]["kv_bytes_per_token"]
    T = result["context_tokens"]
    steps = range(len(trace))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(steps, [(T + k) * per_token / 2**20 for k in steps], "k--", label="full KV cache (= host mirror)")
    total = result["report"].get("device_total_trace") or []
    if total:
        ax.plot(
            range(len(total)), [b / 2**20 for b in total], label="flashmem, every device byte (held tensors)"
        )
    ax.plot(steps, [b / 2**20 for b in trace], label="flashmem device KV blocks in use (allocator)")
    if result.get("device_bytes"):
        peak = result["device_bytes"]["peak_total"] / 2**20
        ax.axhline(
            peak,
            color="tab:red",
            lw=0.8,
            ls=":",
            label=f"peak of every device byte ({peak:.1f} MiB, prefill)",
        )
    ax.set_yscale("log")
    ax.set_xlabel("decode step (0 = after prefill)")
    ax.set_ylabel("MiB (log scale)")
    ax.set_title(
        f"{result['model']}, {T:,} tokens\npeak {result['peak_device_share']:.2%} of the full KV "
        "(every device byte, prefill included)",
        fontsize=8,
    )
    ax.legend(fontsize=7)
    common.save_figure(fig, png)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.long_context", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=500_000)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--budget-tokens", type=int, default=2048)
    p.add_argument("--prefill-chunk-tokens", type=int, default=2048)
    p.add_argument("--chunk-budget", type=int, default=8)
    p.add_argument("--indexer", default="quest")
    p.add_argument("--quick", action="store_true", help="20K tokens, 32 new tokens")
    p.add_argument("--llama8b", action="store_true", help="CUDA only: Llama-3.1-8B-shaped model in bf16")
    p.add_argument(
        "--flush-denormal",
        action="store_true",
        help="CPU: treat denormal floats as zero (torch.set_flush_denormal) while this entry runs",
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.flush_denormal:
        # far-away tokens give softmax weights below float32's normal range; x86 CPUs compute with
        # such denormals many times slower, a cost that grows with the context and is absent on GPUs
        if not torch.set_flush_denormal(True):
            p.error("--flush-denormal: this CPU does not support flushing denormals")
        try:
            return _main(args)
        finally:
            torch.set_flush_denormal(False)  # torch's default
    return _main(args)


def _main(args) -> int:
    if args.quick:
        args.tokens, args.new_tokens = 20_000, 32
    if args.llama8b and not torch.cuda.is_available():
        print("long_context --llama8b: needs a CUDA device; skipped")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.llama8b else torch.float32
    model = common.random_llama("llama8b" if args.llama8b else "tiny", device, dtype)
    name = (
        "llama-3.1-8b-shaped random-init (bf16)"
        if args.llama8b
        else "tiny llama random-init (2 layers, 4/2 heads, d16)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stats = stats_for(model, RESULTS / ".long_context_stats.safetensors")
    exact = check_exact(model, stats)
    print(f"correctness (budget covers all, recall + sparse prefill == dense): {exact}")
    if not exact:
        raise SystemExit("flashmem disagrees with dense attention; not timing")
    config_kwargs = dict(
        budget_tokens=args.budget_tokens,
        prefill="sparse",
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        indexer=args.indexer,
        chunk_budget=args.chunk_budget,
    )
    result = run(model, stats, args.tokens, args.new_tokens, config_kwargs)
    result.update(
        {
            "benchmark": "long_context",
            "machine": machine(),
            "model": name,
            "correctness_exact": exact,
            "flush_denormal": bool(args.flush_denormal),
        }
    )
    Path(RESULTS / ".long_context_stats.safetensors").unlink(missing_ok=True)
    suffix = "_flush_denormal" if args.flush_denormal else ""
    out = (
        args.json
        or RESULTS / f"long_context_{'llama8b' if args.llama8b else 'tiny'}_{args.tokens}{suffix}.json"
    )
    out.write_text(json.dumps(result, indent=2, default=str))
    plot_trace(result, out.with_suffix(".png"))
    print(
        f"{name}: {args.tokens} tokens + {result['new_tokens']} decoded on {result['machine']['device']}: "
        f"peak device total {result['peak_device_share']:.3%} of the full KV "
        f"({result['device_bytes']['peak_total'] / 2**20:.1f} MiB of {result['full_kv_bytes'] / 2**20:.1f} MiB; "
        f"KV alone {result['peak_device_kv_share']:.3%}), avg {result['avg_device_share']:.3%}; parts "
        f"{ {k: v for k, v in result['device_bytes'].items()} }; host mirror = full KV: "
        f"{result['host_equals_full']}; prefill {result['prefill_tokens_per_s']:.0f} tok/s, decode "
        f"{result['decode_tokens_per_s'] or 0:.1f} tok/s; wrote {out}"
    )
    # the 2% bound (of every device byte the library holds, over the full KV) is the target at 500K
    # tokens; shorter (quick) runs report their share only
    bounded = result["peak_device_share"] < 0.02 or args.tokens < 500_000
    return 0 if result["host_equals_full"] and bounded else 1


if __name__ == "__main__":
    raise SystemExit(main())
