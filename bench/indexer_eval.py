"""Indexer evaluation on held-out documents: covered attention mass and recall at a chunk budget.

Held-out documents: synthetic tasks with seeds never used in training, and local text files of the
held-out split (see flashmem.indexer.synthetic). Every indexer (trained lookahead, each heuristic, the
oracle) is scored at the same budgets; the main figure is the 10% chunk budget.

    python -m bench.indexer_eval [--tokens 4096] [--records-cache PATH] [--indexer PATH]

Writes bench/results/indexer_eval.json and bench/results/indexer_eval.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from flashmem import build_records, load_indexer, load_model, model_fingerprint
from flashmem.indexer import (
    TargetConfig,
    default_checkpoint_path,
    evaluate_records,
    load_records,
    local_documents,
    refresh_cost,
    save_records,
    synthetic_documents,
)

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = [0.05, 0.1, 0.2, 0.3]
HELDOUT_SEED = 777


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--synthetic", type=int, default=2)
    p.add_argument("--local", type=int, default=2)
    p.add_argument("--window-stride", type=int, default=4)
    p.add_argument("--records-cache", default=None)
    p.add_argument("--indexer", default=None)
    args = p.parse_args(argv)
    model, tok = load_model("default")
    ckpt = args.indexer or default_checkpoint_path()
    look = load_indexer(ckpt, model_fingerprint(model))
    meta = json.loads(Path(ckpt).with_suffix(".json").read_text())
    cfg = TargetConfig(
        chunk_size=look.config.chunk_size, lookahead=look.config.lookahead, window_stride=args.window_stride
    )
    t0 = time.time()
    if args.records_cache and Path(args.records_cache).is_file():
        records = load_records(args.records_cache)
    else:
        docs = synthetic_documents(tok, args.synthetic, args.tokens + 64, seed=HELDOUT_SEED)
        docs += local_documents(tok, args.local, args.tokens, split="heldout")
        records = build_records(model, tok, docs, cfg, args.tokens, desc="held-out labels")
        if args.records_cache:
            save_records(records, args.records_cache)
    trained_on = set(meta.get("training", {}).get("documents", []))
    overlap = sorted(trained_on & {r.name for r in records})
    if overlap:
        raise RuntimeError(f"held-out documents were used in training: {overlap}")
    label_s = time.time() - t0
    frontier = {str(b): evaluate_records(records, b, lookahead=look) for b in BUDGETS}
    main_res = frontier["0.1"]
    heur = {k: v["covered_mass"] for k, v in main_res.items() if k not in ("lookahead", "oracle")}
    result = {
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "model": "SmolLM2-135M-Instruct (default, fp32)",
        "documents": [r.name for r in records],
        "tokens_per_document": int(records[0].start[-1] + records[0].chunk_size),
        "targets": {
            "chunk_size": cfg.chunk_size,
            "lookahead": cfg.lookahead,
            "top_p": cfg.top_p,
            "recent_tokens": cfg.recent_tokens,
            "num_sink_chunks": cfg.num_sink_chunks,
            "refresh_stride": cfg.refresh_stride,
            "first_refresh": cfg.first_refresh,
            "window_stride": cfg.window_stride,
        },
        "budget": 0.1,
        "indexers": main_res,
        "frontier": {b: {k: v["covered_mass"] for k, v in r.items()} for b, r in frontier.items()},
        "lookahead_beats_every_heuristic": all(
            main_res["lookahead"]["covered_mass"] > v for v in heur.values()
        ),
        "lookahead_mass_vs_oracle": main_res["lookahead"]["mass_vs_oracle"],
        "target_mass_vs_oracle": 0.9,
        "refresh_cost_500k": refresh_cost(look),
        "checkpoint": str(Path(ckpt).name),
        "label_seconds": round(label_s, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "indexer_eval.json").write_text(json.dumps(result, indent=2))
    _plot(result, RESULTS / "indexer_eval.png")
    print(
        json.dumps(
            {
                k: result[k]
                for k in ("indexers", "lookahead_beats_every_heuristic", "lookahead_mass_vs_oracle")
            },
            indent=2,
        )
    )
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["indexers"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    mass = [result["indexers"][n]["covered_mass"] for n in names]
    rec = [result["indexers"][n]["recall"] for n in names]
    x = range(len(names))
    ax1.bar([i - 0.2 for i in x], mass, 0.4, label="covered attention mass")
    ax1.bar([i + 0.2 for i in x], rec, 0.4, label="recall of label chunks")
    ax1.set_xticks(list(x), names, rotation=20)
    ax1.set_title("held-out, 10% chunk budget")
    ax1.legend()
    budgets = [float(b) for b in result["frontier"]]
    for n in names:
        ax2.plot(budgets, [result["frontier"][b][n] for b in result["frontier"]], marker="o", label=n)
    ax2.set_xlabel("chunk budget (fraction of candidate chunks)")
    ax2.set_ylabel("covered attention mass")
    ax2.set_title("frontier")
    ax2.legend()
    fig.suptitle(
        f"{result['model']}, {result['tokens_per_document']} tokens, chunk {result['targets']['chunk_size']}, "
        f"lookahead {result['targets']['lookahead']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
