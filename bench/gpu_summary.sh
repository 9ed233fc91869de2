#!/usr/bin/env bash
# The GPU check's summary from what its steps left in a results folder: the failed steps, the tests' last line,
# the kernel, training-iteration and judge-memory tables. bench/gpu_check.sh runs it last; bench/device_run.sh
# again where the check was stopped before it (written to OUT/summary.md, and printed).
#
#   bench/gpu_summary.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:?give the results folder of bench/gpu_check.sh}"
PYTHON="${PYTHON:-python3}"
{
  [ -f "$OUT/failed.txt" ] && sed 's/^/FAILED: /' "$OUT/failed.txt"
  [ -f "$OUT/device.txt" ] && echo "device: $(tail -n 1 "$OUT/device.txt")"
  [ -f "$OUT/tests_kernels.log" ] && echo "kernel and engine tests: $(tail -n 1 "$OUT/tests_kernels.log")"
  [ -f "$OUT/train_toy.log" ] && echo "toy trainer on CUDA: $(grep -c . "$OUT/train_toy.log") log lines"
  echo
  [ -f "$OUT/kernels.json" ] && "$PYTHON" bench/kernels.py --summarize "$OUT/kernels.json"
  echo
  [ -f "$OUT/train_step.md" ] && cat "$OUT/train_step.md"
  echo
  [ -f "$OUT/judge_memory.md" ] && cat "$OUT/judge_memory.md"
  true
} | tee "$OUT/summary.md"
