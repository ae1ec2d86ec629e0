"""Peer: Hugging Face's own offloaded cache (``DynamicCache(offloading=True)``), CUDA only.

transformers keeps every layer's K/V in host memory and copies one layer back to the GPU ahead of
its use (a prefetch stream), so at most about two layers' KV sit on the device at once. Its device
share is therefore ~2 / num_layers of the full KV at every context length, bought with a full
host-to-device copy of the whole KV every decode step. ``python -m bench.run hf-offload`` runs
:func:`hf_cache_decode` on a CUDA machine beside full attention and flashmem on the same ids.

Measured per decode step (after the forward returns, the GPU synchronised):

* ``device_kv_bytes``: bytes of the cache's key/value tensors that live on the model's device
  (for the offloaded cache: the prefetched layer(s); for ``DynamicCache``: everything);
* ``allocated_delta_bytes``: ``torch.cuda.memory_allocated()`` minus the figure before the prompt,
  i.e. cache + activations still alive; the step's allocator peak the same way.

On a machine without CUDA the offloaded cache cannot run (its prefetch stream is a CUDA stream):
:func:`hf_cache_decode` with ``offloading=True`` raises before any work, and the entries print a
skip message. With ``offloading=False`` the same loop runs anywhere (it is plain full attention),
which is what the CPU tests exercise.
"""

from __future__ import annotations

import statistics
import time

import torch

from bench import common, metrics


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def hf_cache_decode(model, ids: torch.Tensor, steps: int, *, offloading: bool) -> dict:
    """Greedy decode of ``steps`` tokens after ``ids`` ``[1, T]`` with a Hugging Face ``DynamicCache``
    (``offloading=True``: transformers' offloaded cache). Returns tokens, per-step seconds (GPU
    synchronised), per-step device KV bytes and allocator figures, and the end-of-run totals."""
    from flashmem.testing import DenseDecoder

    device = next(model.parameters()).device
    if offloading and device.type != "cuda":
        raise RuntimeError(
            "Hugging Face's offloaded cache needs a CUDA device (it prefetches on a CUDA stream); "
            f"the model is on {device}"
        )
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must be [1, T], got {tuple(ids.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ids = ids.to(device)
    cuda = device.type == "cuda"
    if cuda:
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    dense = DenseDecoder(model, offloading=offloading)
    t0 = time.perf_counter()
    logits = dense.step(ids)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    prefill_peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    token = int(logits.argmax())
    tokens = [token]
    step_s, device_kv, allocated, step_peak = [], [], [], []
    for _ in range(steps - 1):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        logits = dense.step(torch.tensor([[token]], device=device))
        token = int(logits.argmax())  # a host read: the step is complete on the GPU
        _sync(device)
        step_s.append(time.perf_counter() - t0)
        tokens.append(token)
        device_kv.append(dense.kv_bytes(device)[0])
        if cuda:
            allocated.append(torch.cuda.memory_allocated(device) - base)
            step_peak.append(torch.cuda.max_memory_allocated(device) - base)
    on_device, total = dense.kv_bytes(device)
    med = statistics.median(step_s) if step_s else None
    return {
        "method": "HF offloaded cache" if offloading else "full attention (DynamicCache)",
        "offloading": offloading,
        "prompt_tokens": int(ids.shape[1]),
        "tokens": tokens,
        "prefill_s": prefill_s,
        "step_s": step_s,
        "step_ms": 1000 * med if med else None,
        "tokens_per_s": 1.0 / med if med else None,
        "device_kv_trace": device_kv,
        "device_kv_bytes_end": on_device,
        "full_kv_bytes_end": total,
        "device_share_end": on_device / total if total else None,
        "max_device_share": max(device_kv) / total if device_kv and total else None,
        "allocated_delta_trace": allocated,
        "allocated_delta_peak_decode": max(step_peak) if step_peak else None,
        "allocated_delta_peak_prefill": prefill_peak,
    }


def skip_reason() -> str | None:
    """Why the offloaded-cache peer cannot run here, or None when it can."""
    if not torch.cuda.is_available():
        return "Hugging Face offloaded cache: skipped, no CUDA device here (it runs in bench/gpu_check.sh)"
    return None


def _flashmem_run(model, ids, steps: int, cfg: dict) -> dict:
    """flashmem on the same ids through the shared decode loop (its step times end with the greedy
    token read back, so they include the GPU work)."""
    run = common.flashmem_decode(model, cfg, ids, steps, collect_logits=False)
    rep = run["report"]
    med = statistics.median(run["step_s"]) if run["step_s"] else None
    return {
        "method": f"flashmem {cfg}",
        "flashmem_config": cfg,
        "tokens": run["tokens"],
        "step_ms": 1000 * med if med else None,
        "tokens_per_s": 1.0 / med if med else None,
        "device_kv_trace": run["trace"],
        "device_share_end": rep.get("device_share"),
        "max_device_share": rep.get("peak_device_share"),
        "avg_device_share": rep.get("avg_device_share"),
        "offload": rep.get("offload"),
        "timings": rep.get("timings"),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.run hf-offload``: full attention, Hugging Face's offloaded cache and flashmem
    on the same default-model prompt on a CUDA device: device KV share and decode tokens/s."""
    import argparse
    import json

    p = argparse.ArgumentParser(
        prog="python -m bench.run hf-offload", description=main.__doc__.split("\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="2,048-token prompt, 32 steps")
    p.add_argument("--context", type=int, default=None, help="prompt tokens (default 8192; quick 2048)")
    p.add_argument("--steps", type=int, default=None, help="decode steps (default 128; quick 32)")
    p.add_argument("--flashmem-config", default='{"budget_tokens": 512}', help="FlashMemConfig JSON")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    cfg = json.loads(args.flashmem_config)
    context = args.context or (2048 if args.quick else 8192)
    steps = args.steps or (32 if args.quick else 128)
    reason = skip_reason()
    if reason:
        print(reason)
        return 0
    import flashmem
    from flashmem import local_text_token_ids

    model, tok = flashmem.load_default_model(device="cuda")
    ids, source = local_text_token_ids(tok, context)
    ids = ids[None].cuda()
    full = hf_cache_decode(model, ids, steps, offloading=False)
    offl = hf_cache_decode(model, ids, steps, offloading=True)
    if offl["tokens"] != full["tokens"]:
        raise AssertionError("the offloaded cache must generate full attention's tokens (it is lossless)")
    fm = _flashmem_run(model, ids, steps, cfg)
    rows = []
    for run in (full, offl, fm):
        ratio = run["tokens_per_s"] / full["tokens_per_s"] if run["tokens_per_s"] else None
        rows.append(
            {
                "method": run["method"],
                "tokens_per_s": run["tokens_per_s"],
                "ratio_vs_full": ratio,
                "max_device_share": run["max_device_share"],
                "tokens_agree_with_full": metrics.token_agreement(full["tokens"], run["tokens"]),
            }
        )
        print(
            f"  {run['method']}: {run['tokens_per_s']:.1f} tok/s ({ratio:.2f}x full), "
            f"max device KV share {run['max_device_share']:.3f}"
        )
    json_path, _ = common.result_paths("hf_offload", args.quick, args.json)
    data = common.header(
        "hf_offload",
        quick=args.quick,
        model="SmolLM2-135M-Instruct (default, fp32, CUDA)",
        context_tokens=context,
        steps=steps,
        flashmem_config=cfg,
        text=source[:300],
    )
    for run in (full, offl, fm):
        run.pop("tokens", None)
    data.update(summary=rows, full_attention=full, hf_offloaded=offl, flashmem=fm)
    common.write_json(json_path, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
