"""Decode step cost on a GPU: flashmem eager vs flashmem with ``cuda_graph=True`` vs a dense Hugging Face step.

For each case (``--cases``; default a Llama-3.1-8B-shaped random-init model at a 4K-token prompt and
the tiny random Llama at 128K, both bf16): ms per decode step of

* flashmem eager (``budget_tokens=2048``, recall with Quest, TriAttention stats from the prompt,
  compaction and prefetched windows inside the timed steps),
* the same with ``cuda_graph=True`` (refreshes, compaction and table updates outside the graph),
* the model's own forward over a ``DynamicCache`` (greedy, ``int(argmax)`` per step),

and host syncs per step of the eager flashmem step (:class:`flashmem.testing.OpCounter` on the
device: scalar reads, data-dependent shapes, blocking host<->device copies), and whether the graph
run produced the eager run's tokens, token for token. Correctness first: the graph run must equal
the eager run, else the bench exits 1. On a machine without CUDA it prints why and exits 0.

    python -m bench.decode_step [--steps 64] [--cases llama8b:4096,tiny:131072] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import flashmem
from bench import common


def _dense_ms(model, ids: torch.Tensor, steps: int) -> float:
    from flashmem.testing import DenseDecoder

    dense = DenseDecoder(model)
    with torch.no_grad():
        logits = dense.step(ids)
        for _ in range(4):  # warm-up steps (not timed)
            logits = dense.step(torch.tensor([[int(logits.argmax())]], device=ids.device))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = dense.step(torch.tensor([[int(logits.argmax())]], device=ids.device))
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / steps


def _flashmem_run(model, ids: torch.Tensor, steps: int, graph: bool) -> tuple[torch.Tensor, float, dict]:
    config = flashmem.FlashMemConfig(
        budget_tokens=2048, stats_path="prompt", indexer="quest", cuda_graph=graph, attention_backend="auto"
    )
    fm = flashmem.wrap(model, config)
    out = fm.generate(ids, steps + 1, eos_token_id=None, progress=False)
    torch.cuda.synchronize()
    report = fm.memory_report()
    ms = 1e3 * report["timings"]["decode_s"] / max(1, report["decode_steps"])
    return out, ms, report


def _syncs_per_step(model, ids: torch.Tensor, steps: int) -> tuple[float, dict]:
    from flashmem.testing import OpCounter

    config = flashmem.FlashMemConfig(budget_tokens=2048, stats_path="prompt", indexer="quest")
    fm = flashmem.wrap(model, config)
    counter = OpCounter(ids.device)
    marks = []
    with counter:
        fm.generate(
            ids, steps + 1, eos_token_id=None, progress=False, stream=lambda t: marks.append(counter.syncs)
        )
    return (marks[-1] - marks[0]) / (len(marks) - 1), dict(counter.sync_by_op)


def run_case(shape: str, tokens: int, steps: int) -> dict:
    device = torch.device("cuda")
    model = common.random_llama(shape, device, torch.bfloat16)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0)).to(device)
    _flashmem_run(model, ids[:, :512], 8, graph=True)  # compile kernels once (not timed)
    eager_out, eager_ms, report = _flashmem_run(model, ids, steps, graph=False)
    graph_out, graph_ms, _ = _flashmem_run(model, ids, steps, graph=True)
    same = bool(torch.equal(eager_out, graph_out))
    dense_ms = _dense_ms(model, ids, steps)
    syncs, by_op = _syncs_per_step(model, ids, min(steps, 32))
    row = {
        "model": shape,
        "prompt_tokens": tokens,
        "decode_steps": steps,
        "eager_ms_per_step": round(eager_ms, 3),
        "graph_ms_per_step": round(graph_ms, 3),
        "dense_hf_ms_per_step": round(dense_ms, 3),
        "host_syncs_per_step": round(syncs, 3),
        "syncs_by_op": by_op,
        "graph_equals_eager": same,
        "compactions": report["compactions"],
        "recall_refreshes": report["recall_refreshes"],
    }
    print(
        f"{shape} @ {tokens} tokens, {steps} steps: eager {eager_ms:.2f} ms/step, graph {graph_ms:.2f} ms/step, "
        f"dense HF {dense_ms:.2f} ms/step; host syncs/step (eager) {syncs:.2f}; graph == eager: {same}",
        flush=True,
    )
    del model
    torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per run")
    parser.add_argument(
        "--cases", default="llama8b:4096,tiny:131072", help="SHAPE:TOKENS,... (bench.common.RANDOM_LLAMAS)"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "decode_step: no CUDA device here; the CUDA-graph decode step is measured on a GPU only (skipped)"
        )
        return 0
    rows = []
    for case in args.cases.split(","):
        shape, tokens = case.split(":")
        rows.append(run_case(shape, int(tokens), args.steps))
    result = {
        **common.header("decode_step", quick=False, model="random-init Llama shapes", budget_tokens=2048),
        "rows": rows,
        "summary": {
            f"{r['model']}@{r['prompt_tokens']}": {
                k: r[k] for k in ("eager_ms_per_step", "graph_ms_per_step", "dense_hf_ms_per_step",
                                  "host_syncs_per_step", "graph_equals_eager")
            }
            for r in rows
        },
    }  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(common._jsonable(result), f, indent=2)
    return 0 if all(r["graph_equals_eager"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
