#!/usr/bin/env bash
# GPU check: on a CUDA machine, build the native extension with CUDA, run the GPU tests and the benchmarks,
# write logs and JSON under $1 (default bench/results/gpu), and print a summary table last.
# Usage: bench/gpu_check.sh [OUT_DIR]      (PYTHON=... picks the interpreter; must finish in < 8 min on one H200)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
SCRATCH="$(mktemp -d)"  # the toy runs' checkpoints: not results
step() { echo "== $(date +%T) $*" >&2; }

step "device"
"$PYTHON" - <<'PY' | tee "$OUT/device.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY

step "build fastfair._C with CUDA (log: $OUT/build_native.log)"
if ! FASTFAIR_BUILD_NATIVE=1 MAX_JOBS="${MAX_JOBS:-16}" "$PYTHON" -m pip install --no-build-isolation --no-deps -e . \
    > "$OUT/build_native.log" 2>&1; then
  tail -n 60 "$OUT/build_native.log"
  exit 1
fi
"$PYTHON" -c "import torch, fastfair._C; assert torch.ops.fastfair.has_cuda(), 'fastfair._C was built without CUDA'"

step "kernel and engine tests on CUDA (log: $OUT/tests_kernels.log)"
"$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_kernels_native.py tests/test_kernels_triton.py \
  tests/test_kernels_dispatch.py tests/test_dft_cuda.py tests/test_lean_graph.py tests/test_keep_attention.py 2>&1 | tee "$OUT/tests_kernels.log"

step "trainer on CUDA: the toy config, 3 iterations in fp32 and in bf16 autocast (log: $OUT/train_toy.log)"
for mixed in fp32 bf16; do
  timeout 180 "$PYTHON" fastfair/train.py --config configs/toy.yaml max_steps=3 checkpoint_every=3 \
    precision.mixed=$mixed output_dir="$SCRATCH/train_toy_$mixed" 2>&1 | tail -n 5 | tee -a "$OUT/train_toy.log"
  "$PYTHON" -c "import sys; from fastfair.checkpoint import list_checkpoints as ls; assert ls(sys.argv[1]), \
    'toy training ($mixed) saved no checkpoint'" "$SCRATCH/train_toy_$mixed"
done

step "kernel benchmark (log: $OUT/kernels.log)"
"$PYTHON" bench/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"

# ==== engine / trainer benchmarks (lead): add them here, writing logs and JSON under "$OUT" ====
step "training iteration, baseline vs fastfair, sd15 shapes at 512x512 (log: $OUT/train_step.log)"
# 2 images, 20 steps, 1 round of (warm-up + 1 timed iteration) per implementation, then memory versus steps
# (budget ~5 min on one H200: model build/save ~1 min, five configurations, four sweep points per impl).
"$PYTHON" bench/train_step.py --model sd15 --images 2 --steps 20 --rounds 1 --iters 1 \
  --sweep-steps 5,10,40 --json "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log"

# ==== end of engine / trainer benchmarks ====

step "summary"
{
  echo "kernel and engine tests: $(tail -n 1 "$OUT/tests_kernels.log")"
  echo "toy trainer on CUDA: $(grep -c . "$OUT/train_toy.log") log lines, checkpoints saved in fp32 and bf16"
  echo
  "$PYTHON" bench/kernels.py --summarize "$OUT/kernels.json"
  echo
  cat "$OUT/train_step.md"
} | tee "$OUT/summary.md"
