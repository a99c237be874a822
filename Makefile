# Two commands do all set-up on a fresh machine:
#   make test   - creates .venv, installs the pinned dev dependencies, builds the extension, runs the tests
#   make bench  - the same set-up, then the benchmark runner's representative set (a few minutes;
#                 tables on stdout, markdown + JSON + plot in bench-out/); make bench-full: everything
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: test test-slow test-compat bench bench-full build clean gpu-check

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(VPY)
	$(VPY) -m pip install --upgrade-strategy only-if-needed -r requirements-dev.txt
	touch $@

# --no-build-isolation builds against the venv's torch. setup.py keeps the objects in
# build/<torch version>-<hash of the build settings>/, so ninja recompiles only the sources that
# changed (pip's editable build would otherwise start from a fresh temporary folder every time).
build: $(DEPS)
	MAX_JOBS=$${MAX_JOBS:-2} $(VPY) -m pip install --no-build-isolation --no-deps -e .

test: build
	$(VPY) -m pytest -q $(PYTEST_ARGS)

test-slow: build
	$(VPY) -m pytest -q -m slow $(PYTEST_ARGS)

# BENCH_ARGS narrows either (e.g. --configs zh --workloads train_step); runner.py --help lists the names.
bench: build
	$(VPY) benchmarks/runner.py $(BENCH_ARGS)

bench-full: build
	$(VPY) benchmarks/runner.py --full $(BENCH_ARGS)

# make test-compat: the fast suite on the oldest and the newest supported stacks, each in a venv
# of its own with the extension built against that venv's torch and installed there (not in
# place: the source tree's _C stays the one `make test` built). PYTHONSAFEPATH keeps the source
# tree's package off sys.path, so the tests import the installed one. The suite includes the
# interpreted Triton tests and tests/backends/test_triton_gpu_compile.py (sm_80/sm_90 cubins).
# The first Python 3.12 that runs (a pyenv shim may exist and refuse), else $(PYTHON).
COMPAT_PYTHON ?= $(firstword $(shell for p in $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12; do \
                   $$p -c "" 2>/dev/null && command -v $$p && break; done) $(PYTHON))
COMPAT_OLDEST := .venv-compat-oldest
COMPAT_NEWEST := .venv-compat-newest
COMPAT_TRITON_NEWEST := 3.9.0

$(COMPAT_OLDEST)/.deps-installed: requirements-compat-oldest.txt
	rm -rf $(COMPAT_OLDEST) && $(COMPAT_PYTHON) -m venv $(COMPAT_OLDEST)
	$(COMPAT_OLDEST)/bin/python -m pip install -r requirements-compat-oldest.txt
	touch $@

$(COMPAT_NEWEST)/.deps-installed: requirements-compat-newest.txt
	rm -rf $(COMPAT_NEWEST) && $(PYTHON) -m venv $(COMPAT_NEWEST)
	$(COMPAT_NEWEST)/bin/python -m pip install -r requirements-compat-newest.txt
	$(COMPAT_NEWEST)/bin/python -m pip install --no-deps triton==$(COMPAT_TRITON_NEWEST)
	touch $@

test-compat: $(COMPAT_OLDEST)/.deps-installed $(COMPAT_NEWEST)/.deps-installed
	@for venv in $(COMPAT_OLDEST) $(COMPAT_NEWEST); do \
	  echo "== test-compat: $$venv: $$($$venv/bin/python -c 'import sys, torch, triton, numpy; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")')"; \
	  MAX_JOBS=$${MAX_JOBS:-2} $$venv/bin/python -m pip install --no-build-isolation --no-deps --force-reinstall . -q || exit 1; \
	  PYTHONSAFEPATH=1 $$venv/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) || exit 1; \
	done

# make gpu-check: on a lent GPU machine (torch, triton, pytest, pytest-benchmark, hypothesis
# installed; no network), with its own python3: build, CUDA/Triton tests, compute-sanitizer,
# benchmarks and memory, each stage time-limited (GPU_CHECK_STAGES, GPU_CHECK_OUT: see the script).
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf build *.egg-info seq2seq_fast/_C*.so
