"""The README's result tables, rendered from the JSON files in ``bench/results/`` (not a benchmark:
it reads what the entries wrote; only ``bench/run.py`` imports it).

    python -m bench.run report            # rewrite the tables in README.md from the JSON files
    python -m bench.run report --check    # exit 1 (and show the difference) when README.md disagrees

Each table sits in README.md between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``; the
text around the markers is written by hand, the text between them only by this module, so the
figures in the README are the figures in the JSON. ``tests/bench/test_readme_results.py`` runs the
check on every test run. A table whose JSON file is missing renders as a line saying so.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"
MARK = re.compile(
    r"(<!-- results:(?P<name>[a-z0-9_-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S
)


# ---------------------------------------------------------------------------------------------
# formatting helpers
# ---------------------------------------------------------------------------------------------
def _load(name: str, results: Path) -> dict | None:
    path = results / name
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _int(x) -> str:
    return "n/a" if x is None else f"{int(x):,}"


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _missing(*names: str) -> str:
    return f"_(not measured yet: {', '.join(f'`bench/results/{n}`' for n in names)} missing)_\n"


def _method(label: str) -> str:
    """``flashmem budget_tokens=256,chunk_size=16`` -> ``flashmem (budget 256, chunk size 16)``."""
    if not label.startswith("flashmem ") or "=" not in label:
        return label
    pairs = [kv.split("=", 1) for kv in label[len("flashmem ") :].split(",")]
    return "flashmem (" + _cfg({k.strip(): v for k, v in pairs}) + ")"


def _cfg(cfg: dict) -> str:
    if not cfg:
        return "no budget"
    parts = []
    for k, v in cfg.items():
        parts.append(f"{k.replace('_tokens', '').replace('_', ' ')} {v}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
def passkey_trials(results: Path) -> str:
    """Per length: full attention, flashmem with only ``budget_tokens`` set (``*_default.json``) and
    the kvpress presses; a flashmem run from before a change of the defaults is named below the table."""
    rows, notes = [], []
    for tag in ("4k", "7k", "2k"):
        for method in ("full", "default"):
            name = f"passkey_trials_{tag}_{method}.json"
            d = _load(name, results)
            if d is None:
                rows.append([tag, method, "not run", "", "", f"`{name}`"])
                continue
            tokens = d["records"][0]["tokens"] if d["records"] else "?"
            label = "full attention" if not d["config"] else f"**flashmem ({_cfg(d['config'])})**"
            old = _stamp_old(d) if d["config"] else ""  # full attention depends on no flashmem default
            if old:
                notes.append(f"`{name}`: {old}.")
            rows.append(
                [
                    f"{_int(tokens)} tokens",
                    label,
                    f"{d['correct']}/{d['trials']}",
                    _pct(min(d["max_peak_device_share"], 1.0)),
                    _pct(min(d["mean_avg_device_share"], 1.0)),
                    f"`{name}`",
                ]
            )
        name = f"kvpress_passkey_trials_{tag}.json"
        d = _load(name, results)
        for method, s in (d or {}).get("summary", {}).items():
            rows.append(
                [
                    f"{_int(d['prompt_tokens'])} tokens",
                    method,
                    f"{s['correct']}/{s['trials']}",
                    "n/a",
                    _pct(s.get("mean_kept_share")) + " kept",
                    f"`{name}`",
                ]
            )
    table = _table(["prompt", "method", "correct", "peak device share", "avg device share", "results"], rows)
    return table + "".join(f"\n{n}\n" for n in notes)


def long_context(results: Path) -> str:
    d = _load("long_context_tiny_500000.json", results)
    if d is None:
        return _missing("long_context_tiny_500000.json")
    short = _load("long_context_tiny_4096.json", results)
    rep = d["report"]
    parts = d.get("device_bytes")
    if parts is not None:  # runs with the complete accounting: every device byte, KV alone beside it
        peak = (
            f"{_pct(d['peak_device_share'], 2)} ({_mib(parts['peak_total'])} of {_mib(d['full_kv_bytes'])})"
        )
        extra = [_pct(d["peak_device_kv_share"], 2)]
        headers = ["peak device (all bytes)", "peak KV alone", "avg device (all bytes)"]
    else:
        peak = f"{_pct(d['peak_device_share'], 2)} ({_mib(d['peak_device_kv_bytes'])} of {_mib(d['full_kv_bytes'])})"
        extra = []
        headers = ["peak device KV", "avg device KV"]
    row = [
        _int(d["context_tokens"]),
        _int(d["new_tokens"]),
        peak,
        *extra,
        _pct(d["avg_device_share"], 2),
        ("= full KV" if d["host_equals_full"] else "!= full KV") + f" ({_mib(d['host_kv_bytes'])})",
        _int(d["blocks_freed"]),
        f"{d['prefill_tokens_per_s']:,.0f} tok/s",
        f"{d['decode_tokens_per_s']:,.0f} tok/s",
        f"{d['wall_s']:.0f} s",
    ]
    out = _table(
        ["context", "new tokens", *headers, "host mirror", "blocks freed", "prefill", "decode", "wall"],
        [row],
    )
    if parts is not None:
        listed = ", ".join(
            f"{k} {_mib(parts[k])}"
            for k in (
                "kv",
                "kv_reserved",
                "index",
                "staging_peak",
                "outputs",
                "scratch_peak",
                "total",
                "peak_total",
            )
        )
        out += f"\nDevice bytes at the end of the run (peaks where named): {listed}.\n"
    if short is not None:
        long_ms = 1000 * rep["timings"]["decode_s"] / rep["decode_steps"]
        s_rep = short["report"]
        short_ms = 1000 * s_rep["timings"]["decode_s"] / s_rep["decode_steps"]
        out += (
            f"\nDecode step time, same model and settings: {long_ms:.2f} ms at {_int(d['context_tokens'])} "
            f"tokens vs {short_ms:.2f} ms at {_int(short['context_tokens'])} tokens: a ratio of "
            f"**{long_ms / short_ms:.2f}** (ideal 1.0).\n"
        )
        fd_long = _load("long_context_tiny_500000_flush_denormal.json", results)
        fd_short = _load("long_context_tiny_4096_flush_denormal.json", results)
        if fd_long and fd_short:
            fl = 1000 * fd_long["report"]["timings"]["decode_s"] / fd_long["report"]["decode_steps"]
            fs = 1000 * fd_short["report"]["timings"]["decode_s"] / fd_short["report"]["decode_steps"]
            out += (
                f"With denormal floats flushed to zero (`--flush-denormal`, same settings): {fl:.2f} ms vs "
                f"{fs:.2f} ms, a ratio of **{fl / fs:.2f}** (`long_context_tiny_500000_flush_denormal.json`, "
                f"`long_context_tiny_4096_flush_denormal.json`).\n"
            )
        b_long, b_short = d.get("decode_breakdown_ms_per_step"), short.get("decode_breakdown_ms_per_step")
        if b_long and b_short:
            parts = [
                ("total", "decode step"),
                ("forward_and_attention", "forward + attention"),
                ("recall_refresh", "recall refreshes (indexer + requests + waits)"),
                ("h2d_copy_time_in_recall", "of which host-to-device copies"),
                ("stall_time_in_recall", "of which stalls"),
                ("compaction", "compaction"),
            ]
            rows = [
                [what, f"{b_short[k]:.3f}", f"{b_long[k]:.3f}", f"{b_long[k] - b_short[k]:+.3f}"]
                for k, what in parts
            ]
            out += "\nWhere the decode time goes (ms per step, mean over the decode steps):\n\n" + _table(
                [
                    "part",
                    f"{_int(short['context_tokens'])} tokens",
                    f"{_int(d['context_tokens'])} tokens",
                    "difference",
                ],
                rows,
            )
    return out


def prefill_cost(results: Path) -> str:
    d = _load("prefill_cost.json", results)
    if d is None:
        return _missing("prefill_cost.json")
    a = d["part_a"]
    rows = [
        [
            _int(r["tokens"]),
            f"{r['dense_prefill_s']:.2f} s",
            f"{r['flashmem_prefill_s']:.2f} s",
            f"**{r['ratio']:.2f}x**",
            f"{r['first_token_logits_rel_diff']:.1e}",
            _mib(r["prefill_h2d_bytes"]),
            _mib(r["prefill_d2h_bytes"]) + f" (= full KV {_mib(r['full_kv_bytes'])})",
        ]
        for r in a["rows"]
    ]
    return (
        f"{a['model']}, `budget_tokens={a['budget_tokens']}` and every other setting at its default; "
        f"median of {d['settings']['repeats']} runs each, interleaved in one process, "
        f"{d['machine'].get('torch_threads', '?')} torch thread(s). {_stamp(d)}\n\n"
        + _table(
            [
                "prompt tokens",
                "dense prefill",
                "flashmem prefill",
                "ratio",
                "first-token logits (rel. diff)",
                "host-to-device",
                "device-to-host",
            ],
            rows,
        )
    )


STATS_SOURCE_FILES = (
    "passkey_trials_4k_default.json",
    "passkey_trials_4k_prompt_stats.json",
)


def stats_source(results: Path) -> str:
    rows, old = [], []
    for name, what in zip(
        STATS_SOURCE_FILES, ("shipped (calibrated on local text)", "the prompt's own queries")
    ):
        d = _load(name, results)
        if d is None:
            rows.append([what, "not run", "", "", "", f"`{name}`"])
            continue
        if _auto_was_learned(d):
            old.append(f"`{name}`")
        rows.append(
            [
                what,
                f"`{json.dumps(d['config'])}`",
                f"{d['correct']}/{d['trials']}",
                _pct(d["max_peak_device_share"]),
                _pct(d.get("max_peak_device_kv_share")),
                f"`{name}`",
            ]
        )
    said = "Both" if len(old) == len(STATS_SOURCE_FILES) else " and ".join(old)
    return (f"{said} {AUTO_WAS_LEARNED}.\n\n" if old else "") + _table(
        [
            "TriAttention stats",
            "config",
            "correct",
            "peak device share (all bytes)",
            "peak KV share",
            "results",
        ],
        rows,
    )


def freed_blocks(results: Path) -> str:
    d = _load("freed_blocks.json", results)
    if d is None:
        return _missing("freed_blocks.json")
    rows = []
    for r in d["rows"]:
        ts = r.get("triattention_scores") or {}
        rows.append(
            [
                _pct(r["eviction_rate"], 1),
                _int(r["ideal_freeable_blocks"]),
                f"{r['inplace_random']['blocks_freed_mean']:.1f}",
                f"{r['inplace_expected_hypergeometric']:.2f}",
                f"{ts.get('inplace_per_head_blocks_freed', 'n/a')} / {ts.get('inplace_shared_blocks_freed', 'n/a')}",
                f"**{_int(r['compaction_random']['blocks_freed'])}**",
            ]
        )
    head = (
        f"{_int(d['tokens'])} tokens in {_int(d['blocks'])} blocks of {d['block_size']}; real scores from the "
        f"default model's layer {d['real_scores'].get('layer')} on local text.\n\n"
    )
    return head + _table(
        [
            "evicted",
            "ideal blocks",
            f"in place, random ({d['rows'][0]['inplace_random']['seeds']} seeds)",
            "expected (hypergeometric)",
            "in place, TriAttention per head / shared",
            "**compaction**",
        ],
        rows,
    )


INDEXER_ORDER = ["lookahead", "recency", "quest", "mean_key", "mean_key_prerope", "oracle"]
INDEXER_NAMES = {
    "lookahead": "learned lookahead (shipped)",
    "recency": "recency",
    "quest": "quest",
    "mean_key": "mean key",
    "mean_key_prerope": "mean key (pre-RoPE)",
    "oracle": "oracle",
}


def indexer(results: Path) -> str:
    d = _load("indexer_eval.json", results)
    if d is None:
        return _missing("indexer_eval.json")
    ix = d["indexers"]
    rows = []
    for name in INDEXER_ORDER + sorted(set(ix) - set(INDEXER_ORDER)):
        if name not in ix:
            continue
        s = ix[name]
        bold = name == "lookahead"
        cm = f"{s['covered_mass']:.3f}"
        vo = f"{s['mass_vs_oracle']:.3f}"
        rows.append(
            [
                INDEXER_NAMES.get(name, name),
                f"**{cm}**" if bold else cm,
                f"**{vo}**" if bold else vo,
                f"{s['recall']:.3f}",
            ]
        )
    t = d["targets"]
    head = (
        f"{len(d['documents'])} held-out documents of {_int(d['tokens_per_document'])} tokens; chunks of "
        f"{t['chunk_size']}, lookahead = {t.get('lookahead', t.get('tau'))}, labels: top-p {t['top_p']} of attention mass; chunk "
        f"budget {_pct(d['budget'], 0)}.\n\n"
    )
    c = d.get("refresh_cost_500k")
    tail = ""
    if c:
        tail = (
            f"\nRefresh cost at 500K tokens ({_int(c['num_chunks'])} chunks, all layers): "
            f"{c['flops_per_refresh_all_layers'] / 1e9:.2f} GFLOP, {c['cpu_seconds_per_refresh_all_layers']:.2f} s "
            f"on {c['cpu_threads']} CPU thread(s), i.e. {c['amortised_flops_per_decode_step'] / 1e6:.0f} MFLOP per "
            f"decode step amortised over lookahead = {t.get('lookahead', t.get('tau'))}.\n"
        )
    return (
        head
        + _table(["indexer", "covered attention mass", "vs oracle", "recall@K of label chunks"], rows)
        + tail
    )


def bandwidth(results: Path) -> str:
    files = sorted(results.glob("bandwidth_*.json"))
    if not files:
        return _missing("bandwidth_<machine>.json")
    out = []
    for path in files:
        d = json.loads(path.read_text())
        s = d["summary"]
        rows = [
            [
                _int(r["chunk_tokens"]),
                _mib(r["bytes"]),
                f"{r['pinned_batched_gbps']:.2f}",
                f"{r['pageable_batched_gbps']:.2f}",
                f"{r['per_row_gbps']:.3f}",
                f"{r['batched_speedup_vs_per_row']:.0f}x",
            ]
            for r in d["results"]
        ]
        out.append(
            f"`{path.name}`: best copy on this machine {s['best_copy_gbps']:.1f} GB/s; batched pinned path at "
            f"{_int(s['largest_chunk_tokens'])}-token chunks {s['pinned_batched_gbps_largest']:.2f} GB/s = "
            f"{_pct(s['pinned_batched_fraction_of_best'])} of it.\n\n"
            + _table(
                [
                    "chunk tokens",
                    "bytes per batch",
                    "batched pinned GB/s",
                    "batched pageable GB/s",
                    "per-row GB/s",
                    "batched vs per-row",
                ],
                rows,
            )
        )
    return "\n".join(out)


# Until this time (unix seconds) ``indexer="auto"`` resolved to the shipped learned checkpoint on the
# embedded model; since then to Quest (``flashmem.recall.resolve_indexer``). A file of the embedded
# model's runs from before it says so beside its machine, so a row left at the default is not read as
# today's default.
AUTO_IS_QUEST_SINCE = 1796221912


NO_RECALL_BENCHMARKS = ("prefill-cost", "prepare-cost")  # prefill alone; a prepared checkpoint


def _auto_was_learned(d: dict) -> bool:
    return (
        "SmolLM2" in str(d.get("model", ""))
        and d.get("benchmark") not in NO_RECALL_BENCHMARKS
        and d.get("created_unix", 0) < AUTO_IS_QUEST_SINCE
    )


AUTO_WAS_LEARNED = (
    'run when `indexer="auto"` meant the shipped learned indexer (now Quest): rows left at the default '
    "use the learned one"
)


# Until this time (unix seconds) recall gave every layer and KV head one set of chunks; since then
# (0.2.3) the default, recall_mode="per_layer_per_head", fills the slots per layer and head after the
# first window. A file from before it says so, unless its benchmark recalls nothing by default or
# compares presses only (the kvpress tables take flashmem's row from the current fidelity files).
RECALL_PER_HEAD_SINCE = 1796612650
SHARED_RECALL_UNAFFECTED = (*NO_RECALL_BENCHMARKS, "bandwidth", "freed_blocks", "kvpress_fidelity")
RECALL_WAS_SHARED = (
    'run when recall held one set of chunks for every layer and head (`recall_mode="shared"`, the '
    "default before 0.2.3)"
)


# Until this time (unix seconds) ``compaction_interval`` defaulted to 128; since then (0.2.4) to 64,
# which at the same budget reserves 64 fewer pool slots. A file from before it says so, unless its
# benchmark does not depend on the interval (the kvpress fidelity tables take flashmem's row from the
# current fidelity files; the copy benchmarks and the prepare step compact nothing).
INTERVAL_64_SINCE = 1796654000
INTERVAL_UNAFFECTED = ("prepare-cost", "bandwidth", "kvpress_fidelity")
INTERVAL_WAS_128 = "run when `compaction_interval` defaulted to 128 (before 0.2.4)"


# Until this time (unix seconds) Quest's chunk bounds were stored in the model's dtype (1.56% of the
# full KV at 64-token chunks); since then (0.2.5) as int8 codes with one fp32 scale per chunk and head
# (0.81% of the KV in bf16 at head_dim 64, 0.40% in fp32), so the same budget holds less device share.
# A file from before it says so, unless its benchmark holds no chunk summaries (the kvpress fidelity
# tables take flashmem's row from the current fidelity files).
INT8_BOUNDS_SINCE = 1796666200
INT8_BOUNDS_UNAFFECTED = ("prepare-cost", "bandwidth", "kvpress_fidelity", "freed_blocks")
BOUNDS_WERE_FLOAT = (
    "run when Quest's chunk bounds were stored in the model's dtype (before 0.2.5; now int8): they held "
    "1.56% of the full KV (now 0.40% in fp32), so the same budget gave about 1.2 points more share"
)


# Until this time (unix seconds) ``triattention_mode`` defaulted to "per_head" (one keep-set per KV
# head for every layer); since then (0.2.6) each layer keeps its own tokens per KV head
# ("per_layer_per_head"), with the same device share at a budget. A file from before it says so,
# unless its benchmark compacts nothing under the defaults (the kvpress fidelity tables take
# flashmem's row from the current fidelity files).
KEEP_PER_LAYER_SINCE = 1796697892
KEEP_PER_LAYER_UNAFFECTED = ("prepare-cost", "bandwidth", "kvpress_fidelity", "freed_blocks")
KEEP_WAS_SHARED = (
    'run when `triattention_mode` defaulted to "per_head", one keep-set per KV head for every layer '
    '(before 0.2.6; now "per_layer_per_head", at the same share)'
)


# (since, benchmarks it does not touch, note): a run of another benchmark created before ``since``
# (or undated) ran under the former default, which ``note`` names.
DEFAULT_CHANGES = (
    (RECALL_PER_HEAD_SINCE, SHARED_RECALL_UNAFFECTED, RECALL_WAS_SHARED),
    (INTERVAL_64_SINCE, INTERVAL_UNAFFECTED, INTERVAL_WAS_128),
    (INT8_BOUNDS_SINCE, INT8_BOUNDS_UNAFFECTED, BOUNDS_WERE_FLOAT),
    (KEEP_PER_LAYER_SINCE, KEEP_PER_LAYER_UNAFFECTED, KEEP_WAS_SHARED),
)


def _stamp_old(d: dict) -> str:
    """What has changed in the defaults since ``d`` ran ("" for a current run), joined by "; "."""
    old = [AUTO_WAS_LEARNED] if _auto_was_learned(d) else []
    when, benchmark = d.get("created_unix", 0), d.get("benchmark")
    old += [
        note for since, unaffected, note in DEFAULT_CHANGES if benchmark not in unaffected and when < since
    ]
    return "; ".join(old)


def _stamp(d: dict) -> str:
    m = d.get("machine", {})
    load = m.get("load_average_1min")
    gpu = (m.get("gpu") or {}).get("name") or "no GPU"
    when = f", load average {load:.1f} at the start" if isinstance(load, (int, float)) else ""
    old = _stamp_old(d)
    return f"{m.get('cpu', '?')} ({m.get('cpu_count', '?')} cores, {gpu}){when}{'; ' + old if old else ''}"


def memory(results: Path) -> str:
    d = _load("memory.json", results)
    if d is None:
        return _missing("memory.json")
    rows = [
        [
            r["model_short"],
            _int(r["prompt_tokens"]),
            _int(r["decode_steps"]),
            r["label"].replace("flashmem ", ""),
            _pct(r["avg_device_share"]),
            _pct(r["peak_device_share"]),
            _mib(r["trace_max_bytes"]),
            _mib(r["full_kv_bytes_end"]),
            "= full" if r["host_kv_bytes"] == r["full_kv_bytes_end"] else _mib(r["host_kv_bytes"]),
            _int(r["blocks_freed"]),
        ]
        for r in d["runs"]
    ]
    return f"Machine: {_stamp(d)}.\n\n" + _table(
        [
            "model",
            "prompt",
            "steps",
            "config",
            "avg share",
            "peak share (incl. prefill)",
            "max device (decode)",
            "full KV",
            "host mirror",
            "blocks freed",
        ],
        rows,
    )


def passkey(results: Path) -> str:
    d = _load("passkey.json", results)
    if d is None:
        return _missing("passkey.json")
    lengths = [str(x) for x in d["settings"]["lengths"]]
    rows = []
    for s in d["summaries"]:
        cells = []
        for L in lengths:
            b = s["by_length"].get(L)
            if b is None:
                cells.append("")
                continue
            share = b.get("mean_avg_device_share")
            cells.append(
                f"{b['correct']}/{b['trials']}" + (f" ({_pct(share, 0)} avg share)" if share else "")
            )
        agree = [
            s["by_length"][L].get("mean_top1_agreement_with_full") for L in lengths if L in s["by_length"]
        ]
        agree = [a for a in agree if a is not None]
        rows.append(
            [
                _method(s["method"]),
                *cells,
                f"{s['correct']}/{s['trials']}",
                f"{sum(agree) / len(agree):.2f}" if agree else "",
            ]
        )
    tokens = d["settings"].get("prompt_tokens", {})
    heads = [f"{_int(tokens[L][0])} tokens" if tokens.get(L) else f"~{_int(int(L))} tokens" for L in lengths]
    depths = ", ".join(f"{x:g}" for x in d["settings"]["depths"])
    return (
        f"Depths {depths}; {d['settings']['new_tokens']} greedy tokens. Machine: {_stamp(d)}.\n\n"
        + _table(["method", *heads, "all", "token agreement with full"], rows)
    )


FIDELITY_TEXTS = (("", "source code"), ("_prose", "natural text (local prose)"))


def _per_text(base: str, results: Path):
    """``(file name, what, data)`` of ``base.json`` (source code) and ``base_prose.json`` (prose),
    for those that were run."""
    for suffix, what in FIDELITY_TEXTS:
        name = f"{base}{suffix}.json"
        d = _load(name, results)
        if d is not None:
            yield name, what, d


def fidelity(results: Path) -> str:
    """flashmem's next-token fidelity per budget, one table per kind of document that was run."""
    out = []
    for name, what, d in _per_text("fidelity", results):
        st = d["settings"]
        rows = [
            [
                _method(s["method"]),
                f"{s['top1_agreement']:.3f}",
                f"{s['mean_kl']:.4f}",
                _pct(s["mean_avg_device_share"]),
            ]
            for s in d["summary"]
        ]
        docs = ", ".join(f"`{x}`" for x in st["docs"])
        out.append(
            f"**{what.capitalize()}** (`{name}`): {len(st['docs'])} documents of "
            f"{_int(st['context_tokens'])} tokens ({docs}), {st['new_tokens']} teacher-forced steps each. "
            f"Machine: {_stamp(d)}.\n\n"
            + _table(["method", "top-1 agreement", "mean KL (nats)", "avg device share"], rows)
        )
    return "\n".join(out) if out else _missing("fidelity.json")


def throughput(results: Path) -> str:
    d = _load("throughput.json", results)
    if d is None:
        return _missing("throughput.json")
    a, b = d["part_a"], d["part_b"]
    full = a["full_attention"]
    rows = [
        [
            "full attention (DynamicCache)",
            f"{full['step_ms']:.1f}",
            f"{full['tokens_per_s']:.1f}",
            "1.00",
            "100%",
        ]
    ]
    for r in a["flashmem"]:
        rows.append(
            [
                _method(r["method"]),
                f"{r['step_ms']:.1f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['ratio_vs_full']:.2f}",
                _pct(r.get("avg_device_share")),
            ]
        )
    out = (
        f"Part A: {a['model_short']}, {_int(a['context_tokens'])}-token prompt, {a['steps']} decode steps "
        f"(median step). Machine: {_stamp(d)}.\n\n"
        + _table(["method", "ms per step", "tokens/s", "vs full attention", "avg device share"], rows)
    )
    brow = []
    for name in ("short", "long"):
        r = b["runs"][name]
        per = r["flashmem"]["timings_per_step_ms"]
        brow.append(
            [
                _int(r["context_tokens"]),
                f"{r['flashmem']['step_ms']:.2f} / {r['flashmem']['mean_step_ms']:.2f}",
                f"{per.get('compaction_s', 0):.2f}",
                f"{per.get('recall_s', 0):.2f}",
                f"{r['full_attention']['step_ms']:.2f}",
            ]
        )
    out += (
        f"\nPart B: tiny model, {_cfg(b['flashmem_config'])}; step time long / short: flashmem "
        f"**{b['flashmem_long_over_short']:.2f}**, full attention {b['full_long_over_short']:.2f}.\n\n"
        + _table(
            [
                "prompt",
                "flashmem ms/step (median / mean)",
                "of which compaction (mean)",
                "of which recall (mean)",
                "full attention ms/step (median)",
            ],
            brow,
        )
    )
    return out


def _current_flashmem_rows(
    fidelity_name: str, results: Path, settings: dict, machine_transformers: str | None = None
) -> dict:
    """flashmem's rows of the current ``fidelity*.json`` for the press run's share labels, where that run
    used the same documents (names, and the same transformers, whose files they are read from) and
    steps and its share is still the one the presses were matched to
    (within 0.5 points): a flashmem release that changes what it decodes, not what it holds, needs no
    new press runs. A label's own row comes first; else a row that sets nothing but the budget (the
    default configuration at another budget, as after a default that changes what a budget holds) at
    that share. Labels with neither keep the row the press run recorded."""
    d = _load(fidelity_name, results)
    if d is None or d["settings"].get("docs") != settings.get("docs"):
        return {}
    if d["settings"].get("new_tokens") != settings.get("new_tokens"):
        return {}
    # the documents are read from the installed packages: another transformers, other text
    if (d.get("machine") or {}).get("transformers") != machine_transformers:
        return {}
    rows = {x["method"].replace("flashmem ", ""): x for x in d["summary"]}
    budget_only = [x for label, x in rows.items() if "," not in label and label.startswith("budget_tokens=")]
    out = {}
    for share in settings["keep_shares"]:
        own = rows.get(share["label"])
        near = [
            x
            for x in ([own] if own else []) + budget_only
            if abs(x["mean_avg_device_share"] - share["share"]) <= 0.005
        ]
        if near:
            out[share["label"]] = near[0]
    return out


def kvpress_fidelity(results: Path) -> str:
    """Per kind of document and flashmem budget: flashmem's row, then every press at the share
    matched to flashmem's (measured kept share, its largest gap to the target over the documents),
    and flashmem's top-1 minus the best matched press's."""
    out = []
    for name, what, d in _per_text("kvpress_fidelity", results):
        st = d["settings"]
        fm = {x["method"].replace("flashmem ", ""): x for x in (d.get("flashmem") or [])}
        tf = (d.get("machine") or {}).get("transformers")
        fm.update(_current_flashmem_rows(name.replace("kvpress_", ""), results, st, tf))
        rows = []
        for share in st["keep_shares"]:
            label = share["label"]
            presses = [x for x in d["summary"] if x["share_label"] == label]
            matched = [x for x in presses if x.get("matched")]
            f = fm.get(label)
            if f is not None:
                best = max(matched, key=lambda x: x["top1_agreement"], default=None)
                lead = "n/a" if best is None else f"{f['top1_agreement'] - best['top1_agreement']:+.3f}"
                rows.append(
                    [
                        f"**{_method(f.get('method', 'flashmem ' + label))}**",
                        _pct(f["mean_avg_device_share"]),
                        "(every device byte)",
                        f"**{f['top1_agreement']:.3f}**",
                        f"**{f['mean_kl']:.4f}**",
                        f"{lead} vs best matched press",
                    ]
                )
            for x in presses:
                gap = x.get("max_share_gap")
                rows.append(
                    [
                        x["method"],
                        _pct(x.get("mean_target_avg_share")),
                        _pct(x["mean_avg_kept_share"])
                        + (
                            ""
                            if gap is None
                            else f" ({'matched' if x.get('matched') else 'not matched'}, "
                            f"max gap {100 * gap:.2f} pp)"
                        ),
                        f"{x['top1_agreement']:.3f}",
                        f"{x['mean_kl']:.4f}",
                        "",
                    ]
                )
        env = d.get("env_check", {})
        out.append(
            f"**{what.capitalize()}** (`{name}`): {len(st['docs'])} documents of "
            f"{_int(st['context_tokens'])} tokens, {st['new_tokens']} teacher-forced steps; kvpress "
            f"{d['peers'].get('worker_versions', {}).get('kvpress', '?')} in its own environment (its full "
            f"attention equals the main process's greedy tokens: {env.get('all_equal')}). Machine: {_stamp(d)}.\n\n"
            + _table(
                [
                    "method",
                    "target share",
                    "share (measured, avg over steps)",
                    "top-1 agreement",
                    "mean KL (nats)",
                    "flashmem top-1 lead",
                ],
                rows,
            )
        )
    return "\n".join(out) if out else _missing("kvpress_fidelity.json")


RULER_SHORT = {
    "niah_single_1": "S1",
    "niah_single_2": "S2",
    "niah_single_3": "S3",
    "niah_multikey_1": "MK1",
    "niah_multikey_2": "MK2",
    "niah_multikey_3": "MK3",
    "niah_multivalue": "MV",
    "niah_multiquery": "MQ",
    "vt": "VT",
    "cwe": "CWE",
    "fwe": "FWE",
    "qa_1": "QA1",
    "qa_2": "QA2",
}


def ruler(results: Path) -> str:
    """One table per length: a row per method (default-config flashmem first), its measured share,
    the score of every task and their mean."""
    d = _load("ruler.json", results)
    if d is None:
        return "_(not run yet: `python -m bench.run ruler` writes this table)_\n"
    st = d["settings"]
    rows_by = {(r["method"], r["length"], r["task"]): r for r in d["summary"]}
    tasks = [t for t in RULER_SHORT if any(r["task"] == t for r in d["summary"])]
    out = [
        f"{st['samples']} samples per task and length; greedy, no EOS stop; score = mean string match x 100 "
        f"(QA: any reference). Machine: {_stamp(d)}. Full attention equals flashmem without a budget on "
        f"`{d['sanity']['prompt']}`: {d['sanity']['tokens_equal']}.\n"
    ]
    kv = d.get("kvpress")
    if kv and kv.get("status") != "ok":
        out.append(
            f"\nkvpress presses: the last run's worker {kv.get('status')} ({str(kv.get('reason'))[:200]}), "
            f"{kv.get('done', 0)} of {kv.get('jobs', '?')} missing press runs done; the press rows hold the "
            "runs in `ruler_runs.jsonl`, a cell left out (-) was not run.\n"
        )
    for length in st["lengths"]:
        budgets = st.get("budgets", {}).get(str(length), {})
        notes = [
            f"target {float(s):.0%}: budget {b['budget_tokens']} ({_pct(b['share'])} on the calibration prompt"
            + ("" if b["reached"] else ", nearest feasible")
            + ")"
            for s, b in budgets.items()
        ]
        rows = []
        for method in st["methods"]:
            avg = rows_by.get((method, length, "average"))
            if avg is None:
                continue
            if "mean_avg_device_share" in avg:
                share = _pct(avg["mean_avg_device_share"])
            elif "mean_kept_share_end" in avg:
                share = _pct(avg["mean_kept_share_end"]) + " kept"
            else:
                share = "100%"
            cells = []
            for t in tasks:
                r = rows_by.get((method, length, t))
                cells.append("-" if r is None else f"{r['score']:.0f}")
            ran = len(tasks) - cells.count("-")
            mean = f"**{avg['score']:.1f}**" + ("" if ran == len(tasks) else f" ({ran} tasks)")
            rows.append([method, share, *cells, mean])
        if not rows:
            continue
        out.append(f"\n**{length:,} tokens** (flashmem {'; '.join(notes) or 'not run'}):\n\n")
        out.append(_table(["method", "device share", *(RULER_SHORT[t] for t in tasks), "mean"], rows))
        points = sorted(
            (p for p in d.get("frontier", []) if p["length"] == length and p["share"] is not None),
            key=lambda p: p["share"],
        )
        if points:
            common = ", ".join(RULER_SHORT.get(t, t) for t in points[0]["tasks"])
            out.append(
                f"\nAccuracy against share at {length:,} tokens, over the tasks every method ran ({common}); "
                "`ruler_frontier.png` plots it:\n\n"
            )
            out.append(
                _table(
                    ["method", "share", "what the share counts", "mean score"],
                    [[p["method"], _pct(p["share"]), p["share_counts"], f"{p['score']:.1f}"] for p in points],
                )
            )
    return "".join(out)


def suite(results: Path) -> str:
    rows = []
    for quick in (False, True):
        d = _load("quick/all.json" if quick else "all.json", results)
        if d is None:
            continue
        ok = sum(e["status"] == 0 for e in d["entries"])
        per = ", ".join(f"{e['name']} {e['seconds']:.0f} s" for e in d["entries"])
        rows.append(
            [
                "`all --quick`" if quick else "`all`",
                f"{ok}/{len(d['entries'])}",
                f"{d['total_seconds'] / 60:.1f} min",
                per,
                _stamp(d),
            ]
        )
    if not rows:
        return _missing("all.json")
    return _table(["suite", "entries ok", "wall", "per entry", "machine"], rows)


def fidelity_choices(results: Path) -> str:
    """Next-token fidelity at one budget by indexer and by TriAttention statistics source."""
    name = "fidelity_indexers_stats.json"
    d = _load(name, results)
    if d is None:
        return _missing(name)
    st = d["settings"]
    rows = []
    auto = "`auto` (the shipped learned one)" if _auto_was_learned(d) else "`auto` (Quest)"
    for s in d["summary"]:
        cfg = s["flashmem_config"]
        rows.append(
            [
                f"`{cfg['indexer']}`" if "indexer" in cfg else auto,
                "the prompt's own queries" if cfg.get("stats_path") == "prompt" else "shipped",
                f"{s['top1_agreement']:.3f}",
                f"{s['mean_kl']:.4f}",
                _pct(s["mean_avg_device_share"]),
            ]
        )
    return (
        f"`budget_tokens={d['summary'][0]['flashmem_config']['budget_tokens']}`; {len(st['docs'])} documents "
        f"of {_int(st['context_tokens'])} tokens, {st['new_tokens']} teacher-forced steps each "
        f"(`{name}`). Machine: {_stamp(d)}.\n\n"
        + _table(
            ["indexer", "TriAttention stats", "top-1 agreement", "mean KL (nats)", "avg device share"], rows
        )
    )


def prepare_cost(results: Path) -> str:
    name = "prepare_cost.json"
    d = _load(name, results)
    if d is None:
        return _missing(name)
    m, e, st = d["measured"], d["estimate_llama8b_h100"], d["settings"]
    load, cores = d["machine"].get("load_average_1min") or 0, d["machine"].get("cpu_count") or 1
    busy = "; the cores were shared with other runs: an upper bound" if load > cores else ""
    return (
        f"Measured on {d['model']} ({_stamp(d)}; {d['machine'].get('torch_threads')} torch thread(s)"
        f"{busy}): **{m['wall_s']:.0f} s** in all, TriAttention stats "
        f"{m['stats_s']:.0f} s ({_int(st['stats_tokens'])} tokens), lookahead indexer {m['indexer_s']:.0f} s "
        f"({st['indexer_documents']} documents of {_int(st['indexer_document_tokens'])} tokens, labels and "
        f"training); afterwards a plain budget config used both files ({d['check']['auto_indexer']}).\n\n"
        f"Llama-3.1-8B on one H100, **an estimate from FLOPs, not a measurement**: the same stats pass is "
        f"{e['stats_forward_flops']:.1e} FLOP (~{e['stats_s']:.0f} s at 40% of bf16 peak) and the indexer's "
        f"forward passes {e['indexer_forward_flops']:.1e} FLOP (~{e['indexer_forward_s']:.0f} s), plus label "
        f"building and training of the small indexer (their share of the {m['indexer_s']:.0f} s above does "
        f"not grow with the model), plus loading the model (`{name}`).\n"
    )


SECTIONS: dict[str, Callable[[Path], str]] = {
    "suite": suite,
    "memory": memory,
    "passkey": passkey,
    "fidelity": fidelity,
    "throughput": throughput,
    "kvpress-fidelity": kvpress_fidelity,
    "passkey-trials": passkey_trials,
    "ruler": ruler,
    "long-context": long_context,
    "freed-blocks": freed_blocks,
    "indexer": indexer,
    "bandwidth": bandwidth,
    "prefill-cost": prefill_cost,
    "stats-source": stats_source,
    "fidelity-choices": fidelity_choices,
    "prepare-cost": prepare_cost,
}


# ---------------------------------------------------------------------------------------------
# README rewriting
# ---------------------------------------------------------------------------------------------
def render(text: str, results: Path = RESULTS) -> str:
    """``text`` with every marked block replaced by its section rendered from ``results``."""
    unknown = [m.group("name") for m in MARK.finditer(text) if m.group("name") not in SECTIONS]
    if unknown:
        raise ValueError(f"README marks unknown result sections {unknown}; known: {sorted(SECTIONS)}")

    def sub(m: re.Match) -> str:
        return m.group(1) + SECTIONS[m.group("name")](results) + m.group(4)

    return MARK.sub(sub, text)


def marked_sections(text: str) -> list[str]:
    return [m.group("name") for m in MARK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run report", description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when README.md differs")
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    text = args.readme.read_text()
    new = render(text, args.results)
    if args.check:
        if new != text:
            sys.stdout.writelines(
                difflib.unified_diff(text.splitlines(True), new.splitlines(True), "README.md", "rendered")
            )
            print("README.md disagrees with bench/results: run `python -m bench.run report`")
            return 1
        print(f"README.md agrees with bench/results ({len(marked_sections(text))} tables)")
        return 0
    if new != text:
        args.readme.write_text(new)
        print(f"rewrote {len(marked_sections(text))} tables in {args.readme}")
    else:
        print("README.md already agrees with bench/results")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
