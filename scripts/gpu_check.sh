#!/usr/bin/env bash
# Every CUDA-side kernel check and the kernel benchmarks, in one run, on a GPU machine.
#   bash scripts/gpu_check.sh OUT_DIR            # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run [OUT]    # anywhere: verify what the run needs, print its commands
# Runs the `gpu` kernel tests, `kernels check` on the Triton backend, the AOT compile sweep for this
# GPU's arch with its own Triton, `kernels bench`, and 10 training steps of configs/llama-1b.toml (tokens/s, MFU), with the machine's own python, torch and triton
# (nothing is installed; PYTHON picks the interpreter). It needs only torch, triton, numpy, typer, rich
# and pytest: not deepspeed, ray or nvtx (the dry run proves it by blocking those imports). Writes full
# results into OUT_DIR and prints a short table last. Exit status: non-zero if any step failed.
# Liger-Kernel (pure Python + Triton), which the GPU image lacks, joins the rms_norm/rope/swiglu benchmark
# rows when its wheel is carried along: LIGER_WHEEL=PATH, or wheels/liger_kernel-*.whl (unpacked into OUT_DIR).
set -uo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT=${1:-results/gpu}
if [[ $DRY == 0 && -z "${1:-}" ]]; then echo "usage: bash scripts/gpu_check.sh [--dry-run] OUT_DIR" >&2; exit 2; fi
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export WB_AUTOTUNE_CACHE=${WB_AUTOTUNE_CACHE:-/tmp/wb-autotune}
LIGER_WHEEL=${LIGER_WHEEL:-$(ls wheels/liger_kernel-*.whl 2>/dev/null | head -n 1)}
KCLI="$PY -m gpu_workbench.cli.kernels_cli"  # the kernel commands alone: the full `wb` CLI imports more
ARCH_OF_GPU="\$($PY -c 'import torch; c = torch.cuda.get_device_capability(); print(90 if c[0] >= 9 else 80)')"

STEPS=(
  "pytest -m gpu|$PY -m pytest tests/kernels -m gpu -q -p no:cacheprovider -o addopts= > $OUT/gpu_tests.log 2>&1"
  "kernels check|$KCLI check all --backend triton --json $OUT/check.json > $OUT/check.txt 2>&1"
  "kernels compile|$KCLI compile all --arch $ARCH_OF_GPU --json $OUT/compile.json > $OUT/compile.txt 2>&1"
  "kernels bench|$KCLI bench all --json $OUT/bench.json > $OUT/bench.txt 2>&1"
  "train llama-1b|$PY -m gpu_workbench train --config configs/llama-1b.toml steps=10 progress=false run_dir=$OUT/llama-1b > $OUT/llama-1b.txt 2>&1"
)
# Issue 34's rows, each beside the bf16 eager baseline above (llama-1b.toml: bf16, full checkpointing): bf16
# compiled, fp8 compiled (torchao, rowwise; needs torchao installed and an sm_89+ GPU, else that row fails in one
# line), and the three again with selective checkpointing. gpu_summary.py prints tokens/s, MFU, peak memory and
# the ratios to the baseline.
TRAIN_1B="$PY -m gpu_workbench train --config configs/llama-1b.toml steps=10 progress=false"
for ac in full selective; do
  for variant in "bf16-eager|precision=bf16" "bf16-compiled|precision=bf16 train.compile=true" \
                 "fp8-compiled|precision=fp8 float8.recipe=rowwise train.compile=true"; do
    name="llama-1b-${variant%%|*}-$ac"
    [[ "$name" == llama-1b-bf16-eager-full ]] && continue   # the baseline: run above as llama-1b
    STEPS+=("train $name|$TRAIN_1B ${variant#*|} model.activation_checkpointing=$ac run_dir=$OUT/$name > $OUT/$name.txt 2>&1")
  done
done

if [[ $DRY == 1 ]]; then
  echo "== dry run: the commands a GPU run executes (OUT=$OUT)"
  for step in "${STEPS[@]}"; do echo "  ${step#*|}"; done
  echo "  $PY scripts/gpu_summary.py $OUT"
  echo "  Liger-Kernel wheel: ${LIGER_WHEEL:-none (the benchmark rows go without Liger)}"
  echo "== dry run: checking that everything those commands import and call exists"
  exec $PY scripts/gpu_summary.py --preflight
fi

mkdir -p "$OUT"
status=0
if [[ -n "$LIGER_WHEEL" ]]; then
  $PY -m zipfile -e "$LIGER_WHEEL" "$OUT/liger" && export PYTHONPATH="$OUT/liger:$PYTHONPATH"
fi
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

for step in "${STEPS[@]}"; do
  echo "== ${step%%|*}"
  eval "${step#*|}" || status=1
done
$PY scripts/gpu_summary.py "$OUT" | tee "$OUT/summary.txt"
exit $status
