# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PYTHON    ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
# Without a GPU take the CPU wheel (a plain `torch` would pull a multi-GB CUDA build).
CPU_TORCH ?= 2.13.0
HAS_GPU   := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST    := $(BIN)/python -m pytest

.PHONY: install demo test test-fast bench lint gpu-check clean

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

test: $(STAMP)
	$(PYTEST) tests -q

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
	rm -rf $(VENV) .pytest_cache .ruff_cache .benchmarks
