# bmc_fast developer commands. A fresh machine needs only Python 3.10+, a C++17 compiler and cmake.
#   make test   - create .venv, install torch (CPU wheel) + build deps, build bmc_fast, run the tests
#   make demo   - the main job: BMC on the embedded default stream (see README)
#   make bench  - kernel micro-benchmarks (pytest-benchmark), tables in benchmarks/out/
#   make cuda-check - compile every CUDA kernel with nvcc for sm_80 and sm_90 (no GPU needed)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
BUILD_DIR ?= build/$(notdir $(VENV))
STAMP := $(VENV)/.bmc_deps

.PHONY: setup install test demo bench bench-quick cuda-check clean

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" numpy scikit-build-core pybind11 ninja pytest pytest-benchmark hypothesis scikit-learn tqdm matplotlib lmdb
	touch $@

setup: $(STAMP)

install: $(STAMP)
	$(PY) -m pip install -q --no-build-isolation -e . -Cbuild-dir=$(BUILD_DIR)

test: install
	BMC_FAST_REQUIRE_EXTENSION=1 $(PY) -m pytest tests -q $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/bmc-fast run $(DEMO_ARGS)

bench: install
	cd benchmarks && ../$(PY) -m pytest . $(BENCH_ARGS)

bench-quick: install
	cd benchmarks && BMC_BENCH_QUICK=1 ../$(PY) -m pytest . -q $(BENCH_ARGS)

cuda-check:
	bash tests/cuda_compile/check.sh

clean:
	rm -rf build $(VENV) benchmarks/out
