"""Indexer training records from the model's own attention: one full-attention prefill per document.

:func:`extract_document` runs the model once over a document, captures every layer's post-RoPE
queries and keys, and keeps what indexers are trained and judged on (:class:`flashmem.indexer.records.DocRecord`):
chunk summaries, the refresh-time queries and the window targets of :mod:`flashmem.indexer.labels`.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .hf_compat import (
    attention_scaling,
    base_model,
    capture_attention_inputs,
    kv_geometry,
    rotary_cos_sin,
    unrotate,
)
from .indexer.labels import combine_layers, layer_window_targets
from .indexer.records import DocRecord, TargetConfig
from .indexer.summaries import summarize_chunks


@torch.no_grad()
def extract_document(
    model: torch.nn.Module, input_ids: torch.Tensor, cfg: TargetConfig, name: str = ""
) -> DocRecord:
    """Prefill ``input_ids`` [T] with full attention and build the document's record."""
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must be [T], got shape {tuple(input_ids.shape)}")
    T = input_ids.shape[0]
    refresh = cfg.refresh_positions(T)
    if not refresh:
        raise ValueError(
            f"a {T}-token document has no refresh position (first_refresh={cfg.first_refresh}, lookahead={cfg.lookahead})"
        )
    num_layers = kv_geometry(model)[0]
    device = next(model.parameters()).device
    cos, sin = rotary_cos_sin(model, torch.arange(T, device=device))  # [T, D]
    ref_idx = torch.tensor(refresh, device=device)
    out: dict[int, tuple] = {}

    def on_layer(layer, q, k, v):
        q, k = q[0].float(), k[0].float()  # [H_q, T, D], [H_kv, T, D]
        k_pre = unrotate(k, cos, sin)
        q_sel = q[:, ref_idx]  # [H_q, R, D]
        q_pre = unrotate(q_sel, cos[ref_idx], sin[ref_idx])
        summ = summarize_chunks(k.transpose(0, 1), k_pre.transpose(0, 1), cfg.chunk_size)
        tgt = layer_window_targets(
            q,
            k,
            refresh,
            cfg.chunk_size,
            cfg.lookahead,
            cfg.top_p,
            cfg.num_sink_chunks,
            cfg.recent_tokens,
            scaling=attention_scaling(model, layer),
            window_stride=cfg.window_stride,
        )
        out[layer] = (q_pre.transpose(0, 1).cpu(), q_sel.transpose(0, 1).cpu(), summ, tgt)

    base = base_model(model)  # skip the LM head: only attention inputs are needed
    with capture_attention_inputs(model, on_layer):
        base(input_ids=input_ids.unsqueeze(0).to(device), use_cache=False)
    if sorted(out) != list(range(num_layers)):
        raise RuntimeError(f"captured layers {sorted(out)}, expected 0..{num_layers - 1}")
    layers = [out[i] for i in range(num_layers)]
    comb = combine_layers([x[3] for x in layers], cfg.top_p)
    return DocRecord(
        name=name,
        q_pre=torch.stack([x[0] for x in layers]),
        q_rope=torch.stack([x[1] for x in layers]),
        mean_key=torch.stack([x[2].mean_key for x in layers]).cpu(),
        mean_key_rope=torch.stack([x[2].mean_key_rope for x in layers]).cpu(),
        min_key=torch.stack([x[2].bounds()[0] for x in layers]).cpu(),  # dequantized, as recall sees them
        max_key=torch.stack([x[2].bounds()[1] for x in layers]).cpu(),
        start=layers[0][2].start.cpu(),
        refresh=torch.tensor(refresh, dtype=torch.int64),
        candidates=layers[0][3].candidates,
        target=torch.stack([x[3].target for x in layers]),
        labels=torch.stack([x[3].labels for x in layers]),
        labels_all=comb.labels,
        target_all=comb.target,
        chunk_size=cfg.chunk_size,
    )


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
        if len(ids) < cfg.first_refresh + cfg.lookahead:
            continue
        records.append(extract_document(model, torch.tensor(ids), cfg, name=name))
    return records
