#!/usr/bin/env bash
# GPU check: on a CUDA machine, build the native extension with CUDA, run the GPU tests and the benchmarks,
# write logs and JSON under $1 (default bench/results/gpu), and print a summary table last.
# Usage: bench/gpu_check.sh [OUT_DIR]      (PYTHON=... picks the interpreter; must finish in < 8 min on one H200)
# It stops at the first failing step, loudly. GPU_CHECK_KEEP_GOING=1 (bench/device_run.sh sets it: device time
# is rare) runs the later steps anyway, names every failed step in the summary and still exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
SCRATCH="$(mktemp -d)"  # the toy runs' checkpoints: not results
FAILED=()
step() { echo "== $(date +%T) $*" >&2; }
run_step() {  # run_step TITLE FUNCTION: inside a function called from `if`, errexit is off: each returns its status
  step "$1"
  if ! "$2"; then
    echo "!! FAILED: $1" >&2
    FAILED+=("$1")
    [ "${GPU_CHECK_KEEP_GOING:-0}" = 1 ] || exit 1
  fi
}

device() {
  "$PYTHON" - <<'PY' | tee "$OUT/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
}

build_native() {
  if ! FASTFAIR_BUILD_NATIVE=1 MAX_JOBS="${MAX_JOBS:-16}" "$PYTHON" -m pip install --no-build-isolation --no-deps \
      -e . > "$OUT/build_native.log" 2>&1; then
    tail -n 60 "$OUT/build_native.log"
    return 1
  fi
  "$PYTHON" -c "import torch, fastfair._C; assert torch.ops.fastfair.has_cuda(), 'fastfair._C was built without CUDA'"
}

cuda_tests() {
  "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_kernels_native.py tests/test_kernels_triton.py \
    tests/test_kernels_dispatch.py tests/test_dft_cuda.py tests/test_lean_graph.py tests/test_keep_attention.py \
    tests/test_dft_saved_state.py \
    "tests/test_classifiers_train.py::test_resume_after_an_interruption_equals_an_uninterrupted_run" \
    tests/test_kernels_rounding.py 2>&1 | tee "$OUT/tests_kernels.log"
}

toy_trainer() {
  local mixed
  for mixed in fp32 bf16 fp16; do  # fp16: with the dynamic loss scaler (precision.loss_scale)
    timeout 180 "$PYTHON" fastfair/train.py --config configs/toy.yaml max_steps=3 checkpoint_every=3 \
      precision.mixed=$mixed output_dir="$SCRATCH/train_toy_$mixed" 2>&1 | tail -n 5 | tee -a "$OUT/train_toy.log" \
      || return 1
    "$PYTHON" -c "import sys; from fastfair.checkpoint import list_checkpoints as ls; assert ls(sys.argv[1]), \
      'toy training ($mixed) saved no checkpoint'" "$SCRATCH/train_toy_$mixed" || return 1
  done
}

toy_check() {  # train.py --check on CUDA: peak memory against the device's, the estimate, nothing saved
  local report
  report="$(timeout 120 "$PYTHON" fastfair/train.py --config configs/toy.yaml --check --check-iterations 2 \
    output_dir="$SCRATCH/check_toy" 2>&1 | tail -n 8)" || { echo "$report" | tee -a "$OUT/train_toy.log"; return 1; }
  echo "$report" | tee -a "$OUT/train_toy.log"
  grep -q "nothing was saved" <<< "$report" && ! ls "$SCRATCH/check_toy/checkpoints/step_"* 2>/dev/null
}

kernel_bench() {
  "$PYTHON" bench/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
}

# 2 images, 20 steps, 1 round of (warm-up + 1 timed iteration) per implementation, then memory versus steps and
# images (budget ~6 min on one H200: model build/save ~1 min, five configurations, four sweep runs per impl:
# the main table's 20-step, 2-image point is reused; 2 and 4 images give the largest batch within the baseline's
# peak). The report is rewritten after every run, so a time limit keeps what finished.
train_step_bench() {
  "$PYTHON" bench/train_step.py --model sd15 --images 2 --steps 20 --rounds 1 --iters 1 \
    --sweep-steps 5,10,40 --sweep-images 4 --models-dir "$SCRATCH/sd15" --json "$OUT/train_step.json" 2>&1 \
    | tee "$OUT/train_step.log"
}

# the decode-and-judge phase's peak at 1 and 4 images: kept, block-wise, per image (loss.judge_images=1); on the
# models train_step_bench saved (six subprocesses, about a minute); last: the time limit cuts it first
judge_bench() {
  timeout 150 "$PYTHON" bench/judge_memory.py --images 1,4 --models-dir "$SCRATCH/sd15" \
    --json "$OUT/judge_memory.json" 2>&1 | tee "$OUT/judge_memory.log"
}

# after the benchmarks, so that a time limit cuts it rather than them: DeepSpeed ZeRO-2 with fp16 (its own loss
# scaler)
deepspeed_fp16() {
  if ! "$PYTHON" -c "import deepspeed" 2>/dev/null; then
    echo "deepspeed is not installed: skipped" | tee -a "$OUT/train_toy.log"
    return 0
  fi
  timeout 240 "$PYTHON" fastfair/train.py --config configs/toy.yaml --deepspeed_config configs/ds/zero2_fp16.json \
    max_steps=3 checkpoint_every=3 precision.mixed=fp16 output_dir="$SCRATCH/train_toy_ds_fp16" 2>&1 | tail -n 5 \
    | tee -a "$OUT/train_toy.log" || return 1
  "$PYTHON" -c "import sys; from fastfair.checkpoint import list_checkpoints as ls; assert ls(sys.argv[1]), \
    'DeepSpeed fp16 toy training saved no checkpoint'" "$SCRATCH/train_toy_ds_fp16"
}

step "device"
device  # no CUDA device: nothing below can run
run_step "build fastfair._C with CUDA (log: $OUT/build_native.log)" build_native
run_step "kernel and engine tests on CUDA (log: $OUT/tests_kernels.log)" cuda_tests
run_step "trainer on CUDA: the toy config, 3 iterations in fp32, bf16 and fp16 autocast (log: $OUT/train_toy.log)" \
  toy_trainer
run_step "train.py --check on CUDA: the toy config (log: $OUT/train_toy.log)" toy_check
run_step "kernel benchmark (log: $OUT/kernels.log)" kernel_bench
run_step "training iteration, baseline vs fastfair, sd15 shapes at 512x512 (log: $OUT/train_step.log)" \
  train_step_bench
run_step "trainer on CUDA with DeepSpeed ZeRO-2 in fp16: the toy config, 3 iterations (log: $OUT/train_toy.log)" \
  deepspeed_fp16
run_step "decode-and-judge memory versus images, sd15 shapes at 512x512 (log: $OUT/judge_memory.log)" judge_bench

step "summary"
{
  for name in "${FAILED[@]}"; do echo "FAILED: $name"; done
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
[ "${#FAILED[@]}" = 0 ]
