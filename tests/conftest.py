"""Suite-wide settings. Tiny models are overhead-bound: one intra-op thread is faster than two on a shared
2-core machine (measured 15x on a loaded machine), and keeps timings steady."""
import contextlib
import importlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench_workers_in_process(monkeypatch):
    """Runs each configuration a benchmark hands to ``bench/_workers.spawn`` in this process instead of a fresh one,
    through the same entry (``main(["--worker", JSON])``) and the same JSON line on stdout. A fresh Python costs
    about 9 s on these machines, nearly all of it importing diffusers, where a tiny configuration then runs for a
    second or two. What a fresh process adds (clean peak memory, the allocator's environment) is not tested through
    it: memory figures live in the benchmarks' own tables, made with real workers, and spawn itself is tested in
    tests/test_bench_workers.py. Patches ``spawn`` in every loaded bench module (import them first); returns the
    names of the configurations run, in order."""
    monkeypatch.syspath_prepend(str(BENCH))
    import _workers

    real, names = _workers.spawn, []

    def spawn(script, spec, name, env=None, show_stderr=False):
        module = importlib.import_module(Path(script).stem)
        threads, stdout = torch.get_num_threads(), io.StringIO()
        try:
            with contextlib.redirect_stdout(stdout):
                module.main(["--worker", json.dumps(spec)])
        finally:
            torch.set_num_threads(threads)  # workers set their own, as a fresh process may
        names.append(name)
        return json.loads(stdout.getvalue().strip().splitlines()[-1])

    patched = [m for m in list(sys.modules.values()) if getattr(m, "spawn", None) is real]
    assert patched, "bench_workers_in_process: import the benchmark modules before the fixture runs"
    for module in patched:
        monkeypatch.setattr(module, "spawn", spawn)
    return names
