"""What recall could give: chunk selection per model, per layer and KV head, and by an oracle.

    python -m bench.run recall-granularity [--quick] [--text code|prose] [--modes LIST] [--json PATH]
        [--chunk-size C --chunk-budget K --lookahead N] [--no-engine]
    python -m bench.run recall-granularity --plot-dir FOLDER   # every what-if JSON there, one figure

A what-if beside the engine, at the minimum budget (``sink_tokens + recent_tokens``, where the device
holds the sinks, the recent window with its compaction interval, and ``chunk_budget`` recalled chunks
per layer and head). Each document and its full-attention continuation are run through the model in
ONE teacher-forced forward whose decode rows attend to exactly the keys the device would hold, per
layer and KV head (an attention function registered with transformers; prompt rows attend causally
to the whole prompt, as the exact prefill does). Selection modes, refreshed every ``lookahead`` steps:

* ``shared_quest``: flashmem's ``recall_mode="shared"``: first window by the prompt tail's peak mass
  over every layer and head, later windows the top of Quest's scores summed over layers;
* ``per_head``: the default ``recall_mode="per_layer_per_head"``: first window shared, later windows
  per layer and head by that head's prompt-tail mass + Quest's estimate for its query group;
* ``shared_oracle`` / ``per_head_oracle``: each window's chunks are those its own queries (under full
  attention) give the most mass, summed over the model or per layer and head: what a perfect ranking
  could reach with the same slots.
  (the resident sinks' share left out: counted in, it made chunk 0 the oracle's pick for 60-70% of
  the heads, a slot spent on keys the device holds anyway).

``VARIANTS`` are diagnostics, not engine modes: the oracle in the first or the later windows only,
other estimates for the later windows (Quest alone, its group max or a mean over recent queries, the
mean key, the exact attention of the current queries on every key), other first windows, and
SnapKV-style kept prompt tokens instead of (some of) the recall slots.

Selection reads the queries of a full-attention pass (the engine reads its own, which drift a little
from them); the entry runs the engine in both recall modes on the same documents so the what-if can
be held against it (``engine`` rows). Results: ``recall_granularity[_prose].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from bench import common, metrics
from bench.fidelity import TEXTS, load_documents, result_name

MODES = ("shared_quest", "per_head", "shared_oracle", "per_head_oracle")
# diagnostic variants of per-head selection (not engine modes): where the gap to the oracle lies and
# which ranking closes it
VARIANTS = (
    "per_head_oracle_first",  # the first window by the oracle, later ones as per_head
    "per_head_oracle_later",  # the first window as per_head, later ones by the oracle
    "per_head_quest_only",  # later windows by Quest alone, no prompt-tail prior
    "per_head_quest_max",  # Quest's estimate, max over the query group instead of the mean
    "per_head_quest_recent",  # Quest's estimate averaged over the last ``lookahead // 4`` queries
    "per_head_prompt_only",  # later windows by the prompt-tail prior alone (a static set per head)
    "per_head_mean_key",  # Quest's bound replaced by the query's softmax share on each chunk's mean key
    "per_head_exact_query",  # the query's exact attention mass per chunk (all keys), + the prompt prior
    "per_head_exact_recent",  # the same, averaged over the last ``lookahead // 4`` queries
    "per_head_snap",  # no recall: each layer and head keeps the prompt tokens (chunk_budget * chunk_size
    # of them) its prompt tail attends to most, SnapKV-style (token-level, pooled), for every step
    "per_head_snap_plus",  # the same with one chunk's worth more tokens: the summaries' bytes, spent on KV
    "per_head_snap_half",  # half the slots as such kept tokens, half as per_head recall chunks
    "per_head_first_own",  # the first window per layer and head by its own prompt-tail mass
    "per_head_first_mixed",  # the first window: the shared top chunk, then each head's own top
)
_STATE: dict = {}


def _group(q: torch.Tensor, h_kv: int) -> torch.Tensor:
    """[H_q, T, D] -> [H_kv, G, T, D]."""
    return q.reshape(h_kv, q.shape[0] // h_kv, *q.shape[1:])


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Causal attention over the prompt; the decode rows see what ``_STATE["allow"]`` gives each KV
    head (mode "masked"), or everything (mode "record": queries, keys and masses are kept)."""
    st, layer = _STATE, module.layer_idx
    q, k, v = query[0], key[0], value[0]  # [H_q, T, D], [H_kv, T, D]
    h_kv, T = k.shape[0], q.shape[1]
    P, cs, look = st["prompt"], st["chunk"], st["lookahead"]
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)[0]
    rows = torch.arange(P, T)
    if st["mode"] == "record":
        st["q"][layer], st["k"][layer] = q.detach(), k.detach()
        # prompt-tail peak mass per KV head and chunk (resident sinks and recent window left out)
        tail = _group(q[:, P - st["observe"] : P], h_kv)
        logits = torch.einsum("hgwd,hsd->hgws", tail, k[:, :P]) * scale
        logits = logits.masked_fill(
            torch.arange(P)[None] > torch.arange(P - st["observe"], P)[:, None], -math.inf
        )
        prob = logits.softmax(-1)
        prob[..., : st["sinks"]] = 0
        prob[..., P - st["recent"] :] = 0
        n = P // cs
        st["observed"][layer] = (
            prob[..., : n * cs].unflatten(-1, (n, cs)).sum(-1).amax(dim=(1, 2))
        )  # [H_kv, n]
        # token-level: the window's summed mass, peak over the group, pooled over 7 neighbours
        tokens = prob.sum(2).amax(1)  # [H_kv, P]
        st["tokens"][layer] = F.avg_pool1d(tokens[:, None], 7, stride=1, padding=3, count_include_pad=False)[
            :, 0
        ]
        # the oracle: each window's full-attention mass per KV head and chunk
        logits = torch.einsum("hgrd,hsd->hgrs", _group(q[:, P:], h_kv), k) * scale
        prob = logits.masked_fill(torch.arange(T)[None] > rows[:, None], -math.inf).softmax(-1).sum(1)
        prob[..., : st["sinks"]] = 0  # resident: no chunk is worth recalling for its sinks
        m = (T // cs) * cs
        mass = prob[..., :m].unflatten(-1, (m // cs, cs)).sum(-1)  # [H_kv, R, N]
        st["future"][layer] = torch.stack(
            [mass[:, w : w + look].sum(1) for w in range(0, T - P, look)], 1
        )  # [H_kv, windows, N]
        return out.transpose(0, 1)[None], None
    logits = torch.einsum("hgrd,hsd->hgrs", _group(q[:, P:], h_kv), k) * scale
    logits = logits.masked_fill(~st["allow"][layer][:, None], -math.inf)
    out = out.clone()
    out[:, P:] = torch.einsum("hgrs,hsd->hgrd", logits.softmax(-1), v).flatten(0, 1)
    return out.transpose(0, 1)[None], None


def _quest(layer: int, position: int, hi: int, queries: int = 1, reduce: str = "mean") -> torch.Tensor:
    """Quest's estimate per KV head of its query group's attention share on chunks [0, hi): the
    bound with the queries of ``position - queries .. position - 1``, softmax over the chunks per
    query head, reduced over the group (and averaged over the queries)."""
    st = _STATE
    q = st["q"][layer][:, position - queries : position].float()  # [H_q, r, D]
    k, cs = st["k"][layer].float(), st["chunk"]
    h_kv, d = k.shape[0], k.shape[-1]
    chunks = k[:, : hi * cs].unflatten(1, (hi, cs))
    lo_, hi_ = chunks.amin(2), chunks.amax(2)  # [H_kv, n, D]
    qg = q.reshape(h_kv, -1, queries, d)
    bound = torch.einsum("hgrd,hnd->hgrn", qg.clamp_min(0), hi_) + torch.einsum(
        "hgrd,hnd->hgrn", qg.clamp_max(0), lo_
    )
    share = (bound / math.sqrt(d)).softmax(-1).mean(2)  # [H_kv, G, n]
    return share.amax(1) if reduce == "max" else share.mean(1)


def _mean_key(layer: int, position: int, hi: int, queries: int = 1, reduce: str = "mean") -> torch.Tensor:
    """The query group's softmax share per KV head on each chunk's mean key, chunks [0, hi)."""
    st = _STATE
    q = st["q"][layer][:, position - queries : position].float()
    k, cs = st["k"][layer].float(), st["chunk"]
    h_kv, d = k.shape[0], k.shape[-1]
    mean = k[:, : hi * cs].unflatten(1, (hi, cs)).mean(2)  # [H_kv, n, D]
    qg = q.reshape(h_kv, -1, queries, d)
    share = (torch.einsum("hgrd,hnd->hgrn", qg, mean) / math.sqrt(d)).softmax(-1).mean(2)
    return share.amax(1) if reduce == "max" else share.mean(1)


def _exact(layer: int, position: int, hi: int, queries: int = 1, reduce: str = "mean") -> torch.Tensor:
    """The query group's exact attention mass per KV head on chunks [0, hi) (softmax over every key
    before ``position``): what a ranking that could read every key would see."""
    st = _STATE
    q = st["q"][layer][:, position - queries : position].float()
    k, cs = st["k"][layer][:, :position].float(), st["chunk"]
    h_kv, d = k.shape[0], k.shape[-1]
    qg = q.reshape(h_kv, -1, queries, d)
    logits = torch.einsum("hgrd,hsd->hgrs", qg, k) / math.sqrt(d)
    keys = torch.arange(position)
    rows = torch.arange(position - queries, position)
    prob = logits.masked_fill(keys[None] > rows[:, None], -math.inf).softmax(-1).mean(2)  # [H_kv, G, S]
    mass = prob[..., : hi * cs].unflatten(-1, (hi, cs)).sum(-1)
    return mass.amax(1) if reduce == "max" else mass.mean(1)


def select(mode: str, layers: int, h_kv: int, total: int, k: int) -> list[list[torch.Tensor]]:
    """Per layer, per window: chunk ids ``[H_kv, k]``."""
    st = _STATE
    P, cs, look, recent = st["prompt"], st["chunk"], st["lookahead"], st["recent"]
    prompt = []
    for layer in range(layers):
        o = st["observed"][layer]
        s = o.clone()
        s[:, 1:] = torch.maximum(o[:, 1:], o[:, :-1])  # a chunk inherits its predecessor's peak
        prompt.append(s)
    prompt = torch.stack(prompt)  # [L, H_kv, N]
    out = [[] for _ in range(layers)]
    for w in range(math.ceil((total - P) / look)):
        position = P + w * look
        start = max(0, position - recent)
        oracle = (
            mode.endswith("oracle")
            or (mode.endswith("oracle_first") and w == 0)
            or (mode.endswith("oracle_later") and w > 0)
        )
        hi = -(-start // cs) if (w == 0 and not oracle) else start // cs
        if oracle:
            score = torch.stack([st["future"][layer][:, w, :hi] for layer in range(layers)])
            shared = mode == "shared_oracle"
            total_score = score.sum((0, 1)) if shared else None
        elif w == 0 and mode in ("per_head_first_own", "per_head_first_mixed"):
            score, shared = prompt[..., :hi].clone(), False
            if mode == "per_head_first_mixed":
                top = prompt[..., :hi].amax((0, 1)).argmax()
                score[..., top] = math.inf  # every head holds the shared top chunk first
        elif w == 0:
            score, shared, total_score = prompt[..., :hi], True, prompt[..., :hi].amax((0, 1))
        else:
            queries = max(1, look // 4) if mode in ("per_head_quest_recent", "per_head_exact_recent") else 1
            reduce = "max" if mode == "per_head_quest_max" else "mean"
            estimate = {"per_head_mean_key": _mean_key, "per_head_exact_query": _exact}.get(mode, _quest)
            estimate = _exact if mode == "per_head_exact_recent" else estimate
            quest = torch.stack(
                [estimate(layer, position, hi, queries, reduce) for layer in range(layers)]
            )  # [L, H_kv, hi]
            shared = mode == "shared_quest"
            if shared:
                total_score = quest.mean(1).sum(0)  # each layer's mean over its query heads, summed
            elif mode == "per_head_quest_only":
                score = quest
            elif mode == "per_head_prompt_only":
                score = F.pad(prompt, (0, max(0, hi - prompt.shape[-1])))[..., :hi]
            else:
                pad = F.pad(prompt, (0, max(0, hi - prompt.shape[-1])))[..., :hi]
                score = quest + pad
        n = min(k, hi)
        for layer in range(layers):
            if shared:
                out[layer].append(torch.topk(total_score, n).indices[None].expand(h_kv, n))
            else:
                out[layer].append(torch.topk(score[layer], n, dim=-1).indices)
    return out


def snap_tokens(layers: int, n: int) -> list[torch.Tensor]:
    """Per layer ``[H_kv, n]``: the prompt tokens (past the sinks, before the recent window) each KV
    head's prompt tail attends to most (``_STATE["tokens"]``)."""
    st = _STATE
    lo, hi = st["sinks"], st["prompt"] - st["recent"]
    return [
        torch.topk(st["tokens"][layer][:, lo:hi], min(n, hi - lo), dim=-1).indices + lo
        for layer in range(layers)
    ]


def allow_masks(sel, total: int, h_kv: int, static: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Per layer ``[H_kv, R, T]``: sinks, the recent window as compaction leaves it, the window's chunks
    (and ``static`` token ids per layer ``[H_kv, n]`` held for every step)."""
    st = _STATE
    P, cs, look = st["prompt"], st["chunk"], st["lookahead"]
    rows = torch.arange(P, total)
    keys = torch.arange(total)
    start = P - st["recent"] + st["interval"] * torch.div(rows - P, st["interval"], rounding_mode="floor")
    base = (keys[None] < st["sinks"]) | ((keys[None] >= start[:, None]) & (keys[None] <= rows[:, None]))
    masks = []
    for layer, windows in enumerate(sel):
        allow = base[None].repeat(h_kv, 1, 1)
        if static is not None:
            for h in range(h_kv):
                allow[h][:, static[layer][h]] = True
        for w, chunks in enumerate(windows):
            r0, r1 = w * look, min((w + 1) * look, total - P)
            for h in range(h_kv):
                held = torch.isin(keys // cs, chunks[h]) & (keys[None] <= rows[r0:r1, None])
                allow[h, r0:r1] |= held
        masks.append(allow)
    return masks


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.run recall-granularity", description=__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="1 document of 640 tokens, 48 steps")
    p.add_argument("--text", choices=TEXTS, default="code")
    p.add_argument("--tokens", type=int, default=None, help="document tokens (default 4096)")
    p.add_argument("--docs", type=int, default=None, help="documents (default 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="teacher-forced steps (default 256)")
    p.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES + VARIANTS)}")
    p.add_argument("--chunk-size", type=int, default=None, help="recall chunk tokens (default: the config's)")
    p.add_argument(
        "--chunk-budget", type=int, default=None, help="chunks per layer and head (default: the config's)"
    )
    p.add_argument(
        "--lookahead", type=int, default=None, help="steps per recall window (default: the config's)"
    )
    p.add_argument("--no-engine", action="store_true", help="skip the engine rows")
    p.add_argument(
        "--plot-dir",
        default=None,
        help="only plot: every what-if JSON in this folder in one figure (summary.png there), no model run",
    )
    p.add_argument("--model", default="default", choices=("default", "tiny"), help="tiny: smoke tests only")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.plot_dir:
        return plot_folder(args.plot_dir)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES + VARIANTS):
        p.error(f"--modes must name some of {MODES + VARIANTS}")
    q = args.quick
    num_tokens, num_docs = args.tokens or (640 if q else 4096), args.docs or (1 if q else 2)
    new_tokens = args.new_tokens or (48 if q else 256)
    json_path, png = common.result_paths(result_name("recall_granularity", args.text), q, args.json)

    from transformers import AttentionInterface

    import flashmem

    model, tok, name, stats_path = common.load_bench_model(args.model)
    base = flashmem.FlashMemConfig()
    budget = base.sink_tokens + base.recent_tokens  # the minimum budget: the working set is sinks + window
    overrides = {
        key: value
        for key, value in (
            ("chunk_size", args.chunk_size), ("chunk_budget", args.chunk_budget), ("lookahead", args.lookahead)
        )
        if value is not None
    }  # fmt: skip
    cfg = flashmem.FlashMemConfig(budget_tokens=budget, **overrides)
    text_cfg = model.config
    layers, h_kv = text_cfg.num_hidden_layers, text_cfg.num_key_value_heads
    AttentionInterface.register("recall_whatif", _attention)
    docs = load_documents(tok, args.text, num_docs, num_tokens)
    rows, checks = [], []
    for di, doc in enumerate(docs):
        ids = torch.tensor([doc["ids"]])
        ref = common.hf_decode(model, ids, new_tokens)
        seq = torch.cat([ids, torch.tensor([ref["tokens"][:-1]])], 1)
        total, P = seq.shape[1], ids.shape[1]
        _STATE.clear()
        _STATE.update(
            prompt=P, chunk=cfg.chunk_size, lookahead=cfg.lookahead, observe=cfg.observe_tokens,
            sinks=cfg.sink_tokens, recent=cfg.recent_tokens, interval=cfg.compaction_interval,
            mode="record", q={}, k={}, observed={}, tokens={}, future={},
        )  # fmt: skip
        saved = text_cfg._attn_implementation
        model.set_attn_implementation("recall_whatif")
        try:
            logits = model(seq).logits[0, P - 1 :].float()
            check = metrics.compare_logits(ref["logits"], logits)
            if check["top1_agreement"] != 1.0 or check["max_kl"] > 1e-6:
                raise AssertionError(
                    f"the what-if's full-attention pass differs from full attention: {check}"
                )
            checks.append({"doc": doc["file"], **check})
            for mode in modes:
                t0 = time.perf_counter()
                k, cs = cfg.effective_chunk_budget, cfg.chunk_size
                if mode.startswith("per_head_snap"):
                    slots = k // 2 if mode == "per_head_snap_half" else 0
                    extra = cs if mode == "per_head_snap_plus" else 0
                    sel = select("per_head", layers, h_kv, total, slots) if slots else [[]] * layers
                    static = snap_tokens(layers, (k - slots) * cs + extra)
                else:
                    sel, static = select(mode, layers, h_kv, total, k), None
                _STATE["allow"] = allow_masks(sel, total, h_kv, static)
                _STATE["mode"] = "masked"
                logits = model(seq).logits[0, P - 1 :].float()
                _STATE["mode"] = "record"
                m = metrics.compare_logits(ref["logits"], logits)
                rows.append({"doc": doc["file"], "method": f"what-if {mode}", "mode": mode, **m})
                print(f"doc {di + 1} {mode}: top-1 {m['top1_agreement']:.3f}, KL {m['mean_kl']:.4f} "
                      f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        finally:
            model.set_attn_implementation(saved)
        for recall_mode in () if args.no_engine else ("shared", "per_layer_per_head"):
            run = common.flashmem_decode(
                model, {"budget_tokens": budget, "recall_mode": recall_mode, **overrides}, ids, new_tokens,
                forced=ref["tokens"], stats_path=stats_path,
            )  # fmt: skip
            m = metrics.compare_logits(ref["logits"], run["logits"])
            rows.append(
                {"doc": doc["file"], "method": f"engine recall_mode={recall_mode}", "mode": recall_mode, **m,
                 "avg_device_share": run["report"].get("avg_device_share")}
            )  # fmt: skip
            print(
                f"doc {di + 1} engine {recall_mode}: top-1 {m['top1_agreement']:.3f}, KL {m['mean_kl']:.4f}"
            )
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        summary.append(
            {
                "method": method,
                "top1_agreement": sum(r["top1_agreement"] for r in rs) / len(rs),
                "mean_kl": sum(r["mean_kl"] for r in rs) / len(rs),
                "docs": len(rs),
            }
        )
    data = common.header(
        "recall_granularity", quick=q, model=name, context_tokens=num_tokens, text=args.text,
        docs=[d["file"] for d in docs], new_tokens=new_tokens, budget_tokens=budget,
        chunk_size=cfg.chunk_size, chunk_budget=cfg.effective_chunk_budget, lookahead=cfg.lookahead,
        method="one teacher-forced forward per mode, decode rows masked per layer and KV head to the keys "
        "the device would hold at the minimum budget; selection from a full-attention pass's queries",
    )  # fmt: skip
    data.update(check=checks, summary=summary, rows=rows)
    common.write_json(json_path, data)
    _plot(
        summary, png, f"{name.split(' ')[0]}, {num_docs} x {num_tokens} tokens ({args.text}), budget {budget}"
    )
    return 0


def plot_folder(folder) -> int:
    """One bar chart of every what-if row in ``folder/*.json`` (mean KL and top-1, labelled by chunk
    size x slots, lookahead and mode), written to ``folder/summary.png``."""
    import json
    from pathlib import Path

    folder = Path(folder)
    summary = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        st = data["settings"]
        tag = f"{st['chunk_size']}x{st['chunk_budget']}, look {st['lookahead']}"
        for s in data["summary"]:
            summary.append({**s, "method": f"{tag}: {s['method'].removeprefix('what-if ')}"})
    if not summary:
        raise SystemExit(f"no what-if JSON in {folder}")
    summary.sort(key=lambda s: s["mean_kl"])
    _plot(summary, folder / "summary.png", f"recall what-ifs in {folder.name} (code, minimum budget)")
    print(f"wrote {folder / 'summary.png'} ({len(summary)} rows)")
    return 0


def _plot(summary: list[dict], png, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, max(3.6, 0.28 * len(summary) + 1)))
    names = [s["method"] for s in summary]
    for axis, key, label in (
        (ax[0], "mean_kl", "mean KL(full || method), nats"),
        (ax[1], "top1_agreement", "top-1 agreement"),
    ):
        axis.barh(
            names,
            [s[key] for s in summary],
            color=["#888" if "engine" in n else "#c84" if "oracle" in n else "#4a7" for n in names],
        )
        axis.set_xlabel(label)
        if key == "top1_agreement":
            axis.set_xlim(max(0.0, min(s[key] for s in summary) - 0.05), 1.0)
        axis.invert_yaxis()
    ax[1].set_yticklabels([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
