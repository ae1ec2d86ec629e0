"""``flashmem`` command line: generate, calibrate, train-indexer, eval-indexer."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
}


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _load(args):
    import torch

    from .models import load_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(
        args.model, dtype=_dtype(args.dtype), device=device, trust_remote_code=args.trust_remote_code
    )


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="'default' (embedded SmolLM2-135M) or a local checkpoint path"
    )
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint"
    )


def print_memory_report(report: dict, out=None) -> None:
    """Human-readable memory report (figures from the block allocator)."""
    from .wrapper import format_bytes

    out = out if out is not None else sys.stdout
    rows = [
        ("tokens (logical / on device)", f"{report['logical_tokens']} / {report['device_slots']}"),
        ("budget tokens", str(report["budget_tokens"])),
        ("device KV now", format_bytes(report["device_kv_bytes"])),
        ("device KV peak", format_bytes(report["peak_device_kv_bytes"])),
        ("full (dense) KV", format_bytes(report["full_kv_bytes"])),
        ("host mirror KV", format_bytes(report["host_kv_bytes"])),
        ("device share now / peak / avg", "{:.1%} / {:.1%} / {:.1%}".format(
            report["device_share"], report["peak_device_share"], report["avg_device_share"])),
        ("blocks in use / peak / freed", "{} / {} / {}".format(
            report["blocks_in_use"], report["peak_blocks_in_use"], report["blocks_freed"])),
        ("block size / block bytes", f"{report['block_size']} tokens / {format_bytes(report['kv_block_bytes'])}"),
        ("compactions", str(report["compactions"])),
    ]  # fmt: skip
    off = report.get("offload")
    if off is not None:
        stall = off.get("stall_fraction")
        rows.append((
            "recall chunks prefetched / on demand",
            "{} / {} ({} prefetches; stall {})".format(
                off["chunks_prefetched"], off["chunks_loaded_on_demand"], off["prefetches_issued"],
                "n/a" if stall is None else f"{stall:.2%} of decode time"),
        ))  # fmt: skip
    width = max(len(k) for k, _ in rows)
    print("memory report", file=out)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=out)


def cmd_generate(args) -> int:
    from . import FlashMemConfig, wrap
    from .prompts import fillers_for_tokens, passkey_prompt

    config = FlashMemConfig(
        budget_tokens=args.budget_tokens,
        attention_backend=args.attention_backend,
        stats_path=args.stats,
        max_context_tokens=args.max_context_tokens,
        protect_prompt=args.protect_prompt,
        compaction_interval=args.compaction_interval,
        window_tokens=args.window_tokens,
        sink_tokens=args.sink_tokens,
        triattention_mode=args.triattention_mode,
        chunk_size=args.chunk_size,
        chunk_budget=args.chunk_budget,
        lookahead=args.lookahead,
        prefetch_steps=args.prefetch_steps,
        indexer=args.indexer,
        index_backend=args.index_backend,
        index_candidates=args.index_candidates,
        prefill=args.prefill,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        max_host_bytes=args.max_host_bytes,
    )
    if args.prompt_file is None and args.passkey_tokens is None:
        raise SystemExit("give --prompt-file FILE or --passkey-tokens N")
    if args.prompt_file is not None and not Path(args.prompt_file).is_file():
        raise SystemExit(f"prompt file not found: {args.prompt_file}")
    t0 = time.perf_counter()
    model, tok = _load(args)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    key = None
    if args.prompt_file is not None:
        text = Path(args.prompt_file).read_text(encoding="utf-8")
    else:
        prompt = passkey_prompt(fillers_for_tokens(tok, args.passkey_tokens), args.depth, seed=args.seed)
        text, key = prompt.text, prompt.key
    ids = tok(text, return_tensors="pt").input_ids
    fm = wrap(model, config)
    print(f"prompt: {ids.shape[1]} tokens", file=sys.stderr)
    t1 = time.perf_counter()
    out = fm.generate(ids.to(fm.device), args.max_new_tokens, progress=True)
    elapsed = time.perf_counter() - t1
    answer = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print("answer:", answer.strip())
    if key is not None:
        print(f"pass key: {key} -> {'found' if key in answer else 'NOT found'}")
    report = fm.memory_report()
    report["generate_s"] = elapsed
    print_memory_report(report)
    if args.report_json:
        Path(args.report_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report_json).write_text(json.dumps({"answer": answer, "report": report}, indent=2))
    return 0


def read_text_source(path: str, suffixes=(".txt", ".md", ".rst", ".py")) -> str:
    """A file's text, or the concatenated text of the files under a directory (sorted, by suffix)."""
    p = Path(path)
    if p.is_file():
        return p.read_text(encoding="utf-8", errors="replace")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        if not files:
            raise SystemExit(f"no {suffixes} files under {path}")
        return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    raise SystemExit(f"text source not found: {path}")


def cmd_calibrate(args) -> int:
    from .calibration import calibrate

    text = read_text_source(args.text)
    model, tok = _load(args)
    ids = tok(text, return_tensors="pt").input_ids[0][: args.max_tokens]
    stats = calibrate(model, ids.to(next(model.parameters()).device), max_tokens=args.max_tokens)
    stats.save(args.out)
    print(f"wrote {args.out} ({stats.num_tokens} calibration tokens)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashmem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate from a long prompt and print the memory report")
    _add_model_args(g)
    g.add_argument("--prompt-file", default=None, help="text file holding the prompt")
    g.add_argument(
        "--passkey-tokens", type=int, default=None, help="instead of a file: a pass-key prompt of ~N tokens"
    )
    g.add_argument("--depth", type=float, default=0.5, help="pass-key depth in [0, 1]")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument(
        "--budget-tokens", type=int, default=None, help="device tokens kept per KV head (default: all)"
    )
    g.add_argument("--protect-prompt", action="store_true")
    g.add_argument("--compaction-interval", type=int, default=128)
    g.add_argument("--window-tokens", type=int, default=128)
    g.add_argument("--sink-tokens", type=int, default=4)
    g.add_argument("--triattention-mode", default="per_head", choices=["per_head", "per_layer_per_head"])
    g.add_argument("--chunk-size", type=int, default=64, help="tokens per recall chunk")
    g.add_argument("--chunk-budget", type=int, default=None, help="chunks recalled per lookahead window")
    g.add_argument("--lookahead", type=int, default=64, help="decode steps between indexer refreshes")
    g.add_argument(
        "--prefetch-steps",
        type=int,
        default=0,
        help="copy the next recall window this many steps before its boundary (0: at the boundary)",
    )
    g.add_argument(
        "--indexer", default="auto", help="auto, quest, mean_key, recency, lookahead, a checkpoint, none"
    )
    g.add_argument("--index-backend", default="torch", choices=["torch", "faiss"])
    g.add_argument("--index-candidates", type=int, default=0)
    g.add_argument("--prefill", default="exact", choices=["exact", "sparse"])
    g.add_argument("--prefill-chunk-tokens", type=int, default=None)
    g.add_argument("--max-host-bytes", type=int, default=None)
    g.add_argument("--stats", default=None, help="TriAttention calibration stats (.safetensors)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "triton", "torch"])
    g.add_argument("--max-context-tokens", type=int, default=524_288)
    g.add_argument("--report-json", default=None, help="also write the answer and the memory report as JSON")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("calibrate", help="compute TriAttention query statistics from local text")
    _add_model_args(c)
    c.add_argument("--text", required=True, help="a text file or a directory of text files")
    c.add_argument("--out", required=True, help="output .safetensors")
    c.add_argument("--max-tokens", type=int, default=32768)
    c.set_defaults(func=cmd_calibrate)

    t = sub.add_parser(
        "train-indexer", help="train the lookahead indexer (see flashmem.indexer_training)", add_help=False
    )
    t.set_defaults(func=None)
    e = sub.add_parser("eval-indexer", help="evaluate indexers against the oracle", add_help=False)
    e.set_defaults(func=None)

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train-indexer", "eval-indexer"):
        from . import indexer_training

        command = indexer_training.train_main if argv[0] == "train-indexer" else indexer_training.eval_main
        return int(command(argv[1:]) or 0)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
