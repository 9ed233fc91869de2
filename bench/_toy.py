"""Shared parts of the toy-world ablation benches (bench/toy_gradients.py, bench/toy_components.py).

A variant is a worker spec ``{"name", "overrides": [config key=value], "iters", "out", "eval_images",
"images_per_prompt", "threads", ...}`` run in its own subprocess (``python SCRIPT --worker JSON``, one JSON line
on stdout). ``train_and_evaluate`` is the common worker body: the toy gender config
(``fastfair/toy/configs/gender.yaml``) with the variant's overrides, ``iters`` iterations of
`fastfair.trainer.Trainer` with the loss parts recorded per iteration, then the demo's held-out evaluation
(`fastfair.demo.evaluate_heldout` + `summarize_demo`: the toy *evaluation* classifier on the held-out
occupations, original vs finetuned EMA weights from the same noise).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from _workers import add_worker_flag, spawn
from fastfair.files import write_text

CONFIG = "pkg://fastfair.toy/configs/gender.yaml"
FINAL_WINDOW = 20  # "final train loss": mean over the last this many iterations


def add_common_args(parser: argparse.ArgumentParser, iters: int, eval_images: int, variants: Sequence[str]) -> None:
    """The CLI every toy bench shares."""
    parser.add_argument("--iters", type=int, default=iters, help="training iterations per variant")
    parser.add_argument("--out-dir", default="bench/results", help="where the JSON, Markdown and PNGs go")
    parser.add_argument("--eval-images", type=int, default=eval_images,
                        help="held-out evaluation images per occupation and model")
    parser.add_argument("--images-per-prompt", type=int, default=None,
                        help="training batch (default: the config's, 16)")
    parser.add_argument("--variants", default=",".join(variants), help=f"comma-separated subset of {variants}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per worker (default torch's)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the config's seed (training prompts and noise; the held-out evaluation uses seed + 1)")
    parser.add_argument("--work-dir", default=None,
                        help="training runs and evaluation reports (default: runs/<bench>, ignored by git)")
    add_worker_flag(parser)


def check_args(args, known: Sequence[str]) -> List[str]:
    """The chosen variants, after checking the numbers (ValueError naming the flag)."""
    chosen = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(chosen) - set(known))
    if unknown or not chosen:
        raise ValueError(f"--variants {args.variants!r}: choose from {', '.join(known)} (unknown: {unknown})")
    repeated = sorted({v for v in chosen if chosen.count(v) > 1})
    if repeated:  # the second run deleted the first's work folder and the table listed the variant twice
        raise ValueError(f"--variants {args.variants!r}: {', '.join(repeated)} named twice; name each once")
    seed = getattr(args, "seed", 0)
    if not 0 <= seed < 2 ** 32:  # the config's range: refused here, not in a worker's traceback
        raise ValueError(f"--seed {seed}: expected 0 to 2**32 - 1")
    for flag, value in (("--iters", args.iters), ("--eval-images", args.eval_images),
                        ("--images-per-prompt", args.images_per_prompt), ("--threads", getattr(args, "threads", None))):
        if value is not None and value < 1:  # None: the config's batch, torch's thread count
            raise ValueError(f"{flag} {value}: expected at least 1")
    return chosen


def base_spec(args, name: str, work_dir: Path) -> dict:
    """The worker spec fields every variant shares."""
    overrides = [f"seed={args.seed}"] + ([f"batch.images_per_prompt={args.images_per_prompt}"]
                                         if args.images_per_prompt is not None else [])
    return {"name": name, "overrides": overrides, "iters": args.iters, "out": str(work_dir / name),
            "eval_images": args.eval_images, "threads": args.threads}


def run_worker(script: str, spec: dict) -> dict:
    """``python script --worker SPEC`` in a fresh process; its stderr (progress bars) goes to ours."""
    began = time.perf_counter()
    result = spawn(script, spec, spec["name"], show_stderr=True)
    print(f"{Path(script).stem} {spec['name']}: {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    return result


def train_and_evaluate(spec: dict, prepare: Optional[Callable] = None) -> dict:
    """The worker body (module docstring). ``prepare(trainer)`` may patch the trainer before training.

    Returns {"name", "history": [per iteration {loss part: float}], "iteration_seconds", "seconds_per_iteration"
    (median), "eval_seconds", "trainable_parameters", "skipped_steps", "target", "coefficients", "lr", "batch",
    "steps", "guidance", "heldout": fastfair.demo.summarize_demo(...)}.
    """
    import torch
    from tqdm import tqdm

    from fastfair import checkpoint
    from fastfair.config import load_config, save_config
    from fastfair.demo import evaluate_heldout, summarize_demo
    from fastfair.trainer import Trainer, process_group

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out = Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)  # a stale run or image cache would be resumed, not remade
    cfg = load_config(CONFIG, list(spec["overrides"]) + [f"output_dir={out / 'train'}", "resume=",
                                                         f"max_steps={spec['iters']}"])
    history, seconds = [], []
    with process_group("cpu"):
        trainer = Trainer(cfg, "cpu")
        if prepare is not None:
            prepare(trainer)
        save_config(cfg, out / "train" / "config.yaml")  # the evaluation reads the run's config beside its checkpoints
        for it in tqdm(range(cfg.max_steps), desc=spec["name"]):
            began = time.perf_counter()
            history.append(trainer.iteration(it))
            seconds.append(time.perf_counter() - began)
        trainer.save(cfg.max_steps)
    began = time.perf_counter()
    final = checkpoint.checkpoint_dir(cfg.output_dir) / f"step_{cfg.max_steps:08d}"
    heldout = summarize_demo(evaluate_heldout(cfg, final, out / "eval", spec["eval_images"]))
    return {"name": spec["name"], "history": history, "iteration_seconds": seconds,
            "seconds_per_iteration": statistics.median(seconds), "eval_seconds": time.perf_counter() - began,
            "trainable_parameters": sum(p.numel() for p in trainer.model.parameters()),
            "skipped_steps": trainer.skipped, "target": cfg.finetune.target, "coefficients": cfg.sampler.coefficients,
            "lr": cfg.optim.lr, "batch": cfg.batch.images_per_prompt, "steps": cfg.sampler.num_steps,
            "grad_steps": cfg.sampler.grad_steps, "guidance": cfg.sampler.guidance_scale, "heldout": heldout}


def run_meta(args, result: dict) -> dict:
    """The settings a table states, from the CLI and a worker's result."""
    return {"iters": args.iters, "eval_images": args.eval_images, "threads": args.threads, "seed": args.seed,
            **{key: result.get(key) for key in ("batch", "steps", "grad_steps", "guidance", "lr")}}


def settings_line(meta: dict, finetuned: str, per: str) -> str:
    """The sentence above a table: what was trained, how long, and how it was evaluated."""
    differentiated = "" if meta.get("grad_steps") in (None, meta["steps"]) else (
        f" with the gradient through a random {meta['grad_steps']} of them per iteration")
    return (f"Toy world, gender config (fastfair/toy/configs/gender.yaml: {finetuned}, {meta['steps']}-step "
            f"DPM-Solver++{differentiated}, guidance {meta['guidance']}, lr {meta['lr']:g}, batch {meta['batch']}), "
            f"{meta['iters']} iterations per {per} from seed {meta.get('seed', 0)}: the same prompts and noise for "
            "each. Held-out: "
            f"{meta['eval_images']} images per held-out occupation and model, judged by the toy evaluation "
            "classifier; semantics: cosine to the original model's image from the same noise.")


def final_mean(history: List[dict], key: str = "loss", window: int = FINAL_WINDOW) -> float:
    """Mean of ``key`` over the last ``window`` iterations (all of them when fewer)."""
    values = [row[key] for row in history[-window:]]
    return sum(values) / len(values)


def heldout_row(result: dict) -> dict:
    """The held-out numbers a table shows, flattened from ``result["heldout"]``."""
    h = result["heldout"]
    return {"bias_before": h["before"]["gender_bias"], "bias_before_std": h["before"]["gender_bias_std"],
            "bias_after": h["after"]["gender_bias"], "bias_after_std": h["after"]["gender_bias_std"],
            "sim_latent": h["semantics"]["sim_latent"], "sim_layout": h["semantics"]["sim_layout"],
            "diversity_before": h["semantics"]["diversity_before"],
            "diversity_after": h["semantics"]["diversity_after"]}


def variant_rows(results: List[dict]) -> List[dict]:
    """The JSON's per-variant entries: the worker result with the table's numbers added."""
    return [{**r, "final_loss": final_mean(r["history"]), **heldout_row(r)} for r in results]


def write_outputs(out_dir, name: str, payload: dict, markdown: str, argv: Optional[Sequence[str]]) -> Path:
    """OUT_DIR/name.json and OUT_DIR/name.md (headed by the command that made them); returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = f"python bench/{name}.py " + " ".join(sys.argv[1:] if argv is None else argv)
    payload = {"command": command, "date": time.strftime("%Y-%m-%d"), **payload}
    # atomic: a failed write would leave the committed table cut short
    write_text(out_dir / f"{name}.json", json.dumps(payload, indent=1))
    write_text(out_dir / f"{name}.md", f"Command: `{command.strip()}` ({payload['date']}, CPU)\n\n{markdown}")
    return out_dir / f"{name}.json"

