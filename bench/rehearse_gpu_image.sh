#!/usr/bin/env bash
# Rehearse, on a CPU machine, the GPU machine's software before spending device time on bench/device_run.sh:
# its Python (3.12) and package versions (torch 2.11.0+cu130, torchvision 0.26.0, triton 3.6.0, numpy 2.5.2,
# transformers 5.17.0, huggingface_hub 1.33.0, setuptools < 82, as the device library's KINDS.md lists them,
# 2026-11), the carried wheels installed with --target as there, and the native build with CUDA (sm_90; nothing
# runs on a GPU). In a fresh clone of HEAD: it builds fastfair._C with CUDA, runs the whole test suite (CUDA tests
# skip; the open_clip ones run: open_clip is installed here, not there, since CI cannot run them, as no torchvision
# imports beside its CPU torch), the toy trainer in fp32 and bf16, the kernel benchmark, a tiny fp16
# training-iteration benchmark and small sd15-shaped ones (the iteration, the judges' memory).
#
#   bench/rehearse_gpu_image.sh [WORK_DIR]      (default /tmp/gpu-image; the venv there is reused; ~15 min)
# PY312 names a Python 3.12 (default: python3.12, else pyenv's); PYTHON one with pip and pydantic for bench/device_wheels.sh
# (default: .venv/bin/python, as `make setup` makes it).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${1:-/tmp/gpu-image}"
VENV="$WORK/venv" SITE="$WORK/site" CLONE="$WORK/clone"
pin() { grep -i "^$1==" constraints.txt | cut -d= -f3; }  # the version constraints.txt pins for $1
IMAGE=(torch==2.11.0 torchvision==0.26.0 triton==3.6.0 numpy==2.5.2 transformers==5.17.0 huggingface_hub==1.33.0
       accelerate==1.15.0 safetensors==0.8.0 "peft==$(pin peft)" tqdm tensorboard scipy pytest
       matplotlib pillow opencv-python-headless==4.14.0.94 pyyaml ninja "setuptools<82" wheel requests psutil
       py-cpuinfo einops msgpack nvidia-ml-py packaging zipp httpx
       # not on the GPU machine (nothing there uses them): the open_clip tests, which CI cannot run
       "open_clip_torch==$(pin open_clip_torch)" "timm==$(pin timm)" "ftfy==$(pin ftfy)" "wcwidth==$(pin wcwidth)")
step() { echo "== $(date +%T) $*" >&2; }
[ -n "${PYTHON:-}" ] || { [ -x .venv/bin/python ] && export PYTHON="$PWD/.venv/bin/python"; } || true

step "the image's packages in $VENV"
mkdir -p "$WORK"
if [ ! -x "$VENV/bin/python" ]; then
  for py in "${PY312:-}" python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    [ -n "$py" ] && "$py" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null && break
    py=""
  done
  [ -n "$py" ] || { echo "no Python 3.12 found: set PY312 (e.g. apt-get install python3.12-venv)" >&2; exit 1; }
  "$py" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q "${IMAGE[@]}"
step "a clone of HEAD in $CLONE, the carried wheels in $SITE"
rm -rf "$CLONE" "$SITE" "$WORK/sd15"  # an earlier rehearsal's sd15 models: saved by an older bench, maybe
git clone -q . "$CLONE"
bash bench/device_wheels.sh "$CLONE/.whl" > /dev/null
"$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  "$CLONE"/.whl/*.whl
export PYTHONPATH="$SITE"
cd "$CLONE"
P="$VENV/bin/python"

step "native build with CUDA for sm_90 (no CUDA_HOME: the build finds the toolkit)"
env -u CUDA_HOME FASTFAIR_BUILD_NATIVE=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=2 \
  "$P" -m pip install -q --no-build-isolation --no-deps -e . > "$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log"; exit 1; }
(cd / && "$P" -c "import torch, fastfair._C; assert torch.ops.fastfair.has_cuda(), 'built without CUDA'")

step "the test suite"
"$P" -m pytest -q -p no:cacheprovider 2>&1 | tail -n 3

step "toy trainer, fp32 and bf16"
for mixed in fp32 bf16; do
  "$P" fastfair/train.py --config configs/toy.yaml max_steps=3 checkpoint_every=3 precision.mixed=$mixed \
    output_dir="$WORK/toy_$mixed" > "$WORK/toy_$mixed.log" 2>&1 || { tail -n 20 "$WORK/toy_$mixed.log"; exit 1; }
  "$P" -c "import sys; from fastfair.checkpoint import list_checkpoints as ls; assert ls(sys.argv[1])" \
    "$WORK/toy_$mixed"
done

step "kernel benchmark and a tiny fp16 training-iteration benchmark"
"$P" bench/kernels.py --quick --json "$WORK/kernels.json" > /dev/null
"$P" bench/train_step.py --model tiny --images 2 --steps 5 --rounds 1 --iters 1 --dtype fp16 --sweep-steps 5,10 \
  --json "$WORK/train_step.json" > "$WORK/train_step.log" 2>&1 || { tail -n 30 "$WORK/train_step.log"; exit 1; }
# most of the GPU check's time goes to the sd15 shapes (CLIP vision and text, DINOv2, the face classifier, built
# from configs under the image's transformers): their models, the iteration and the judges, small here
step "sd15 shapes at 64x64: a training-iteration and a decode-and-judge benchmark"
"$P" bench/train_step.py --model sd15 --resolution 64 --images 1 --steps 2 --impls baseline_sdpa,fastfair \
  --rounds 1 --iters 1 --warmup 0 --models-dir "$WORK/sd15" --json "$WORK/train_step_sd15.json" \
  > "$WORK/train_step_sd15.log" 2>&1 || { tail -n 30 "$WORK/train_step_sd15.log"; exit 1; }
"$P" bench/judge_memory.py --model sd15 --resolution 64 --images 1 --modes keep --models-dir "$WORK/sd15" \
  --json "$WORK/judge_memory_sd15.json" > "$WORK/judge_memory_sd15.log" 2>&1 \
  || { tail -n 30 "$WORK/judge_memory_sd15.log"; exit 1; }
step "done: the GPU image's software builds and runs fastfair here"
