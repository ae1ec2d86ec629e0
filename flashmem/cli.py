"""``flashmem`` command line: generate, calibrate, prepare, train-indexer, eval-indexer.

A user error (a bad option value, a missing, empty or non-UTF-8 prompt, an output path that cannot
be written, a model or device that is not there) prints one line, ``flashmem: error: ...``, on
stderr and exits with status 2. Everything that can be checked without the model is checked before
the model is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
import types
import typing
from pathlib import Path

from .config import (
    ATTENTION_BACKENDS,
    INDEX_BACKENDS,
    PREFILL_MODES,
    RECALL_MODES,
    TRIATTENTION_MODES,
    FlashMemConfig,
)

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
}

# One help text per FlashMemConfig field: `flashmem generate` has one option per field, derived from
# the dataclass below (a field without an entry here fails the parser's construction, and a test).
CONFIG_HELP = {
    "budget_tokens": "device tokens kept per KV head after each compaction (default: keep every token, "
    "exactly dense attention)",
    "block_size": "tokens per device block, the paged cache's granularity",
    "max_context_tokens": "longest prompt + generation accepted, checked before any work",
    "compaction_interval": "prune when the device holds budget + this many tokens",
    "recent_tokens": "most recent tokens, never evicted",
    "sink_tokens": "first tokens, never evicted",
    "protect_prompt": "never evict prompt tokens (only generated tokens compete for the budget)",
    "triattention_mode": "one keep-set per layer and KV head, or per_head: one per KV head shared by all "
    "layers (default: per_layer_per_head; per_head with --recall-mode shared)",
    "stats_path": "TriAttention calibration stats written by 'flashmem calibrate' (.safetensors), or "
    "'prompt' to derive them from the prompt (default: those 'flashmem prepare' stored for the model, "
    "else the shipped ones when they fit, else derived from the prompt)",
    "attention_backend": "decode attention: triton, torch (the reference) or auto (triton on CUDA)",
    "host_mirror": "keep a lossless host copy of every token's K/V (default: on with --budget-tokens)",
    "max_host_bytes": "cap on the host mirror in bytes (default: the machine's available memory)",
    "chunk_size": "tokens per recall chunk (a multiple of --block-size)",
    "chunk_budget": "chunks recalled per recall window (default: budget // (2 x chunk size), at least 2; 0: no recall)",
    "lookahead": "decode steps between indexer refreshes",
    "prefetch_steps": "select and copy the next recall window this many steps before its boundary "
    "(0, the default: at the boundary, one window on the device; > 0: copies overlap decoding and two "
    "windows are held meanwhile; must be < --lookahead)",
    "indexer": "auto, quest, mean_key, mean_key_prerope, recency, lookahead, none, or an indexer "
    "checkpoint path",
    "index_backend": "chunk index used for candidate retrieval (faiss needs flashmem[faiss])",
    "index_candidates": "chunks the chunk index retrieves for the indexer to score (0: score every chunk)",
    "prefill": "exact (layer by layer, every token attends to the whole prompt before it) or sparse "
    "(token chunks attending to the resident tokens only: approximate)",
    "prefill_chunk_tokens": "prompt tokens per forward: the exact prefill's tile (default 8192) or the "
    "sparse prefill's chunk (default: --compaction-interval)",
    "observe_tokens": "prompt-tail queries whose attention picks the first recalled chunks "
    "(0: ask the indexer)",
    "cuda_graph": "capture the decode step in a CUDA graph and replay it (CUDA only)",
    "recall_mode": "per_layer_per_head: every layer and KV head recalls its own chunks; shared: one set "
    "for the whole model (needed for --prefetch-steps > 0)",
}
CONFIG_CHOICES = {
    "triattention_mode": TRIATTENTION_MODES,
    "attention_backend": ATTENTION_BACKENDS,
    "index_backend": INDEX_BACKENDS,
    "prefill": PREFILL_MODES,
    "recall_mode": RECALL_MODES,
}
CONFIG_ALIASES = {"stats_path": ("--stats",), "recent_tokens": ("--window-tokens",)}  # earlier spelling
CONFIG_METAVARS = {"stats_path": "PATH", "indexer": "NAME|PATH"}


class UsageError(Exception):
    """A mistake in the command line or in the files it names: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse errors become a :class:`UsageError` (one line, status 2) instead of usage + exit."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def config_option(field: str) -> str:
    """The `flashmem generate` option of a FlashMemConfig field."""
    return "--" + field.replace("_", "-")


def _field_kind(hint) -> type:
    """int, bool or str: the type a FlashMemConfig field takes (None stripped from ``X | None``)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) else ()
    kinds = [a for a in args if a is not type(None)] if args else [hint]
    if len(kinds) != 1 or kinds[0] not in (int, bool, str):
        raise TypeError(f"FlashMemConfig field of type {hint!r} has no command-line form; add one in cli.py")
    return kinds[0]


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per FlashMemConfig field, with the dataclass's own default."""
    group = parser.add_argument_group("cache configuration (the fields of flashmem.FlashMemConfig)")
    hints = typing.get_type_hints(FlashMemConfig)
    for field in dataclasses.fields(FlashMemConfig):
        kind = _field_kind(hints[field.name])
        flags = (config_option(field.name), *CONFIG_ALIASES.get(field.name, ()))
        text = CONFIG_HELP[field.name]
        if field.default is not None:
            shown = ("on" if field.default else "off") if kind is bool else field.default
            text += f" (default: {shown})"
        common = dict(dest=field.name, default=field.default, help=text)
        if kind is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        elif kind is int:
            group.add_argument(*flags, type=int, metavar="N", **common)
        else:
            choices = CONFIG_CHOICES.get(field.name)
            metavar = None if choices else CONFIG_METAVARS.get(field.name, "TEXT")
            group.add_argument(*flags, choices=choices, metavar=metavar, **common)


def config_from_args(args: argparse.Namespace) -> FlashMemConfig:
    """The FlashMemConfig the options describe; a refused value is a :class:`UsageError` naming the
    option."""
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(FlashMemConfig)}
    try:
        return FlashMemConfig(**values)
    except (TypeError, ValueError) as exc:
        raise UsageError(_in_option_names(exc)) from None


def _in_option_names(exc: Exception) -> str:
    """An error message with ``FlashMemConfig.some_field`` spelt as the option ``--some-field``."""
    return re.sub(r"FlashMemConfig\.([a-z_]+)", lambda m: config_option(m.group(1)), str(exc))


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {text!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


# ---- checks made before the model is loaded -----------------------------------------------------
def check_output_path(option: str, path: str) -> None:
    """Refuse an output path that could not be written: its directory must exist and take a new
    file (probed with a temporary file that is removed at once), an existing file must open for
    writing. Nothing is created or changed."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {path}: is a directory; give a file path")
    parent = p.parent
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: directory {parent} does not exist; create it first")
    try:
        if p.exists():
            with open(p, "ab"):
                pass
        else:
            fd, probe = tempfile.mkstemp(dir=parent, prefix=".flashmem-write-check-")
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None


def check_model(name: str) -> None:
    """``default`` must be installed; anything else must be a local Hugging Face checkpoint."""
    from .models import default_model_path

    if name == "default":
        try:
            default_model_path()
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
        return
    if name.endswith(".gguf"):
        if not Path(name).is_file():
            raise UsageError(f"--model {name}: no such GGUF file")
        from .hf_compat import gguf_architecture

        try:
            gguf_architecture(name)
        except ValueError as exc:
            raise UsageError(f"--model {exc}") from None
        return
    if not Path(name).is_dir():
        raise UsageError(
            f"--model {name}: not a local directory or .gguf file; flashmem never downloads weights (use "
            "'default' for the embedded model, or the path of a saved checkpoint)"
        )
    if not (Path(name) / "config.json").is_file():
        raise UsageError(f"--model {name}: no config.json there; give a directory written by save_pretrained")


def resolve_device(name: str | None):
    """``--device`` as a torch.device: cpu, or cuda[:N] where CUDA is there (default: cuda if it is)."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: not a device; use cpu or cuda[:N]") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {name}: flashmem runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def read_prompt(path: str) -> str:
    """The prompt file's text: an existing, non-empty, UTF-8 file (a BOM is dropped)."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--prompt-file {path}: prompt file not found")
    if not p.is_file():
        raise UsageError(f"--prompt-file {path}: not a file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"--prompt-file {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"--prompt-file {path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    if not text.strip():
        raise UsageError(f"--prompt-file {path}: the prompt is empty")
    return text


def _dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def _load(args, device):
    from .models import load_model

    try:
        return load_model(
            args.model, dtype=_dtype(args.dtype), device=device, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {args.model}: cannot load it ({exc})") from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="'default' (embedded SmolLM2-135M) or a local checkpoint path"
    )
    p.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="model dtype (default: float32)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow custom model code from the checkpoint"
    )


def print_memory_report(report: dict, out=None) -> None:
    """Human-readable memory report: every device byte flashmem holds, and the KV alone."""
    from .wrapper import format_bytes

    out = out if out is not None else sys.stdout
    parts = report["device_bytes"]
    rows = [
        ("tokens (logical / on device)", f"{report['logical_tokens']} / {report['device_slots']}"),
        ("budget tokens", str(report["budget_tokens"])),
        ("device bytes now / peak", "{} / {} (pool {}, index {}, prefill scratch peak {})".format(
            format_bytes(parts["total"]), format_bytes(parts["peak_total"]), format_bytes(parts["kv_reserved"]),
            format_bytes(parts["index"]), format_bytes(parts["scratch_peak"]))),
        ("device KV now / peak", "{} / {}".format(
            format_bytes(report["device_kv_bytes"]), format_bytes(report["peak_device_kv_bytes"]))),
        ("full (dense) KV", format_bytes(report["full_kv_bytes"])),
        ("host mirror KV", format_bytes(report["host_kv_bytes"])),
        ("device share now / peak / avg", "{:.1%} / {:.1%} / {:.1%} (every device byte)".format(
            report["device_share"], report["peak_device_share"], report["avg_device_share"])),
        ("KV alone now / peak / avg", "{:.1%} / {:.1%} / {:.1%}".format(
            report["device_kv_share"], report["peak_device_kv_share"], report["avg_device_kv_share"])),
        ("blocks in use / peak / freed", "{} / {} / {}".format(
            report["blocks_in_use"], report["peak_blocks_in_use"], report["blocks_freed"])),
        ("block size / block bytes", f"{report['block_size']} tokens / {format_bytes(report['kv_block_bytes'])}"),
        ("compactions", str(report["compactions"])),
    ]  # fmt: skip
    off = report.get("offload")
    if off is not None and "window_loads" in off:  # per-head recall: one window, loaded at its boundary
        rows.append((
            "recall windows loaded / chunks copied",
            "{} / {} (per layer and KV head)".format(off["window_loads"], off["chunks_loaded"]),
        ))  # fmt: skip
    elif off is not None:
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
    from . import wrap
    from .prompts import fillers_for_tokens, passkey_prompt

    # Everything that needs no model first: the config, the output path, the prompt, model and device.
    config = config_from_args(args)
    if args.report_json:
        check_output_path("--report-json", args.report_json)
    text = read_prompt(args.prompt_file) if args.prompt_file is not None else None
    check_model(args.model)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    model, tok = _load(args, device)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    key = None
    if text is None:
        shortest = len(tok(passkey_prompt(1, args.depth).text).input_ids)
        if args.passkey_tokens < shortest:
            raise UsageError(
                f"--passkey-tokens {args.passkey_tokens}: the shortest pass-key prompt is {shortest} tokens "
                "with this tokenizer; give at least that"
            )
        prompt = passkey_prompt(fillers_for_tokens(tok, args.passkey_tokens), args.depth, seed=args.seed)
        text, key = prompt.text, prompt.key
    ids = tok(text, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UsageError(f"--prompt-file {args.prompt_file}: the prompt encodes to no tokens")
    try:
        fm = wrap(model, config)
        # the wrapper's own up-front input checks (context length, host memory, protected prompt vs
        # budget), made here so that a refusal is reported as a user error, not a traceback
        fm._check_inputs(ids, args.max_new_tokens, {})
    except (ValueError, OSError) as exc:
        raise UsageError(_in_option_names(exc)) from None
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
        _write_text(
            "--report-json", args.report_json, json.dumps({"answer": answer, "report": report}, indent=2)
        )
    return 0


def _write_text(option: str, path: str, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write it ({exc.strerror or exc})") from None


def read_text_source(path: str, suffixes=(".txt", ".md", ".rst", ".py")) -> str:
    """A file's text, or the concatenated text of the files under a directory (sorted, by suffix)."""
    p = Path(path)
    if p.is_file():
        text = p.read_text(encoding="utf-8", errors="replace")
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        if not files:
            raise UsageError(f"--text {path}: no {suffixes} files under it")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    else:
        raise UsageError(f"--text {path}: text source not found")
    if not text.strip():
        raise UsageError(f"--text {path}: no text in it")
    return text


def cmd_calibrate(args) -> int:
    from .calibration import calibrate

    check_output_path("--out", args.out)
    text = read_text_source(args.text)
    check_model(args.model)
    device = resolve_device(args.device)
    model, tok = _load(args, device)
    ids = tok(text, return_tensors="pt").input_ids[0][: args.max_tokens]
    stats = calibrate(model, ids.to(next(model.parameters()).device), max_tokens=args.max_tokens)
    try:
        stats.save(args.out)
    except OSError as exc:
        raise UsageError(f"--out {args.out}: cannot write it ({exc.strerror or exc})") from None
    print(f"wrote {args.out} ({stats.num_tokens} calibration tokens)")
    return 0


def cmd_prepare(args) -> int:
    from .preparation import prepare

    text = read_text_source(args.text) if args.text is not None else None
    check_model(args.model)
    device = resolve_device(args.device)
    model, tok = _load(args, device)
    options = {"steps": args.indexer_steps}
    if args.text is not None:
        options["data"] = [args.text]
    try:
        report = prepare(
            model,
            tok,
            text=text,
            max_tokens=args.max_tokens,
            train_indexer=args.train_indexer,
            indexer_options=options,
            progress=not args.quiet,
        )
    except OSError as exc:
        raise UsageError(
            f"cannot write the cache directory ({exc.strerror or exc}); set FLASHMEM_CACHE_DIR"
        ) from None
    print(json.dumps(report, indent=1))
    return 0


FORWARDED = {"train-indexer": "train_main", "eval-indexer": "eval_main"}  # in flashmem.indexer_training


def _precheck_forwarded(command: str, argv: list[str]) -> None:
    """The checks a forwarded command's own parser does not make, before it loads the model: the
    model exists, and (train-indexer) the --out checkpoint can be written."""
    if "-h" in argv or "--help" in argv:
        return
    p = _Parser(prog=f"flashmem {command}", add_help=False)
    p.add_argument("--model", default="default")
    if command == "train-indexer":
        p.add_argument("--out", default=None)
    known, _ = p.parse_known_args(argv)
    check_model(known.model)
    if getattr(known, "out", None):
        check_output_path("--out", known.out)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flashmem", description="flashmem command line: generate, calibrate, train-indexer, eval-indexer"
    )
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="what to run ('flashmem COMMAND --help' for its options)",
    )

    g = sub.add_parser("generate", help="generate from a long prompt and print the memory report")
    _add_model_args(g)
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt-file", default=None, help="UTF-8 text file holding the prompt")
    source.add_argument(
        "--passkey-tokens",
        type=_int_at_least(1),
        default=None,
        metavar="N",
        help="instead of a file: a pass-key prompt of ~N tokens",
    )
    g.add_argument("--depth", type=_fraction, default=0.5, help="pass-key depth in [0, 1] (default: 0.5)")
    g.add_argument("--seed", type=int, default=0, help="seed choosing the pass key (default: 0)")
    g.add_argument(
        "--max-new-tokens",
        type=_int_at_least(0),
        default=32,
        metavar="N",
        help="tokens to generate at most; stops early at end of sequence (default: 32)",
    )
    g.add_argument(
        "--report-json", default=None, help="also write the answer and the memory report to this JSON file"
    )
    _add_config_options(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("calibrate", help="compute TriAttention query statistics from local text")
    _add_model_args(c)
    c.add_argument("--text", required=True, help="a text file or a directory of text files")
    c.add_argument("--out", required=True, help="output .safetensors (its directory must exist)")
    c.add_argument(
        "--max-tokens",
        type=_int_at_least(1),
        default=32768,
        metavar="N",
        help="calibrate on the first N tokens of the text (default: 32768)",
    )
    c.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "prepare",
        help="make this model's TriAttention stats (and optionally its indexer) once, in the user cache "
        "($FLASHMEM_CACHE_DIR or ~/.cache/flashmem), where budgets and indexer=auto find them",
    )
    _add_model_args(p)
    p.add_argument(
        "--text", default=None, help="a text file or directory (default: local text of installed packages)"
    )
    p.add_argument(
        "--max-tokens",
        type=_int_at_least(1),
        default=32768,
        metavar="N",
        help="calibrate on the first N tokens (default: 32768)",
    )
    p.add_argument("--train-indexer", action="store_true", help="also train the lookahead indexer")
    p.add_argument(
        "--indexer-steps", type=_int_at_least(1), default=300, metavar="N", help="indexer optimiser steps"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_prepare)

    sub.add_parser(
        "train-indexer", help="train the lookahead indexer (see flashmem.indexer_training)", add_help=False
    )
    sub.add_parser("eval-indexer", help="evaluate indexers against the oracle", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error prints ``flashmem: error: ...`` (one line) and returns 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in FORWARDED:
            from . import indexer_training

            _precheck_forwarded(argv[0], argv[1:])
            return int(getattr(indexer_training, FORWARDED[argv[0]])(argv[1:]) or 0)
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except UsageError as exc:
        print("flashmem: error: " + re.sub(r"\s*\n\s*", " ", str(exc)).strip(), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
