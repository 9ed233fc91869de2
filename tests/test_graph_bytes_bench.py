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
