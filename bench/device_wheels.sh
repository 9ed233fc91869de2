#!/usr/bin/env bash
# Wheels for a GPU machine that has no package index: its image holds torch, triton, transformers, peft,
# accelerate, safetensors, tqdm, tensorboard, scipy, pytest, ... but not diffusers or deepspeed (nor a few of
# their needs). Writes them to DEST (default .whl/, kept out of git through .git/info/exclude), for Python 3.12
# on x86-64 Linux, at the versions constraints.txt pins.
#
#   bench/device_wheels.sh [DEST]
#
# There, before anything imports them:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site
# then `bash bench/gpu_check.sh "$OUT/gpu"` (README, "Kernels").
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$DEST"
if [ "$DEST" = ".whl" ] && [ -d .git ] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null; then
  echo '/.whl/' >> .git/info/exclude
fi

pin() {  # the version constraints.txt pins for $1
  local version
  version="$(grep -i "^$1==" constraints.txt | cut -d= -f3)"
  [ -n "$version" ] || { echo "constraints.txt pins no version of $1" >&2; exit 1; }
  echo "$version"
}
installed() {  # the version installed here (pydantic and pydantic-core must match each other exactly)
  "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"
}

PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# diffusers (of its requirements, importlib_metadata is imported below Python 3.8 only)
"$PYTHON" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$DEST" "diffusers==$(pin diffusers)"
# deepspeed's requirements missing there (hjson, pydantic and its own)
"$PYTHON" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$DEST" hjson "pydantic==$(installed pydantic)" \
  "pydantic_core==$(installed pydantic_core)" annotated_types typing_inspection
# deepspeed is published as a source archive only: build its pure-Python wheel here (no ops compiled ahead of
# time; DeepSpeed builds the ones it uses on first use)
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(pin deepspeed)"
ls -l "$DEST"
du -sh "$DEST"
