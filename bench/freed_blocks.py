"""Freed blocks: in-place eviction in a paged cache vs in-order compaction, on the same token scores.

    python -m bench.freed_blocks [--quick] [--json PATH] [--model default|none] [--gpu-timing]

A sequence of 16,000 tokens fills 1,000 blocks of 16 slots. For evictions of 50%, 87.5% and 95%:

* in place (vLLM-style masking): evicted slots are only marked empty; a block returns to the pool
  when all 16 of its slots are evicted. Survivors chosen (a) uniformly at random (several seeds,
  mean) beside the closed-form expectation ``1000 * e^16`` (e = evicted share, independent slots)
  and the exact hypergeometric one for exactly-k sampling ``1000 * prod_{i<16} (E - i) / (N - i)``;
  (b) by real TriAttention scores (``--model default``: the embedded default model is calibrated
  on local text with :func:`flashmem.calibrate`, then the keys of one layer
  of other local text are scored per KV head). With per-head keep-sets a slot is empty only when
  every KV head evicted it; the "shared" variant evicts whole tokens by their best head score.
* compaction: the same keep-sets go through a real :class:`flashmem.offload.PagedKVCache`
  and :func:`flashmem.offload.compact_sequence`; freed blocks are read from the
  allocator (``pool.blocks_freed_total``). Survivors are checked to equal the gathered keep-set.

"ideal" = floor(evicted / 16), the blocks the evicted tokens would fill. Writes JSON + a grouped bar
PNG to ``bench/results/freed_blocks.json/.png`` (or beside ``--json``).

``--gpu-timing`` (CUDA only; prints a skip elsewhere) times the scoring and compaction kernels on
128K tokens with Qwen3-8B geometry (see :func:`time_kernels_cuda`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import common

RESULTS = Path(__file__).resolve().parent / "results"
NUM_TOKENS = 16_000
BLOCK_SIZE = 16
EVICTION_RATES = (0.5, 0.875, 0.95)


# ---------------------------------------------------------------------------------------------
# counting
# ---------------------------------------------------------------------------------------------
def inplace_freed(kept: torch.Tensor, num_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks whose every slot is evicted in every head. kept: [N] or [N, H] bool (True = survivor)."""
    occupied = kept if kept.dim() == 1 else kept.any(dim=1)  # [N]
    blocks = occupied[: (num_tokens // block_size) * block_size].view(-1, block_size)
    return int((~blocks.any(dim=1)).sum())


def expected_freed_independent(num_blocks: int, evicted_share: float, block_size: int = BLOCK_SIZE) -> float:
    return num_blocks * evicted_share**block_size


def expected_freed_hypergeometric(
    num_blocks: int, num_tokens: int, evicted: int, block_size: int = BLOCK_SIZE
) -> float:
    """Exactly ``evicted`` of ``num_tokens`` slots chosen uniformly: P(block all evicted) =
    C(N - b, E - b) / C(N, E) = prod_{i<b} (E - i) / (N - i)."""
    p = 1.0
    for i in range(block_size):
        p *= max(evicted - i, 0) / (num_tokens - i)
    return num_blocks * p


def compaction_freed(keep_idx: torch.Tensor, num_tokens: int, *, head_dim: int = 8, seed: int = 0) -> dict:
    """Run the real paged cache + compaction with ``keep_idx [H, n_keep]`` on a ``num_tokens``
    sequence; return blocks freed (from the allocator) and a survivor check."""
    from flashmem.offload import BlockPool, PagedKVCache, compact_sequence

    num_heads = keep_idx.shape[0]
    num_blocks = math.ceil(num_tokens / BLOCK_SIZE)
    pool = BlockPool(1, num_blocks, num_heads, head_dim, block_size=BLOCK_SIZE)
    cache = PagedKVCache(pool)
    seq = cache.add_sequence()
    gen = torch.Generator().manual_seed(seed)
    cache.begin_append(seq, num_tokens)
    keys = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    values = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    cache.write(seq, 0, keys, values, torch.arange(num_tokens))
    cache.end_append(seq)
    blocks_before = pool.blocks_in_use
    freed_before = pool.blocks_freed_total
    t0 = time.perf_counter()
    compact_sequence(cache, seq, keep_idx)
    seconds = time.perf_counter() - t0
    freed = pool.blocks_freed_total - freed_before
    k, v, p = cache.gather(seq, 0)
    heads = torch.arange(num_heads)[:, None]
    ok = (
        torch.equal(k, keys[keep_idx, heads].transpose(0, 1))
        and torch.equal(v, values[keep_idx, heads].transpose(0, 1))
        and torch.equal(p.long(), keep_idx.t())
    )
    return {
        "blocks_before": blocks_before,
        "blocks_freed": freed,
        "blocks_after": pool.blocks_in_use,
        "survivors_match_gather": bool(ok),
        "seconds": seconds,
    }


def keep_from_scores(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """scores [N, H] -> keep_idx [H, n_keep] (top scores per head, sorted)."""
    from flashmem.offload import select_keep

    return select_keep(scores, n_keep)


def keep_mask(keep_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """keep_idx [H, n] -> [N, H] bool."""
    mask = torch.zeros(num_tokens, keep_idx.shape[0], dtype=torch.bool)
    mask.scatter_(0, keep_idx.t(), True)
    return mask


# ---------------------------------------------------------------------------------------------
# real scores from the default model
# ---------------------------------------------------------------------------------------------
def real_scores(num_tokens: int, calib_tokens: int, window: int, layer: int | None) -> dict:
    """Calibrate the default model on local text and score one layer's keys of other local text.

    Returns {"available": False, "reason": ...} when the model cannot be loaded."""
    try:
        from flashmem import load_default_model

        model, tokenizer = load_default_model()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available", reported as such
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}

    from flashmem import calibrate, local_text_token_ids, model_fingerprint
    from flashmem.kernels import aggregate_scores, reference_triattention_score
    from flashmem.testing import pre_rope_keys

    fingerprint = model_fingerprint(model)
    num_layers, num_kv = fingerprint["num_layers"], fingerprint["num_key_value_heads"]
    layer = num_layers // 2 if layer is None else layer
    ids, source = local_text_token_ids(tokenizer, calib_tokens + num_tokens)
    calib_ids, score_ids = ids[:calib_tokens], ids[calib_tokens:]
    t0 = time.perf_counter()
    stats = calibrate(model, calib_ids, max_tokens=calib_tokens, tokens_per_forward=window, progress=False)
    calib_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    pre_keys = pre_rope_keys(model, score_ids, layer, window=window)  # [N, H_kv, D]
    capture_s = time.perf_counter() - t0
    positions = torch.arange(num_tokens, dtype=torch.int32)[:, None].expand(num_tokens, num_kv).contiguous()
    raw = reference_triattention_score(pre_keys, positions, *stats.layer(layer), stats.omega, num_tokens)
    scores = aggregate_scores(raw, num_kv)  # [N, H_kv]
    return {
        "available": True,
        "scores": scores,
        "layer": layer,
        "num_kv_heads": num_kv,
        "calibration_tokens": calib_tokens,
        "scored_tokens": num_tokens,
        "window": window,
        "text": source,
        "calibration_s": round(calib_s, 1),
        "key_capture_s": round(capture_s, 1),
    }


# ---------------------------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------------------------
def run(quick: bool, model: str, layer: int | None) -> dict:
    seeds = 5 if quick else 20
    num_tokens = NUM_TOKENS
    num_blocks = num_tokens // BLOCK_SIZE
    real = None
    if model == "default":
        real = real_scores(
            num_tokens=4096 if quick else num_tokens,
            calib_tokens=1024 if quick else 4096,
            window=2048,
            layer=layer,
        )
    rows = []
    for rate in EVICTION_RATES:
        evicted = round(rate * num_tokens)
        n_keep = num_tokens - evicted
        ideal = evicted // BLOCK_SIZE
        random_freed = []
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            kept = torch.zeros(num_tokens, dtype=torch.bool)
            kept[torch.randperm(num_tokens, generator=gen)[:n_keep]] = True
            random_freed.append(inplace_freed(kept, num_tokens))
        gen = torch.Generator().manual_seed(1000)
        random_keep = torch.randperm(num_tokens, generator=gen)[:n_keep].sort().values[None]  # [1, n_keep]
        comp_random = compaction_freed(random_keep.expand(3, n_keep).contiguous(), num_tokens)
        row = {
            "eviction_rate": rate,
            "evicted_tokens": evicted,
            "kept_tokens": n_keep,
            "ideal_freeable_blocks": ideal,
            "inplace_random": {
                "seeds": seeds,
                "blocks_freed_mean": statistics.fmean(random_freed),
                "blocks_freed_min": min(random_freed),
                "blocks_freed_max": max(random_freed),
                "ratio_to_ideal": statistics.fmean(random_freed) / ideal if ideal else None,
            },
            "inplace_expected_independent": expected_freed_independent(num_blocks, rate),
            "inplace_expected_hypergeometric": expected_freed_hypergeometric(num_blocks, num_tokens, evicted),
            "compaction_random": dict(comp_random, ratio_to_ideal=comp_random["blocks_freed"] / ideal),
        }
        if real is not None and real["available"]:
            scores = real["scores"]
            n_real = scores.shape[0]
            r_evicted = round(rate * n_real)
            r_keep = n_real - r_evicted
            r_ideal = r_evicted // BLOCK_SIZE
            per_head = keep_from_scores(scores, r_keep)  # [H_kv, r_keep]
            shared = keep_from_scores(scores.amax(dim=1, keepdim=True), r_keep)  # [1, r_keep]
            freed_per_head = inplace_freed(keep_mask(per_head, n_real), n_real)
            freed_shared = inplace_freed(keep_mask(shared, n_real), n_real)
            comp = compaction_freed(per_head, n_real)
            row["triattention_scores"] = {
                "tokens": n_real,
                "evicted_tokens": r_evicted,
                "ideal_freeable_blocks": r_ideal,
                "inplace_per_head_blocks_freed": freed_per_head,
                "inplace_per_head_ratio": freed_per_head / r_ideal if r_ideal else None,
                "inplace_shared_blocks_freed": freed_shared,
                "inplace_shared_ratio": freed_shared / r_ideal if r_ideal else None,
                "compaction_blocks_freed": comp["blocks_freed"],
                "compaction_ratio": comp["blocks_freed"] / r_ideal if r_ideal else None,
                "compaction_survivors_match_gather": comp["survivors_match_gather"],
            }
        rows.append(row)
    if real is not None and real.get("available"):
        real_info = {k: v for k, v in real.items() if k != "scores"}
    elif real is not None:
        real_info = {"available": False, "reason": real["reason"]}
    else:
        real_info = {"available": False, "reason": "not requested (--model none)"}
    return {
        "benchmark": "freed_blocks",
        "machine": {
            "node": platform.node(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _triton_version(),
        },
        "model": "SmolLM2-135M-Instruct (embedded default)" if real_info.get("available") else None,
        "real_scores": real_info,
        "tokens": num_tokens,
        "blocks": num_blocks,
        "block_size": BLOCK_SIZE,
        "quick": quick,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
        "acceptance_compaction_frees_100pct_of_ideal": all(
            r["compaction_random"]["blocks_freed"] == r["ideal_freeable_blocks"]
            and ("triattention_scores" not in r or r["triattention_scores"]["compaction_ratio"] == 1.0)
            for r in rows
        ),
    }


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['eviction_rate'] * 100:g}% evicted" for r in rows]
    series = [
        ("ideal floor(evicted/16)", [r["ideal_freeable_blocks"] for r in rows]),
        ("in place, random (mean)", [r["inplace_random"]["blocks_freed_mean"] for r in rows]),
        ("in place, expected (hypergeom.)", [r["inplace_expected_hypergeometric"] for r in rows]),
    ]
    if all("triattention_scores" in r for r in rows):
        series.append(
            (
                "in place, TriAttention (per head)",
                [r["triattention_scores"]["inplace_per_head_blocks_freed"] for r in rows],
            )
        )
        series.append(
            (
                "in place, TriAttention (shared)",
                [r["triattention_scores"]["inplace_shared_blocks_freed"] for r in rows],
            )
        )
        series.append(
            ("compaction, TriAttention", [r["triattention_scores"]["compaction_blocks_freed"] for r in rows])
        )
    series.append(("compaction, random", [r["compaction_random"]["blocks_freed"] for r in rows]))
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(series)
    for i, (name, vals) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        bars = ax.bar(xs, vals, width, label=name)
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in vals], fontsize=7, padding=1)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_ylabel("blocks freed (of 1,000)")
    real = result["real_scores"]
    model = f"; scores: {result['model']}, layer {real['layer']}" if real.get("available") else ""
    ax.set_title(
        f"Freed blocks: {result['tokens']:,} tokens in {result['blocks']:,} blocks of {result['block_size']}{model}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# GPU timing
# ---------------------------------------------------------------------------------------------
def time_kernels_cuda(
    num_tokens: int = 131_072,
    *,
    num_layers: int = 36,
    num_q_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    budget: int = 2048,
    dtype: torch.dtype = torch.bfloat16,
    repeats: int = 10,
    device: str = "cuda",
) -> dict | None:
    """Time TriAttention scoring (one layer, post-RoPE keys) and compaction (all layers, keep
    ``budget`` of ``num_tokens``) on CUDA, after checking both against their references.
    Prints a skip and returns None without CUDA. (``device="cpu"`` runs the same steps under the
    Triton interpreter with wall-clock timing: a smoke check of this function, not a measurement.)"""
    if device == "cuda" and not torch.cuda.is_available():
        print("time_kernels_cuda: skipped (no CUDA device)")
        return None
    from flashmem.kernels import (
        aggregate_scores,
        compaction,
        reference_compaction,
        reference_triattention_score,
        triattention_score,
    )
    from flashmem.offload import select_keep

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    half = head_dim // 2
    keys = torch.randn(num_tokens, num_kv_heads, head_dim, device=dev, generator=gen).to(dtype)
    qr = torch.randn(num_q_heads, half, device=dev, generator=gen)
    qi = torch.randn(num_q_heads, half, device=dev, generator=gen)
    qa = torch.hypot(qr, qi) + torch.rand(num_q_heads, half, device=dev, generator=gen)
    omega = (1.0 / 1e6 ** (torch.arange(half, device=dev) / half)).float()
    t = num_tokens + 5
    # correctness first (a slice, the reference is float64)
    sub = keys[:4096]
    got = triattention_score(sub, None, qr, qi, qa, omega, t, rotated=True)
    ref = reference_triattention_score(sub, None, qr, qi, qa, omega, t, rotated=True)
    score_err = float((got - ref).abs().max() / ref.abs().max())

    out = torch.empty(num_tokens, num_q_heads, device=dev)
    score_ms = common.median_ms(
        lambda: triattention_score(keys, None, qr, qi, qa, omega, t, rotated=True, out=out), dev, 1, repeats
    )
    select_ms = common.median_ms(
        lambda: select_keep(aggregate_scores(out, num_kv_heads), budget), dev, 1, repeats
    )

    # compaction: a pool of num_tokens slots per layer, keep `budget` per head in every layer
    num_blocks = math.ceil(num_tokens / BLOCK_SIZE)
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    pool_k = [torch.randn(shape, device=dev, dtype=dtype) for _ in range(num_layers)]
    pool_v = [torch.randn(shape, device=dev, dtype=dtype) for _ in range(num_layers)]
    pool_p = [torch.arange(num_blocks * BLOCK_SIZE, device=dev, dtype=torch.int32)
              .view(num_blocks, BLOCK_SIZE, 1).expand(shape[:3]).contiguous() for _ in range(num_layers)]  # fmt: skip
    keep = torch.stack(
        [
            torch.randperm(num_tokens, device=dev, generator=gen)[:budget].sort().values
            for _ in range(num_kv_heads)
        ]
    )
    dst = torch.arange(budget, device=dev)
    check = (
        [k[:64].clone() for k in pool_k[:2]],
        [v[:64].clone() for v in pool_v[:2]],
        [p[:64].clone() for p in pool_p[:2]],
    )
    small_keep = keep[:, :100] % (64 * BLOCK_SIZE)
    small_keep = torch.sort(small_keep, dim=1).values
    expected = tuple([x.clone() for x in part] for part in check)
    reference_compaction(*expected, small_keep, dst[:100])
    compaction(*check, small_keep, dst[:100])
    compaction_ok = all(torch.equal(a, b) for pa, pb in zip(check, expected) for a, b in zip(pa, pb))
    compaction_ms = common.median_ms(lambda: compaction(pool_k, pool_v, pool_p, keep, dst), dev, 1, repeats)
    result = {
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu (Triton interpreter)",
        "num_tokens": num_tokens,
        "num_layers": num_layers,
        "geometry": {"H_q": num_q_heads, "H_kv": num_kv_heads, "D": head_dim, "dtype": str(dtype)},
        "budget": budget,
        "score_max_rel_error_vs_fp64_reference": score_err,
        "compaction_matches_reference": compaction_ok,
        "score_one_layer_ms": score_ms,
        "score_all_layers_ms_estimate": score_ms * num_layers,
        "score_gbps": keys.numel() * keys.element_size() / (score_ms * 1e-3) / 1e9,
        "aggregate_and_select_one_layer_ms": select_ms,
        "compaction_all_layers_ms": compaction_ms,
    }
    print(json.dumps(result, indent=2))
    return result


# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.freed_blocks", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="5 seeds; real scores on 4,096 tokens (smoke run)")
    p.add_argument("--json", type=Path, default=None, help="JSON output path (PNG written beside it)")
    p.add_argument(
        "--model", choices=("default", "none"), default="default", help="real scores from the default model"
    )
    p.add_argument("--layer", type=int, default=None, help="layer whose keys are scored (default: middle)")
    p.add_argument(
        "--gpu-timing", action="store_true", help="time the kernels on 128K tokens on CUDA and exit"
    )
    args = p.parse_args(argv)
    if args.gpu_timing:
        time_kernels_cuda()
        return 0
    result = run(args.quick, args.model, args.layer)
    path = args.json or RESULTS / "freed_blocks.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, path.with_suffix(".png"))
    for r in result["rows"]:
        line = (
            f"{r['eviction_rate'] * 100:5.1f}% evicted ({r['evicted_tokens']:>6} tok): ideal {r['ideal_freeable_blocks']:4d} | "
            f"in place random {r['inplace_random']['blocks_freed_mean']:7.2f} "
            f"(hypergeom. {r['inplace_expected_hypergeometric']:7.2f}, e^16 {r['inplace_expected_independent']:7.2f}) | "
            f"compaction {r['compaction_random']['blocks_freed']:4d}"
        )
        if "triattention_scores" in r:
            s = r["triattention_scores"]
            line += (
                f" | TriAttention ({s['tokens']} tok): ideal {s['ideal_freeable_blocks']}, in place per-head "
                f"{s['inplace_per_head_blocks_freed']}, shared {s['inplace_shared_blocks_freed']}, "
                f"compaction {s['compaction_blocks_freed']}"
            )
        print(line)
    print(f"real scores: {result['real_scores'].get('available')} {result['real_scores'].get('reason', '')}")
    print(
        f"compaction frees 100% of ideal at every rate: {result['acceptance_compaction_frees_100pct_of_ideal']}"
    )
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0 if result["acceptance_compaction_frees_100pct_of_ideal"] else 1


if __name__ == "__main__":
    sys.exit(main())
