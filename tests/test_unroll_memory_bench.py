"""bench/unroll_memory.py's sweep versus images runs end to end at a tiny size, every configuration in its own
process, into JSON and its Markdown table (no memory figure is asserted: they live in the benchmark's own
tables)."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "unroll_memory.py"


def test_the_images_sweep_writes_both_recomputes_rows(tmp_path):
    out = tmp_path / "memory.json"
    cmd = [sys.executable, str(BENCH), "--steps", "", "--batches", "1,3", "--batch-steps", "2", "--size", "8",
           "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert sorted((r["impl"], r["steps"], r["images"]) for r in results) == [
        ("fastfair", 2, 1), ("fastfair", 2, 3), ("fastfair_per_image", 2, 1), ("fastfair_per_image", 2, 3)]
    assert all(isinstance(r["peak_bytes"], int) and r["seconds"] > 0 for r in results)
    table = out.with_suffix(".md").read_text()
    assert "| 3 | " in table and "per-image / whole" in table and "fastfair / reference" not in table
    assert "--batches 1,3" in table.splitlines()[0]  # the command that made it


def test_the_steps_table_marks_an_implementation_left_out():
    sys.path.insert(0, str(BENCH.parent))
    import unroll_memory

    rows = [{"impl": "fastfair", "steps": s, "peak_bytes": s * 2**20} for s in (5, 10)]
    table = unroll_memory.markdown(rows)
    assert "| 5 | 5.0 | - | - |" in table and "fastfair 10 steps / 5 steps: 2.000; reference: -" in table
