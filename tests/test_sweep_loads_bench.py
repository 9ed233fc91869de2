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
