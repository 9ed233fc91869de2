"""bench/finetuned_copy.py runs end to end on the tiny world, each way as a worker (in this process:
tests/conftest.py's bench_workers_in_process), into JSON and its Markdown table; both ways build the same finetuned
model, and only the earlier way copies a U-Net a text-encoder run leaves as it is (no memory figure is asserted:
they live in the benchmark's own tables)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "finetuned_copy.py"
sys.path.insert(0, str(BENCH.parent))

import finetuned_copy  # noqa: E402


def test_both_ways_build_the_same_model_and_only_the_earlier_copies_the_unet(tmp_path, bench_workers_in_process):
    out = tmp_path / "copy.json"
    finetuned_copy.main(["--model", "tiny", "--targets", "text_lora", "--models-dir", str(tmp_path / "models"),
                         "--json", str(out)])
    assert bench_workers_in_process == ["text_lora whole", "text_lora parts"]
    data = json.loads(out.read_text())
    whole, parts = results = data["results"]
    assert [(r["target"], r["way"]) for r in results] == [("text_lora", "whole"), ("text_lora", "parts")]
    assert all(isinstance(r["peak_bytes"], int) and r["seconds"] > 0 for r in results)
    assert (whole["shares_unet"], parts["shares_unet"]) == (False, True)
    # the text LoRA moved the prompt's embedding, by as much both ways
    assert whole["embedding_shift"] > 0
    assert parts["embedding_shift"] == pytest.approx(whole["embedding_shift"], rel=1e-4)
    table = out.with_suffix(".md").read_text()
    assert "| text_lora | parts | " in table and "--targets text_lora" in table.splitlines()[0]


def test_an_unknown_target_is_named():
    run = subprocess.run([sys.executable, str(BENCH), "--targets", "text_lora,prefix"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "--targets 'text_lora,prefix': choose from" in run.stderr



def test_the_table_gives_parts_over_whole():
    rows = [{"target": "text_lora", "way": way, "peak_bytes": peak * 2**20, "seconds": seconds}
            for way, peak, seconds in (("whole", 8, 4.0), ("parts", 2, 1.0))]
    table = finetuned_copy.markdown(rows)
    assert "| text_lora | whole | 8.0 | 4.00 | - | - |" in table
    assert "| text_lora | parts | 2.0 | 1.00 | 0.250 | 0.25 |" in table
