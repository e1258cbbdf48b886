# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PYTHON    ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
# Without a GPU take the CPU wheel (a plain `torch` would pull a multi-GB CUDA build).
CPU_TORCH ?= 2.13.0
HAS_GPU   := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST    := $(BIN)/python -m pytest

.PHONY: install demo test test-fast test-triton36 bench lint gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	@echo "GPU found: installing the CUDA build of torch"
	$(BIN)/pip install -q torch
else
	@echo "no GPU: installing the CPU build torch==$(CPU_TORCH)"
	$(BIN)/pip install -q torch==$(CPU_TORCH)
endif
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wb demo

test: $(STAMP) test-triton36
	$(PYTEST) tests -q --durations=30

# The oldest supported Triton (kernels/triton_compat.py) in a venv of its own, built once (stamp file):
# the AOT compile sweep of every fp16 spec (a third of `wb kernels compile all`, which takes too long for
# this lane on 2 cores) for sm_80 and sm_90, the compat and compile tests, and the float64 correctness
# sweep of every kernel through the interpreter (tests/kernels in full takes ~11 min here). CPU torch:
# the lane compiles for absent GPUs and interprets. `-e . --no-deps` keeps this torch and triton; the
# lane needs only numpy, typer and rich of the project's dependencies (no deepspeed, ray, matplotlib).
T36_VENV  ?= .venv-triton36
T36_STAMP := $(T36_VENV)/.installed
T36_PY    := $(T36_VENV)/bin/python

$(T36_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(T36_VENV)
	$(T36_VENV)/bin/pip install -q torch==$(CPU_TORCH) triton==3.6.0 "numpy>=1.26" "typer>=0.12" "rich>=13" \
		"pytest>=8" "pytest-timeout>=2.3" "pytest-benchmark>=4"
	$(T36_VENV)/bin/pip install -q --no-deps -e .
	touch $(T36_STAMP)

test-triton36: $(T36_STAMP)
	$(T36_PY) -m workbench.kernels_cli compile all --arch 80,90 --match fp16
	$(T36_PY) -m pytest tests/kernels/test_triton_compat.py tests/kernels/test_gpu_compile.py -q -m "not slow" \
		-p no:cacheprovider
	$(T36_PY) -m workbench.kernels_cli check all --backend interpret

test-fast: $(STAMP)
	$(PYTEST) tests -q -m "not slow"

bench: $(STAMP)
	$(PYTEST) tests/bench -q --benchmark-enable --benchmark-only --benchmark-columns=median,iqr,ops
	$(BIN)/wb kernels bench all

lint: $(STAMP)
	$(BIN)/ruff check .

gpu-check: $(STAMP)
	bash scripts/gpu_check.sh results/gpu

clean:
	rm -rf $(VENV) $(T36_VENV) .pytest_cache .ruff_cache .benchmarks
