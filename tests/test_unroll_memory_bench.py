"""bench/unroll_memory.py's sweeps run end to end at a tiny size into JSON and its Markdown table (no memory figure
is asserted: they live in the benchmark's own tables): one configuration in a fresh process, as the benchmarks run
every one (the one test of the suite that starts a real worker: the others run theirs in process, with
tests/conftest.py's bench_workers_in_process), and the sweep versus images."""
import json
import sys
from pathlib import Path

from fake_memory import recording_peak_memory

BENCH = Path(__file__).resolve().parent.parent / "bench" / "unroll_memory.py"
sys.path.insert(0, str(BENCH.parent))

import unroll_memory  # noqa: E402


def test_a_configuration_runs_in_a_fresh_process(tmp_path):
    out = tmp_path / "memory.json"
    unroll_memory.main(["--steps", "2", "--impls", "fastfair", "--batch", "1", "--size", "8", "--json", str(out)])
    row, = json.loads(out.read_text())["results"]
    assert (row["impl"], row["steps"], row["images"], row["latent"]) == ("fastfair", 2, 1, [1, 4, 8, 8])
    assert isinstance(row["peak_bytes"], int) and row["seconds"] > 0


def test_the_images_sweep_writes_both_recomputes_rows(tmp_path, bench_workers_in_process):
    out = tmp_path / "memory.json"
    unroll_memory.main(["--steps", "", "--batches", "1,3", "--batch-steps", "2", "--size", "8", "--json", str(out)])
    assert len(bench_workers_in_process) == 4  # each configuration a worker (here in this process)
    results = json.loads(out.read_text())["results"]
    assert sorted((r["impl"], r["steps"], r["images"]) for r in results) == [
        ("fastfair", 2, 1), ("fastfair", 2, 3), ("fastfair_per_image", 2, 1), ("fastfair_per_image", 2, 3)]
    assert all(isinstance(r["peak_bytes"], int) and r["seconds"] > 0 for r in results)
    table = out.with_suffix(".md").read_text()
    assert "| 3 | " in table and "per-image / whole" in table and "fastfair / reference" not in table
    assert "--batches 1,3" in table.splitlines()[0]  # the command that made it


def test_the_steps_table_marks_an_implementation_left_out():
    rows = [{"impl": "fastfair", "steps": s, "peak_bytes": s * 2**20} for s in (5, 10)]
    table = unroll_memory.markdown(rows)
    assert "| 5 | 5.0 | - | - |" in table and "fastfair 10 steps / 5 steps: 2.000; reference: -" in table


def test_an_unknown_implementation_is_refused_before_any_worker(capsys, bench_workers_in_process):
    """The known implementations' workers ran first, then a KeyError lost their results."""
    import pytest

    with pytest.raises(SystemExit):
        unroll_memory.main(["--steps", "2", "--impls", "fastfair,bogus", "--size", "8"])
    assert "--impls 'fastfair,bogus': unknown bogus (choose from fastfair" in capsys.readouterr().err
    assert not bench_workers_in_process



def test_the_tables_ratios_are_per_image_over_whole_and_fastfair_over_reference():
    rows = [{"impl": impl, "steps": 20, "images": 2, "peak_bytes": peak * 2**20, "seconds": seconds}
            for impl, peak, seconds in (("fastfair", 8, 4.0), ("fastfair_per_image", 2, 6.0))]
    assert "| 2 | 8.0 | 2.0 | 0.250 | 2.000 | 3.000 |" in unroll_memory.markdown_images(rows)
    rows = [{"impl": impl, "steps": 5, "peak_bytes": peak * 2**20}
            for impl, peak in (("fastfair", 1), ("reference", 4))]
    assert "| 5 | 1.0 | 4.0 | 0.250 |" in unroll_memory.markdown(rows)


def test_the_warm_up_runs_before_the_peak_is_reset(monkeypatch):
    """The warm-up's allocations are no part of the measured backward's peak."""
    import torch

    import fastfair.dft

    events = []

    def sample(unet, scheduler, z_T, cond, uncond, num_steps):
        events.append(("sample", num_steps, torch.is_grad_enabled()))
        return z_T.clone().requires_grad_()

    monkeypatch.setattr(unroll_memory, "PeakMemory", recording_peak_memory(events, 0))
    monkeypatch.setattr(fastfair.dft, "sample", sample)
    threads = torch.get_num_threads()
    try:
        unroll_memory.worker("fastfair", 5, 8, 1)
    finally:
        torch.set_num_threads(threads)
    assert events == [("sample", 2, False), "start", ("sample", 5, True), "peak"]
