"""Train and evaluate the lookahead indexer end to end: documents -> records (the model runs) -> fit.

Data: local text files (documentation and source of installed packages; the held-out split is never
used for training) and synthetic long documents (:mod:`flashmem.indexer.synthetic`). Each document is
prefilled once with full attention (:func:`flashmem.indexer_data.extract_document`); training then
runs on the stored records only (:func:`flashmem.indexer.train.fit`).

CLI: ``flashmem train-indexer --model default|PATH --data DIR_OR_FILES --out PATH [--steps ...]`` and
``flashmem eval-indexer --model default|PATH [--indexer PATH] --text FILE --chunk-budget K``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from flashmem.indexer.evaluate import evaluate_records
from flashmem.indexer.lookahead import LookaheadConfig, LookaheadIndexer, default_checkpoint_path
from flashmem.indexer.records import TargetConfig, load_records, save_records
from flashmem.indexer.synthetic import local_documents, synthetic_documents
from flashmem.indexer.train import fit

from .files import load_indexer
from .hf_compat import kv_geometry, model_fingerprint
from .indexer_data import build_records, extract_document
from .models import load_model


def train_indexer(
    model,
    tokenizer,
    out: str | Path,
    data: list[str] | None = None,
    steps: int = 300,
    chunk_size: int = 64,
    lookahead: int = 64,
    rank: int = 32,
    num_tokens: int = 4096,
    num_synthetic: int = 6,
    num_local: int = 8,
    budget: float = 0.1,
    window_stride: int = 4,
    records_cache: str | Path | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = True,
) -> tuple[LookaheadIndexer, dict]:
    """Build labels, train, validate and write the checkpoint ``out`` (.safetensors + .json).

    data: files or directories of local text (default: installed site-packages, train split).
    Returns (indexer, report)."""
    t0 = time.time()
    cfg = TargetConfig(
        chunk_size=chunk_size,
        lookahead=lookahead,
        window_stride=window_stride,
        first_refresh=min(1024, num_tokens // 4),
    )
    if records_cache is not None and Path(records_cache).is_file():
        records = load_records(str(records_cache))
    else:
        roots = [Path(d) for d in data] if data else None
        docs = synthetic_documents(tokenizer, num_synthetic, num_tokens + 64, seed=seed)
        docs += local_documents(tokenizer, num_local, num_tokens, split="train", roots=roots, seed=seed)
        records = build_records(model, tokenizer, docs, cfg, num_tokens)
        if records_cache is not None:
            save_records(records, str(records_cache))
    if not records:
        raise ValueError(
            "no usable training documents (each needs more than first_refresh + lookahead tokens)"
        )
    t_labels = time.time() - t0
    n_val = max(1, int(round(val_fraction * len(records)))) if len(records) > 1 else 0
    rng = random.Random(seed)
    idx = list(range(len(records)))
    rng.shuffle(idx)
    val = [records[i] for i in idx[:n_val]]
    train = [records[i] for i in idx[n_val:]]
    layers, hq, hkv, d = kv_geometry(model)
    lcfg = LookaheadConfig(layers, hq, hkv, d, rank=min(rank, d), chunk_size=chunk_size, lookahead=lookahead)
    indexer = LookaheadIndexer(lcfg, fingerprint=model_fingerprint(model))
    indexer.init_from_keys(torch.cat([r.mean_key for r in train], dim=1))
    indexer.train()
    hist = fit(indexer, train, val, steps=steps, budget=budget, seed=seed, progress=progress)
    report = {
        "documents": [r.name for r in records],
        "train_documents": len(train),
        "val_documents": len(val),
        "tokens_per_document": num_tokens,
        "steps": steps,
        "label_seconds": round(t_labels, 1),
        "total_seconds": round(time.time() - t0, 1),
        "targets": {
            "chunk_size": chunk_size,
            "lookahead": lookahead,
            "top_p": cfg.top_p,
            "window_stride": window_stride,
            "recent_tokens": cfg.recent_tokens,
            "num_sink_chunks": cfg.num_sink_chunks,
        },
        **hist,
    }
    indexer.save(out, extra=report)
    return indexer, report


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The options both commands take: the model, and the chunk size and lookahead of the records."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument(
        "--model", default="default", help="'default' (embedded SmolLM2-135M) or a local model directory"
    )
    p.add_argument("--chunk-size", type=int, default=64, help="tokens per chunk")
    p.add_argument(
        "--lookahead",
        "--tau",
        type=int,
        default=64,
        help="decode steps between indexer refreshes (the label window)",
    )
    return p


def train_main(argv: list[str] | None = None) -> int:
    """``flashmem train-indexer``."""
    p = _parser("flashmem train-indexer", "train the lookahead memory indexer")
    p.add_argument(
        "--data", nargs="*", default=None, help="text files or directories (default: site-packages)"
    )
    p.add_argument(
        "--out", required=True, help="checkpoint path (.safetensors; a .json is written beside it)"
    )
    p.add_argument("--steps", type=int, default=300, help="optimiser steps")
    p.add_argument("--rank", type=int, default=32, help="rank of the learned query/key projections")
    p.add_argument("--budget", type=float, default=0.1, help="validation chunk budget (fraction or count)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per training document")
    p.add_argument("--synthetic", type=int, default=6, help="synthetic documents")
    p.add_argument("--local", type=int, default=8, help="local text documents")
    p.add_argument("--window-stride", type=int, default=4, help="label every n-th query of each window")
    p.add_argument("--records-cache", default=None, help="reuse/write extracted records here")
    p.add_argument("--seed", type=int, default=0, help="seed of the document choice, split and sampling")
    args = p.parse_args(argv)
    if args.steps <= 0:
        p.error("--steps must be positive")
    model, tok = load_model(args.model)
    _, report = train_indexer(
        model,
        tok,
        args.out,
        data=args.data,
        steps=args.steps,
        chunk_size=args.chunk_size,
        lookahead=args.lookahead,
        rank=args.rank,
        num_tokens=args.tokens,
        num_synthetic=args.synthetic,
        num_local=args.local,
        budget=args.budget,
        window_stride=args.window_stride,
        records_cache=args.records_cache,
        seed=args.seed,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2))
    return 0


def eval_main(argv: list[str] | None = None) -> int:
    """``flashmem eval-indexer``: recall and covered mass of every indexer on local text files."""
    p = _parser("flashmem eval-indexer", "evaluate indexers against the oracle on local text")
    p.add_argument(
        "--indexer", default=None, help="lookahead checkpoint (.safetensors); default: the shipped one"
    )
    p.add_argument("--text", nargs="+", required=True, help="text file(s) to evaluate on")
    p.add_argument(
        "--chunk-budget", type=float, default=0.1, help="chunks per refresh: integer K, or a fraction < 1"
    )
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens read from each text file")
    p.add_argument("--window-stride", type=int, default=1, help="label every n-th query of each window")
    args = p.parse_args(argv)
    model, tok = load_model(args.model)
    look = load_indexer(args.indexer or default_checkpoint_path(), model_fingerprint(model))
    cfg = TargetConfig(
        chunk_size=args.chunk_size,
        lookahead=args.lookahead,
        window_stride=args.window_stride,
        first_refresh=min(1024, args.max_tokens // 4),
    )
    records = []
    for path in args.text:
        with open(path, encoding="utf-8") as f:
            ids = tok(f.read())["input_ids"][: args.max_tokens]
        records.append(extract_document(model, torch.tensor(ids), cfg, name=path))
    result = {
        "budget": args.chunk_budget,
        "documents": args.text,
        "tokens": args.max_tokens,
        "indexers": evaluate_records(records, args.chunk_budget, lookahead=look),
    }
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0
