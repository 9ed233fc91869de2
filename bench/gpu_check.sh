#!/usr/bin/env bash
# GPU check: on a CUDA machine, build the native extension with CUDA, run the GPU tests and the benchmarks,
# write logs and JSON under $1 (default bench/results/gpu), and print a summary table last.
# Usage: bench/gpu_check.sh [OUT_DIR]      (PYTHON=... picks the interpreter)
# Time: GPU_CHECK_SECONDS (default 480, under the 8 minutes the check is sized for) bounds the whole script: every
# step runs under `timeout` with the smaller of its own cap and the time left (less GPU_CHECK_RESERVE, default 15 s,
# kept for the summary); a step with under 10 s left is skipped as failed. So the summary is always written.
# Order: what the open issues need measured first (kernels, the training-iteration table), the toy checks after.
# It stops at the first failing step, loudly. GPU_CHECK_KEEP_GOING=1 (bench/device_run.sh sets it: device time
# is rare) runs the later steps anyway, names every failed step in the summary and still exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu}"
PYTHON="${PYTHON:-python3}"
TOTAL="${GPU_CHECK_SECONDS:-480}"
RESERVE="${GPU_CHECK_RESERVE:-15}"
mkdir -p "$OUT"
: > "$OUT/failed.txt"  # one line per failed step: bench/gpu_summary.sh reads it
SCRATCH="$(mktemp -d)"  # the toy runs' checkpoints: not results
step() { echo "== $(date +%T) [$SECONDS s] $*" >&2; }
run_step() {  # run_step TITLE FUNCTION: inside a function called from `if`, errexit is off: each returns its status
  step "$1"
  if ! "$2"; then
    echo "!! FAILED: $1" >&2
    echo "$1" >> "$OUT/failed.txt"
    [ "${GPU_CHECK_KEEP_GOING:-0}" = 1 ] || { bash bench/gpu_summary.sh "$OUT"; exit 1; }
  fi
}
within() {  # within CAP COMMAND...: COMMAND under timeout of min(CAP, the time left); 124 when it ran out
  local cap=$1 left=$(( TOTAL - RESERVE - SECONDS ))
  shift
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 10 ]; then
    echo "no time left (GPU_CHECK_SECONDS=$TOTAL): skipped" >&2
    return 124
  fi
  timeout --kill-after=5 "$cap" "$@"
}

saved() {  # saved RUN_DIR WHAT: whether the run saved a checkpoint
  within 60 "$PYTHON" -c "import sys; from fastfair.checkpoint import list_checkpoints as ls; assert ls(sys.argv[1]), \
    sys.argv[2] + ' saved no checkpoint'" "$1" "$2"
}

device() {
  within 60 "$PYTHON" - <<'PY' | tee "$OUT/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
}

build_native() {
  if ! FASTFAIR_BUILD_NATIVE=1 MAX_JOBS="${MAX_JOBS:-16}" within 240 "$PYTHON" -m pip install --no-build-isolation \
      --no-deps -e . > "$OUT/build_native.log" 2>&1; then
    tail -n 60 "$OUT/build_native.log"
    # fastfair (and fastfair.kernels, mapped from kernels/ by setup.py) must still be installed for every later
    # step: without the native extension, the torch and Triton backends are what they test and measure
    echo "installing fastfair without the native extension, so that the later steps run" >&2
    FASTFAIR_BUILD_NATIVE=0 within 120 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . \
      >> "$OUT/build_native.log" 2>&1
    return 1
  fi
  within 60 "$PYTHON" -c \
    "import torch, fastfair._C; assert torch.ops.fastfair.has_cuda(), 'fastfair._C was built without CUDA'"
}

# every failure reported (not -x: one failing test would hide the rest); the nvcc compile-check of the CUDA
# sources is for machines without a CUDA torch: the build above compiled them for real
cuda_tests() {
  within 150 "$PYTHON" -m pytest -q --maxfail=25 -p no:cacheprovider tests/test_kernels_native.py \
    tests/test_kernels_triton.py tests/test_kernels_dispatch.py tests/test_dft_cuda.py tests/test_lean_graph.py \
    tests/test_keep_attention.py tests/test_dft_saved_state.py tests/test_host_copy.py \
    "tests/test_classifiers_train.py::test_resume_after_an_interruption_equals_an_uninterrupted_run" \
    tests/test_kernels_rounding.py "tests/test_toy_world.py::test_detector_network_follows_the_images_device" \
    --deselect tests/test_kernels_native.py::test_cuda_sources_compile 2>&1 \
    | tee "$OUT/tests_kernels.log"
}

kernel_bench() {
  within 90 "$PYTHON" bench/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
}

# 2 images, 20 steps, 1 round of (warm-up + 1 timed iteration) per implementation, then peak memory at 40 steps
# (flat in the steps?) and 4 images (the largest batch within the baseline's peak); the main table's 20-step,
# 2-image point is reused. The report is rewritten after every run, so the time limit keeps what finished.
train_step_bench() {
  within 270 "$PYTHON" bench/train_step.py --model sd15 --images 2 --steps 20 --rounds 1 --iters 1 \
    --sweep-steps 40 --sweep-images 4 --models-dir "$SCRATCH/sd15" --json "$OUT/train_step.json" 2>&1 \
    | tee "$OUT/train_step.log"
}

toy_trainer() {  # every precision tried, the failures named
  local mixed failed=""
  for mixed in fp32 bf16 fp16; do  # fp16: with the dynamic loss scaler (precision.loss_scale)
    if within 90 "$PYTHON" fastfair/train.py --config configs/toy.yaml max_steps=3 checkpoint_every=3 \
        precision.mixed=$mixed output_dir="$SCRATCH/train_toy_$mixed" 2>&1 | tail -n 5 | tee -a "$OUT/train_toy.log" \
        && saved "$SCRATCH/train_toy_$mixed" "toy training ($mixed)"; then
      continue
    fi
    failed+=" $mixed"
  done
  [ -z "$failed" ] || { echo "toy training failed in:$failed" | tee -a "$OUT/train_toy.log"; return 1; }
}

toy_check() {  # train.py --check on CUDA: peak memory against the device's, the estimate, nothing saved
  local report
  report="$(within 90 "$PYTHON" fastfair/train.py --config configs/toy.yaml --check --check-iterations 2 \
    output_dir="$SCRATCH/check_toy" 2>&1 | tail -n 8)" || { echo "$report" | tee -a "$OUT/train_toy.log"; return 1; }
  echo "$report" | tee -a "$OUT/train_toy.log"
  grep -q "nothing was saved" <<< "$report" && ! ls "$SCRATCH/check_toy/checkpoints/step_"* 2>/dev/null
}

# DeepSpeed ZeRO-2 with fp16 (its own loss scaler); skipped only where deepspeed is absent (a carried wheel that
# fails to import is a failure)
deepspeed_fp16() {
  local found=0
  within 60 "$PYTHON" -c "import importlib.util, sys; sys.exit(3 if importlib.util.find_spec('deepspeed') is None \
    else 0)" || found=$?
  if [ "$found" = 3 ]; then
    echo "deepspeed is not installed: skipped" | tee -a "$OUT/train_toy.log"
    return 0
  fi
  [ "$found" = 0 ] || return 1
  within 150 "$PYTHON" fastfair/train.py --config configs/toy.yaml --deepspeed_config configs/ds/zero2_fp16.json \
    max_steps=3 checkpoint_every=3 precision.mixed=fp16 output_dir="$SCRATCH/train_toy_ds_fp16" 2>&1 | tail -n 5 \
    | tee -a "$OUT/train_toy.log" || return 1
  saved "$SCRATCH/train_toy_ds_fp16" "DeepSpeed fp16 toy training"
}

# the decode-and-judge phase's peak at 1 and 4 images: kept, block-wise, per image (loss.judge_images=1); on the
# models train_step_bench saved (six subprocesses, about a minute); last: the time limit cuts it first (its report
# is rewritten after each run)
judge_bench() {
  within 150 "$PYTHON" bench/judge_memory.py --images 1,4 --models-dir "$SCRATCH/sd15" \
    --json "$OUT/judge_memory.json" 2>&1 | tee "$OUT/judge_memory.log"
}

step "device"
if ! device; then
  echo "no usable CUDA device: nothing below can run" | tee -a "$OUT/failed.txt" >&2
  bash bench/gpu_summary.sh "$OUT"
  exit 1
fi
run_step "build fastfair._C with CUDA (log: $OUT/build_native.log)" build_native
run_step "kernel and engine tests on CUDA (log: $OUT/tests_kernels.log)" cuda_tests
run_step "kernel benchmark (log: $OUT/kernels.log)" kernel_bench
run_step "training iteration, baseline vs fastfair, sd15 shapes at 512x512 (log: $OUT/train_step.log)" \
  train_step_bench
run_step "trainer on CUDA: the toy config, 3 iterations in fp32, bf16 and fp16 autocast (log: $OUT/train_toy.log)" \
  toy_trainer
run_step "train.py --check on CUDA: the toy config (log: $OUT/train_toy.log)" toy_check
run_step "trainer on CUDA with DeepSpeed ZeRO-2 in fp16: the toy config, 3 iterations (log: $OUT/train_toy.log)" \
  deepspeed_fp16
run_step "decode-and-judge memory versus images, sd15 shapes at 512x512 (log: $OUT/judge_memory.log)" judge_bench

step "summary"
bash bench/gpu_summary.sh "$OUT"
[ ! -s "$OUT/failed.txt" ]
