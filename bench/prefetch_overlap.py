"""Decode overlapping the recall prefetch: stall time per decode time with and without prefetching.

    python -m bench.prefetch_overlap [--quick] [--device cuda|cpu] [--json PATH]

The same long prompt is prefilled (sparse) and decoded twice through ``flashmem.wrap`` with a token
budget and lookahead recall: once with ``prefetch_steps=0`` (the next window's chunks are selected,
copied and waited for at the window boundary) and once with ``prefetch_steps > 0`` (selected and
copied that many steps before the boundary on the transfer engine's side stream; at the boundary
the compute stream only waits on copies that have not landed). Reported per run, from
``memory_report()``: stall time (the compute stream waiting on a copy event that had not fired,
timed with CUDA events), decode time, stall fraction = stall / decode time, chunks prefetched vs
loaded on demand, host-to-device bytes; from the host clock (each step ends with the sampled token
read back, so it includes the device work): mean step time, and the mean of the boundary steps and
of the prefetch steps.

Correctness first: with a budget covering the whole context (recalled copies of resident tokens
are all masked), decoding with prefetching must give exactly the tokens of decoding without it;
agreement with dense attention is reported too. A warm-up run compiles the kernels before timing.

On CUDA: a random-init Llama-style model (8 layers, 16/8 heads, head_dim 128, bf16). Without CUDA
it prints a skip message and exits 0; ``--device cpu`` runs a tiny model instead (the CPU backend
copies synchronously inside the prefetch, so it never stalls: stall time 0). Exit status 1 when the
correctness check fails or, on CUDA, when the stall fraction with prefetching is not under 5%.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import common

STALL_TARGET = 0.05


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.prefetch_overlap", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="shorter prompt and fewer decode steps")
    p.add_argument(
        "--tokens", type=int, default=None, help="prompt tokens (default: 16384 on CUDA, 2048 on CPU)"
    )
    p.add_argument(
        "--new-tokens", type=int, default=None, help="decode steps (default: 256 on CUDA, 96 on CPU)"
    )
    p.add_argument(
        "--lookahead", type=int, default=None, help="decode steps per window (default: 32 CUDA, 16 CPU)"
    )
    p.add_argument("--prefetch-steps", type=int, default=8)
    p.add_argument(
        "--chunk-budget", type=int, default=None, help="chunks per window (default: 32 CUDA, 4 CPU)"
    )
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.lookahead = args.lookahead or (32 if args.device == "cuda" else 16)
    if not 0 < args.prefetch_steps < args.lookahead:
        p.error(
            f"--prefetch-steps must be in [1, lookahead) = [1, {args.lookahead}), got {args.prefetch_steps}"
        )
    return args


def _model(device: str):
    if device != "cuda":
        model = common.random_llama("tiny", "cpu", torch.float32)
        return model, "tiny random-init llama (2 layers, 4/2 heads, d16, fp32)"
    return common.random_llama(
        "8layer", device, torch.bfloat16
    ), "random-init llama (8 layers, 16/8 heads, d128, bf16)"


def _ids(model, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(next(model.parameters()).device)


def _config(stats: str, settings: dict, prefetch_steps: int, **overrides):
    import flashmem

    kw = dict(settings, stats_path=stats, prefetch_steps=prefetch_steps, recall_mode="shared")
    kw.update(overrides)
    return flashmem.FlashMemConfig(**kw)


def check_correctness(
    model, stats: str, settings: dict, prefetch_steps: int, prompt: int = 300, new_tokens: int = 40
) -> dict:
    """Budget covering everything: prefetching must not change a token; dense agreement reported."""
    import flashmem

    ids = _ids(model, prompt, 2)
    full = dict(budget_tokens=1024, prefill_chunk_tokens=None, max_context_tokens=4096)
    out = {}
    for p in (0, prefetch_steps):
        fm = flashmem.wrap(model, _config(stats, settings, p, **full))
        out[p] = fm.generate(ids, new_tokens, eos_token_id=None)
    dense = flashmem.wrap(model, flashmem.FlashMemConfig()).generate(ids, new_tokens, eos_token_id=None)
    return {
        "prefetch_equals_on_demand": bool(torch.equal(out[0], out[prefetch_steps])),
        "prefetch_equals_dense": bool(torch.equal(out[prefetch_steps], dense)),
        "report_prefetches": fm.memory_report()["offload"]["prefetches_issued"],
    }


def timed_run(model, stats: str, settings: dict, prefetch_steps: int, tokens: int, new_tokens: int) -> dict:
    import flashmem

    config = _config(stats, settings, prefetch_steps, max_context_tokens=tokens + new_tokens)
    fm = flashmem.wrap(model, config)
    stamps: list[float] = []
    out = fm.generate(
        _ids(model, tokens, 3),
        new_tokens,
        eos_token_id=None,
        stream=lambda _: stamps.append(time.perf_counter()),
    )
    r = fm.memory_report()
    off = r["offload"]
    # stamps[s] is taken when step s's token is known: step s's work (refresh, forward, compaction,
    # sampling) lies between stamps[s] and stamps[s + 1]
    step_ms = [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]
    look = config.lookahead
    boundary = [t for s, t in enumerate(step_ms) if s and s % look == 0]
    ahead = [t for s, t in enumerate(step_ms) if prefetch_steps and (s + prefetch_steps) % look == 0]
    decode_s = r["timings"]["decode_s"]
    return {
        "prefetch_steps": prefetch_steps,
        "decode_steps": r["decode_steps"],
        "new_tokens": int(out.shape[1] - tokens),
        "decode_s": decode_s,
        "mean_step_ms": statistics.mean(step_ms) if step_ms else None,
        "median_step_ms": statistics.median(step_ms) if step_ms else None,
        "boundary_step_ms": statistics.mean(boundary) if boundary else None,
        "prefetch_step_ms": statistics.mean(ahead) if ahead else None,
        "stall_time_s": off["stall_time_s"],
        "stalls": off["stalls"],
        "waits": off["waits"],
        "stall_fraction": off["stall_fraction"],
        "stall_ms_per_boundary": off["stall_time_s"] * 1e3 / len(boundary) if boundary else 0.0,
        "prefetches_issued": off["prefetches_issued"],
        "chunks_prefetched": off["chunks_prefetched"],
        "chunks_loaded_on_demand": off["chunks_loaded_on_demand"],
        "h2d_bytes": off["h2d_bytes"],
        "h2d_gbps": off["h2d_gbps"],
        "backend": off["backend"],
        "peak_device_kv_bytes": r["peak_device_kv_bytes"],
        "pool_blocks": r["pool_blocks"],
        "host_equals_full": r["host_kv_bytes"] == r["full_kv_bytes"],
        "recall_s": r["timings"]["recall_s"],
        "compactions": r["compactions"],
    }


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("prefetch_overlap: skipped: CUDA is not available (run with --device cpu for the CPU path)")
        return 0
    from flashmem import calibrate

    cuda = args.device == "cuda"
    tokens = args.tokens or (16384 if cuda else 2048)
    new_tokens = args.new_tokens or (256 if cuda else 96)
    if args.quick:
        tokens, new_tokens = min(tokens, 8192 if cuda else 600), min(new_tokens, 128 if cuda else 40)
    settings = dict(
        budget_tokens=1024 if cuda else 128,
        compaction_interval=128 if cuda else 32,
        recent_tokens=128 if cuda else 32,
        chunk_size=64 if cuda else 16,
        chunk_budget=args.chunk_budget or (32 if cuda else 4),
        lookahead=args.lookahead,
        prefill="sparse",
        prefill_chunk_tokens=2048 if cuda else 128,
        indexer="quest",
    )
    prefetch_steps = args.prefetch_steps
    model, name = _model(args.device)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        stats_path = str(Path(tmp) / "stats.safetensors")
        calib = _ids(model, 2048 if cuda else 600, 1)[0]
        calibrate(
            model, calib, max_tokens=calib.numel(), tokens_per_forward=calib.numel() // 2, progress=False
        ).save(stats_path)
        check = check_correctness(
            model,
            stats_path,
            settings,
            prefetch_steps,
            *((300, 40) if cuda else (160, settings["lookahead"] + 8)),
        )
        print(
            f"correctness (budget covers all): prefetch == on demand: {check['prefetch_equals_on_demand']}; "
            f"== dense: {check['prefetch_equals_dense']}"
        )
        if not check["prefetch_equals_on_demand"]:
            print("prefetch_overlap: prefetching changed the tokens under a full budget; not timing")
            return 1
        # warm-up: compile every kernel (decode, compaction, scoring) before anything is timed
        timed_run(
            model, stats_path, settings, prefetch_steps, min(tokens, 4 * settings["prefill_chunk_tokens"]), 48
        )
        runs = [timed_run(model, stats_path, settings, p, tokens, new_tokens) for p in (0, prefetch_steps)]
    on_demand, ahead = runs
    device_name = torch.cuda.get_device_name(0) if cuda else common.machine_stamp()["cpu"]
    under = ahead["stall_fraction"] is not None and ahead["stall_fraction"] < STALL_TARGET
    summary = {
        "device": device_name,
        "context_tokens": tokens,
        "decode_steps": ahead["decode_steps"],
        "lookahead": settings["lookahead"],
        "prefetch_steps": prefetch_steps,
        "chunk_budget": settings["chunk_budget"],
        "stall_fraction_on_demand": on_demand["stall_fraction"],
        "stall_fraction_prefetch": ahead["stall_fraction"],
        "stall_ms_per_boundary_on_demand": on_demand["stall_ms_per_boundary"],
        "stall_ms_per_boundary_prefetch": ahead["stall_ms_per_boundary"],
        "mean_step_ms_on_demand": on_demand["mean_step_ms"],
        "mean_step_ms_prefetch": ahead["mean_step_ms"],
        "boundary_step_ms_on_demand": on_demand["boundary_step_ms"],
        "boundary_step_ms_prefetch": ahead["boundary_step_ms"],
        "stall_under_5pct_with_prefetch": under,
        "correct": check["prefetch_equals_on_demand"],
    }
    data = common.header(
        "prefetch_overlap", quick=args.quick, model=name, context_tokens=tokens, new_tokens=new_tokens,
        device=args.device, **settings, prefetch_steps=prefetch_steps,
    )  # fmt: skip
    data.update({"correctness": check, "runs": runs, "summary": summary, "wall_s": time.perf_counter() - t0})
    path, _ = common.result_paths("prefetch_overlap" + ("" if cuda else "_cpu"), args.quick, args.json)
    common.write_json(path, data)
    print(
        f"{name} on {device_name}: {tokens}-token prompt, {ahead['decode_steps']} decode steps, lookahead {settings['lookahead']}"
    )
    print(
        f"{'prefetch_steps':>14} {'stall ms':>9} {'decode s':>9} {'stall/decode':>12} {'step ms':>8} {'boundary ms':>11} {'prefetched':>10} {'on demand':>9}"
    )
    for r in runs:
        frac = r["stall_fraction"] or 0.0
        print(
            f"{r['prefetch_steps']:>14} {r['stall_time_s'] * 1e3:>9.3f} {r['decode_s']:>9.3f} {frac:>12.3%} "
            f"{r['mean_step_ms'] or 0:>8.2f} {r['boundary_step_ms'] or 0:>11.2f} {r['chunks_prefetched']:>10} "
            f"{r['chunks_loaded_on_demand']:>9}"
        )
    if cuda and not under:
        print(
            f"prefetch_overlap: stall fraction with prefetching {ahead['stall_fraction']} is not under {STALL_TARGET:.0%}"
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
