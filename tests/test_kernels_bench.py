"""bench/kernels.py's command line: bad flags are refused before any measurement (the benchmark itself runs by
hand and in bench/gpu_check.sh; its numbers live in bench/results)."""
import sys
from pathlib import Path

import pytest

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
