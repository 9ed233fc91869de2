"""bench/graph_bytes.py: its per-node walk of a kept step's graph counts exactly the bytes fastfair.memory_budget
counts, and lean_graph's savings land in the node types it changes."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import graph_bytes  # noqa: E402
from fastfair.testing import tiny_unet  # noqa: E402


def test_per_node_bytes_add_up_and_show_lean_graph():
    unet = tiny_unet(cross_attention_dim=16).requires_grad_(False)
    lean, plain = (graph_bytes.measure(unet, 8, on) for on in (True, False))
    for result in (lean, plain):
        assert result["total_bytes"] == result["saved_tensor_bytes_check"] > 0
        assert result["total_bytes"] == sum(result["by_node"].values())
    assert lean["total_bytes"] < plain["total_bytes"]
    assert plain["by_node"].get("Convolution", 0) > 0 and lean["by_node"].get("Convolution", 0) == 0
    assert "GegluGate" in lean["by_node"] and "GegluGate" not in plain["by_node"]
    attention = graph_bytes.attention_keep(unet, 8)
    assert 0 < attention["attention_bytes"] < lean["total_bytes"] and 0 < attention["attention_share"] < 1
    table = graph_bytes.markdown([lean, plain], "--latent 8", attention)
    assert "| total |" in table and "| GegluGate |" in table and "keeps its attention outputs only" in table



def test_the_attention_paragraph_compares_recompute_saved_per_byte():
    mib = 2**20
    lean = {"lean_graph": True, "latent": 8, "by_node": {"Mm": 3 * mib}, "total_bytes": 4 * mib,
            "saved_tensor_bytes_check": 4 * mib}
    plain = {**lean, "lean_graph": False, "total_bytes": 8 * mib, "saved_tensor_bytes_check": 8 * mib}
    table = graph_bytes.markdown([lean, plain], "", {"attention_bytes": mib, "attention_share": 0.5})
    # a quarter of the lean graph's bytes saves half its recompute: attention-only keeps first
    assert "holds 1.0 MiB, 25.0% of the lean graph's bytes" in table and "50.0% of its FLOPs" in table
    assert "per byte, attention-only keeps save more" in table
    table = graph_bytes.markdown([lean, plain], "", {"attention_bytes": mib, "attention_share": 0.2})
    assert "per byte, whole graphs save more" in table
