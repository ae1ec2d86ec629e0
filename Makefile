# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-all lint bench-quick gpu-check

setup:
	bash scripts/setup.sh

demo: setup
	$(BIN)/flashmem generate --model default --passkey-tokens 4000 --depth 0.3 --budget-tokens 256 --max-new-tokens 12

# The suite on the newest transformers, then the Hugging Face integration tests on the oldest
# supported release (5.17) in a second environment.
test: setup lint
	$(BIN)/python -m pytest -q
	VENV=.venv-tf517 TRANSFORMERS_SPEC="transformers==5.17.*" bash scripts/setup.sh
	.venv-tf517/bin/python -m pytest -q -p no:cacheprovider tests/flashmem

test-all: setup lint
	$(BIN)/python -m pytest -q -m "slow or not slow"

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench-quick: setup
	$(BIN)/python -m bench.run all --quick

gpu-check: setup
	bash bench/gpu_check.sh
