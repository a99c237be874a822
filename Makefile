# Two commands do all set-up on a fresh machine:
#   make test   - creates .venv, installs the pinned dev dependencies, builds the extension, runs the tests
#   make bench  - the same set-up, then the benchmark runner (table, markdown + JSON in bench-out/)
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test test-slow bench build clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(VPY)
	$(VPY) -m pip install --upgrade-strategy only-if-needed -r requirements-dev.txt
	touch $@

# Ninja rebuilds only what changed; --no-build-isolation builds against the venv's torch.
build: $(DEPS)
	MAX_JOBS=$${MAX_JOBS:-2} $(VPY) -m pip install --no-build-isolation --no-deps -e .

test: build
	$(VPY) -m pytest -q $(PYTEST_ARGS)

test-slow: build
	$(VPY) -m pytest -q -m slow $(PYTEST_ARGS)

bench: build
	$(VPY) benchmarks/runner.py $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info seq2seq_fast/_C*.so
