"""Device KV memory over a long decode: bytes from the block allocator at every step vs the full cache.

    python -m bench.run memory [--quick] [--flashmem-config JSON] [--steps N] [--contexts 8192]
                               [--tiny-contexts 16384,65536] [--json PATH]

For each prompt (real local text, see ``flashmem.local_text_token_ids``; random
tokens on the tiny model) and each flashmem setting, ``generate`` runs ``--steps`` decode steps and
the device KV bytes are recorded after every step: the wrapper's own per-step trace
(``memory_report()["device_kv_trace"]``) when it has one, else the allocator's ``pool.device_kv_bytes``
read in generate's ``stream`` callback. Index k of the trace is taken at logical length T + k.
The full cache's line is ``(T + k) x kv_bytes_per_token`` (a dense cache of the same tokens).

Correctness first: with no budget, on the tiny model, every traced figure must equal
``ceil((T + k) / block_size) x block bytes`` and the greedy tokens must equal Hugging Face's.

Reported per run: device share of the full KV at the end, its average over steps (prefill included,
from the wrapper) and peak; blocks freed; compactions; the same figures recomputed from the trace.
Default model: SmolLM2-135M (8K-token prompts; 32K with ``--contexts 8192,32768``, beyond the model's
trained 8K positions, which does not change the memory figures). Tiny model: larger contexts.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from bench import common

DEFAULT_CONFIGS = [{"budget_tokens": 512}]
TINY_CONFIGS = [{"budget_tokens": 256}]


def _check_exact(model, stats_path) -> dict:
    """No budget: the trace equals whole blocks of the logical length; tokens equal HF greedy."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 100), generator=g)
    ref = common.hf_decode(model, ids, 40, collect_logits=False)
    run = common.flashmem_decode(model, {}, ids, 40, collect_logits=False, stats_path=stats_path)
    rep = run["report"]
    block_bytes, bs = rep["kv_block_bytes"], rep["block_size"]
    expected = [math.ceil((100 + k) / bs) * block_bytes for k in range(len(run["trace"]))]
    ok_trace = run["trace"] == expected
    ok_tokens = run["tokens"] == ref["tokens"]
    if not (ok_trace and ok_tokens):
        raise AssertionError(
            f"memory check failed: trace exact={ok_trace}, tokens equal to Hugging Face={ok_tokens}"
        )
    return {"trace_equals_whole_blocks": ok_trace, "tokens_equal_hf": ok_tokens, "steps": len(run["trace"])}


def _measure(model, ids, cfg, steps, stats_path, label) -> dict:
    t0 = time.perf_counter()
    run = common.flashmem_decode(model, cfg, ids, steps, collect_logits=False, stats_path=stats_path)
    rep = run["report"]
    T = ids.shape[1]
    per_tok = rep["kv_bytes_per_token"]
    trace = run["trace"]
    full = [(T + k) * per_tok for k in range(len(trace))]
    shares = [d / f for d, f in zip(trace, full)]
    # exact accounting: the last figure of the trace is whole blocks
    if rep["device_kv_bytes"] != rep["blocks_in_use"] * rep["kv_block_bytes"]:
        raise AssertionError("device_kv_bytes != blocks_in_use x kv_block_bytes")
    out = {
        "label": label,
        "flashmem_config": cfg,
        "prompt_tokens": T,
        "decode_steps": steps,
        "trace_source": run["trace_source"],
        "device_kv_trace": trace,
        "full_kv_trace": full,
        "device_share_end": rep.get("device_share"),
        "avg_device_share": rep.get("avg_device_share"),
        "peak_device_share": rep.get("peak_device_share"),
        "peak_device_kv_share": rep.get("peak_device_kv_share"),
        "avg_device_kv_share": rep.get("avg_device_kv_share"),
        "device_bytes": rep.get("device_bytes"),
        "trace_avg_share": sum(shares) / len(shares) if shares else None,
        "trace_max_share": max(shares) if shares else None,
        "trace_max_bytes": max(trace) if trace else None,
        "peak_device_kv_bytes": rep.get("peak_device_kv_bytes"),
        "pool_capacity_bytes": rep.get("pool_capacity_bytes"),
        "full_kv_bytes_end": rep.get("full_kv_bytes"),
        "host_kv_bytes": rep.get("host_kv_bytes"),
        "blocks_freed": rep.get("blocks_freed"),
        "compactions": rep.get("compactions"),
        "timings": rep.get("timings"),
        "wall_s": time.perf_counter() - t0,
    }
    print(
        f"  {label}: T={T} steps={steps} end share={out['device_share_end']:.3f} "
        f"avg={out['avg_device_share']:.3f} peak={out['peak_device_share']:.3f} "
        f"max device={_mib(out['trace_max_bytes'])} vs full {_mib(full[-1] if full else 0)} ({out['wall_s']:.0f} s)"
    )
    return out


def _mib(n) -> str:
    return f"{(n or 0) / 2**20:.1f} MiB"


def _plot(runs: list[dict], png) -> None:
    plt = common.pyplot()
    if plt is None or not runs:
        return
    n = len(runs)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, r in zip(axes.flat, runs):
        steps = range(len(r["device_kv_trace"]))
        ax.plot(steps, [b / 2**20 for b in r["full_kv_trace"]], "k--", label="full KV cache")
        ax.plot(steps, [b / 2**20 for b in r["device_kv_trace"]], label="flashmem device KV")
        ax.set_title(f"{r['model_short']}, T={r['prompt_tokens']}\n{r['label']}", fontsize=8)
        ax.set_xlabel("decode step")
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Device KV bytes from the allocator at every decode step", fontsize=10)
    common.save_figure(fig, png)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run memory", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model only, short contexts (a smoke run)")
    p.add_argument("--flashmem-config", default=None, help="JSON object or list: FlashMemConfig kwargs")
    p.add_argument("--tiny-flashmem-config", default=None, help="same, for the tiny model")
    p.add_argument("--steps", type=int, default=None, help="decode steps per run (default 256; quick 160)")
    p.add_argument("--contexts", default=None, help="default-model prompt lengths (default 8192; quick none)")
    p.add_argument(
        "--tiny-contexts",
        default=None,
        help="tiny-model prompt lengths (default 16384,65536; 500K: the long-context entry)",
    )
    p.add_argument("--json", default=None, help="output JSON (PNG beside it)")
    args = p.parse_args(argv)

    configs = common.parse_configs(args.flashmem_config, DEFAULT_CONFIGS)
    tiny_configs = common.parse_configs(args.tiny_flashmem_config, TINY_CONFIGS)
    steps = args.steps or (160 if args.quick else 256)
    contexts = _ints(args.contexts, [] if args.quick else [8192])
    tiny_contexts = _ints(args.tiny_contexts, [2048, 8192] if args.quick else [16384, 65536])
    if steps < 1:
        p.error("--steps must be >= 1")
    json_path, png = common.result_paths("memory", args.quick, args.json)

    tiny, stats_path, tiny_desc = common.tiny_bench_model(max(tiny_contexts + [4096]) + steps + 16)
    check = _check_exact(tiny, stats_path)
    print(f"check: no-budget trace is whole blocks and tokens equal Hugging Face ({check['steps']} steps)")

    runs = []
    if contexts:
        from flashmem import local_text_token_ids

        model, tok, name = common.load_default()
        for T in contexts:
            ids, source = local_text_token_ids(tok, T)
            for cfg in configs:
                r = _measure(model, ids[None], cfg, steps, None, common.config_label(cfg))
                r.update(model=name, model_short="SmolLM2-135M", text=source[:300])
                runs.append(r)
        del model
    for T in tiny_contexts:
        ids = torch.randint(0, tiny.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(T))
        for cfg in tiny_configs:
            r = _measure(tiny, ids, cfg, steps, stats_path, common.config_label(cfg))
            r.update(model=tiny_desc, model_short="tiny Llama", text="random tokens")
            runs.append(r)

    data = common.header(
        "memory",
        quick=args.quick,
        model="SmolLM2-135M (default) and a tiny random-init Llama",
        decode_steps=steps,
        default_model_contexts=contexts,
        tiny_contexts=tiny_contexts,
        flashmem_configs=configs,
        tiny_flashmem_configs=tiny_configs,
    )
    data["check"] = check
    data["runs"] = runs
    common.write_json(json_path, data)
    _plot(runs, png)
    return 0


def _ints(text: str | None, default: list[int]) -> list[int]:
    if text is None:
        return default
    return [int(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
