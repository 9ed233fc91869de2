"""bench/_workers.py's protocol between a benchmark and its fresh-process workers, on a script that imports no
torch (the benchmarks' own end-to-end tests run their workers in process: tests/conftest.py)."""
import json
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from _memory import peak_ratio  # noqa: E402
from _workers import spawn  # noqa: E402

SCRIPT = f"""
import argparse, json, os, sys
sys.path.insert(0, {str(BENCH)!r})
from _workers import add_worker_flag, worker_or_none

def body(spec):
    print("a progress line a library printed")
    print("to stderr", file=sys.stderr)
    if spec.get("fail"):
        raise SystemExit("the worker gave up: " + spec["fail"])
    if spec.get("killed"):  # the kernel's OOM killer, a time limit: its JSON-looking output is no result
        print(json.dumps({{"half": "done"}}), flush=True)
        os.kill(os.getpid(), 9)
    return {{"spec": spec, "pid": os.getpid(), "env": os.environ.get("FASTFAIR_TEST_WORKER")}}

parser = argparse.ArgumentParser()
add_worker_flag(parser)
if not worker_or_none(parser.parse_args(), body):
    print(json.dumps("not a worker"))
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "bench_script.py"
    path.write_text(SCRIPT)
    return path


def test_a_worker_gets_its_spec_and_environment_and_answers_with_its_last_line(script):
    spec = {"impl": "fastfair", "steps": [5, 10], "name": "é ü"}
    result = spawn(script, spec, "one", env=dict(os.environ, FASTFAIR_TEST_WORKER="set"))
    assert result["spec"] == spec and result["env"] == "set"
    assert result["pid"] != os.getpid()  # a fresh process


def test_a_failed_worker_is_named_with_its_stderr(script):
    with pytest.raises(RuntimeError, match=r"worker broken of bench_script.py failed with exit code 1; its stderr "
                                           r"ends:\nto stderr\nthe worker gave up: on purpose"):
        spawn(script, {"fail": "on purpose"}, "broken")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_worker_killed_by_a_signal_has_failed_whatever_it_printed(script):
    with pytest.raises(RuntimeError, match="worker killed of bench_script.py failed with exit code -9"):
        spawn(script, {"killed": True}, "killed")


def test_a_worker_shows_its_stderr_as_it_runs_when_asked(script, capfd):
    with pytest.raises(RuntimeError, match="worker broken of bench_script.py failed .* its traceback is above"):
        spawn(script, {"fail": "on purpose"}, "broken", show_stderr=True)
    assert "the worker gave up: on purpose" in capfd.readouterr().err


def test_without_the_flag_the_script_is_no_worker(script):
    import subprocess

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == "not a worker"


def test_peak_ratios_of_missing_or_unmeasured_peaks_print_as_a_dash():
    assert peak_ratio(3, 4) == "0.750"
    assert peak_ratio(None, 4) == peak_ratio(3, None) == peak_ratio(3, 0) == "-"


def test_cpu_peak_memory_is_the_growth_since_start():
    """PeakMemory('cpu'): the resident set's highest point above its level at start(), not the process's whole
    peak (which counts torch and every earlier test)."""
    import torch
    from _memory import PeakMemory

    meter = PeakMemory("cpu")
    try:
        meter.start()
    except OSError as error:  # /proc/self/clear_refs: Linux, writable
        pytest.skip(f"the resident-set peak cannot be reset here: {error}")
    block = torch.ones(16 * 2**20)  # 64 MiB, every page touched
    grown = meter.peak()
    del block
    assert 56 * 2**20 <= grown < 96 * 2**20  # the kernel's resident-set counts may lag by some pages
