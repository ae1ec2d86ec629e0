"""Pass-key retrieval vs prompt length and depth: full attention vs flashmem at device budgets.

    python -m bench.run passkey [--quick] [--lengths 2000,4000,7000] [--depths 0.1,0.3,0.5,0.7,0.9]
                                [--seeds-per-cell 1] [--flashmem-config JSON] [--peers] [--json PATH]

Prompts (:func:`bench.inputs.heatmap_prompts`): :func:`flashmem.prompts.passkey_prompt` (plain, no
chat template), ~length tokens with the default model's tokenizer, one 5-digit key per (length,
depth, seed); seeds are fixed (derived from length, depth index and seed index). Every method reads
the SAME token ids: the context (instructions and filler with the key) and the question ("What is
the pass key? The pass key is") are tokenized separately and concatenated, so a peer can compress
the context alone.

Methods (greedy, 8 new tokens, no EOS stop; correct = the first 5-digit number equals the key):
* full attention: plain Hugging Face forward with ``DynamicCache`` (the reference);
* flashmem: ``wrap(model, FlashMemConfig(**cfg)).generate`` for each ``--flashmem-config`` entry,
  with peak and average device share of the full KV (prefill included, from ``memory_report()``) and
  top-1 agreement of its generated tokens with full attention's, position by position;
* ``--peers``: NVIDIA kvpress presses in their own environment (see ``bench/peers/kvpress_peer.py``)
  on the same ids, keeping the share of the KV flashmem kept on average at that length (first
  config).

Correctness first: on the first prompt, flashmem without a budget must generate exactly full
attention's tokens. Writes JSON + a heat map PNG (accuracy per length x depth, one panel a method).
"""

from __future__ import annotations

import argparse
import textwrap
import time

from bench import common, inputs, metrics
from bench.inputs import ANSWER_TOKENS

# two device budgets with every other setting at its default (a tuned configuration is one
# --flashmem-config away)
DEFAULT_CONFIGS = [{"budget_tokens": 256}, {"budget_tokens": 512}]


def _answer(tok, tokens: list[int], key: str) -> dict:
    text = tok.decode(tokens, skip_special_tokens=True)
    return {"answer": text, "correct": metrics.extract_digits(text) == key}


def _check(model, tok, prompt: dict, stats_path) -> dict:
    ids = inputs.prompt_ids(prompt)
    ref = common.hf_decode(model, ids, ANSWER_TOKENS, collect_logits=False)
    run = common.flashmem_decode(model, {}, ids, ANSWER_TOKENS, collect_logits=False, stats_path=stats_path)
    if run["tokens"] != ref["tokens"]:
        raise AssertionError(
            f"flashmem without a budget must equal full attention: {run['tokens']} vs {ref['tokens']}"
        )
    return {"prompt": prompt["id"], "tokens_equal": True, "answer": tok.decode(ref["tokens"])}


def _summary(trials: list[dict], method: str, lengths: list[int], depths: list[float]) -> dict:
    rows = [t for t in trials if t["method"] == method]
    out = {"method": method, "correct": sum(r["correct"] for r in rows), "trials": len(rows), "by_length": {}}
    for length in lengths:
        rl = [r for r in rows if r["target_tokens"] == length]
        if not rl:
            continue
        entry = {"correct": sum(r["correct"] for r in rl), "trials": len(rl)}
        for key in ("peak_device_share", "avg_device_share", "top1_agreement_with_full", "kept_share"):
            vals = [r[key] for r in rl if r.get(key) is not None]
            if vals:
                entry[f"mean_{key}"] = sum(vals) / len(vals)
        entry["by_depth"] = {
            f"{d:.2f}": sum(r["correct"] for r in rl if abs(r["depth"] - d) < 1e-9)
            / max(1, sum(1 for r in rl if abs(r["depth"] - d) < 1e-9))
            for d in depths
        }
        out["by_length"][str(length)] = entry
    return out


def _heatmap(summaries: list[dict], lengths, depths, png) -> None:
    plt = common.pyplot()
    if plt is None or not summaries:
        return
    n = len(summaries)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(4.6 * cols, (0.5 * len(lengths) + 2.0) * rows),
        squeeze=False,
        constrained_layout=True,
    )
    for ax, s in zip(axes.flat, summaries):
        grid = [
            [s["by_length"].get(str(L), {}).get("by_depth", {}).get(f"{d:.2f}", float("nan")) for d in depths]
            for L in lengths
        ]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(depths)), [f"{d:.1f}" for d in depths], fontsize=7)
        ax.set_yticks(range(len(lengths)), [str(L) for L in lengths], fontsize=7)
        ax.set_xlabel("depth of the key")
        ax.set_ylabel("prompt tokens")
        label = "\n".join(textwrap.wrap(s["method"].replace(",", ", "), 44))
        ax.set_title(f"{label}: {s['correct']}/{s['trials']} correct", fontsize=8)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.1f}".rstrip("0").rstrip("."), ha="center", va="center", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="fraction correct")
    fig.suptitle("Pass-key retrieval, SmolLM2-135M", fontsize=10)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run passkey", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one 1,000-token prompt, one budget (a smoke run)")
    p.add_argument("--lengths", default=None, help="prompt lengths in tokens (default 2000,4000,7000)")
    p.add_argument("--depths", default=None, help="key depths (default 0.1,0.3,0.5,0.7,0.9)")
    p.add_argument("--seeds-per-cell", type=int, default=1, help="prompts per (length, depth)")
    p.add_argument("--flashmem-config", default=None, help="JSON object or list of FlashMemConfig kwargs")
    p.add_argument("--peers", action="store_true", help="also run kvpress presses (own venv, slow)")
    p.add_argument("--model", default="default", choices=("default", "tiny"), help="tiny: smoke tests only")
    p.add_argument("--json", default=None, help="output JSON (PNG beside it)")
    args = p.parse_args(argv)

    default_cfgs = [{"budget_tokens": 256}] if args.quick else DEFAULT_CONFIGS
    configs = common.parse_configs(args.flashmem_config, default_cfgs)
    lengths = [int(x) for x in (args.lengths or ("1000" if args.quick else "2000,4000,7000")).split(",")]
    depths = [float(x) for x in (args.depths or ("0.5" if args.quick else "0.1,0.3,0.5,0.7,0.9")).split(",")]
    if args.seeds_per_cell < 1 or any(not 0 <= d <= 1 for d in depths) or min(lengths) < 64:
        p.error("--seeds-per-cell >= 1, depths in [0, 1], lengths >= 64")
    json_path, png = common.result_paths("passkey", args.quick, args.json)

    model, tok, name, stats_path = common.load_bench_model(args.model)
    prompts = inputs.heatmap_prompts(tok, lengths, depths, args.seeds_per_cell)
    check = _check(model, tok, prompts[0], stats_path)
    print(f"check: flashmem without a budget equals full attention on {check['prompt']}")

    trials: list[dict] = []
    t_start = time.perf_counter()
    for i, pr in enumerate(prompts):
        ids = inputs.prompt_ids(pr)
        base = {k: pr[k] for k in ("id", "target_tokens", "depth", "seed", "key", "tokens")}
        ref = common.hf_decode(model, ids, ANSWER_TOKENS, collect_logits=False)
        trials.append(
            {
                **base,
                "method": "full attention",
                **_answer(tok, ref["tokens"], pr["key"]),
                "kept_share": 1.0,
                "generated": ref["tokens"],
                "prefill_s": ref["prefill_s"],
            }
        )
        line = [f"full={'ok' if trials[-1]['correct'] else 'x'}"]
        for cfg in configs:
            run = common.flashmem_decode(
                model, cfg, ids, ANSWER_TOKENS, collect_logits=False, stats_path=stats_path
            )
            rep = run["report"]
            trials.append(
                {
                    **base,
                    "method": common.config_label(cfg),
                    "flashmem_config": cfg,
                    **_answer(tok, run["tokens"], pr["key"]),
                    "peak_device_share": rep.get("peak_device_share"),
                    "avg_device_share": rep.get("avg_device_share"),
                    "device_share_end": rep.get("device_share"),
                    "peak_device_kv_share": rep.get("peak_device_kv_share"),
                    "avg_device_kv_share": rep.get("avg_device_kv_share"),
                    "device_bytes": rep.get("device_bytes"),
                    "kept_share": rep.get("avg_device_share"),
                    "top1_agreement_with_full": metrics.token_agreement(ref["tokens"], run["tokens"]),
                    "blocks_freed": rep.get("blocks_freed"),
                    "timings": rep.get("timings"),
                    "wall_s": run["wall_s"],
                }
            )
            line.append(
                f"{cfg}={'ok' if trials[-1]['correct'] else 'x'}({rep.get('avg_device_share', 0):.2f})"
            )
        print(
            f"[{i + 1}/{len(prompts)}] {pr['id']} T={pr['tokens']} key={pr['key']} "
            + " ".join(line)
            + f"  ({time.perf_counter() - t_start:.0f} s)"
        )

    methods = ["full attention"] + [common.config_label(c) for c in configs]
    peers = None
    if args.peers:
        from bench.peers import kvpress_peer

        shares = {}
        for length in lengths:
            vals = [
                t["avg_device_share"]
                for t in trials
                if t["target_tokens"] == length and t["method"] == methods[1] and t.get("avg_device_share")
            ]
            shares[str(length)] = sum(vals) / len(vals) if vals else 0.15
        full_tokens = {t["id"]: t["generated"] for t in trials if t["method"] == "full attention"}
        peers = kvpress_peer.run_passkey(
            prompts, shares, new_tokens=ANSWER_TOKENS, quick=args.quick, full_tokens=full_tokens
        )
        for r in peers.get("trials", []):
            pr = next(x for x in prompts if x["id"] == r["id"])
            trials.append(
                {k: pr[k] for k in ("id", "target_tokens", "depth", "seed", "key", "tokens")}
                | {
                    "method": r["method"],
                    "answer": r["answer"],
                    "correct": metrics.extract_digits(r["answer"]) == pr["key"],
                    "kept_share": r.get("kept_share"),
                }
            )
        methods += sorted({r["method"] for r in peers.get("trials", [])})

    summaries = [_summary(trials, m, lengths, depths) for m in methods]
    data = common.header(
        "passkey",
        quick=args.quick,
        model=name,
        lengths=lengths,
        depths=depths,
        seeds_per_cell=args.seeds_per_cell,
        new_tokens=ANSWER_TOKENS,
        flashmem_configs=configs,
        prompt_tokens={
            str(L): sorted({p["tokens"] for p in prompts if p["target_tokens"] == L}) for L in lengths
        },
    )
    data.update(
        check=check,
        summaries=summaries,
        trials=trials,
        peers=None if peers is None else {k: v for k, v in peers.items() if k != "trials"},
    )
    common.write_json(json_path, data)
    _heatmap(summaries, lengths, depths, png)
    for s in summaries:
        print(f"{s['method']}: {s['correct']}/{s['trials']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
