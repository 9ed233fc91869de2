"""Demonstration of the adjusted-DFT engine on CPU: finetune a diffusion model with an image-space loss.

    python -m fastfair.engine_demo [--out DIR] [--iters 60] [--steps 20]

No weights are downloaded: a small Stable-Diffusion-shaped model (U-Net, VAE decoder) is built with random
weights. The loss is a plain image-space objective, unrelated to fairness: make the decoded images' mean colour
match a target colour. The U-Net's LoRA (peft) and the prompt embedding are trained through 20-step DPM-Solver++
sampling with classifier-free guidance, with fastfair.dft.sample's exact per-step recompute. The demo prints the
loss before and after on held-out noise and writes DIR/metrics.json and DIR/before_after.png (same noise,
before row over after row). Memory against the full-graph reference: bench/unroll_memory.py.

The README's main job is the toy world's debiasing run (``python -m fastfair.demo``); this one shows the engine
alone, on a model with random weights.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from .cli import file_instead_of_folder
from .dft import sample
from .evaluation.report import nan_to_null
from .files import write_text
from .testing import tiny_scheduler, tiny_unet

TARGET_RGB = (0.6, -0.2, -0.4)  # in the decoder's [-1, 1] range: a reddish image


def build_models(seed: int = 0):
    """(unet with LoRA adapters, frozen VAE, scheduler): random weights, SD block layout at toy width."""
    from diffusers import AutoencoderKL
    from peft import LoraConfig

    unet = tiny_unet(seed=seed, channels=(16, 32), cross_attention_dim=32, sample_size=8)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16).eval().requires_grad_(False)
    return unet, vae, tiny_scheduler()


def colour_loss(images: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of each image's mean colour to TARGET_RGB. images: [N, 3, H, W] in [-1, 1]."""
    target = torch.tensor(TARGET_RGB, dtype=images.dtype)
    return ((images.mean(dim=(2, 3)) - target) ** 2).sum(dim=1).mean()


def decode(vae, z0: torch.Tensor) -> torch.Tensor:
    return vae.decode(z0 / vae.config.scaling_factor).sample.clamp(-1, 1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m fastfair.engine_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/engine_demo", help="output directory")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps per sample")
    parser.add_argument("--images", type=int, default=4, help="images per iteration")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's, e.g. OMP_NUM_THREADS)")
    args = parser.parse_args(argv)
    for flag in ("steps", "images", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag} must be >= 1, got {value}")
    if args.iters < 0:
        parser.error(f"--iters must be >= 0, got {args.iters}")
    problem = file_instead_of_folder("--out", args.out, "metrics.json and before_after.png")
    if problem:  # checked now, not after the training
        parser.error(problem)
    from tqdm import tqdm

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    unet, vae, scheduler = build_models(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    cond = torch.randn(1, 8, 32, generator=gen).requires_grad_()
    uncond = torch.randn(1, 8, 32, generator=gen)
    lora = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora + [cond], lr=args.lr)
    eval_noise = torch.randn(args.images, 4, 8, 8, generator=gen)

    def evaluate():
        with torch.no_grad():
            z0 = sample(unet, scheduler, eval_noise, cond, uncond, num_steps=args.steps)
            images = decode(vae, z0)
        return colour_loss(images).item(), images

    loss_before, images_before = evaluate()
    start = time.perf_counter()
    bar = tqdm(range(args.iters), desc="finetuning (adjusted DFT)")
    for _ in bar:
        z_T = torch.randn(args.images, 4, 8, 8, generator=gen)
        z0 = sample(unet, scheduler, z_T, cond, uncond, num_steps=args.steps, coefficients="exact",
                    recompute_chunk=4)
        loss = colour_loss(decode(vae, z0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{args.images * (bar.n + 1) / (time.perf_counter() - start):.1f}")
    loss_after, images_after = evaluate()

    metrics = {
        "colour_loss_before": loss_before,
        "colour_loss_after": loss_after,
        "relative_reduction": 1 - loss_after / loss_before,
        "iterations": args.iters,
        "steps": args.steps,
        "seconds": time.perf_counter() - start,
    }
    os.makedirs(args.out, exist_ok=True)
    # a diverged run's NaN as null: strict JSON
    write_text(os.path.join(args.out, "metrics.json"), json.dumps(nan_to_null(metrics), indent=1, allow_nan=False))
    _save_grid(torch.cat([images_before, images_after]), args.images, os.path.join(args.out, "before_after.png"))
    print(f"\ncolour loss on held-out noise: before {loss_before:.4f} -> after {loss_after:.4f} "
          f"({100 * metrics['relative_reduction']:.0f}% lower)")
    print(f"wrote {args.out}/metrics.json and {args.out}/before_after.png")
    return metrics


def _save_grid(images: torch.Tensor, per_row: int, path: str) -> None:
    from PIL import Image

    n, c, h, w = images.shape
    grid = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = grid.view(n // per_row, per_row, c, h, w).permute(0, 3, 1, 4, 2).reshape(n // per_row * h, per_row * w, c)
    Image.fromarray(grid.numpy()).resize((per_row * w * 4, n // per_row * h * 4), Image.NEAREST).save(path)


if __name__ == "__main__":
    from fastfair.cli import user_errors

    with user_errors("python -m fastfair.engine_demo"):
        main()
