"""Where one kept U-Net step's graph goes: the bytes autograd saves, by node type (for fastfair.memory_budget).

    python bench/graph_bytes.py --unet DIR [--latent 16] [--json OUT.json]

DIR: a diffusers U-Net folder, e.g. ``<models-dir>/sd/unet`` written by ``bench/train_step.py --model sd15
--models-dir``. The call is a kept step's graph-building call in the text-encoder-LoRA recipe: frozen U-Net, CFG's
two rows (uncond, cond) of one image, gradient to the text embeddings [2, 77, D], SDPA attention, fp32 on CPU,
with and without ``fastfair.lean_graph``. Method: walk the graph from the output, summing each node's saved
tensors (the ``_saved_*`` attributes of built-in nodes, ``saved_tensors`` of custom Functions; not 0-dim
scalars); a storage is counted once (for the first node met), parameters and the call's inputs are left out. The total is checked
against ``fastfair.memory_budget.saved_tensor_bytes`` of the same call (which also counts the output).
"""
import argparse
import collections
import contextlib
import json
from pathlib import Path

from typing import Optional

import torch


def saved_by_node(output: torch.Tensor, excluded: set) -> collections.Counter:
    """{autograd node type: bytes of the storages it saves} over the graph behind output."""
    seen, by_node = set(excluded), collections.Counter()
    stack, visited = [output.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        tensors = []
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name, None)
                values = value if isinstance(value, (list, tuple)) else [value]
                tensors += [v for v in values if isinstance(v, torch.Tensor)]
        with contextlib.suppress(RuntimeError, AttributeError):  # built-in nodes have no saved_tensors
            tensors += list(node.saved_tensors)
        for tensor in tensors:
            if tensor.dim() == 0:  # a Python number autograd keeps as a scalar: a fresh tensor on each access
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                by_node[type(node).__name__.removesuffix("Backward0").removesuffix("Backward")] += storage.nbytes()
        stack += [next_node for next_node, _ in node.next_functions]
    return by_node


def measure(unet, latent: int, lean: bool) -> dict:
    from fastfair.lean_graph import lean_graph
    from fastfair.memory_budget import saved_tensor_bytes

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, latent, latent, generator=generator)
    t = torch.full((2,), 500)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).requires_grad_(True)
    params = list(unet.parameters())
    def call():
        with lean_graph(unet) if lean else contextlib.nullcontext():
            return unet(x, t, encoder_hidden_states=emb).sample

    with torch.enable_grad():
        output = call()
    excluded = {p.untyped_storage().data_ptr() for p in params} | {
        v.untyped_storage().data_ptr() for v in (x, t, emb)}
    by_node = saved_by_node(output, excluded)
    checked = saved_tensor_bytes(call, held=params + [x, t, emb]) - output.untyped_storage().nbytes()
    return {"lean_graph": lean, "latent": latent, "total_bytes": sum(by_node.values()),
            "saved_tensor_bytes_check": checked, "by_node": dict(by_node.most_common())}


def attention_keep(unet, latent: int) -> dict:
    """G_att and r of the same call as a step that keeps its attention outputs only
    (``fastfair.memory_budget.attention_keep_costs``): both CFG rows differentiated, as in ``measure``."""
    from fastfair.memory_budget import attention_keep_costs

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, unet.config.in_channels, latent, latent, generator=generator)
    cond, uncond = (torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator).requires_grad_(True)
                    for _ in range(2))
    costs = attention_keep_costs(unet, latents, 500, cond, uncond, 7.5)
    return {"attention_bytes": None, "attention_share": None} if costs is None else {
        "attention_bytes": costs[0], "attention_share": costs[1]}


def markdown(results: list, argv: str, attention: Optional[dict] = None) -> str:
    mib = 2.0 ** 20
    nodes = list(dict.fromkeys(k for r in results for k in r["by_node"]))
    header = " | ".join(f"lean_graph={'on' if r['lean_graph'] else 'off'} MiB" for r in results)
    lines = [f"Command: `python bench/graph_bytes.py {argv}`", "",
             f"One kept step's graph (bench/graph_bytes.py docstring), latent {results[0]['latent']}x"
             f"{results[0]['latent']}, by autograd node type:", "", f"| node | {header} |",
             "|---|" + "---:|" * len(results)]
    for node in nodes:
        lines.append(f"| {node} | " + " | ".join(f"{r['by_node'].get(node, 0) / mib:.1f}" for r in results) + " |")
    lines.append("| total | " + " | ".join(f"{r['total_bytes'] / mib:.1f}" for r in results) + " |")
    lines.append("| saved_tensor_bytes (check) | "
                 + " | ".join(f"{r['saved_tensor_bytes_check'] / mib:.1f}" for r in results) + " |")
    if attention and attention["attention_bytes"] is not None:
        graph, share = results[0]["total_bytes"], attention["attention_share"]
        ratio = attention["attention_bytes"] / graph
        first = "attention-only keeps" if share > ratio else "whole graphs"
        lines += ["", f"A step that keeps its attention outputs only (keep_attention_steps) holds "
                      f"{attention['attention_bytes'] / mib:.1f} MiB, {100 * ratio:.1f}% of the lean graph's bytes, "
                      f"and saves the attention's share of the step's recompute, {100 * share:.1f}% of its FLOPs "
                      f"(fastfair.memory_budget.attention_keep_costs): per byte, {first} save more recompute here."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    import shlex
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", required=True, help="a diffusers UNet2DConditionModel folder")
    parser.add_argument("--latent", type=int, default=16, help="latent side (16: 128 px with SD's VAE)")
    parser.add_argument("--json", default=None, help="write results here (and a .md table beside it)")
    args = parser.parse_args(argv)
    if args.latent < 1:
        parser.error(f"--latent {args.latent}: a latent side >= 1 (16: 128 px with SD's VAE)")
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = UNet2DConditionModel.from_pretrained(args.unet).eval().requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    results = [measure(unet, args.latent, lean) for lean in (True, False)]
    attention = attention_keep(unet, args.latent)
    table = markdown(results, shlex.join(sys.argv[1:] if argv is None else argv), attention)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": "cpu", "results": results, **attention}, indent=1))
        Path(args.json).with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
