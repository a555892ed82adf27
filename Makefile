# bmc_fast developer commands. A fresh machine needs only Python 3.10+, a C++17 compiler and cmake.
#   make test       - create .venv, install torch (CPU wheel) + build and test deps, build bmc_fast, run the tests
#   make demo       - the main job: BMC on the embedded default stream (see README)
#   make bench      - kernel micro-benchmarks (pytest-benchmark), tables in benchmarks/out/
#   make cuda-check - compile every CUDA kernel with nvcc for sm_80 and sm_90 (no GPU needed)
#   make test-avalanche - the Avalanche integration's tests, in an environment with the [avalanche] extra
#                     (AVALANCHE_VENV, default build/cuda-venv: torch 2.14.1, which torchvision needs)
#   make gpu-check  - on a GPU machine: build for its GPU, run the CUDA tests, the GPU benchmarks and the
#                     trainer on CUDA; one report in benchmarks/results/ (GPU_PYTHON: a python whose torch
#                     has CUDA; default .venv's if there is one, else python3)
# The first `make test` installs for ~1-2 min (~1.5 GB in .venv) and compiles for ~3 min on 2 cores; after
# that, the build runs again only when csrc/, CMakeLists.txt, pyproject.toml or a bmc_fast/*.py changed.
# CUDA kernels: build against a CUDA torch with nvcc on PATH, in its own venv, e.g.
#   make test VENV=.venv-cuda TORCH_SPEC=torch==2.14.1      (PyPI's Linux torch wheel is built with CUDA 13)
# BMC_FAST_CUDA=ON|OFF|AUTO and BMC_FAST_CUDA_ARCHS (default "80-real;90-real") choose what is compiled.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
BUILD_DIR ?= build/$(notdir $(VENV))
DEPS := numpy scikit-build-core pybind11 ninja pytest pytest-benchmark hypothesis scikit-learn tqdm matplotlib lmdb lightning
STAMP := $(VENV)/.bmc_deps
BUILT := $(VENV)/.bmc_built
SOURCES := $(shell find csrc bmc_fast -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.py' \) 2>/dev/null) \
           CMakeLists.txt pyproject.toml
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))

.PHONY: setup install test test-avalanche demo bench bench-quick cuda-check gpu-check clean

# Re-run when this file changes (a new test dependency reaches existing environments).
$(STAMP): Makefile
	@if [ ! -x $(PY) ]; then \
	  echo "creating $(VENV) and installing $(TORCH_SPEC) + build and test deps (first time: ~1-2 min, ~1.5 GB)"; \
	  $(PYTHON) -m venv $(VENV); \
	else echo "updating the packages of $(VENV) (the Makefile changed)"; fi
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q "$(TORCH_SPEC)" $(DEPS)
	@touch $@

setup: $(STAMP)

$(BUILT): $(STAMP) $(SOURCES)
	@echo "building bmc_fast into $(BUILD_DIR) (the C++ extension: first time ~3 min on 2 cores, then only what changed)"
	@$(PY) -m pip install -q --no-build-isolation -e . -Cbuild-dir=$(BUILD_DIR)
	@touch $@

install: $(BUILT)

test: install
	@echo "running the tests"
	BMC_FAST_REQUIRE_EXTENSION=1 $(PY) -m pytest tests -q $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/bmc-fast run $(DEMO_ARGS)

bench: install
	cd benchmarks && ../$(PY) -m pytest . $(BENCH_ARGS)

bench-quick: install
	cd benchmarks && BMC_BENCH_QUICK=1 ../$(PY) -m pytest . -q $(BENCH_ARGS)

cuda-check:
	bash tests/cuda_compile/check.sh

test-avalanche:
	bash tests/avalanche_env.sh

gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf build $(VENV) benchmarks/out
