"""bench/kernels.py's command line: bad flags are refused before any measurement (the benchmark itself runs by
hand and in bench/gpu_check.sh; its numbers live in bench/results)."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import kernels as kernels_bench  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    # a KeyError after the whole fp32 pass, which was then lost with nothing written
    (["--dtypes", "fp32,fp64"], "--dtypes 'fp32,fp64': unknown fp64 (choose from fp16, bf16, fp32)"),
    (["--dtypes", ","], "--dtypes ',': empty"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
])
def test_bad_flags_are_refused_before_measuring(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(kernels_bench, "run", lambda args: pytest.fail("measured despite a bad flag"))
    with pytest.raises(SystemExit):
        kernels_bench.main(["--json", str(tmp_path / "k.json"), *argv])
    assert message in capsys.readouterr().err


def test_bandwidth_counts_every_tensor_read_and_written():
    """Minimal bytes moved per element: the step reads z, m_prev (fp32) and eps_c, eps_u (U-Net dtype) and writes
    z_next, m (fp32); the fan-out reads g (fp32) and writes 4 steps x 2 branches in the U-Net dtype."""
    assert kernels_bench.step_bytes(10, torch.float16) == 10 * (4 * 4 + 2 * 2)
    assert kernels_bench.step_bytes(10, torch.float32) == 10 * 6 * 4
    assert kernels_bench.fanout_bytes(10, torch.bfloat16) == 10 * (4 + 8 * 2)
    assert kernels_bench.fanout_bytes(10, torch.float32) == 10 * (4 + 8 * 4)


def test_each_result_is_the_median_sample_and_its_speedup_is_torch_over_backend(monkeypatch):
    samples = {"torch": iter([1.0, 1.0, 1.0, 1.0, 100.0]), "native": iter([0.25, 0.25, 9.0, 0.25, 0.25])}
    monkeypatch.setattr(kernels_bench, "_sample", lambda fn, device, inner: next(samples[fn()]))
    calls = {name: lambda name=name: name for name in samples}  # each call returns its name
    assert kernels_bench.median_times(calls, "cpu", 5, 1e-6) == {"torch": 1.0, "native": 0.25}
    # the run's rows: speedup = torch's time / the backend's, bandwidth = the op's bytes / the backend's time
    monkeypatch.setattr(kernels_bench, "SHAPES", [(1, 4, 8, 8)])
    monkeypatch.setattr(kernels_bench, "fused_backends", lambda device: [])
    monkeypatch.setattr(kernels_bench, "median_times", lambda calls, *a: {"torch": 2e-6, "native": 5e-7})
    args = SimpleNamespace(device="cpu", quick=True, large=False, note=[], dtypes="fp32")
    rows = {(r["op"], r["backend"]): r for r in kernels_bench.run(args)["results"]}
    n = 4 * 8 * 8
    for op, nbytes in (("solver_step", kernels_bench.step_bytes(n, torch.float32)),
                       ("grad_fanout", kernels_bench.fanout_bytes(n, torch.float32))):
        assert rows[(op, "torch")]["speedup_vs_torch"] == 1.0
        assert rows[(op, "native")]["speedup_vs_torch"] == 4.0
        assert rows[(op, "native")]["achieved_gbps"] == pytest.approx(nbytes / 5e-7 / 1e9)
        assert rows[(op, "native")]["bandwidth_frac_of_copy"] is None  # no copy measured on CPU
    monkeypatch.setattr(kernels_bench, "copy_bandwidth", lambda device, reps: 1e12)  # as on CUDA
    rows = {(r["op"], r["backend"]): r for r in kernels_bench.run(args)["results"]}
    frac = rows[("solver_step", "native")]["bandwidth_frac_of_copy"]
    assert frac == pytest.approx(kernels_bench.step_bytes(n, torch.float32) / 5e-7 / 1e12) and frac < 1


def test_a_cpu_sample_is_seconds_per_call(monkeypatch):
    clock = [0.0]

    def call():
        clock[0] += 0.5

    monkeypatch.setattr(kernels_bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert kernels_bench._sample(call, "cpu", 4) == 0.5


def _row(op, backend, shape, dtype, speedup, frac=None):
    return dict(op=op, backend=backend, shape=list(shape), dtype=dtype, speedup_vs_torch=speedup,
                bandwidth_frac_of_copy=frac)


def test_the_targets_table_checks_each_device_s_own_targets():
    meta = {"device": "GPU", "date": "today", "copy_gbps": 4000.0}
    gpu = kernels_bench.summarize({"meta": meta, "results": [
        _row("solver_step", "torch", (8, 4, 64, 64), "fp16", 1.0),
        _row("solver_step", "native", (1, 4, 64, 64), "fp16", 2.0),  # B = 1: no target
        _row("solver_step", "native", (8, 4, 64, 64), "fp16", 4.5),
        _row("grad_fanout", "triton", (32, 4, 64, 64), "fp16", 3.9),
        _row("solver_step", "triton", (64, 4, 256, 256), "fp16", 1.0, 0.85),
        _row("grad_fanout", "native", (64, 4, 256, 256), "fp16", 1.0, 0.79)]}).splitlines()
    assert gpu[4:] == ["| solver_step 8x4x64x64 fp16 | native | 4.50x | >= 4x | yes |",
                       "| grad_fanout 32x4x64x64 fp16 | triton | 3.90x | >= 4x | NO |",
                       "| solver_step 64x4x256x256 fp16 | triton | 85% of copy | >= 80% | yes |",
                       "| grad_fanout 64x4x256x256 fp16 | native | 79% of copy | >= 80% | NO |"]
    cpu = kernels_bench.summarize({"meta": {**meta, "device": "x86_64 CPU, 2 cores", "copy_gbps": None}, "results": [
        _row("solver_step", "native", (8, 4, 64, 64), "fp32", 2.5),
        _row("grad_fanout", "native", (8, 4, 64, 64), "fp32", 1.5)]}).splitlines()
    assert cpu[4:] == ["| solver_step 8x4x64x64 fp32 | native | 2.50x | >= 2x | yes |"]


def test_a_slow_first_call_does_not_set_the_calls_per_sample(monkeypatch):
    """The first calls (a Triton compile, lazy allocations) run before the call that sizes each sample: a
    compile-length first call would leave one call per sample, and launch-bound calls would time the timer."""
    clock, calls, inners = [0.0], [], []

    def call():
        calls.append(1)
        clock[0] += 100.0 if len(calls) == 1 else 0.25

    monkeypatch.setattr(kernels_bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(kernels_bench, "_sample", lambda fn, device, inner: inners.append(inner) or 1.0)
    kernels_bench.median_times({"op": call}, "cpu", 3, 2.0)
    assert inners == [8, 8, 8]


def test_copy_bandwidth_counts_the_read_and_the_write(monkeypatch):
    """The ceiling the kernels' bandwidth is a fraction of: a 512 MiB copy reads and writes 512 MiB each."""
    made = []

    def empty(n, dtype, device):
        made.append((n, dtype, device))
        return SimpleNamespace(numel=lambda: n)

    monkeypatch.setattr(kernels_bench, "torch", SimpleNamespace(float32=torch.float32, empty=empty,
                                                                empty_like=lambda t: t))
    monkeypatch.setattr(kernels_bench, "median_times", lambda calls, device, reps, sample_s: {"copy": 0.5})
    assert kernels_bench.copy_bandwidth("cuda", 3) == 2 * 2**29 / 0.5
    assert made == [(2**27, torch.float32, "cuda")]
    assert kernels_bench.copy_bandwidth("cpu", 3) is None


def test_a_run_stopped_partway_keeps_the_shapes_it_measured(monkeypatch, tmp_path):
    """gpu_check.sh runs the benchmark under a time limit: each shape's rows are written (JSON and Markdown, each
    atomically) as they come, marked partial until the last."""
    import json

    monkeypatch.setattr(kernels_bench, "SHAPES", [(1, 4, 8, 8), (2, 4, 8, 8)])
    monkeypatch.setattr(kernels_bench, "fused_backends", lambda device: [])
    timed = []

    def median_times(calls, *args):
        timed.append(1)
        if len(timed) > 2:  # the second shape's first op: the time limit strikes
            raise KeyboardInterrupt
        return {"torch": 2e-6, "native": 5e-7}

    monkeypatch.setattr(kernels_bench, "median_times", median_times)
    out = tmp_path / "k.json"
    with pytest.raises(KeyboardInterrupt):
        kernels_bench.main(["--json", str(out), "--device", "cpu"])
    report = json.loads(out.read_text())
    assert report["meta"]["complete"] is False and {tuple(r["shape"]) for r in report["results"]} == {(1, 4, 8, 8)}
    assert len(report["results"]) == 4 and report["meta"]["command"].startswith("python bench/kernels.py --json")
    assert "- partial: the run stopped before its last shape" in (tmp_path / "k.md").read_text()
    assert "; partial: the run stopped before its last shape)" in kernels_bench.summarize(report)  # gpu_summary.sh
    timed.clear()
    monkeypatch.setattr(kernels_bench, "median_times", lambda calls, *args: {"torch": 2e-6, "native": 5e-7})
    kernels_bench.main(["--json", str(out), "--device", "cpu"])
    report = json.loads(out.read_text())
    assert report["meta"]["complete"] is True and len(report["results"]) == 8
    assert "partial" not in (tmp_path / "k.md").read_text() and "partial" not in kernels_bench.summarize(report)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_report_from_before_the_complete_field_is_not_called_partial():
    """Reports written before ``meta.complete`` existed were written whole, at the end of their run."""
    meta = {"date": "today", "device": "x86_64 CPU, 2 cores", "torch": "2", "threads": 2, "copy_gbps": None,
            "notes": []}
    results = [dict(_row("solver_step", "native", (8, 4, 64, 64), "fp32", 2.5), median_s=1e-6, achieved_gbps=1.0)]
    for report in ({"meta": meta, "results": results}, {"meta": dict(meta, complete=True), "results": results}):
        assert "partial" not in kernels_bench.markdown(report) and "partial" not in kernels_bench.summarize(report)
    partial = {"meta": dict(meta, complete=False), "results": results}
    assert "partial" in kernels_bench.markdown(partial) and "partial" in kernels_bench.summarize(partial)


def test_a_run_stopped_in_its_first_shape_replaces_an_older_report(monkeypatch, tmp_path):
    """An older report at the path would have stood for this run's (its date alone telling them apart): the run
    writes its empty, partial report before measuring anything."""
    import json

    out = tmp_path / "k.json"
    out.write_text(json.dumps({"meta": {"complete": True}, "results": [{"op": "stale"}]}))
    monkeypatch.setattr(kernels_bench, "fused_backends", lambda device: [])
    monkeypatch.setattr(kernels_bench, "median_times", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        kernels_bench.main(["--json", str(out), "--device", "cpu"])
    report = json.loads(out.read_text())
    assert report["meta"]["complete"] is False and report["results"] == []
    assert "the rows are what it measured (none)" in (tmp_path / "k.md").read_text()


def test_the_benchmark_ends_with_status_143_at_sigterm(tmp_path):
    """Run as gpu_check.sh runs it, under `timeout`: main runs under sigterm_as_exit, so a stopped report write
    leaves no temporary file (tests/test_run_safety.py shows the mechanism)."""
    import signal
    import subprocess
    import time

    from child_env import child_env

    out = tmp_path / "k.json"
    run = subprocess.Popen([sys.executable, str(BENCH / "kernels.py"), "--json", str(out), "--device", "cpu",
                            "--quick", "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=child_env())
    deadline = time.monotonic() + 120
    while not out.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the first (empty) report: main has begun, under its handler
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=60) == 128 + signal.SIGTERM, run.stderr.read().decode()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
