"""Prefill cost: flashmem's exact, layer-major prefill against a dense Hugging Face prefill of the same ids.

Part A (any machine): the default model (``--quick``: a tiny random-init Llama) at several prompt
lengths, ``budget_tokens=256`` with every other setting at its default. Correctness first: the
first token's logits must equal the dense forward's (fp32, 1e-4 relative) before anything is
timed. Then, interleaved in the same process, the dense prefill (``model(ids, logits_to_keep=1)``,
the whole prompt in one forward) and flashmem's (``generate(ids, 1)``, its ``prefill_s``), the median
of ``--repeats``; and the prefill's host traffic from the host mirror's counters: device-to-host
once per prompt row; host-to-device nothing under the default (each layer's keep-set is written
from its own buffer), the working set with ``triattention_mode="per_head"`` (read back from the mirror
once every layer is scored): independent of the prompt length either way.

Part B (``--llama8b``, CUDA only): a Llama-3.1-8B-shaped random-init model in bf16 at ``--tokens``
(default 131072): prefill seconds against the compute floor (prefill FLOPs divided by the bf16
matmul rate measured in the same run) and peak device memory beyond the weights
(``torch.cuda.max_memory_allocated``) against the bound (pool + one layer's prompt K/V + hidden
states + one tile's activations) and against ``memory_report()["device_bytes"]["peak_total"]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import flashmem
from bench import common

BUDGET = 256


def _prefill_times(model, ids: torch.Tensor, config: flashmem.FlashMemConfig, repeats: int) -> dict:
    device = next(model.parameters()).device
    ids = ids.to(device)
    with torch.no_grad():
        dense_logits = model(ids, logits_to_keep=1).logits[0, -1].float()
    fm = flashmem.wrap(model, config)
    fm.generate(ids, 1, eos_token_id=None, collect_logits=True, progress=False)
    rel = float((fm.step_logits[0] - dense_logits).abs().max() / dense_logits.abs().max())
    if model.dtype == torch.float32 and rel > 1e-4:
        raise RuntimeError(f"first-token logits differ from the dense prefill by {rel:.2e} (relative)")
    dense_s, flash_s = [], []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids, logits_to_keep=1)
        _sync(device)
        dense_s.append(time.perf_counter() - t0)
        fm = flashmem.wrap(model, config)
        fm.generate(ids, 1, eos_token_id=None, progress=False)
        flash_s.append(fm.memory_report()["timings"]["prefill_s"])
    report = fm.memory_report()
    traffic = fm.mirror.traffic() if fm.mirror is not None else {"h2d_bytes": 0, "d2h_bytes": 0}
    return {
        "tokens": int(ids.shape[1]),
        "first_token_logits_rel_diff": rel,
        "dense_prefill_s": statistics.median(dense_s),
        "flashmem_prefill_s": statistics.median(flash_s),
        "ratio": statistics.median(flash_s) / statistics.median(dense_s),
        "dense_runs_s": dense_s,
        "flashmem_runs_s": flash_s,
        "prefill_h2d_bytes": traffic["h2d_bytes"],
        "prefill_d2h_bytes": traffic["d2h_bytes"],
        "full_kv_bytes": report["full_kv_bytes"],
        "peak_device_kv_bytes": report["peak_device_kv_bytes"],
        "peak_pool_kv_bytes": report["peak_pool_kv_bytes"],
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_a(quick: bool, lengths: list[int], repeats: int) -> dict:
    if quick:
        model, stats, name = common.tiny_bench_model(max(lengths) + 16)
        vocab = model.config.vocab_size
        token_ids = [
            torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)) for n in lengths
        ]
    else:
        model, tok, name = common.load_default()
        stats = None
        ids, _ = flashmem.local_text_token_ids(tok, max(lengths), skip_files=40)
        token_ids = [ids[None, :n] for n in lengths]
    rows = []
    for ids in token_ids:
        config = flashmem.FlashMemConfig(budget_tokens=BUDGET, stats_path=stats)
        row = _prefill_times(model, ids, config, repeats)
        print(
            f"{row['tokens']:>7} tokens: dense {row['dense_prefill_s']:.2f} s, flashmem "
            f"{row['flashmem_prefill_s']:.2f} s ({row['ratio']:.2f}x); H2D {row['prefill_h2d_bytes']} B, "
            f"D2H {row['prefill_d2h_bytes']} B"
        )
        rows.append(row)
    return {"model": name, "budget_tokens": BUDGET, "rows": rows}


def _matmul_tflops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def part_b(tokens: int, budget: int) -> dict:
    """8B-shaped bf16 prefill on CUDA: time vs compute floor, peak memory vs bound."""
    device = torch.device("cuda")
    model = common.random_llama("llama8b", device, torch.bfloat16)
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rate = _matmul_tflops(device)
    calib = torch.randint(0, cfg.vocab_size, (2048,), generator=torch.Generator().manual_seed(1)).to(device)
    import tempfile
    from pathlib import Path

    stats = Path(tempfile.mkdtemp()) / "llama8b_stats.safetensors"
    flashmem.calibrate(model, calib, max_tokens=2048, tokens_per_forward=1024, progress=False).save(stats)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(3)).to(device)
    config = flashmem.FlashMemConfig(
        budget_tokens=budget, stats_path=str(stats), max_context_tokens=tokens + 1
    )
    fm = flashmem.wrap(model, config)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fm.generate(ids, 1, eos_token_id=None, progress=True)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    report = fm.memory_report()
    prefill_s = report["timings"]["prefill_s"]
    L, hidden, inter, hq, hkv, d = 32, 4096, 14336, 32, 8, 128
    linear_params = L * (hidden * (hq + 2 * hkv) * d + hq * d * hidden + 3 * hidden * inter)
    attn_flops = L * 2 * 2 * hq * d * tokens * tokens / 2  # QK^T and PV, causal half
    flops = 2 * linear_params * tokens + attn_flops + 2 * hidden * cfg.vocab_size  # LM head on the last token
    tile = config.effective_prefill_chunk
    layer_kv = 2 * tokens * hkv * d * 2
    hidden_states = tokens * hidden * 2
    tile_activations = tile * (2 * inter + 4 * hidden) * 2  # MLP gate/up + attention in/out, bf16
    bound = report["peak_pool_kv_bytes"] + layer_kv + hidden_states + tile_activations
    return {
        "model": "Llama-3.1-8B-shaped random-init (32 layers, 32/8 heads, head_dim 128), bf16",
        "device": torch.cuda.get_device_name(device),
        "tokens": tokens,
        "budget_tokens": budget,
        "weights_bytes": weights,
        "matmul_tflops_bf16": rate,
        "prefill_flops": flops,
        "compute_floor_s": flops / (rate * 1e12),
        "prefill_s": prefill_s,
        "prefill_over_floor": prefill_s / (flops / (rate * 1e12)),
        "peak_device_bytes_beyond_weights": peak,
        "bound_bytes": bound,
        "bound_parts": {
            "pool_peak": report["peak_pool_kv_bytes"],
            "one_layer_prompt_kv": layer_kv,
            "hidden_states": hidden_states,
            "tile_activations_estimate": tile_activations,
        },
        "within_bound": peak <= bound,
        # the report's own count of every byte flashmem holds (its peak over the call), beside what
        # the allocator saw beyond the weights: the gap is the model's activations (tile MLP, etc.)
        "report_peak_total_bytes": report["device_bytes"]["peak_total"],
        "report_device_bytes": report["device_bytes"],
        "allocator_minus_report_bytes": peak - report["device_bytes"]["peak_total"],
        "prefill_h2d_bytes": fm.mirror.traffic()["h2d_bytes"],
    }


def _plot(a: dict, png) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    rows = a["rows"]
    x = [r["tokens"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    a1.plot(x, [r["dense_prefill_s"] for r in rows], "o-", label="dense Hugging Face prefill")
    a1.plot(x, [r["flashmem_prefill_s"] for r in rows], "s-", label=f"flashmem, budget {a['budget_tokens']}")
    a1.set_xlabel("prompt tokens")
    a1.set_ylabel("seconds")
    a1.set_title("prefill time (same process)", fontsize=9)
    a1.legend(fontsize=7)
    a2.plot(x, [r["prefill_d2h_bytes"] / 2**20 for r in rows], "o-", label="device-to-host (mirror writes)")
    a2.plot(x, [r["prefill_h2d_bytes"] / 2**20 for r in rows], "s-", label="host-to-device (read-back)")
    a2.set_xlabel("prompt tokens")
    a2.set_ylabel("MiB")
    a2.set_title("prefill host traffic", fontsize=9)
    a2.legend(fontsize=7)
    fig.suptitle(a["model"], fontsize=9)
    common.save_figure(fig, png)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run prefill-cost", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random-init model, short prompts")
    p.add_argument("--lengths", default=None, help="comma-separated prompt lengths (default 2048,4096,6700)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method (median; default 2)")
    p.add_argument("--llama8b", action="store_true", help="CUDA only: part B, the 8B-shaped model")
    p.add_argument("--tokens", type=int, default=131072, help="part B prompt tokens")
    p.add_argument("--json", default=None, help="output JSON path (PNG beside it)")
    args = p.parse_args(argv)
    q = args.quick
    lengths = (
        [int(x) for x in args.lengths.split(",")]
        if args.lengths
        else ([512, 1024, 2048] if q else [2048, 4096, 6700])
    )
    repeats = args.repeats or (1 if q else 2)
    if min(lengths) < 2 or repeats < 1:
        p.error("lengths must be >= 2 and --repeats >= 1")
    json_path, png = common.result_paths("prefill_cost" + ("_llama8b" if args.llama8b else ""), q, args.json)
    if args.llama8b:
        if not torch.cuda.is_available():
            print("prefill-cost --llama8b: needs a CUDA device; skipped")
            return 0
        data = common.header("prefill-cost", quick=q, model="Llama-3.1-8B-shaped", tokens=args.tokens)
        data["part_b"] = part_b(args.tokens, 2048)
        common.write_json(json_path, data)
        print({k: v for k, v in data["part_b"].items() if k != "bound_parts"})
        return 0
    a = part_a(q, lengths, repeats)
    data = common.header(
        "prefill-cost",
        quick=q,
        model=a["model"],
        lengths=lengths,
        repeats=repeats,
        budget_tokens=BUDGET,
        what="prefill seconds (flashmem's timings.prefill_s vs one dense forward of the same ids), host traffic",
    )
    data["part_a"] = a
    data["summary"] = {
        "max_ratio": max(r["ratio"] for r in a["rows"]),
        "h2d_bytes": [r["prefill_h2d_bytes"] for r in a["rows"]],
    }
    common.write_json(json_path, data)
    _plot(a, png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
