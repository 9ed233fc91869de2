"""bench/device_run.sh and bench/gpu_check.sh keep to their time limit and always bring back a summary: run here
with a stand-in interpreter whose device probe passes and whose every other call hangs (a GPU step that never
ends), so the steps' time limits, the skipping of steps without time and the packing are what is tested."""
import os
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

STAND_IN = """#!/usr/bin/env bash
if [ "${1:-}" = "-" ]; then cat > /dev/null; echo "Stand-in GPU, torch 0, CUDA 0"; exit 0; fi
exec sleep 300
"""


def test_a_hanging_step_is_stopped_and_the_summary_names_every_step_left_undone(tmp_path):
    python = tmp_path / "python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    # no carried wheels: a .whl/ left in the checkout (bench/device_wheels.sh's, for the GPU machine's Python 3.12)
    # would be installed with this machine's python3, and fail
    env = dict(os.environ, PYTHON=str(python), OUT=str(out), GPU_CHECK_RESERVE="2", DEVICE_WHEELS="none")
    # a 44 s limit: gpu_check gets 14 s, its build step 12 s of them; no later step has the 10 s it needs
    run = subprocess.run(["bash", "bench/device_run.sh", "44"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    # the check ended itself (status 1: steps failed), not killed by the backstop's limit (status 124)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "gpu_check.sh exit status 1 " in run.stdout
    summary = (out / "summary.md").read_text()
    failed = [line for line in summary.splitlines() if line.startswith("FAILED: ")]
    assert len(failed) == 8 and failed[0].startswith("FAILED: build fastfair._C with CUDA")
    assert "device: Stand-in GPU, torch 0, CUDA 0" in summary
    with tarfile.open(out / "gpu.tgz") as archive:
        names = set(archive.getnames())
    assert {"gpu/summary.md", "gpu/failed.txt", "gpu/device.txt", "gpu/console.log"} <= names
    assert "no time left (GPU_CHECK_SECONDS=14): skipped" in run.stdout


def test_a_run_without_the_carried_wheels_is_refused_before_any_step(tmp_path):
    """The GPU machine has no diffusers or deepspeed: a device call whose .whl/ was not built ran on, and most
    steps failed after minutes of the session's rare device time."""
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), DEVICE_WHEELS=str(tmp_path / "no_wheels"))
    run = subprocess.run(["bash", "bench/device_run.sh", "44"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1 and "no carried wheels in" in run.stderr and "bench/device_wheels.sh" in run.stderr
    assert not any(out.iterdir())
