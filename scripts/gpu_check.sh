#!/usr/bin/env bash
# Every CUDA-side check and the kernel benchmarks, in one run, on a GPU machine.
#   bash scripts/gpu_check.sh OUT_DIR
# Runs `pytest -m gpu`, `wb kernels check all` and `wb kernels bench all` with the machine's own
# torch and triton (nothing is installed), writes full results into OUT_DIR and prints a short
# table last. Works from a checkout without `pip install`: the packages are found on PYTHONPATH.
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export WB_AUTOTUNE_CACHE=${WB_AUTOTUNE_CACHE:-/tmp/wb-autotune}
status=0

{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== pytest -m gpu"
$PY -m pytest tests -m gpu -q -p no:cacheprovider --continue-on-collection-errors -o addopts="" \
  > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -3 "$OUT/gpu_tests.log"

echo "== wb kernels check all"
$PY -m workbench kernels check all --json "$OUT/check.json" > "$OUT/check.txt" 2>&1 || status=1
tail -1 "$OUT/check.txt"

echo "== wb kernels bench all"
$PY -m workbench kernels bench all --json "$OUT/bench.json" > "$OUT/bench.txt" 2>&1 || status=1
tail -1 "$OUT/bench.txt"

$PY scripts/gpu_summary.py "$OUT" | tee "$OUT/summary.txt"
exit $status
