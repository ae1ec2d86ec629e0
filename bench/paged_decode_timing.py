"""Time the paged decode attention kernel against torch SDPA on the same data.

    python -m bench.paged_decode_timing [--json PATH] [--lengths 4096,32768,131072]

For each context length: one query token (B=1, H_q=32, H_kv=8, D=128, bf16 by default). SDPA reads
dense contiguous K/V ``[B, H_kv, S, D]``; the kernel reads the same tokens scattered over shuffled
16-slot blocks of a larger pool. Correctness is checked first (kernel and SDPA against an fp32
SDPA); then each is timed with CUDA events after warm-up (median per call, host launch included).
Every SDPA backend that accepts the inputs is timed and the fastest is the baseline.
Writes JSON (machine, torch/triton/CUDA versions, settings, per-length figures) and, when
matplotlib is installed, a PNG beside it. Without CUDA it prints a skip message and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import common

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "paged_decode_timing.json"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench.paged_decode_timing", description=__doc__.split("\n")[0]
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the JSON results")
    p.add_argument("--lengths", default="4096,32768,131072", help="comma-separated context lengths (tokens)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    except ValueError:
        p.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    if not args.lengths or min(args.lengths) < 1:
        p.error("--lengths needs at least one positive length")
    if args.q_heads % args.kv_heads:
        p.error(f"--q-heads ({args.q_heads}) must be a multiple of --kv-heads ({args.kv_heads})")
    if min(args.batch, args.block_size, args.head_dim, args.iters) < 1 or args.warmup < 0:
        p.error("batch, block size, head dim and iters must be positive; warmup non-negative")
    return args


def _backend_context(backend):
    from torch.nn.attention import sdpa_kernel

    return lambda: sdpa_kernel([backend])


def _sdpa_backends():
    """(name, context manager factory) for each SDPA backend this torch exposes."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:  # pragma: no cover - old torch
        return []
    names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    return [(n.lower(), _backend_context(getattr(SDPBackend, n))) for n in names if hasattr(SDPBackend, n)]


def _graph_time_ms(fn, device: torch.device, warmup: int, iters: int) -> float | None:
    """Median ms per replay of ``fn`` captured in a CUDA graph (device time without host launch
    cost); None when capture fails or off CUDA."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return common.median_ms(graph.replay, device, warmup, iters)
    except RuntimeError:
        return None


def _sdpa(q, k, v, scale):
    """q [B, H_q, 1, D], k/v [B, H_kv, S, D] -> [B, H_q, 1, D] with GQA."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def run_length(seq_len: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    """Build one case of ``seq_len`` tokens, check correctness, time kernel and SDPA."""
    from flashmem.kernels import block_valid_from_num_slots, paged_decode_attention

    gen = torch.Generator(device="cpu").manual_seed(args.seed + seq_len)
    b, hq, hkv, d, bs = args.batch, args.q_heads, args.kv_heads, args.head_dim, args.block_size
    scale = d**-0.5
    blocks_per_seq = math.ceil(seq_len / bs)
    num_blocks = b * blocks_per_seq + max(8, (b * blocks_per_seq) // 4)  # a larger pool than needed

    q = torch.randn(b, hq, d, generator=gen).to(device, dtype)  # [B, H_q, D]
    k_dense = torch.randn(b, hkv, seq_len, d, generator=gen).to(device, dtype)  # [B, H_kv, S, D]
    v_dense = torch.randn(b, hkv, seq_len, d, generator=gen).to(device, dtype)
    key_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(device, dtype)  # unused blocks: noise
    value_cache = torch.randn(num_blocks, bs, hkv, d, generator=gen).to(device, dtype)
    perm = torch.randperm(num_blocks, generator=gen)[: b * blocks_per_seq].view(b, blocks_per_seq)
    pad = blocks_per_seq * bs - seq_len
    for i in range(b):
        ids = perm[i].to(device)
        for dense, cache in ((k_dense, key_cache), (v_dense, value_cache)):
            tokens = dense[i].transpose(0, 1)  # [S, H_kv, D]
            if pad:
                tokens = torch.cat([tokens, tokens.new_zeros(pad, hkv, d)])
            cache[ids] = tokens.reshape(blocks_per_seq, bs, hkv, d)
    tables = perm.to(device=device, dtype=torch.int32)  # [B, max_blocks], shuffled pool ids
    valid = block_valid_from_num_slots(torch.full((b,), seq_len, device=device), blocks_per_seq, bs)
    del perm

    q4 = q[:, :, None, :]  # [B, H_q, 1, D]
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, dtype=torch.float32, device=device)

    # ---- correctness first -------------------------------------------------------------------
    exact = _sdpa(q4.float(), k_dense.float(), v_dense.float(), scale)[:, :, 0]  # fp32 truth
    paged_decode_attention(q, key_cache, value_cache, tables, valid, scale=scale, out=out, lse_out=lse)
    sdpa_out = _sdpa(q4, k_dense, v_dense, scale)[:, :, 0]
    kernel_err = (out.float() - exact).abs().max().item()
    sdpa_err = (sdpa_out.float() - exact).abs().max().item()
    kernel_vs_sdpa = (out.float() - sdpa_out.float()).abs().max().item()
    tol = ATOL[dtype]
    ok = kernel_vs_sdpa <= tol and kernel_err <= tol and math.isfinite(kernel_err)
    result = {
        "context_tokens": seq_len,
        "num_blocks_attended": b * blocks_per_seq,
        "pool_blocks": num_blocks,
        "max_abs_err_kernel_vs_fp32": kernel_err,
        "max_abs_err_sdpa_vs_fp32": sdpa_err,
        "max_abs_diff_kernel_vs_sdpa": kernel_vs_sdpa,
        "tolerance": tol,
        "correct": ok,
    }
    if not ok:
        return result

    # ---- timing ------------------------------------------------------------------------------
    def kernel(splits=None):
        return lambda: paged_decode_attention(
            q, key_cache, value_cache, tables, valid, scale=scale, num_splits=splits, out=out, lse_out=lse
        )

    result["kernel_ms"] = common.median_ms(kernel(), device, args.warmup, args.iters)
    result["kernel_1split_ms"] = common.median_ms(kernel(1), device, args.warmup, args.iters)
    result["kernel_graph_ms"] = _graph_time_ms(kernel(), device, args.warmup, args.iters)
    sdpa_ms: dict[str, float] = {}
    sdpa_graph_ms: dict[str, float] = {}
    for name, ctx in _sdpa_backends() or [("default", None)]:
        try:
            if ctx is None:
                sdpa_ms[name] = common.median_ms(
                    lambda: _sdpa(q4, k_dense, v_dense, scale), device, args.warmup, args.iters
                )
                continue
            with ctx():
                check = _sdpa(q4, k_dense, v_dense, scale)[:, :, 0]
                if (check.float() - exact).abs().max().item() > tol:
                    continue
                sdpa_ms[name] = common.median_ms(
                    lambda: _sdpa(q4, k_dense, v_dense, scale), device, args.warmup, args.iters
                )
        except RuntimeError:  # backend does not take these inputs (dtype, GQA, device)
            continue
    result["sdpa_ms_by_backend"] = sdpa_ms
    result["sdpa_graph_ms_by_backend"] = sdpa_graph_ms
    if result["kernel_graph_ms"] is not None and sdpa_graph_ms:
        best_graph = min(sdpa_graph_ms, key=sdpa_graph_ms.get)
        result["sdpa_best_graph_backend"] = best_graph
        result["sdpa_best_graph_ms"] = sdpa_graph_ms[best_graph]
        result["graph_speedup_vs_sdpa_best"] = sdpa_graph_ms[best_graph] / result["kernel_graph_ms"]
    if sdpa_ms:
        best = min(sdpa_ms, key=sdpa_ms.get)
        result["sdpa_best_backend"] = best
        result["sdpa_best_ms"] = sdpa_ms[best]
        result["speedup_vs_sdpa_best"] = sdpa_ms[best] / result["kernel_ms"]
    kv_bytes = 2 * b * seq_len * hkv * d * key_cache.element_size()
    result["kv_bytes"] = kv_bytes
    result["kernel_kv_GBps"] = kv_bytes / (result["kernel_ms"] * 1e-3) / 1e9
    if result.get("kernel_graph_ms"):
        result["kernel_graph_kv_GBps"] = kv_bytes / (result["kernel_graph_ms"] * 1e-3) / 1e9
    if sdpa_ms:
        result["sdpa_best_kv_GBps"] = kv_bytes / (result["sdpa_best_ms"] * 1e-3) / 1e9
    return result


def _machine(device: torch.device) -> dict:
    import triton

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_capability=f"{props.major}.{props.minor}",
            gpu_sm_count=props.multi_processor_count,
            gpu_memory_GiB=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return info


def _plot(results: list[dict], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timed = [r for r in results if "kernel_ms" in r]
    if not timed:
        return None
    xs = [r["context_tokens"] for r in timed]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [r["kernel_ms"] for r in timed], "o-", label="paged kernel (shuffled blocks)")
    ax.plot(xs, [r["kernel_1split_ms"] for r in timed], "s--", label="paged kernel, 1 split")
    if all("sdpa_best_ms" in r for r in timed):
        ax.plot(xs, [r["sdpa_best_ms"] for r in timed], "^-", label="torch SDPA (dense, best backend)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context tokens")
    ax.set_ylabel("ms per decode step (one layer)")
    ax.set_title("paged decode attention vs SDPA")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("paged_decode_timing: skipped: CUDA is not available (this benchmark times GPU kernels)")
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype]
    machine = _machine(device)
    print(
        f"paged_decode_timing on {machine.get('gpu')} (torch {machine['torch']}, triton {machine['triton']}): "
        f"B={args.batch} H_q={args.q_heads} H_kv={args.kv_heads} D={args.head_dim} {args.dtype} "
        f"block_size={args.block_size}"
    )
    results = []
    for seq_len in args.lengths:
        r = run_length(seq_len, args, device, dtype)
        results.append(r)
        torch.cuda.empty_cache()
    nan = float("nan")
    header = (
        f"{'tokens':>8} {'kernel ms':>10} {'1-split ms':>10} {'SDPA ms':>9} {'SDPA backend':>20} {'speedup':>8}"
        f" {'graph kern':>10} {'graph SDPA':>10} {'speedup':>8} {'kern GB/s':>10} {'max err':>9}"
    )
    print(header)
    failed = False
    for r in results:
        if not r["correct"]:
            failed = True
            print(
                f"{r['context_tokens']:>8} INCORRECT: kernel vs SDPA {r['max_abs_diff_kernel_vs_sdpa']:.3g}, "
                f"kernel vs fp32 {r['max_abs_err_kernel_vs_fp32']:.3g} (tolerance {r['tolerance']})"
            )
            continue
        graph_kernel = r.get("kernel_graph_ms")
        print(
            f"{r['context_tokens']:>8} {r['kernel_ms']:>10.4f} {r['kernel_1split_ms']:>10.4f} "
            f"{r.get('sdpa_best_ms', nan):>9.4f} {r.get('sdpa_best_backend', '-'):>20} "
            f"{r.get('speedup_vs_sdpa_best', nan):>7.2f}x "
            f"{graph_kernel if graph_kernel is not None else nan:>10.4f} {r.get('sdpa_best_graph_ms', nan):>10.4f} "
            f"{r.get('graph_speedup_vs_sdpa_best', nan):>7.2f}x "
            f"{r.get('kernel_graph_kv_GBps', r['kernel_kv_GBps']):>10.1f} {r['max_abs_err_kernel_vs_fp32']:>9.2e}"
        )
    print(
        "ms = median per call with host launch; graph = median CUDA-graph replay (device time); "
        "GB/s = K+V bytes / graph time (per-call time when no graph)"
    )
    payload = {
        "benchmark": "paged_decode_timing",
        "machine": machine,
        "settings": {
            "batch": args.batch,
            "q_heads": args.q_heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "block_size": args.block_size,
            "dtype": args.dtype,
            "warmup": args.warmup,
            "iters": args.iters,
            "timing": "median per call, CUDA events around each call (host launch included); "
            "*_graph_ms: median replay of the call captured in a CUDA graph",
            "layout": "SDPA: dense contiguous [B, H_kv, S, D]; kernel: shuffled blocks of a larger pool",
        },
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    png = _plot(results, args.json.with_suffix(".png"))
    print(f"wrote {args.json}" + (f" and {png}" if png else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
