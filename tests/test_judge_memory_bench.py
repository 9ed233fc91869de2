"""bench/judge_memory.py runs end to end on the tiny world, each mode as a worker (in this process:
tests/conftest.py's bench_workers_in_process), into JSON and its Markdown table, with the same loss and gradient in
every mode (no memory figure is asserted: they live in the benchmark's own tables)."""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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



def _result(mode, images, peak, seconds, grad_norm=1.0):
    return {"mode": mode, "images": images, "peak_bytes": peak * 2**20, "seconds": seconds, "grad_norm": grad_norm}


def test_the_table_gives_each_mode_over_keep_and_seconds_per_image():
    table = judge_memory.markdown([_result("keep", 2, 8, 4.0), _result("blockwise", 2, 4, 5.0),
                                   _result("sliced", 2, 2, 6.0, 1.001)])
    assert "| 2 | 8.0 | 4.0 | 2.0 | 0.500 | 0.250 | 2.00 | 2.50 | 3.00 |" in table
    assert "differs by at most 1.0e-03" in table


@pytest.mark.parametrize("mode, rows", [("keep", []), ("blockwise", [None]), ("sliced", [1])])
def test_each_mode_recomputes_its_judges_as_named_and_times_one_run(monkeypatch, mode, rows):
    import torch
    import train_step

    recomputed, clock = [], [0.0]

    def judged_loss(objective, z_orig, z):  # one second each (warm-up, then the measured run)
        clock[0] += 1.0
        return torch.tensor(1.0), z

    monkeypatch.setattr(train_step, "load_objective", lambda *a: "objective")
    monkeypatch.setattr(train_step, "recompute_objective", lambda objective, n: recomputed.append(n))
    monkeypatch.setattr(train_step, "judged_loss", judged_loss)
    monkeypatch.setattr(judge_memory, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(judge_memory, "PeakMemory", lambda device: SimpleNamespace(start=lambda: None, peak=lambda: 0))
    threads = torch.get_num_threads()
    try:
        result = judge_memory.worker(mode, 2, 4, {})
    finally:
        torch.set_num_threads(threads)
    assert recomputed == rows and result["images"] == 2
    assert result["seconds"] == 1.0  # the measured run's, not the warm-up's


def test_the_report_is_written_after_every_run(tmp_path, monkeypatch):
    """A GPU run may stop at a time limit: the runs that finished are in the JSON and Markdown already."""
    def spawn(script, cfg, name, env=None):
        if cfg["mode"] == "blockwise":
            raise RuntimeError("worker died")
        return {**_result(cfg["mode"], cfg["images"], 8, 1.0), "device": "cpu", "latent": cfg["latent"]}

    monkeypatch.setattr(judge_memory, "spawn", spawn)
    import train_step

    monkeypatch.setattr(train_step, "models_on_disk", lambda *a: {})
    out = tmp_path / "judges.json"
    with pytest.raises(RuntimeError, match="worker died"):
        judge_memory.main(["--model", "tiny", "--images", "1", "--json", str(out)])
    assert [r["mode"] for r in json.loads(out.read_text())["results"]] == ["keep"]
    assert "\n| 1 | 8.0 |" in out.with_suffix(".md").read_text()
