#!/usr/bin/env bash
# One command for a CUDA machine: kernel tests on the GPU (bf16 included), then short timings,
# a summary table last. Budget: under 8 minutes. Results go to bench/results/gpu/ (or $OUT).
# Usage: bash bench/gpu_check.sh            (uses .venv when present, else the current python)
set -uo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && PY=.venv/bin/python || PY=${PYTHON:-python3}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible; nothing to check here (run the CPU suite with 'make test')."
  exit 0
fi
OUTDIR=${OUT:-bench/results/gpu}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
: >"$LOG"
declare -a NAMES STATUS SECS

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  NAMES+=("$name")
  SECS+=("$((SECONDS - t0))")
  case $rc in 0) STATUS+=("ok") ;; 124) STATUS+=("TIMEOUT") ;; *) STATUS+=("FAIL($rc)") ;; esac
}

$PY - <<'PYEOF' | tee -a "$LOG"
import torch, triton, transformers, platform
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, SMs {p.multi_processor_count}; torch {torch.__version__}, "
      f"triton {triton.__version__}, transformers {transformers.__version__}, python {platform.python_version()}")
PYEOF

# step timeouts add up to 480 s (100+40+30+25+30+35+25+55+90+50), so the whole script stays under 8 minutes
step "kernel tests (GPU, bf16)" 100 $PY -m pytest -q -x tests/kernels -p no:cacheprovider
step "paged decode vs SDPA" 40 $PY -m bench.paged_decode_timing --json "$OUTDIR/paged_decode_timing.json"
step "TriAttention kernels @128K" 30 $PY -m bench.freed_blocks --gpu-timing --json "$OUTDIR/freed_blocks_gpu.json"
step "H2D bandwidth" 25 $PY -m bench.bandwidth --quick --json "$OUTDIR/bandwidth.json"
step "offload CUDA tests" 30 $PY -m pytest -q tests/offload/test_transfer.py tests/offload/test_host_mirror.py tests/offload/test_prefetch.py tests/offload/test_head_window.py -p no:cacheprovider
# decode with recall, the next window prefetched 8 steps ahead vs copied at the boundary: stall
# time / decode time for both (fails when the prefetched run stalls 5% or more)
step "prefetch overlap stall/step" 35 $PY -m bench.prefetch_overlap --quick --json "$OUTDIR/prefetch_overlap.json"
step "HF offloaded cache peer" 25 $PY -m bench.run hf-offload --quick --json "$OUTDIR/hf_offload.json"
# Llama-3.1-8B-shaped random-init model, bf16, 128K-token prompt: the layer-major prefill's seconds
# against its compute floor (FLOPs / bf16 matmul rate measured in the same run) and its peak device
# memory beyond the weights against the bound (pool + one layer's prompt KV + hidden states + a tile)
step "8B-shaped prefill vs floor @128K" 55 $PY -m bench.prefill_cost --llama8b --tokens 131072 --json "$OUTDIR/prefill_cost_llama8b_128k.json"
# the same model end to end; 500K runs outside the 8-minute budget with:
# python -m bench.long_context --llama8b --tokens 500000
step "8B-shaped @128K end to end" 90 $PY -m bench.long_context --llama8b --tokens 131072 --new-tokens 64 --json "$OUTDIR/long_context_llama8b_128k.json"
# ms per decode step: flashmem eager, flashmem cuda_graph=True and a dense HF step (8B-shaped model at
# 4K, tiny model at 128K), host syncs per eager step, and whether the graph run equals the eager
# run token for token (fails when it does not)
step "decode step eager/graph/dense" 50 $PY -m bench.decode_step --steps 32 --json "$OUTDIR/decode_step.json"

echo
echo "summary (machine above; details in $LOG)"
printf "  %-28s %-10s %s\n" "step" "status" "seconds"
for i in "${!NAMES[@]}"; do
  printf "  %-28s %-10s %s\n" "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
done
for f in "$OUTDIR"/*.json; do
  [ -f "$f" ] && $PY -c "import json,sys; d=json.load(open(sys.argv[1])); s=d.get('summary'); print('  ' + sys.argv[1] + ': ' + (json.dumps(s) if s else 'see file'))" "$f"
done
