"""What ``flashmem prepare --train-indexer`` costs: measured on this machine, estimated for an 8B model.

    python -m bench.run prepare-cost [--quick] [--json PATH]

Runs :func:`flashmem.preparation.prepare` with ``train_indexer=True`` and its defaults (TriAttention
stats from 32,768 tokens of local text; indexer records from 14 documents of 4,096 tokens, then 300
training steps) on the default model (``--quick``: a tiny random-init Llama with a byte tokenizer and
small settings), into a temporary cache directory (``FLASHMEM_CACHE_DIR`` is pointed there for the
run; the user's cache is not touched). Correctness first: the files must then be the ones a plain
``FlashMemConfig(budget_tokens=...)`` finds for the model (``memory_report()["triattention_stats"]``
names the prepared stats, the indexer the prepared checkpoint) before any figure is written.

The 8B figure is an **estimate**, not a measurement: the forward FLOPs of the same token counts on a
Llama-3.1-8B-shaped model (2 x parameters per token plus causal attention) divided by an assumed
sustained bf16 rate (40% of an H100's 989 TFLOP/s dense peak), plus the training steps (measured
here; they do not grow with the model: the indexer is small).
"""

from __future__ import annotations

import argparse
import inspect
import os
import tempfile
import time
from pathlib import Path

import torch

import flashmem
from bench import common

# Llama-3.1-8B: parameters (weights read per token), layers, hidden size
LLAMA8B = {"params": 8.03e9, "layers": 32, "hidden": 4096}
H100_BF16_DENSE = 989e12
ASSUMED_MFU = 0.40


def forward_flops(params: float, layers: int, hidden: int, tokens: int, tokens_per_forward: int) -> float:
    """Forward FLOPs of ``tokens`` tokens in causal passes of ``tokens_per_forward``: ``2 x params``
    per token plus the attention products (``2 x 2 x hidden`` per query-key pair, half the pairs)."""
    passes, rest = divmod(tokens, tokens_per_forward)
    pairs = passes * tokens_per_forward * tokens_per_forward / 2 + rest * rest / 2
    return 2 * params * tokens + 4 * hidden * layers * pairs


def _model_shape(model) -> dict:
    c = model.config
    return {
        "params": float(sum(p.numel() for p in model.parameters())),
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
    }


def run(quick: bool) -> dict:
    if quick:
        from flashmem.testing import tiny_model

        model = tiny_model("llama", layers=2, seed=0, max_positions=8192)
        tok = common.ByteTokenizer(model.config.vocab_size)
        name = "tiny random-init Llama (2 layers), byte tokenizer"
        stats_tokens, forward = 1024, 512
        options = {"steps": 5, "num_tokens": 512, "num_synthetic": 2, "num_local": 0}
    else:
        model, tok, name = common.load_default()
        stats_tokens, forward = 32768, 2048
        options = {}
    from flashmem import prepare, train_indexer

    defaults = {k: v.default for k, v in inspect.signature(train_indexer).parameters.items()}
    docs = options.get("num_synthetic", defaults.get("num_synthetic", 6)) + options.get(
        "num_local", defaults.get("num_local", 8)
    )
    doc_tokens = options.get("num_tokens", defaults.get("num_tokens", 4096))
    with tempfile.TemporaryDirectory(prefix="flashmem-prepare-") as cache:
        old = os.environ.get("FLASHMEM_CACHE_DIR")
        os.environ["FLASHMEM_CACHE_DIR"] = cache
        try:
            t0 = time.perf_counter()
            report = prepare(
                model,
                tok,
                max_tokens=stats_tokens,
                tokens_per_forward=forward,
                train_indexer=True,
                indexer_options=options,
                progress=False,
            )
            wall = time.perf_counter() - t0
            check = _check_found(model, report)
        finally:
            if old is None:
                os.environ.pop("FLASHMEM_CACHE_DIR", None)
            else:
                os.environ["FLASHMEM_CACHE_DIR"] = old
    shape = _model_shape(model)
    here_stats = forward_flops(**shape, tokens=stats_tokens, tokens_per_forward=forward)
    here_records = forward_flops(**shape, tokens=docs * doc_tokens, tokens_per_forward=doc_tokens)
    big_stats = forward_flops(**LLAMA8B, tokens=stats_tokens, tokens_per_forward=forward)
    big_records = forward_flops(**LLAMA8B, tokens=docs * doc_tokens, tokens_per_forward=doc_tokens)
    rate = H100_BF16_DENSE * ASSUMED_MFU
    return {
        "model": name,
        "settings": {
            "stats_tokens": stats_tokens,
            "tokens_per_forward": forward,
            "indexer_documents": docs,
            "indexer_document_tokens": doc_tokens,
            "indexer_options": options or "defaults",
        },
        "check": check,
        "measured": {
            "wall_s": round(wall, 1),
            "stats_s": report["stats_seconds"],
            "indexer_s": report["indexer_seconds"],
            "stats_forward_flops": here_stats,
            "indexer_forward_flops": here_records,
        },
        "estimate_llama8b_h100": {
            "what": (
                "ESTIMATE from FLOPs, not measured: forward FLOPs of the same token counts on a "
                f"Llama-3.1-8B-shaped model at {ASSUMED_MFU:.0%} of an H100's bf16 dense peak, "
                "plus this run's indexer seconds beyond its forward passes (label building and the "
                "small indexer's training, which do not grow with the model)"
            ),
            "stats_forward_flops": big_stats,
            "indexer_forward_flops": big_records,
            "stats_s": round(big_stats / rate, 1),
            "indexer_forward_s": round(big_records / rate, 1),
        },
    }


def _check_found(model, report: dict) -> dict:
    """The prepared files are what a plain budget config uses for this model (read off the wrapper
    as a user would: its stats source and its indexer)."""
    fm = flashmem.wrap(model, flashmem.FlashMemConfig(budget_tokens=256))
    if fm.stats_source is None or Path(fm.stats_source) != Path(report["stats"]):
        raise RuntimeError(f"the prepared stats are not used for the model: stats source {fm.stats_source!r}")
    if fm.indexer_name != f"lookahead:{Path(report['indexer']).name}":
        raise RuntimeError(f"indexer='auto' does not pick the prepared checkpoint: got {fm.indexer_name!r}")
    return {"stats_source": "prepared", "auto_indexer": fm.indexer_name}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run prepare-cost", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny random-init model, small settings")
    p.add_argument("--json", default=None, help="output JSON path")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    data = run(args.quick)
    out = common.header("prepare-cost", quick=args.quick, model=data.pop("model"), **data.pop("settings"))
    out.update(data)
    json_path, _ = common.result_paths("prepare_cost", args.quick, args.json)
    common.write_json(json_path, out)
    m, e = out["measured"], out["estimate_llama8b_h100"]
    print(
        f"prepare --train-indexer: {m['wall_s']} s here (stats {m['stats_s']} s, indexer {m['indexer_s']} s); "
        f"8B on one H100, estimated: stats {e['stats_s']} s + indexer forwards {e['indexer_forward_s']} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
