"""Fit the lookahead indexer to stored records (tensors only: no model runs here).

Records come from :func:`flashmem.indexer_data.extract_document` (one full-attention prefill per
document); the end-to-end run (documents, records, fit, checkpoint) is
:func:`flashmem.indexer_training.train_indexer`.

Loss per (layer, refresh): listwise cross-entropy between the window's candidate-mass distribution and
``softmax(z)`` over the candidates (the KL form of DeepSeek's indexer warm-up, up to a constant), plus
``bce_weight`` x BCE on the top-p labels with about ``negatives_per_positive`` sampled negatives per
positive (so ``sigmoid(z) > threshold`` is a usable selection rule).
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

from .evaluate import evaluate_records
from .lookahead import LookaheadIndexer
from .records import DocRecord


def _loss(
    indexer: LookaheadIndexer, rec: DocRecord, bce_weight: float, neg_per_pos: float, gen: torch.Generator
) -> torch.Tensor:
    cand = rec.candidates  # [R, N]
    rows = cand.any(-1)
    losses = []
    for layer in range(indexer.config.num_layers):
        z = indexer.record_logits(rec, layer)[rows]  # [R', N]
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
