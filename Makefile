# Two commands do all the set-up on a bare machine (Python 3.11 and a C++ compiler):
#   make test   create .venv, install pinned torch + vitkern[test] (builds vitkern._C), run the suite
#   make bench  the same set-up, then the benchmark CLI and the pytest-benchmark suite
# Each step leaves a stamp file, so a second run reinstalls nothing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamp
# Tests run the Triton kernels in Triton's CPU interpreter (no GPU on CPU machines).
TEST_ENV := TRITON_INTERPRET=1 OMP_NUM_THREADS=1
PYTEST_ARGS ?=

.PHONY: test bench setup info clean test-fast

setup: $(STAMP)-pkg

$(STAMP)-venv:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23.2" "setuptools>=64" wheel
	touch $@

$(STAMP)-torch: $(STAMP)-venv
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	touch $@

$(STAMP)-pkg: $(STAMP)-torch setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"
	touch $@

test: setup
	$(TEST_ENV) $(PY) -m pytest tests $(PYTEST_ARGS)

bench: setup
	$(PY) -m vitkern bench --op all --json bench-results/latest.json --plot bench-results/latest.png --markdown bench-results/latest.md
	$(PY) -m pytest benchmarks -p no:xdist --benchmark-only --benchmark-columns=median,iqr,rounds -q

info: setup
	$(PY) -m vitkern info

clean:
	rm -rf $(VENV) build *.egg-info vitkern/_C*.so
