"""Recompute a committed train_step table's FLOP-model ratios with the baseline's checkpoint recompute (Ur)
measured as bench/train_step.py now measures it, without rerunning the table's timings.

    python bench/refit_flop_model.py bench/results/train_step_cpu.json --json bench/results/refit_train_step_cpu.json

Tables written before 2026-11-30 took Ur as the checkpointed modules' forward FLOPs; a checkpointed backward
recomputes less (the first resnet's input needs no gradient; torch's checkpoint stops each segment at the last
tensor the backward needs). This builds the table's U-Net (tiny: its saved world; sd15: SD 1.5's architecture on
the meta device), counts U, Ub and Ur at the table's latent size and prints old and new model speedups.
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]
from flops import count_flops, iteration_flops  # noqa: E402
from train_step import unet_backward_units  # noqa: E402


def unet_units(model: str, latent: int) -> dict:
    """{unet, unet_input_backward, unet_recompute} of one image and branch at a latent [4, latent, latent]
    (train_step's counts: ``unet_backward_units``)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor

    if model == "tiny":
        from transformers import CLIPTextConfig

        from fastfair.testing import make_world

        sd = Path(make_world(tempfile.mkdtemp())["sd"])
        unet, device = UNet2DConditionModel.from_pretrained(sd / "unet"), "cpu"
        text = CLIPTextConfig.from_pretrained(sd / "text_encoder")
        context = (text.max_position_embeddings, text.hidden_size)
    else:  # SD 1.5's U-Net: shapes alone are counted
        with torch.device("meta"):
            unet = UNet2DConditionModel(sample_size=latent, cross_attention_dim=768)
        device, context = "meta", (77, 768)
    unet = unet.eval().requires_grad_(False)
    unet.set_attn_processor(AttnProcessor())
    z = torch.randn(1, unet.config.in_channels, latent, latent, device=device)
    t = torch.tensor([500], device=device)
    leaf = torch.randn(1, *context, device=device).requires_grad_()
    forward = count_flops(lambda: unet(z, t, encoder_hidden_states=leaf))
    return {"unet": forward, **unet_backward_units(unet, z, t, leaf)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", help="a train_step JSON (bench/results/train_step_*.json)")
    parser.add_argument("--json", required=True, help="where to write the refit (and a .md beside it)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = json.loads(Path(args.table).read_text())
    meta, old = data["meta"], dict(data["meta"]["unit_flops"])
    measured = unet_units(meta["model"], meta["latent"][-1])
    if measured["unet"] != old["unet"]:  # not the table's U-Net: the refit would mix two models
        raise SystemExit(f"{args.table}: its U = {old['unet']}, this build's {measured['unet']}")
    new = dict(old, unet_recompute=measured["unet_recompute"])
    n, s = meta["images"], meta["steps"]
    rows = []
    for row in data["results"]:
        impl = row["impl"]
        micro = -(-n // row["micro_batch"]) if impl.startswith("baseline") else 1
        options = (n, s, micro, row.get("keep_graph_steps", 0), min(5, s) if impl == "fastfair_k5" else None,
                   row.get("keep_attention_steps", 0))
        # judges run block-wise per M images (--micro-batch), as the table's runs record (loss.judge_images)
        sliced = any(run.get("judge_images") is not None for run in data.get("runs", []) if run["impl"] == impl)
        rows.append({"impl": impl, "old_flops": iteration_flops(impl, old, *options, sliced_judges=sliced)["total"],
                     "new_flops": iteration_flops(impl, new, *options, sliced_judges=sliced)["total"],
                     "measured_speedup": row.get("speedup_per_image_vs_baseline_sdpa")})
    ref = next(r for r in rows if r["impl"] == "baseline_sdpa")
    for row in rows:
        row["old_model_speedup"] = ref["old_flops"] / row["old_flops"]
        row["new_model_speedup"] = ref["new_flops"] / row["new_flops"]
    result = {"table": args.table, "unet": old["unet"], "old_unet_recompute": old["unet_recompute"],
              "new_unet_recompute": measured["unet_recompute"], "results": rows}
    lines = [f"Command: `python bench/refit_flop_model.py {args.table} --json {args.json}`", "",
             f"Ur / U: {old['unet_recompute'] / old['unet']:.3f} in the table, "
             f"{measured['unet_recompute'] / old['unet']:.3f} measured on a checkpointed backward.", "",
             "| impl | measured speedup | FLOP-model speedup (table) | FLOP-model speedup (refit) |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['impl']} | {r['measured_speedup']:.3f} | {r['old_model_speedup']:.3f} | "
              f"{r['new_model_speedup']:.3f} |" for r in rows]
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    Path(os.path.splitext(args.json)[0] + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
