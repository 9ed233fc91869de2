"""bench/judge_memory.py runs end to end on the tiny world, each mode as a worker (in this process:
tests/conftest.py's bench_workers_in_process), into JSON and its Markdown table, with the same loss and gradient in
every mode (no memory figure is asserted: they live in the benchmark's own tables)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "judge_memory.py"
sys.path.insert(0, str(BENCH.parent))

import judge_memory  # noqa: E402


def test_every_mode_runs_and_gives_the_same_gradient(tmp_path, bench_workers_in_process):
    out = tmp_path / "judges.json"
    judge_memory.main(["--model", "tiny", "--images", "3", "--models-dir", str(tmp_path / "models"),
                       "--json", str(out)])
    assert bench_workers_in_process == [f"{mode} at 3 images" for mode in judge_memory.MODES]
    data = json.loads(out.read_text())
    results = data["results"]
    assert [(r["mode"], r["images"]) for r in results] == [("keep", 3), ("blockwise", 3), ("sliced", 3)]
    assert data["model"] == "tiny" and data["resolution"] == 16 and results[0]["latent"] == 8
    assert all(isinstance(r["peak_bytes"], int) and r["seconds"] > 0 for r in results)
    keep = results[0]
    assert keep["grad_norm"] > 0
    for r in results[1:]:
        assert r["loss"] == pytest.approx(keep["loss"], rel=1e-5)
        assert r["grad_norm"] == pytest.approx(keep["grad_norm"], rel=1e-5)
    table = out.with_suffix(".md").read_text()
    assert "| images | keep peak MiB | blockwise peak MiB | sliced peak MiB |" in table
    assert "\n| 3 | " in table and "The same gradient in every mode" in table
    assert "--images 3" in table.splitlines()[0]  # the command that made it


@pytest.mark.parametrize("flags, message", [
    (["--modes", "keep,fast"], "--modes 'keep,fast': choose from keep, blockwise, sliced"),
    (["--images", "0"], "--images '0': positive image counts"),
    (["--images", "two"], "--images 'two': positive image counts"),
    (["--model", "tiny", "--resolution", "15"], "--resolution 15: a multiple of 2"),
])
def test_bad_flags_are_refused_before_any_model_is_built(tmp_path, flags, message):
    run = subprocess.run([sys.executable, str(BENCH), *flags, "--models-dir", str(tmp_path / "m")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr
    assert not (tmp_path / "m").exists()
