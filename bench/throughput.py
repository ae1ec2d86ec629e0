"""Decode throughput: flashmem vs full attention at the same context, and flashmem's step time at long
vs short context (a bounded cache should make it flat: ideal ratio 1.0).

    python -m bench.run throughput [--quick] [--context 4096] [--steps 64]
                                   [--flashmem-config JSON] [--short 512] [--long 16384] [--json PATH]

Part A (default model; the tiny model with ``--quick``): a prompt of ``--context`` tokens of local text,
then ``--steps`` greedy decode steps with (a) full attention: plain Hugging Face forward with
``DynamicCache``, time per step measured around each forward; (b) flashmem for each config, time between successive tokens (generate's ``stream`` callback), so
compaction and recall are included. Step figures are MEDIANS over the steps (robust to a shared
machine's stalls; means are in the JSON too); tokens/s = 1 / median step time, and the ratio
flashmem / full attention is measured in the same run on the same machine.
Correctness first: flashmem without a budget generates exactly full attention's tokens.

Part B (tiny random-init Llama, random tokens): flashmem under a budget at a short and a long prompt,
mean decode step time at each and the ratio long / short; full attention's ratio beside it; the
``timings`` breakdown (prefill, decode, compaction, recall seconds) per run.

On this CPU-only machine every figure is CPU time, shared with whatever else runs (the load average
is in the stamp); the GPU figures need a CUDA machine (not measured here).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench import common, metrics

DEFAULT_CONFIGS = [{}, {"budget_tokens": 512}]


def _fm_rate(run: dict, steps: int) -> dict:
    rep = run["report"]
    t = rep.get("timings") or {}
    n = rep.get("decode_steps") or (steps - 1)
    decode_s = t.get("decode_s", 0.0)
    med = statistics.median(run["step_s"]) if run["step_s"] else decode_s / max(n, 1)
    return {
        "decode_steps": n,
        "decode_s": decode_s,
        "mean_step_ms": 1000 * decode_s / n if n else None,
        "step_ms": 1000 * med,
        "tokens_per_s": 1.0 / med if med else None,
        "timings": t,
        # decode steps only: compaction and recall done during prefill are not counted here
        "timings_per_step_ms": {k: 1000 * v / n for k, v in run["decode_timings"].items() if n},
        "avg_device_share": rep.get("avg_device_share"),
        "compactions": rep.get("compactions"),
    }


def _hf_rate(ref: dict) -> dict:
    s = ref["step_s"]
    total = sum(s)
    med = statistics.median(s) if s else None
    return {
        "decode_steps": len(s),
        "decode_s": total,
        "mean_step_ms": 1000 * total / len(s) if s else None,
        "step_ms": 1000 * med if med else None,
        "tokens_per_s": 1.0 / med if med else None,
        "prefill_s": ref["prefill_s"],
    }


def part_a(model, ids, configs, steps, stats_path) -> dict:
    ref = common.hf_decode(model, ids, steps, collect_logits=False)
    check = common.flashmem_decode(model, {}, ids, steps, collect_logits=False, stats_path=stats_path)
    if check["tokens"] != ref["tokens"]:
        raise AssertionError("flashmem without a budget must generate full attention's tokens")
    full = _hf_rate(ref)
    rows = []
    for cfg in configs:
        run = (
            check
            if not cfg
            else common.flashmem_decode(model, cfg, ids, steps, collect_logits=False, stats_path=stats_path)
        )
        r = {"method": common.config_label(cfg), "flashmem_config": cfg, **_fm_rate(run, steps)}
        r["ratio_vs_full"] = r["tokens_per_s"] / full["tokens_per_s"] if r["tokens_per_s"] else None
        r["tokens_agree_with_full"] = metrics.token_agreement(ref["tokens"], run["tokens"])
        rows.append(r)
        print(
            f"  T={ids.shape[1]} {r['method']}: {r['tokens_per_s']:.2f} tok/s "
            f"({r['ratio_vs_full']:.2f}x full attention's {full['tokens_per_s']:.2f})"
        )
    return {
        "context_tokens": ids.shape[1],
        "steps": steps,
        "check_tokens_equal": True,
        "full_attention": full,
        "flashmem": rows,
    }


def part_b(model, stats_path, cfg, short, long, steps) -> dict:
    out = {"flashmem_config": cfg, "steps": steps, "runs": {}}
    for name, T in (("short", short), ("long", long)):
        ids = torch.randint(0, model.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        run = common.flashmem_decode(model, cfg, ids, steps, collect_logits=False, stats_path=stats_path)
        ref = common.hf_decode(model, ids, steps, collect_logits=False)
        out["runs"][name] = {
            "context_tokens": T,
            "flashmem": _fm_rate(run, steps),
            "full_attention": _hf_rate(ref),
        }
        print(
            f"  tiny T={T}: flashmem {out['runs'][name]['flashmem']['step_ms']:.2f} ms/step, "
            f"full attention {out['runs'][name]['full_attention']['step_ms']:.2f} ms/step"
        )
    s, l_ = out["runs"]["short"], out["runs"]["long"]
    out["flashmem_long_over_short"] = l_["flashmem"]["step_ms"] / s["flashmem"]["step_ms"]
    out["full_long_over_short"] = l_["full_attention"]["step_ms"] / s["full_attention"]["step_ms"]
    print(
        f"  step time long/short: flashmem {out['flashmem_long_over_short']:.2f} (ideal 1.0), "
        f"full attention {out['full_long_over_short']:.2f}"
    )
    return out


def _plot(a: dict, b: dict, png) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    labels = ["full attention"] + [r["method"].replace("flashmem ", "fm ") for r in a["flashmem"]]
    vals = [a["full_attention"]["tokens_per_s"]] + [r["tokens_per_s"] for r in a["flashmem"]]
    a1.bar(labels, vals, color=["gray"] + ["tab:blue"] * len(a["flashmem"]))
    a1.set_ylabel("decode tokens/s")
    a1.set_title(f"{a['model_short']}, context {a['context_tokens']} tokens", fontsize=9)
    a1.tick_params(axis="x", labelsize=7, rotation=15)
    names = ["short", "long"]
    x = range(2)
    a2.bar([i - 0.2 for i in x], [b["runs"][n]["flashmem"]["step_ms"] for n in names], 0.4, label="flashmem")
    a2.bar(
        [i + 0.2 for i in x],
        [b["runs"][n]["full_attention"]["step_ms"] for n in names],
        0.4,
        label="full attention",
        color="gray",
    )
    a2.set_xticks(list(x), [f"{n}: {b['runs'][n]['context_tokens']} tok" for n in names])
    a2.set_ylabel("ms per decode step")
    a2.set_title(
        f"tiny model, {common.config_label(b['flashmem_config'])}: long/short "
        f"{b['flashmem_long_over_short']:.2f} (full {b['full_long_over_short']:.2f})",
        fontsize=8,
    )
    a2.legend(fontsize=7)
    fig.suptitle("CPU-only decode timing (shared machine; see load average in the JSON)", fontsize=9)
    common.save_figure(fig, png)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run throughput", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model only, short contexts")
    p.add_argument(
        "--context", type=int, default=None, help="part A prompt tokens (default 4096; quick 2048)"
    )
    p.add_argument("--steps", type=int, default=None, help="decode steps (default 64; quick 32)")
    p.add_argument("--flashmem-config", default=None, help="JSON object or list of FlashMemConfig kwargs")
    p.add_argument(
        "--budget-config", default=None, help='part B config JSON (default {"budget_tokens": 256})'
    )
    p.add_argument("--short", type=int, default=512)
    p.add_argument("--long", type=int, default=None, help="part B long prompt (default 16384; quick 4096)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    q = args.quick
    default = [{}, {"budget_tokens": 256}] if q else DEFAULT_CONFIGS
    configs = common.parse_configs(args.flashmem_config, default)
    b_cfg = common.parse_configs(args.budget_config, [{"budget_tokens": 256}])[0]
    context = args.context or (2048 if q else 4096)
    steps = args.steps or (32 if q else 64)
    long = args.long or (4096 if q else 16384)
    if steps < 2 or min(context, args.short, long) < 1:
        p.error("--steps >= 2 and positive lengths")
    json_path, png = common.result_paths("throughput", q, args.json)

    tiny, stats_path, tiny_desc = common.tiny_bench_model(max(long, context) + steps + 16)
    if q:
        ids = torch.randint(
            0, tiny.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(7)
        )
        a = part_a(tiny, ids, configs, steps, stats_path)
        a.update(model=tiny_desc, model_short="tiny Llama")
    else:
        from flashmem import local_text_token_ids

        model, tok, name = common.load_default()
        ids, _ = local_text_token_ids(tok, context)
        a = part_a(model, ids[None], configs, steps, None)
        a.update(model=name, model_short="SmolLM2-135M")
        del model
    b = part_b(tiny, stats_path, b_cfg, args.short, long, steps)
    b["model"] = tiny_desc
    data = common.header(
        "throughput",
        quick=q,
        model=a["model"],
        context_tokens=context,
        steps=steps,
        flashmem_configs=configs,
        part_b_config=b_cfg,
        part_b_contexts=[args.short, long],
        attention_note="CPU: flashmem's decode attention is the torch reference "
        "(attention_backend auto); Triton kernels are timed on CUDA only",
    )
    data.update(part_a=a, part_b=b)
    common.write_json(json_path, data)
    _plot(a, b, png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
