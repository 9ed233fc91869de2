"""Generate with a finetuned model: ``python -m fastfair.generate --model SD_DIR|SD_FILE|toy|pkg://PACKAGE/PATH
[--model-config SD_DIR] --lora EXPORT_DIR --prompt TEXT --num-images N --out DIR [--steps N --guidance G
--seed 0 --dtype fp32]``; writes DIR/<index>.png (steps and guidance: the run's, as its export records them, else
20 and 7.5)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional

import torch

from fastfair.evaluation.sources import finetuned_kind, resolve_model, resolve_model_config
from fastfair.export import EXPORT_INFO, export_info, load_into_pipeline
from fastfair.models import load_stable_diffusion


DEFAULT_STEPS, DEFAULT_GUIDANCE = 20, 7.5


def generate(model, lora, prompt: str, num_images: int, out, steps: Optional[int] = None,
             guidance: Optional[float] = None, seed: int = 0, dtype: str = "fp32", device: str = "cpu",
             model_config=None) -> list:
    """Images of `prompt` from the model with the exported weights (None: the base model); returns the PNG paths.
    steps / guidance: None takes what the export records its run sampled with (`fastfair.export.export_info`),
    else 20 / 7.5. model_config: the diffusers folder of a single-file model's architecture."""
    from diffusers import StableDiffusionPipeline

    recorded = export_info(lora) if lora and Path(lora).is_dir() else {}
    taken = [f"{flag} {recorded[key]}" for flag, key, given in (("--steps", "num_steps", steps),
                                                                ("--guidance", "guidance_scale", guidance))
             if given is None and key in recorded]
    if taken:  # a run debiased at one guidance scale is not at another
        print(f"{' and '.join(taken)}: as the run trained ({lora}/{EXPORT_INFO}); give the flag for another")
    exported = guidance is None and "guidance_scale" in recorded  # a refusal names where the value came from
    steps = steps if steps is not None else int(recorded.get("num_steps", DEFAULT_STEPS))
    guidance = guidance if guidance is not None else float(recorded.get("guidance_scale", DEFAULT_GUIDANCE))
    # checked before loading: diffusers would write decoded noise for 0 steps and sample every guidance <= 1
    # as 1 (no classifier-free guidance)
    if num_images < 1:
        raise ValueError(f"--num-images {num_images}: expected at least 1")
    if steps < 1:
        raise ValueError(f"--steps {steps}: expected at least 1 sampling step")
    if not math.isfinite(guidance) or guidance < 1:
        if exported:  # the user gave no --guidance: a run trained before fastfair required >= 1
            raise ValueError(f"{lora}/{EXPORT_INFO} records guidance_scale {guidance}, the run's, which diffusers' "
                             "pipeline cannot sample (no classifier-free guidance below 1): give --guidance G (>= 1; "
                             "1: no guidance)")
        raise ValueError(f"--guidance {guidance}: expected a number >= 1 (1: no classifier-free guidance)")
    out = Path(out)
    earlier = sorted(out.glob("[0-9][0-9][0-9][0-9][0-9].png")) if out.is_dir() else []
    if earlier:  # this run would overwrite some and leave the rest, a folder of two runs' images
        raise ValueError(f"--out {out}: holds images of an earlier run ({earlier[0].name} ...); choose a new folder "
                         "or delete them")
    if lora:
        finetuned_kind(lora, "--lora", checkpoints=False)
    parts = load_stable_diffusion(resolve_model(model), dtype, device=device, config=resolve_model_config(model_config),
                                  key="--model", config_key="--model-config")
    pipe = StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                   unet=parts.unet, scheduler=parts.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).to(device)
    prefix = load_into_pipeline(pipe, lora) if lora else ""
    generator = torch.Generator(device).manual_seed(seed)
    images = pipe(prefix + prompt, num_images_per_prompt=num_images, num_inference_steps=steps,
                  guidance_scale=guidance, generator=generator).images
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{index:05d}.png" for index in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Generate images with a fastfair-finetuned model.")
    parser.add_argument("--model", required=True,
                        help="diffusers folder, single-file SD checkpoint, pkg://PACKAGE/PATH, or 'toy'")
    parser.add_argument("--model-config", default=None,
                        help="with a single-file --model: a local diffusers folder of its architecture")
    parser.add_argument("--lora", default=None, help="folder written by python -m fastfair.export")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=None,
                        help=f"sampling steps (default: the run's, as the export records it, else {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the "
                        f"run's, as the export records it, else {DEFAULT_GUIDANCE})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for path in generate(args.model, args.lora, args.prompt, args.num_images, args.out, args.steps, args.guidance,
                         args.seed, args.dtype, device, args.model_config):
        print(path)


if __name__ == "__main__":
    from fastfair.cli import user_errors

    with user_errors("python -m fastfair.generate"):
        main()
