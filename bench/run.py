"""One command line for every benchmark: ``python -m bench.run NAME [options]``.

    python -m bench.run list                 # the entries and what they measure
    python -m bench.run memory --quick       # any entry; options after NAME go to it (see NAME --help)
    python -m bench.run all --quick          # every entry in its quick mode (< 10 min on 2 CPU cores)
    python -m bench.run all                  # the full CPU suite
    python -m bench.run report [--check]     # README result tables from the JSON files (or compare)

Entries write JSON + PNG into ``bench/results/`` (quick runs into ``bench/results/quick/``), stamped
with the machine, library versions, model, context lengths and budgets. Parts that need a GPU print
a skip message and carry on. ``all`` runs each entry in turn, records how long it took and whether it
failed in ``bench/results[/quick]/all.json``, and exits non-zero if any entry failed.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback

from bench import common

# name -> (module, what it measures, extra argv for `all --quick`, extra argv for `all`)
ENTRIES: dict[str, tuple[str, str, list[str], list[str]]] = {
    "memory": ("bench.memory", "device KV bytes at every decode step vs the full cache", [], []),
    "passkey": (
        "bench.passkey",
        "pass-key accuracy by length x depth: full attention vs flashmem budgets",
        [],
        [],
    ),
    "fidelity": (
        "bench.fidelity",
        "top-1 agreement and KL vs full attention, teacher-forced, local docs",
        [],
        [],
    ),
    "throughput": (
        "bench.throughput",
        "decode tokens/s vs full attention; step time long vs short context",
        [],
        [],
    ),
    "freed-blocks": (
        "bench.freed_blocks",
        "blocks freed: in-place eviction vs in-order compaction",
        ["--quick"],
        [],
    ),
    "bandwidth": (
        "bench.bandwidth",
        "host-to-device copy GB/s: batched pinned vs pageable vs per-row",
        ["--quick"],
        [],
    ),
    "prefill-cost": (
        "bench.prefill_cost",
        "exact layer-major prefill vs a dense prefill: seconds and host traffic",
        ["--quick"],
        [],
    ),
    "prepare-cost": (
        "bench.prepare_cost",
        "flashmem prepare --train-indexer: seconds here; an 8B model on one GPU (estimated from FLOPs)",
        ["--quick"],
        [],
    ),
    "paged-decode": ("bench.paged_decode_timing", "paged decode kernel vs torch SDPA (CUDA only)", [], []),
    "prefetch-overlap": (
        "bench.prefetch_overlap",
        "recall stall per decode time: prefetched ahead vs on demand (CUDA)",
        [],
        [],
    ),
    "recall-granularity": (
        "bench.recall_granularity",
        "what-if: recall shared vs per layer and head vs an oracle, next-token KL at the minimum budget",
        ["--model", "tiny"],
        [],
    ),
    "indexer": (
        "bench.indexer_eval",
        "attention mass covered by each indexer at a chunk budget",
        ["--tokens", "2048", "--synthetic", "1", "--local", "1"],
        [],
    ),
    "hf-offload": (
        "bench.peers.hf_offload",
        "Hugging Face offloaded cache vs flashmem vs full: device KV and tokens/s (CUDA only)",
        [],
        [],
    ),
    "ruler": (
        "bench.ruler",
        "RULER-style synthetic tasks at 2K/4K/7K: full vs flashmem shares vs kvpress (resumable)",
        [],
        [],
    ),
    "kvpress": ("bench.peers.kvpress_peer", "kvpress presses on the pass-key prompts (own venv)", [], []),
    "long-context": (
        "bench.long_context",
        "500K-token prefill + decode on a tiny model: device share, host mirror = full KV",
        ["--quick"],
        [],
    ),
    "passkey-trials": (
        "bench.passkey_trials",
        "depth-spread pass-key trials of one config at one length (full attention with --config {})",
        [],
        [],
    ),
}
# entries whose own CLI has no --quick flag: `all --quick` passes the listed argv instead
NO_QUICK_FLAG = {"indexer", "paged-decode"}
# not part of `all` (needs its own environment; run it by name)
NOT_IN_ALL = {"kvpress", "passkey-trials"}
# part of `all --quick` only: the full run takes hours on a CPU (run it by name, it resumes)
QUICK_ONLY = {"ruler"}


def _result_override(name: str, quick: bool) -> list[str]:
    """Send quick runs of the other modules' entries to bench/results/quick/ (their --json option)."""
    if not quick or name in (
        "memory",
        "passkey",
        "fidelity",
        "throughput",
        "kvpress",
        "indexer",
        "ruler",
        "recall-granularity",
    ):
        return []
    json_path, _ = common.result_paths(name.replace("-", "_"), True)
    return ["--json", str(json_path)]


def _import_module(name: str):
    return importlib.import_module(name)


def run_entry(name: str, argv: list[str], results_dir=None) -> int:
    """Import the entry's module and call its ``main(argv)``; returns an exit status.

    ``results_dir``: for modules that write to a fixed folder (a module-level ``RESULTS``), that folder
    is swapped for this one during the call (how ``all --quick`` keeps smoke results apart)."""
    if name not in ENTRIES:
        raise SystemExit(f"unknown benchmark {name!r}; choose one of: {', '.join(ENTRIES)}, all, list")
    module = _import_module(ENTRIES[name][0])
    saved = getattr(module, "RESULTS", None)
    if results_dir is not None and saved is not None:
        module.RESULTS = results_dir
    try:
        result = module.main(list(argv))
    finally:
        if results_dir is not None and saved is not None:
            module.RESULTS = saved
    if isinstance(result, int):
        return result
    return 0  # entries that return their results dict succeeded


def run_all(argv: list[str]) -> int:
    quick = "--quick" in argv
    rest = [a for a in argv if a != "--quick"]
    if rest:
        raise SystemExit(f"'all' takes only --quick, got {rest}")
    record = common.header("all", quick=quick, model="(per entry)")
    record["entries"] = []
    failed = 0
    t_all = time.perf_counter()
    for name, (_, what, quick_argv, full_argv) in ENTRIES.items():
        if name in NOT_IN_ALL or (name in QUICK_ONLY and not quick):
            continue
        if quick:
            args = (
                quick_argv
                if name in NO_QUICK_FLAG
                else ["--quick"] + [a for a in quick_argv if a != "--quick"]
            )
            args = args + _result_override(name, quick)
        else:
            args = list(full_argv)
        print(f"\n=== {name}: {what}  (python -m bench.run {name} {' '.join(args)})", flush=True)
        t0 = time.perf_counter()
        try:
            status = run_entry(name, args, common.QUICK_RESULTS if quick else None)
            error = None
        except SystemExit as e:  # argparse errors and explicit exits
            status = e.code if isinstance(e.code, int) else 1
            error = None if status == 0 else f"SystemExit({e.code})"
        except Exception as e:  # noqa: BLE001 - one failing entry must not stop the others
            traceback.print_exc()
            status, error = 1, f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - t0
        failed += status != 0
        record["entries"].append(
            {"name": name, "argv": args, "status": status, "error": error, "seconds": round(seconds, 1)}
        )
        print(f"=== {name}: {'ok' if status == 0 else 'FAILED'} in {seconds:.0f} s", flush=True)
    record["total_seconds"] = round(time.perf_counter() - t_all, 1)
    json_path, _ = common.result_paths("all", quick)
    common.write_json(json_path, record)
    print(f"\nall: {len(record['entries']) - failed} ok, {failed} failed, {record['total_seconds']:.0f} s")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(__doc__)
        for name, (module, what, _, _) in ENTRIES.items():
            print(f"  {name:<13} {what}  [{module}]")
        print(
            "  all           every entry above except kvpress, passkey-trials and (without --quick) ruler "
            "(--quick: the smoke suite)"
        )
        print("  report        rewrite README.md's result tables from bench/results (--check: compare only)")
        return 0
    name, rest = argv[0], argv[1:]
    if name == "all":
        return run_all(rest)
    if name == "report":
        from bench import readme  # the README renderer: no benchmark entry imports it

        return readme.main(rest)
    return run_entry(name, rest)


if __name__ == "__main__":
    raise SystemExit(main())
