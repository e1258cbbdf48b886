# Every target sets itself up: a fresh clone needs only `make demo` or `make test`.
PYTHON    ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
STAMP     := $(VENV)/.installed
# Without a GPU take the CPU wheel (a plain `torch` would pull a multi-GB CUDA build). With one, the CUDA
# build of a release a stack has run to the end (README.md, Supported stacks: 2.11.0+cu130, the GPU image's
# torch, on the gpu-image and oldest stacks), not whatever PyPI has newest.
CPU_TORCH ?= 2.13.0
GPU_TORCH ?= 2.11.0
HAS_GPU   := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST    := $(BIN)/python -m pytest
# The Triton 3.6 lane's venv (test-triton36, below); defined here, before `test` names its stamp
T36_VENV  ?= .venv-triton36
T36_STAMP := $(T36_VENV)/.installed
T36_PY    := $(T36_VENV)/bin/python

.PHONY: install demo test test-fast test-triton36 test-stacks bench lint gpu-check clean slurm-up slurm-down

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	@echo "GPU found: installing the CUDA build torch==$(GPU_TORCH)"
	$(BIN)/pip install -q torch==$(GPU_TORCH)
else
	@echo "no GPU: installing the CPU build torch==$(CPU_TORCH)"
	$(BIN)/pip install -q torch==$(CPU_TORCH)
endif
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wb demo

# The tests in parallel (pytest-xdist, each test file on one worker so its module fixtures run once), one
# worker more than there are CPUs: a quarter of a 2-worker run's CPU time sat idle (tests waiting on a
# collective timeout, a Ray or Slurm daemon, a killed rank's restart), and the Triton 3.6 lane runs beside
# them for the same reason (its log: .venv-triton36/lane.log, its tail printed after). No test asserts on a
# duration (those are marked `timing` and run under `make bench`), so a busy machine slows the suite down
# but cannot fail it. The jobs on the single-node Slurm cluster: their module fixture runs
# scripts/slurm_local.sh up (installing Slurm if needed) and down after them; where it cannot run (exit 3)
# they skip with its reason. slurm-down after the run, even when a test fails, leaves nothing running if
# pytest itself dies.
PYTEST_JOBS ?= $(shell echo $$(( $$(nproc) + 1 )))
LANE_LOG   = $(T36_VENV)/lane.log

test: $(STAMP) $(T36_STAMP)
	status=0; \
	$(MAKE) --no-print-directory test-triton36 > $(LANE_LOG) 2>&1 & lane=$$!; \
	$(PYTEST) tests -q -n $(PYTEST_JOBS) --dist loadfile -m "not timing" --durations=30 || status=$$?; \
	if wait $$lane; then tail -n 3 $(LANE_LOG); else cat $(LANE_LOG); echo "test-triton36 failed"; status=1; fi; \
	$(MAKE) slurm-down; exit $$status

slurm-up:
	bash scripts/slurm_local.sh up || [ $$? -eq 3 ]

slurm-down:
	bash scripts/slurm_local.sh down

# The oldest supported Triton (gpu_workbench/kernels/triton_compat.py) in a venv of its own, built once (stamp file):
# the AOT compile sweep of every fp16 spec (a third of `wb kernels compile all`, which takes too long for
# this lane on 2 cores) for sm_80 and sm_90, the compat and compile tests, and the float64 correctness
# sweep of every kernel through the interpreter (tests/kernels in full takes ~11 min here). The venv holds
# triton==3.6.0 alone and sees the main venv's packages after its own (a .pth line: the same CPU torch and
# the project's editable install, without installing torch a second time); --ignore-installed keeps pip
# from uninstalling the main venv's triton, which it would otherwise take for this venv's.
SITE_DIR  := import sysconfig; print(sysconfig.get_paths()["purelib"])

$(T36_STAMP): $(STAMP) pyproject.toml Makefile
	$(PYTHON) -m venv $(T36_VENV)
	echo "import site; site.addsitedir('$$($(BIN)/python -c '$(SITE_DIR)')')" > "$$($(T36_PY) -c '$(SITE_DIR)')/main_venv.pth"
	$(T36_VENV)/bin/pip install -q --ignore-installed --no-deps triton==3.6.0
	$(T36_PY) -c "import torch, triton; assert triton.__version__ == '3.6.0', triton.__version__"
	touch $(T36_STAMP)

test-triton36: $(T36_STAMP)
	$(T36_PY) -m gpu_workbench.cli.kernels_cli compile all --arch 80,90 --match fp16
	$(T36_PY) -m pytest tests/kernels/test_triton_compat.py tests/kernels/test_gpu_compile.py -q -m "not slow" \
		-p no:cacheprovider
	$(T36_PY) -m gpu_workbench.cli.kernels_cli check all --backend interpret

test-fast: $(STAMP)
	$(PYTEST) tests -q -n $(PYTEST_JOBS) --dist loadfile -m "not slow and not timing"

# The fast tier on each supported stack (gpu-image, newest, oldest: README.md), in cached side venvs; not in `test`.
test-stacks:
	bash scripts/test_stacks.sh $(STACKS)

bench: $(STAMP)
	$(PYTEST) tests/bench -q --benchmark-enable --benchmark-only --benchmark-columns=median,iqr,ops
	$(BIN)/wb kernels bench all

lint: $(STAMP)
	$(BIN)/ruff check .

gpu-check: $(STAMP)
	bash scripts/gpu_check.sh results/gpu

clean:
	rm -rf $(VENV) $(T36_VENV) .venv-stack-* .pytest_cache .ruff_cache .benchmarks
