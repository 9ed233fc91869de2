"""The fixed cost of evaluating a run's checkpoints: one sweep (``fastfair.select_checkpoint``, which loads the
base model and the judges once and measures the shared base images once) versus one ``fastfair.evaluate`` per
checkpoint against the same base-images folder (each loads its own models and measures the base images again).

    python bench/sweep_loads.py --model tiny|sd15 [--checkpoints N] [--rounds R] [--json OUT.json]

Both run in this one process, interleaved over the rounds, after an untimed sweep has generated every image, so
the times hold what a sweep spends besides sampling (identical in both: n + 1 models' images): loading the
models (base model, classifier, face detector, CLIP, DINOv2), building each finetuned model, reading the cached
images and scoring them. Models: ``tiny`` (test-sized) or ``sd15`` (SD 1.5 shapes with random weights,
bench/train_step.py's, plus a full CLIP ViT-L/14 for CLIP-T and CLIP-I; 128 px on CPU), fp32; the checkpoints are
text-encoder LoRA (rank 50 for sd15, the paper's) training checkpoints with random B matrices. The evaluation is
--images-per-prompt images of --prompts prompts at one guidance scale, 2 sampling steps, face detector ``none``.
Reports the median seconds per checkpoint of each and their ratio (JSON ``{"device", "results": [...]}`` and a
Markdown table beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import save_models  # noqa: E402  (bench/: the models of the training benchmark)

from fastfair.evaluate import evaluate  # noqa: E402
from fastfair.select_checkpoint import BASE_IMAGES, select_checkpoint  # noqa: E402

PROMPT = "a photo of the face of a {}, a person"
JOBS = ("nurse", "pilot", "chef", "farmer", "lawyer", "dancer", "baker", "judge")


def save_clip(kind: str, folder: Path, tokenizer_folder: Path) -> str:
    """A transformers CLIPModel (both towers, as evaluate's CLIP-T needs): for sd15 ViT-L/14 at 224 px with the SD
    folder's tokenizer; for tiny the test suite's 16 px one."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from fastfair.testing import save_tiny_clip

    if kind != "sd15":
        return str(save_tiny_clip(folder))
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77)
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=224, patch_size=14)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=dict(**text, **ids), vision_config=vision, projection_dim=768)
              ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def save_run(root: Path, files: dict, rank: int, steps, target: str = "text_lora") -> Path:
    """A training run's folder with a checkpoint of ``target`` (finetune.target) at each step: LoRA ones with
    random B (each moves the model), unet_full ones the base U-Net's weights."""
    from fastfair.checkpoint import save_checkpoint
    from fastfair.config import load_config
    from fastfair.finetune import FinetunedModel
    from fastfair.models import load_stable_diffusion

    config = {"output_dir": str(root), "model": {"pretrained": files["sd"], "dtype": "fp32"},
              "finetune": {"target": target, "prefix_tokens": 0, "lora": {"rank": rank}},
              "targets": {"attributes": [{"name": "gender", "classes": {"female": 0, "male": 1},
                                          "probabilities": "uniform"}]},
              "classifiers": {"gender": {"path": files["classifier"]}}, "faces": {"detector": "none"},
              "semantics": {"clip_backend": "transformers", "clip_path": files["clip_vision"],
                            "dino_path": files["dino"]}}
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(root / "config.yaml")
    parts = load_stable_diffusion(cfg.model.pretrained)
    model = FinetunedModel(parts.tokenizer, parts.text_encoder, parts.unet, cfg.finetune.target,
                           cfg.finetune.prefix_tokens, cfg.finetune.lora)
    generator = torch.Generator().manual_seed(0)
    for step in steps:
        weights = {name: p.detach() + (0.01 * torch.randn(p.shape, generator=generator) if "lora_B" in name else 0)
                   for name, p in model.trainable.items()}
        save_checkpoint(str(root), step, weights, weights, {})
    return root


def evaluation_kwargs(files: dict, prompts: int, images: int) -> dict:
    return dict(model=files["sd"], classifiers=[files["classifier"]], prompts=[PROMPT.format(j) for j in
                JOBS[:prompts]], images_per_prompt=images, guidance_scales=(7.5,), num_steps=2, batch_size=images,
                detector="none", clip=files["clip"], dino=files["dino"], device="cpu", progress=False)


def time_lone(run: Path, out: Path, kwargs: dict) -> float:
    """Seconds for one evaluate per checkpoint, each with its own loads, all against the sweep's base images."""
    start = time.perf_counter()
    for folder in sorted((run / "checkpoints").iterdir()):
        results = evaluate(out=out / folder.name, finetuned=str(folder), base_images=out / BASE_IMAGES, **kwargs)
        assert not results["generated"], "an image was not cached: the timing would include sampling"
    return time.perf_counter() - start


def time_sweep(run: Path, out: Path, kwargs: dict) -> float:
    start = time.perf_counter()
    selection = select_checkpoint([str(run)], out, **kwargs)
    assert not any(e["generated"] for e in selection["evaluations"].values()), "an image was not cached"
    return time.perf_counter() - start


def markdown(result: dict, command: str) -> str:
    per = {impl: result[f"{impl}_s_per_checkpoint"] for impl in ("lone", "sweep")}
    return "\n".join([
        f"Command: `{command}`", "",
        f"{result['model']}, {result['checkpoints']} checkpoints, {result['prompts']} prompts x {result['images']} "
        f"images (cached), {result['device']}, {result['date']}, median of {result['rounds']} rounds:", "",
        "| implementation | s per checkpoint | vs lone |", "|---|---|---|",
        f"| one `fastfair.evaluate` per checkpoint (lone) | {per['lone']:.2f} | 1.00 |",
        f"| `fastfair.select_checkpoint` (sweep) | {per['sweep']:.2f} | {per['sweep'] / per['lone']:.2f} |", "",
        f"The sweep's fixed cost per checkpoint is {result['speedup']:.2f}x lower. What the sweep still spends per "
        "checkpoint: building its model on copies of the held base model's parts it changes and scoring its own "
        "images; each lone evaluation also loads the base model and every judge and scores the base images again. "
        "On a CPU the judges' forwards (CLIP, DINOv2) outweigh the loads; on a GPU the loads weigh more.", ""])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--images", type=int, default=4, help="images per prompt")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work", help="folder for the models and images (default: a temporary one)")
    parser.add_argument("--json", help="write results here (and a .md table beside it)")
    args = parser.parse_args(argv)
    # the prompts are among the runs' (default) training prompts: evaluate's warning says so, once per evaluation
    warnings.filterwarnings("ignore", message="--prompts: .* among the prompts the finetuned run trained on")
    if not 1 <= args.prompts <= len(JOBS):
        parser.error(f"--prompts {args.prompts}: expected 1 to {len(JOBS)}")
    for flag in ("checkpoints", "images", "rounds"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: expected at least 1")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.work or scratch)
        files = save_models(args.model, root / "models", 128 if args.model == "sd15" else 16)
        files["clip_vision"] = files["clip"]
        files["clip"] = save_clip(args.model, root / "models" / "clip_full", Path(files["sd"]) / "tokenizer")
        run = save_run(root / "run", files, 50 if args.model == "sd15" else 4, range(1, args.checkpoints + 1))
        kwargs = evaluation_kwargs(files, args.prompts, args.images)
        out = root / "eval"
        select_checkpoint([str(run)], out, **kwargs)  # untimed: generates every image both then read
        times = {"lone": [], "sweep": []}
        for _ in range(args.rounds):
            times["lone"].append(time_lone(run, out, kwargs) / args.checkpoints)
            times["sweep"].append(time_sweep(run, out, kwargs) / args.checkpoints)
            print(f"lone {times['lone'][-1]:.2f} s/ckpt, sweep {times['sweep'][-1]:.2f} s/ckpt", flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "checkpoints": args.checkpoints, "prompts": args.prompts, "images": args.images,
              "rounds": args.rounds, "device": f"cpu ({torch.get_num_threads()} threads)",
              **{f"{impl}_s_per_checkpoint": statistics.median(t) for impl, t in times.items()},
              "times": times}
    result["speedup"] = result["lone_s_per_checkpoint"] / result["sweep_s_per_checkpoint"]
    command = "python bench/sweep_loads.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(result, command.strip())
    print(table)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": result["device"], "results": [result]}, f, indent=1)
        with open(os.path.splitext(args.json)[0] + ".md", "w") as f:
            f.write(table)
    return result


if __name__ == "__main__":
    main()
