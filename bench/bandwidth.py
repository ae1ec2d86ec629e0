"""Host-to-device bandwidth of KV chunk recall: batched pinned staging vs pageable vs per-row copies.

    python -m bench.bandwidth [--quick] [--json PATH] [--layers N] [--device auto|cuda|cpu]

A "row" is one token of one layer's K or V: ``[H_kv, D]`` (default H_kv=8, D=128, bf16: 2 KiB).
A chunk of N tokens moves the rows of all layers' K and V: ``[L, 2, N, H_kv, D]``
(L=36 by default: 144 KiB per token, as in Qwen3-8B). The source is a host mirror
``[L, 2, T, H_kv, D]`` (pinned on CUDA); each path moves chunk 1 (rows N..2N-1) of it:

(a) pinned batched: gather the chunk rows into one pinned staging buffer, one ``non_blocking`` copy
    (figures for gather + copy and for the copy alone);
(b) pageable: the same gather into an ordinary (pageable) buffer, one copy;
(c) per-row: one copy per row straight from the mirror (timed on a prefix of the rows when the
    chunk has more than ``--max-row-copies``; the rate is bytes per second of that prefix).

Each path is checked first (the device bytes equal the mirror rows), then timed: repeated until
``--min-time`` seconds have passed (at least 3 runs), median per run. On CUDA the achieved GB/s of
the batched pinned path is reported as a fraction of the best copy measured in this run and of the
64 GB/s PCIe Gen5 x16 theoretical figure. Without CUDA the "device" is host memory: every figure
is a memcpy, not a bus transfer, and pinned = pageable; the output says so.

Writes ``bench/results/bandwidth_<machine>.json`` and ``.png`` (matplotlib, Agg) unless
``--json`` names another path (the PNG goes beside it).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CHUNK_SIZES = (16, 64, 256, 1024, 4096)
PCIE_GEN5_X16_GBPS = 64.0


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.bandwidth", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="4 layers, shorter timing (a smoke run)")
    p.add_argument("--json", type=Path, default=None, help="JSON output path (PNG written beside it)")
    p.add_argument(
        "--layers", type=int, default=None, help="layers whose K and V make a row set (default 36)"
    )
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--min-time", type=float, default=None, help="seconds of timing per figure")
    p.add_argument("--max-row-copies", type=int, default=None, help="cap on timed per-row copies")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op CPU threads for the gathers (default: torch's)",
    )
    p.add_argument("--chunk-sizes", default=",".join(map(str, CHUNK_SIZES)), help="comma-separated tokens")
    args = p.parse_args(argv)
    try:
        args.chunk_sizes = [int(x) for x in args.chunk_sizes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--chunk-sizes must be comma-separated integers, got {args.chunk_sizes!r}")
    if not args.chunk_sizes or min(args.chunk_sizes) < 1:
        p.error("--chunk-sizes needs positive sizes")
    if args.layers is None:
        args.layers = 4 if args.quick else 36
    if args.min_time is None:
        args.min_time = 0.05 if args.quick else 0.3
    if args.max_row_copies is None:
        args.max_row_copies = 2048 if args.quick else 16384
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if min(args.layers, args.kv_heads, args.head_dim, args.max_row_copies) < 1 or args.min_time <= 0:
        p.error("layers, kv heads, head dim and max row copies must be positive; min time > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    return args


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional for this benchmark
        triton_version = None
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "torch": torch.__version__,
        "triton": triton_version,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
    }
    return info


def machine_slug(info: dict) -> str:
    name = info["gpu"] or "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "machine"


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def median_seconds(self, fn, min_time: float, min_runs: int = 3, max_runs: int = 1000) -> float:
        fn()  # warm-up
        self.sync()
        times = []
        spent = 0.0
        while len(times) < min_runs or (spent < min_time and len(times) < max_runs):
            t0 = time.perf_counter()
            fn()
            self.sync()
            dt = time.perf_counter() - t0
            times.append(dt)
            spent += dt
        return statistics.median(times)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.cpu().view(torch.int16), b.cpu().view(torch.int16))


def _measure_chunk(mirror: torch.Tensor, n: int, device: torch.device, timer: _Timer, args) -> dict:
    """Check, then time, the three copy paths for chunk 1 (rows n..2n-1) of ``mirror [L, 2, T, H, D]``."""
    L, _, _, H, D = mirror.shape
    dtype = mirror.dtype
    row_bytes = H * D * mirror.element_size()
    on_cuda = device.type == "cuda"
    rows = slice(n, 2 * n)
    nbytes = L * 2 * n * row_bytes
    expected = mirror[:, :, rows]
    pinned = torch.empty((L, 2, n, H, D), dtype=dtype, pin_memory=on_cuda)
    pageable = torch.empty((L, 2, n, H, D), dtype=dtype)
    dst = torch.empty((L, 2, n, H, D), dtype=dtype, device=device)

    def gather(buf):
        for l in range(L):
            buf[l, 0].copy_(mirror[l, 0, rows])
            buf[l, 1].copy_(mirror[l, 1, rows])

    def batched_pinned():
        gather(pinned)
        dst.copy_(pinned, non_blocking=True)

    def copy_only():
        dst.copy_(pinned, non_blocking=True)

    def batched_pageable():
        gather(pageable)
        dst.copy_(pageable)

    per_row_total = L * 2 * n
    per_row_n = min(per_row_total, args.max_row_copies)
    row_list = [(l, kind, t) for l in range(L) for kind in range(2) for t in range(n)][:per_row_n]

    def per_row():
        for l, kind, t in row_list:
            dst[l, kind, t].copy_(mirror[l, kind, n + t], non_blocking=True)

    # correctness first: poison the destination, run, compare bytes
    checks = {}
    for name, fn in (("pinned_batched", batched_pinned), ("pageable_batched", batched_pageable)):
        dst.fill_(float("nan"))
        fn()
        timer.sync()
        checks[name] = _same_bytes(dst, expected)
    dst.fill_(float("nan"))
    per_row()
    timer.sync()
    got = torch.stack([dst[l, k, t] for l, k, t in row_list])
    want = torch.stack([mirror[l, k, n + t] for l, k, t in row_list])
    checks["per_row"] = _same_bytes(got, want)
    if not all(checks.values()):
        raise RuntimeError(f"copy check failed at chunk {n} tokens: {checks}")

    t_batched = timer.median_seconds(batched_pinned, args.min_time)
    t_copy = timer.median_seconds(copy_only, args.min_time)
    t_pageable = timer.median_seconds(batched_pageable, args.min_time)
    t_row = timer.median_seconds(per_row, args.min_time, max_runs=50)
    entry = {
        "chunk_tokens": n,
        "bytes": nbytes,
        "pinned_batched_gbps": nbytes / t_batched / 1e9,
        "pinned_copy_only_gbps": nbytes / t_copy / 1e9,
        "pageable_batched_gbps": nbytes / t_pageable / 1e9,
        "per_row_gbps": per_row_n * row_bytes / t_row / 1e9,
        "per_row_rows_timed": per_row_n,
        "per_row_rows_total": per_row_total,
        "pinned_batched_s": t_batched,
        "per_row_s_extrapolated": t_row * per_row_total / max(per_row_n, 1),
        "checks": checks,
    }
    entry["batched_speedup_vs_per_row"] = entry["pinned_batched_gbps"] / entry["per_row_gbps"]
    return entry


def run(args) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    L, H, D = args.layers, args.kv_heads, args.head_dim
    dtype = torch.bfloat16
    es = 2
    row_bytes = H * D * es
    sizes = sorted(args.chunk_sizes)
    total_tokens = 2 * sizes[-1]
    gen = torch.Generator().manual_seed(0)
    mirror = torch.empty((L, 2, total_tokens, H, D), dtype=dtype, pin_memory=on_cuda)
    for l in range(L):  # layer by layer: no full-size fp32 temporary
        mirror[l].copy_(torch.randn(mirror.shape[1:], generator=gen).to(dtype))
    timer = _Timer(device)
    results = []
    for n in sizes:
        entry = _measure_chunk(mirror, n, device, timer, args)
        results.append(entry)
        print(
            f"chunk {n:5d} tok ({entry['bytes'] / 2**20:8.2f} MiB): pinned batched "
            f"{entry['pinned_batched_gbps']:7.2f} GB/s (copy only {entry['pinned_copy_only_gbps']:7.2f}), "
            f"pageable {entry['pageable_batched_gbps']:7.2f}, per-row {entry['per_row_gbps']:7.3f} GB/s "
            f"(batched/per-row x{entry['batched_speedup_vs_per_row']:.1f})",
            flush=True,
        )

    best = max(
        max(
            r["pinned_batched_gbps"],
            r["pinned_copy_only_gbps"],
            r["pageable_batched_gbps"],
            r["per_row_gbps"],
        )
        for r in results
    )
    largest = results[-1]
    summary = {
        "best_copy_gbps": best,
        "largest_chunk_tokens": largest["chunk_tokens"],
        "pinned_batched_gbps_largest": largest["pinned_batched_gbps"],
        "pinned_batched_fraction_of_best": largest["pinned_batched_gbps"] / best,
        "pinned_batched_fraction_of_pcie_gen5": (
            largest["pinned_batched_gbps"] / PCIE_GEN5_X16_GBPS if on_cuda else None
        ),
        "per_chunk_fraction_of_best": {r["chunk_tokens"]: r["pinned_batched_gbps"] / best for r in results},
    }
    note = (
        "CUDA: host-to-device over the bus; pinned memory for (a)"
        if on_cuda
        else "NO CUDA: the 'device' is host memory, so every figure is a host memcpy, NOT a PCIe "
        "figure; pinned memory is unavailable, so (a) and (b) differ only in noise"
    )
    return {
        "benchmark": "bandwidth",
        "machine": machine_info(device),
        "note": note,
        "config": {
            "layers": L,
            "kv_heads": H,
            "head_dim": D,
            "dtype": "bf16",
            "row_bytes": row_bytes,
            "bytes_per_token_all_layers": L * 2 * row_bytes,
            "chunk_sizes": sizes,
            "mirror_tokens": total_tokens,
            "min_time_s": args.min_time,
            "max_row_copies": args.max_row_copies,
            "quick": bool(args.quick),
            "cpu_threads": torch.get_num_threads(),
        },
        "results": results,
        "summary": summary,
        "pcie_gen5_x16_theoretical_gbps": PCIE_GEN5_X16_GBPS,
    }


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG", file=sys.stderr)
        return False
    res = report["results"]
    x = [r["chunk_tokens"] for r in res]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (
        ("pinned_batched_gbps", "(a) pinned staging, gather + 1 copy"),
        ("pinned_copy_only_gbps", "(a) pinned, copy only"),
        ("pageable_batched_gbps", "(b) pageable staging, gather + 1 copy"),
        ("per_row_gbps", "(c) one copy per row"),
    ):
        ax.plot(x, [r[key] for r in res], marker="o", label=label)
    if report["machine"]["gpu"]:
        ax.axhline(PCIE_GEN5_X16_GBPS, color="grey", ls="--", lw=1, label="PCIe Gen5 x16 theoretical")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("chunk size (tokens; all layers' K and V per token)")
    ax.set_ylabel("GB/s")
    cfg = report["config"]
    dev = report["machine"]["gpu"] or "CPU only: memcpy, not PCIe"
    ax.set_title(
        f"Host-to-device chunk copies, {dev}\nL={cfg['layers']}, H_kv={cfg['kv_heads']}, D={cfg['head_dim']}, bf16",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = _parse(argv)
    report = run(args)
    json_path = args.json or RESULTS / f"bandwidth_{machine_slug(report['machine'])}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2))
    png = json_path.with_suffix(".png")
    plotted = plot(report, png)
    s = report["summary"]
    print(report["note"])
    print(
        f"best copy {s['best_copy_gbps']:.2f} GB/s; pinned batched at {s['largest_chunk_tokens']} tokens: "
        f"{s['pinned_batched_gbps_largest']:.2f} GB/s = {100 * s['pinned_batched_fraction_of_best']:.0f}% of best"
        + (
            f", {100 * s['pinned_batched_fraction_of_pcie_gen5']:.0f}% of PCIe Gen5 x16 (64 GB/s)"
            if s["pinned_batched_fraction_of_pcie_gen5"] is not None
            else ""
        )
    )
    print(f"wrote {json_path}" + (f" and {png}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
