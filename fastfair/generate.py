"""Generate with a finetuned model: ``python -m fastfair.generate --model SD_DIR|SD_FILE|toy|pkg://PACKAGE/PATH
[--model-config SD_DIR] --lora EXPORT_DIR (--prompt TEXT ... | --prompts SPEC) --num-images N --out DIR [--steps N
--guidance G --seed 0 --dtype fp32 --batch-size B]``; writes DIR/<index>.png for one --prompt, and for several or
a --prompts set DIR/prompt_<p>/<index>.png with DIR/prompts.txt (line p: prompt p), loading the model once (steps
and guidance: the run's, as its export records them, else 20 and 7.5). --prompts takes what ``python -m
fastfair.evaluate --prompts`` takes (a shipped set NAME[:SPLIT], a text file of prompts, a factory). Image k of a
prompt starts from its own noise, the one ``python -m fastfair.evaluate`` gives image k of the prompt at that seed
(``fastfair.evaluation.cache.paired_noise``, drawn on the CPU in float32; cast to --dtype), so which images come
does not depend on the batch size, on --num-images or on the device's random generator (the pixels equal up to the
rounding of another batch shape's arithmetic)."""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from fastfair.cli import file_instead_of_folder
from fastfair.evaluation.cache import paired_noise
from fastfair.evaluation.sources import check_finetuned_base, finetuned_kind, resolve_model, resolve_model_config
from fastfair.export import EXPORT_INFO, export_info, load_into_pipeline, merged_prompt_prefix, refuse_prefix_token
from fastfair.models import latent_size, load_stable_diffusion, sampling_configs, vae_factor


DEFAULT_STEPS, DEFAULT_GUIDANCE, DEFAULT_BATCH = 20, 7.5, 8  # the batch: images per call, as evaluate's default
# with several prompts: line p is the prompt of DIR/prompt_<p>/ (a record: --prompts would read a line starting
# with '#' as a comment)
PROMPTS_FILE = "prompts.txt"


def prompt_folders(out, prompt: Union[str, Sequence[str]]) -> list:
    """Where each prompt's images go: DIR itself for one prompt given as a string, DIR/prompt_<p> (p = 000, 001,
    ...) for a list of prompts (of one too: a prompt set's layout does not depend on its length)."""
    out = Path(out)
    return [out] if isinstance(prompt, str) else [out / f"prompt_{p:03d}" for p in range(len(prompt))]


def generate(model, lora, prompt: Union[str, Sequence[str]], num_images: int, out, steps: Optional[int] = None,
             guidance: Optional[float] = None, seed: int = 0, dtype: str = "fp32", device: str = "cpu",
             model_config=None, batch_size: Optional[int] = DEFAULT_BATCH,
             resolution: Optional[int] = None) -> list:
    """num_images images of `prompt` (a string, or a list of prompts: each in its own folder, `prompt_folders`)
    from the model with the exported weights (None: the base model); returns the PNG paths, prompt by prompt.
    steps / guidance / resolution (the image side in pixels): None takes what the export records its run sampled
    with (`fastfair.export.export_info`), else 20 / 7.5 / the model's own size. model_config: the diffusers folder
    of a single-file model's architecture. batch_size: images per pipeline call (None: all at once); each image's
    noise is the same whatever it is (module docstring). Prompts are stripped of spaces at their ends (CLIP's
    tokenizer drops them; the noise would not)."""
    from tqdm.auto import tqdm

    model_path = resolve_model(model)
    # the export's record: beside its weights, or in a model written by fastfair.export --merged
    exported_by = lora if lora else model_path
    recorded = export_info(exported_by) if Path(exported_by).is_dir() else {}
    taken = [f"{flag} {recorded[key]}" for flag, key, given in (("--steps", "num_steps", steps),
                                                                ("--guidance", "guidance_scale", guidance),
                                                                ("--resolution", "resolution", resolution))
             if given is None and recorded.get(key) is not None]
    if taken:  # a run debiased at one guidance scale is not at another
        print(f"{' and '.join(taken)}: as the run trained ({exported_by}/{EXPORT_INFO}); give the flag for another",
              file=sys.stderr)  # stdout lists the images written, one path a line
    exported = guidance is None and "guidance_scale" in recorded  # a refusal names where the value came from
    steps = steps if steps is not None else int(recorded.get("num_steps", DEFAULT_STEPS))
    guidance = guidance if guidance is not None else float(recorded.get("guidance_scale", DEFAULT_GUIDANCE))
    resolution = resolution if resolution is not None else recorded.get("resolution")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"--prompt: expected one or more non-empty prompts, got {prompts!r}")
    # as a --prompts file reads them back from prompts.txt, and each prompt's noise is seeded by its text
    prompts = [p.strip() for p in prompts]
    for text in prompts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes a terminal passed that are not UTF-8 (Python keeps them as surrogates)
            raise ValueError(f"--prompt {text!r}: not valid UTF-8 text; give the prompt in UTF-8") from None
    refuse_prefix_token(prompts, "--prompt")
    broken = next((p for p in prompts if "\n" in p or "\r" in p), None)
    if broken is not None:  # prompts.txt holds one prompt per line
        raise ValueError(f"--prompt {broken!r}: a prompt with a line break; give it on one line")
    repeated = sorted({p for p in prompts if prompts.count(p) > 1})
    if repeated:  # the same noise per image index: the same images again
        warnings.warn(f"{len(repeated)} prompt(s) given more than once (e.g. {repeated[0]!r}): their folders hold the "
                      "same images", stacklevel=2)
    # checked before loading: diffusers would write decoded noise for 0 steps and sample every guidance <= 1
    # as 1 (no classifier-free guidance)
    if num_images < 1:
        raise ValueError(f"--num-images {num_images}: expected at least 1")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: expected at least 1 image per batch")
    if steps < 1:
        raise ValueError(f"--steps {steps}: expected at least 1 sampling step")
    if seed < 0:
        raise ValueError(f"--seed {seed}: expected a seed >= 0")
    if resolution is not None and resolution < 1:
        raise ValueError(f"--resolution {resolution}: expected an image side in pixels >= 1")
    if not math.isfinite(guidance) or guidance < 1:
        if exported:  # the user gave no --guidance: a run trained before fastfair required >= 1
            raise ValueError(f"{exported_by}/{EXPORT_INFO} records guidance_scale {guidance}, the run's, which "
                             "diffusers' pipeline cannot sample (no classifier-free guidance below 1): give --guidance "
                             "G (>= 1; 1: no guidance)")
        raise ValueError(f"--guidance {guidance}: expected a number >= 1 (1: no classifier-free guidance)")
    problem = file_instead_of_folder("--out", out, "the images")  # before the model loads
    if problem:
        raise ValueError(problem)
    out = Path(out)
    folders = prompt_folders(out, prompt)
    taken_by_files = [folder for folder in folders if folder.exists() and not folder.is_dir()]
    if taken_by_files:  # found before the model loads, not by mkdir's "File exists" after it
        raise ValueError(f"--out {out}: {taken_by_files[0]} is a file where a prompt's images go; choose a new folder "
                         "or move it")
    # images only, in either layout (a run stopped before its first image left prompts.txt alone, which this one
    # rewrites): one prompt's run beside a set's would leave a folder of two runs' images
    earlier = [path for folder in [out, *sorted(out.glob("prompt_[0-9]*"))] if folder.is_dir()
               for path in sorted(folder.glob("[0-9][0-9][0-9][0-9][0-9].png"))[:1]]
    if earlier:  # this run would overwrite some and leave the rest, a folder of two runs' images
        raise ValueError(f"--out {out}: holds images of an earlier run ({earlier[0].relative_to(out)} ...); choose a "
                         "new folder or delete them")
    if lora:
        finetuned_kind(lora, "--lora", checkpoints=False)
        check_finetuned_base(model, lora, "--lora")
    model_config = resolve_model_config(model_config)

    def check_sampling(scheduler, scale):
        train_steps = scheduler.config.num_train_timesteps
        if steps >= train_steps:  # diffusers' solver fails with an IndexError past the schedule
            raise ValueError(f"--steps {steps}: the model's noise schedule has {train_steps} timesteps; sample fewer "
                             f"steps than that (20-50 as a rule)")
        multiple = math.lcm(scale, 8)  # the VAE's factor, and diffusers' pipeline takes sides divisible by 8 only
        if resolution is not None and resolution % multiple:
            where = (f"{exported_by}/{EXPORT_INFO} records the run's model.resolution {resolution}"
                     if "--resolution" in " ".join(taken) else f"--resolution {resolution}")
            raise ValueError(f"{where}: not a multiple of {multiple} (the VAE's factor {scale}, and the pipeline's "
                             "8); give --resolution N, a multiple of it")

    configs = sampling_configs(model_path, model_config)
    if configs is not None:  # from the config files: refused before the model loads
        check_sampling(configs.scheduler, configs.vae_factor)
    parts = load_stable_diffusion(model_path, dtype, device=device, config=model_config, key="--model",
                                  config_key="--model-config")
    scale = vae_factor(parts.vae.config.block_out_channels)
    if configs is None:
        check_sampling(parts.scheduler, scale)
    pipe = parts.pipeline().to(device)
    # a merged prefix export's token: its prompts start with it, as in training
    prefix = merged_prompt_prefix(model_path) + (load_into_pipeline(pipe, lora) if lora else "")
    pipe.set_progress_bar_config(disable=True)  # one bar over the images below, not one per batch
    latent = (resolution // scale,) * 2 if resolution else latent_size(parts.unet.config)
    shape = (parts.unet.config.in_channels, *latent)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out {out}: cannot make the folder ({error.strerror or error}); give a folder you can "
                         "write in") from None
    if not isinstance(prompt, str):  # first: a run stopped part way still says which folder holds which prompt
        (out / PROMPTS_FILE).write_text("".join(f"{p}\n" for p in prompts), encoding="utf-8")
    paths, batch = [], batch_size or num_images
    with tqdm(total=num_images * len(prompts), desc="generating", unit="img") as bar:
        for text, folder in zip(prompts, folders):
            folder.mkdir(exist_ok=True)
            for start in range(0, num_images, batch):
                indices = range(start, min(start + batch, num_images))
                noise = paired_noise(seed, text, indices, shape).to(device, parts.unet.dtype)
                try:
                    images = pipe(prefix + text, num_images_per_prompt=len(indices), num_inference_steps=steps,
                                  guidance_scale=guidance, latents=noise, height=latent[0] * scale,
                                  width=latent[1] * scale).images
                except RuntimeError as error:  # torch's out-of-memory errors, CUDA's a subclass
                    if "out of memory" not in str(error) and "can't allocate memory" not in str(error):
                        raise
                    raise ValueError(f"--batch-size {batch}: out of memory sampling {len(indices)} images at once "
                                     f"(2 U-Net rows each with guidance); give a smaller --batch-size") from error
                for index, image in zip(indices, images):
                    paths.append(folder / f"{index:05d}.png")
                    image.save(paths[-1])
                bar.update(len(indices))
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastfair.generate",
                                     description="Generate images with a fastfair-finetuned model.")
    parser.add_argument("--model", required=True,
                        help="diffusers folder, single-file SD checkpoint, pkg://PACKAGE/PATH, or 'toy'")
    parser.add_argument("--model-config", default=None,
                        help="with a single-file --model: a local diffusers folder of its architecture")
    parser.add_argument("--lora", default=None, help="folder written by python -m fastfair.export")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", action="append", help="a prompt, used as written; repeat it for several")
    which.add_argument("--prompts", metavar="SPEC",
                       help="prompts as python -m fastfair.evaluate --prompts takes them: NAME[:SPLIT] of a shipped "
                            "set (e.g. occupations:test), a text file of prompts (one per line), or a factory "
                            "package.module:function[:SPLIT]")
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=None,
                        help=f"sampling steps (default: the run's, as the export records it, else {DEFAULT_STEPS})")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the "
                        f"run's, as the export records it, else {DEFAULT_GUIDANCE})")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the run's "
                        "model.resolution, as the export records it, else the model's own size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH,
                        help=f"images per pipeline call (default {DEFAULT_BATCH}); each image's noise does not depend "
                        "on it")
    args = parser.parse_args(argv)
    if args.prompts:  # a set: a folder per prompt, whatever its length
        from fastfair.evaluate import load_prompts

        prompts = load_prompts(args.prompts)
        if not prompts:
            raise ValueError(f"--prompts {args.prompts}: holds no prompt")
    else:  # one --prompt: DIR/<index>.png
        prompts = args.prompt[0] if len(args.prompt) == 1 else args.prompt
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for path in generate(args.model, args.lora, prompts, args.num_images, args.out, args.steps, args.guidance,
                         args.seed, args.dtype, device, args.model_config, args.batch_size, args.resolution):
        print(path)


if __name__ == "__main__":
    from fastfair.cli import user_errors

    with user_errors("python -m fastfair.generate"):
        main()
