# One command per job. `make demo` and `make test` each set up what they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch is pinned and installed first: an unpinned torch pulls GBs of CUDA packages.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: help system-deps venv install lint typecheck test test-all test-slow test-ansible wheel proto demo bench docs-screenshot arm64-check clean

help:
	@echo "make demo       set up, then run the demo federated run (local broker, simulated devices)"
	@echo "make test       set up, then run the test suite (fast and integration tests, not 'slow')"
	@echo "make test-all   the whole suite, slow end-to-end tests included"
	@echo "make test-ansible  converge the Ansible roles for real (slow: minutes per playbook)"
	@echo "make wheel      build the sparsefleet wheel into dist/ (what the device role installs)"
	@echo "make lint       ruff and mypy on device/ and fleet/"
	@echo "make proto      regenerate device/wire/pb from proto/"
	@echo "make bench      run the benchmarks in bench/ (figures, not tests)"
	@echo "make docs-screenshot  retake docs/dashboard.png with the browser test (chromium, mosquitto)"
	@echo "make arm64-check  the device side on arm64 under qemu-user: install, import, unit tests, one real job"

# System packages the tests use: a real mosquitto broker and its clients, and protoc for the
# independent wire-format check. Needs root (as on CI); skipped when everything is present.
system-deps:
	@if ! command -v mosquitto >/dev/null && [ ! -x /usr/sbin/mosquitto ] || ! command -v protoc >/dev/null || ! command -v mosquitto_pub >/dev/null || ! command -v chromium >/dev/null || ! command -v prometheus >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients protobuf-compiler chromium prometheus; \
	  else \
	    echo "missing system packages: run 'sudo apt-get install mosquitto mosquitto-clients protobuf-compiler chromium prometheus'"; exit 1; \
	  fi; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check device fleet tests bench
	$(VENV)/bin/ruff format --check device fleet tests bench
	$(VENV)/bin/mypy device fleet

test: system-deps install
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

test-all: system-deps install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-slow: system-deps install
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

test-ansible: system-deps install
	$(VENV)/bin/pytest -m slow tests/ansible $(PYTEST_ARGS)

wheel: install
	rm -f dist/sparsefleet-*.whl
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w dist .

proto: install
	$(PY) -m device.wire.gen

demo: system-deps install
	$(VENV)/bin/fleet demo

bench: install
	$(PY) bench/codec.py

# docs/dashboard.png is the run page as the browser test (headless Chromium) sees it.
docs-screenshot: system-deps install
	SPARSEFLEET_SCREENSHOT_DIR=docs $(VENV)/bin/pytest -q -m slow tests/web/test_browser.py $(PYTEST_ARGS)

# Not part of `make test`: needs qemu-user-static, debootstrap and mosquitto (apt), root for
# debootstrap, and access to the package sources on the first run (cached afterwards in
# $SPARSEFLEET_ARM64_CACHE, default ~/.cache/sparsefleet-arm64). See docs/hardware.md.
arm64-check: install
	$(PY) -m bench.arm64.check

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
