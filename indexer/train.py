"""Train the lookahead indexer on the model's own attention (no downloads).

Data: local text files (documentation and source of installed packages; the held-out split is never
used here) and synthetic long documents (:mod:`flashmem.indexer.synthetic`). Each document is prefilled
once with full attention (:func:`flashmem.indexer.dataset.extract_document`); training then runs on the
stored records only.

Loss per (layer, refresh): listwise cross-entropy between the window's candidate-mass distribution and
``softmax(z)`` over the candidates (the KL form of DeepSeek's indexer warm-up, up to a constant), plus
``bce_weight`` x BCE on the top-p labels with about ``negatives_per_positive`` sampled negatives per
positive (so ``sigmoid(z) > threshold`` is a usable selection rule).

CLI (``flashmem train-indexer``): ``--model default|PATH --data DIR_OR_FILES --out PATH [--steps ...]``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .dataset import DocRecord, TargetConfig, extract_document, load_records, save_records
from .evaluate import evaluate_records
from .lookahead import LookaheadConfig, LookaheadIndexer
from .synthetic import local_documents, synthetic_documents

DEFAULT_CHECKPOINT = "smollm2_135m_lookahead.safetensors"


def default_checkpoint_path() -> Path:
    """The trained checkpoint shipped for the default model (package data)."""
    return Path(str(resources.files("flashmem.indexer") / "data" / DEFAULT_CHECKPOINT))


def build_records(
    model,
    tokenizer,
    documents: list[tuple[str, str]],
    cfg: TargetConfig,
    num_tokens: int,
    desc: str = "labels",
) -> list[DocRecord]:
    """Prefill each (name, text) document (first ``num_tokens`` tokens) and build its record."""
    records = []
    for name, text in tqdm(documents, desc=desc, unit="doc"):
        ids = tokenizer(text)["input_ids"][:num_tokens]
        if len(ids) < cfg.first_refresh + cfg.tau:
            continue
        records.append(extract_document(model, torch.tensor(ids), cfg, name=name))
    return records


def _loss(
    indexer: LookaheadIndexer, rec: DocRecord, bce_weight: float, neg_per_pos: float, gen: torch.Generator
) -> torch.Tensor:
    cand = rec.candidates  # [R, N]
    rows = cand.any(-1)
    losses = []
    for layer in range(indexer.config.num_layers):
        summ = rec.summaries(layer)
        comp = indexer.compress(layer, summ.mean_key)
        z = indexer.logits(
            layer,
            rec.q_pre[layer],
            rec.q_rope[layer],
            rec.refresh,
            summ.mean_key_rope,
            comp,
            summ.start,
            cand,
            bounds=(summ.min_key, summ.max_key),
        )[rows]  # [R', N]
        tgt = rec.target[layer][rows]
        logp = torch.log_softmax(z, dim=-1).masked_fill(~cand[rows], 0.0)
        ce = -(tgt * logp).sum(-1).mean()
        lab = rec.labels[layer][rows]
        n_pos = lab.sum(-1, keepdim=True).float()
        n_neg = (cand[rows] & ~lab).sum(-1, keepdim=True).float()
        p_neg = (neg_per_pos * n_pos / n_neg.clamp_min(1)).clamp(max=1.0)
        neg = (torch.rand(lab.shape, generator=gen) < p_neg) & cand[rows] & ~lab
        sel = lab | neg
        zs = z.masked_fill(~sel, 0.0)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(zs, lab.float(), reduction="none")
        bce = (bce * sel).sum() / sel.sum().clamp_min(1)
        losses.append(ce + bce_weight * bce)
    return torch.stack(losses).mean()


def fit(
    indexer: LookaheadIndexer,
    train: list[DocRecord],
    val: list[DocRecord],
    steps: int = 300,
    lr: float = 5e-3,
    bce_weight: float = 0.5,
    neg_per_pos: float = 3.0,
    budget: float = 0.1,
    eval_every: int = 50,
    seed: int = 0,
    progress: bool = True,
    lr_scalar: float = 5e-2,
    threads: int | None = 1,
) -> dict:
    """Train in place; keeps the parameters with the best validation covered mass. Returns a history.

    ``lr`` applies to the projections, ``lr_scalar`` to the per-head weights, thresholds and biases.
    ``threads``: torch CPU threads while training (the ops are small; 1 avoids oversubscription)."""
    if not train:
        raise ValueError("no training records")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fit(
            indexer,
            train,
            val,
            steps,
            lr,
            bce_weight,
            neg_per_pos,
            budget,
            eval_every,
            seed,
            progress,
            lr_scalar,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _fit(
    indexer, train, val, steps, lr, bce_weight, neg_per_pos, budget, eval_every, seed, progress, lr_scalar
):
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    proj = [indexer.Wq, indexer.Wk]
    scalars = [p for n, p in indexer.named_parameters() if n not in ("Wq", "Wk")]
    opt = torch.optim.Adam([{"params": proj, "lr": lr}, {"params": scalars, "lr": lr_scalar}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    best = (-1.0, None)
    history = []

    def validate(step):
        nonlocal best
        if not val:
            return
        indexer.eval()
        m = evaluate_records(
            val, budget, names=["lookahead", "mean_key", "quest", "oracle"], lookahead=indexer
        )
        indexer.train()
        history.append({"step": step, **{k: v["covered_mass"] for k, v in m.items()}})
        if m["lookahead"]["covered_mass"] > best[0]:
            best = (
                m["lookahead"]["covered_mass"],
                {k: v.detach().clone() for k, v in indexer.state_dict().items()},
            )

    validate(0)
    bar = tqdm(range(1, steps + 1), desc="train indexer", disable=not progress)
    order: list[int] = []
    for step in bar:
        if not order:
            order = list(range(len(train)))
            rng.shuffle(order)
        loss = _loss(indexer, train[order.pop()], bce_weight, neg_per_pos, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % eval_every == 0 or step == steps:
            validate(step)
            if history:
                bar.set_postfix(loss=f"{loss.item():.4f}", val_mass=f"{history[-1]['lookahead']:.4f}")
    if best[1] is not None:
        indexer.load_state_dict(best[1])
    indexer.eval()
    return {"history": history, "best_val_covered_mass": best[0]}


def train_indexer(
    model,
    tokenizer,
    out: str | Path,
    data: list[str] | None = None,
    steps: int = 300,
    chunk_size: int = 64,
    tau: int = 64,
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
    from ..hf_compat import kv_geometry, model_fingerprint

    t0 = time.time()
    cfg = TargetConfig(
        chunk_size=chunk_size, tau=tau, window_stride=window_stride, first_refresh=min(1024, num_tokens // 4)
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
        raise ValueError("no usable training documents (each needs more than first_refresh + tau tokens)")
    t_labels = time.time() - t0
    n_val = max(1, int(round(val_fraction * len(records)))) if len(records) > 1 else 0
    rng = random.Random(seed)
    idx = list(range(len(records)))
    rng.shuffle(idx)
    val = [records[i] for i in idx[:n_val]]
    train = [records[i] for i in idx[n_val:]]
    layers, hq, hkv, d = kv_geometry(model)
    lcfg = LookaheadConfig(layers, hq, hkv, d, rank=min(rank, d), chunk_size=chunk_size, tau=tau)
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
            "tau": tau,
            "top_p": cfg.top_p,
            "window_stride": window_stride,
            "recent_tokens": cfg.recent_tokens,
            "num_sink_chunks": cfg.num_sink_chunks,
        },
        **hist,
    }
    indexer.save(out, extra=report)
    return indexer, report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="flashmem train-indexer", description="train the lookahead memory indexer"
    )
    p.add_argument(
        "--model", default="default", help="'default' (embedded SmolLM2-135M) or a local model directory"
    )
    p.add_argument(
        "--data", nargs="*", default=None, help="text files or directories (default: site-packages)"
    )
    p.add_argument(
        "--out", required=True, help="checkpoint path (.safetensors; a .json is written beside it)"
    )
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--tau", type=int, default=64)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.1, help="validation chunk budget (fraction or count)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per training document")
    p.add_argument("--synthetic", type=int, default=6, help="synthetic documents")
    p.add_argument("--local", type=int, default=8, help="local text documents")
    p.add_argument("--window-stride", type=int, default=4, help="label every n-th query of each window")
    p.add_argument("--records-cache", default=None, help="reuse/write extracted records here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps <= 0:
        p.error("--steps must be positive")
    from ..models import load_model

    model, tok = load_model(args.model)
    _, report = train_indexer(
        model,
        tok,
        args.out,
        data=args.data,
        steps=args.steps,
        chunk_size=args.chunk_size,
        tau=args.tau,
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


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
