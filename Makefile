# Every target sets itself up on a fresh machine, idempotently: a .venv with PyTorch and the
# dependencies, the extension built (CUDA kernels whenever a CUDA toolkit and a CUDA PyTorch are
# present), then the work. On a machine whose python3 already has a CUDA PyTorch (the GPU machine,
# no network) the .venv reuses it instead of installing one.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
PYTEST_ARGS ?=
BENCH_ARGS ?=
SOURCES := $(shell find csrc -type f) setup.py pyproject.toml
CPP_SOURCES := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu')
# The formatters' versions are pinned: another version may format the same code differently.
LINTERS := ruff==0.17.6 clang-format==23.1.5

.PHONY: test lint format bench gpu-check wheel cmake-check clean

test: $(VENV)/.built
	$(PY) -m pytest $(PYTEST_ARGS)

# Lint and formatting: ruff (pyproject.toml's config) on the Python, clang-format (.clang-format) on csrc/.
lint: $(VENV)/.linters
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $(CPP_SOURCES)

format: $(VENV)/.linters
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .
	$(VENV)/bin/clang-format -i $(CPP_SOURCES)

$(VENV)/.linters: $(VENV)/.deps
	$(PY) -m pip install $(LINTERS)
	touch $@

bench: $(VENV)/.built
	$(PY) -m genfast bench $(BENCH_ARGS)

# The one command for a GPU machine (README, "GPU check"): build, pytest -m gpu, compute-sanitizer, the suite
# on cuda, in under 9 minutes; it builds the extension itself, as a timed step. DRY=1: the same script's
# logic on the CPU, as CI runs it.
gpu-check: $(VENV)/.deps
	$(PY) -m benchmarks.gpu_check $(if $(DRY),--dry)

wheel: $(VENV)/.deps
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

# CMake build of the same sources (CPU variant), so the CMake project cannot rot.
cmake-check: $(VENV)/.deps
	cmake -S . -B build/cmake -G Ninja -DPython_EXECUTABLE=$(abspath $(PY)) -DGENFAST_CUDA=OFF
	cmake --build build/cmake
	$(PY) -c "import importlib.util as u, torch; s = u.spec_from_file_location('genfast._C', 'build/cmake/genfast/_C.so'); \
	  m = u.module_from_spec(s); s.loader.exec_module(m); print('CMake build loads:', m.build_info())"

# A venv made by a python3 that is itself a venv (the GPU machine's) reaches only the base Python's packages
# through --system-site-packages: a .pth file adds python3's own site-packages (after the venv's).
$(VENV)/.deps: Makefile pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then \
	    echo "reusing the CUDA PyTorch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV) && \
	    $(PYTHON) -c "import site; print(*site.getsitepackages(), sep='\n')" \
	      > "$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_reused_python_site.pth"; \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	$(PY) -c "import pytest, numpy, setuptools, wheel" 2>/dev/null || $(PY) -m pip install pytest numpy wheel "setuptools>=64"
	@# Optional (faster builds, Triton, plots, progress bars, statistics, the bundled digits data): a machine without network goes on without.
	$(PY) -c "import ninja, scipy, matplotlib, tqdm, triton, sklearn" 2>/dev/null || \
	  $(PY) -m pip install ninja scipy matplotlib tqdm triton scikit-learn || echo "warning: optional packages missing"
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build dist *.egg-info genfast/*.so $(VENV)/.built
