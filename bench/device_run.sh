#!/usr/bin/env bash
# The one command a lent GPU machine runs (README, "Kernels"): install the carried wheels (bench/device_wheels.sh
# made them here), run bench/gpu_check.sh under a time limit, and pack its results into one archive, since the
# device tool brings back at most 8 files from $OUT and a call stopped at its limit would bring back nothing
# written after it. Device call: carry [".whl"], command `bash bench/device_run.sh`, timeout_s about 600.
#
#   bench/device_run.sh [LIMIT_S]     (default 540, leaving time to pack within a 600 s call)
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT: the folder whose files come back from the device machine}"
LIMIT="${1:-540}"
RESULTS="$(mktemp -d)/gpu"
mkdir -p "$RESULTS"
# the carried wheels; none: run without (a test does: a rehearsal's .whl is for 3.12). Without them the machine has
# no diffusers or deepspeed and most steps would fail: refused in seconds rather than after minutes of device time
WHEELS="${DEVICE_WHEELS:-.whl}"
if [ "$WHEELS" != none ]; then
  compgen -G "$WHEELS/*.whl" >/dev/null || {
    echo "no carried wheels in $WHEELS/: run bash bench/device_wheels.sh here, then the device call with carry" \
         "[\".whl\"] (DEVICE_WHEELS=none runs without them)" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import diffusers, deepspeed" \
    || echo "WARNING: diffusers or deepspeed does not import from the carried wheels: the steps needing them fail" >&2
fi
# device time is rare: a failed step is reported and the later ones (the benchmarks) still run; the check bounds
# its own steps to finish 30 s inside the limit (GPU_CHECK_SECONDS), the outer timeout is a backstop only
GPU_CHECK_KEEP_GOING=1 GPU_CHECK_SECONDS=$(( LIMIT - 30 )) timeout --kill-after=15 "$LIMIT" \
  bash bench/gpu_check.sh "$RESULTS" 2>&1 | tee "$RESULTS/console.log"
status=${PIPESTATUS[0]}
[ -f "$RESULTS/summary.md" ] || timeout 60 bash bench/gpu_summary.sh "$RESULTS" > /dev/null 2>&1
tar czf "$OUT/gpu.tgz" -C "$(dirname "$RESULTS")" gpu
cp "$RESULTS/summary.md" "$OUT/" 2>/dev/null
echo "gpu_check.sh exit status $status (124: stopped at its ${LIMIT} s limit); results in \$OUT/gpu.tgz"
exit "$status"
