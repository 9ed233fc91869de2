"""bench/sweep_loads.py runs end to end on the tiny models and reports both implementations (no timing is
asserted: performance lives in the benchmark's own tables)."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import sweep_loads  # noqa: E402


def test_the_bench_times_lone_evaluations_and_the_sweep_on_cached_images(tmp_path):
    out = tmp_path / "sweep.json"
    result = sweep_loads.main(["--model", "tiny", "--checkpoints", "2", "--prompts", "1", "--images", "2",
                               "--rounds", "1", "--work", str(tmp_path / "work"), "--json", str(out)])
    assert len(result["times"]["lone"]) == len(result["times"]["sweep"]) == 1
    assert result["speedup"] == result["lone_s_per_checkpoint"] / result["sweep_s_per_checkpoint"] > 0
    assert sorted(p.name for p in (tmp_path / "work" / "run" / "checkpoints").iterdir()) == [
        "step_00000001", "step_00000002"]
    written = json.loads(out.read_text())
    assert written["results"][0]["checkpoints"] == 2
    table = out.with_suffix(".md").read_text()
    assert "| `fastfair.select_checkpoint` (sweep) |" in table and "--model tiny" in table


def test_the_report_is_the_median_per_checkpoint_and_lone_over_sweep(tmp_path, monkeypatch):
    """Each round's total is divided by the checkpoints; the table takes the median round (a stalled round does
    not move it) and the sweep's ratio to the lone evaluations (models and evaluations faked: arithmetic only)."""
    monkeypatch.setattr(sweep_loads, "save_models", lambda *a: {k: k for k in ("sd", "classifier", "clip", "dino")})
    monkeypatch.setattr(sweep_loads, "save_clip", lambda *a: "clip_full")
    monkeypatch.setattr(sweep_loads, "save_run", lambda *a: tmp_path)
    monkeypatch.setattr(sweep_loads, "select_checkpoint", lambda *a, **k: None)
    lone, sweep = iter([4.0, 40.0, 4.0]), iter([1.0, 1.0, 1.0])
    monkeypatch.setattr(sweep_loads, "time_lone", lambda *a: next(lone))
    monkeypatch.setattr(sweep_loads, "time_sweep", lambda *a: next(sweep))
    out = tmp_path / "sweep.json"
    result = sweep_loads.main(["--checkpoints", "2", "--rounds", "3", "--work", str(tmp_path), "--json", str(out)])
    assert result["times"] == {"lone": [2.0, 20.0, 2.0], "sweep": [0.5, 0.5, 0.5]}
    assert (result["lone_s_per_checkpoint"], result["sweep_s_per_checkpoint"], result["speedup"]) == (2.0, 0.5, 4.0)
    table = out.with_suffix(".md").read_text()
    assert "| one `fastfair.evaluate` per checkpoint (lone) | 2.00 | 1.00 |" in table
    assert "| `fastfair.select_checkpoint` (sweep) | 0.50 | 0.25 |" in table
