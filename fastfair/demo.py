"""The README's main job: debias the shipped toy model on CPU, then measure it before and after.

    python -m fastfair.demo [--out DIR] [--config gender|gender_race|age|FILE] [--iters N]
                            [--images-per-prompt 40] [key=value ...]

1. Train: the toy config (``fastfair/toy/configs/<name>.yaml``: text-encoder LoRA, the adjusted DFT gradient
   through 20-step DPM-Solver++, alignment + semantics + face losses, the toy judges) with
   `fastfair.trainer.Trainer` into DIR/train; a rerun resumes there (and skips training once it is done).
2. Evaluate: the original and the finetuned model (EMA weights) on the held-out occupations, which training
   never saw, the same noise for both, judged by the toy world's *evaluation* classifier (another
   architecture and seed than the one in the loss) with `fastfair.evaluate` into DIR/eval (report.html,
   summary.md, per_prompt.csv, grids, plots); a rerun reuses its images only when they are of the same
   checkpoint and settings, else it clears DIR/eval and evaluates afresh.
3. Report: print the before/after table and write DIR/metrics.json
   ``{"before": {"<set>_bias": ..}, "after": {..}, "reduction": {..}, "semantics": {..}, ...}``,
   DIR/before_after.png (per held-out occupation, original row over finetuned row, same noise) and
   DIR/frequencies_<set>.png (Fig. 9: a class's frequency per occupation, before and after, target line).

Bias (the method's paragraph 0124): mean over class pairs of |freq_i - freq_j| per prompt, mean ± std over prompts.
Semantics: cos(E(finetuned_j), E(original_j)) of the toy encoders (``sim_latent``, ``sim_layout``,
`fastfair.toy.semantics`) and each model's image diversity (mean pairwise 1 - cos), to show no collapse.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from fastfair.cli import file_instead_of_folder
from fastfair.files import atomic_path, write_text

CONFIGS = {"gender": "pkg://fastfair.toy/configs/gender.yaml",
           "gender_race": "pkg://fastfair.toy/configs/gender_race.yaml",
           "age": "pkg://fastfair.toy/configs/age.yaml"}
EVAL_CLASSIFIER = "fastfair.toy:eval_classifier"
SEMANTICS = "fastfair.toy:toy_semantics"
GRID_COLUMNS = 8
DISPLAY_SCALE = 3
DEMO_MARKER = ".fastfair_demo"  # in the evaluation folder the demo made, which it may then delete and remake


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastfair.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output directory (default: out/demo for the gender config, "
                                      "out/demo_NAME for another, so that each config trains and resumes its own run)")
    parser.add_argument("--config", default="gender", help=f"one of {', '.join(CONFIGS)}, or a YAML file")
    parser.add_argument("--iters", type=int, help="training iterations (default: the config's max_steps)")
    parser.add_argument("--images-per-prompt", type=int, default=40, help="evaluation images per occupation")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("overrides", nargs="*", help="config key=value overrides, e.g. optim.lr=2e-3")
    args = parser.parse_args(argv)
    # checked before training: 0 would otherwise mean the default (--iters, --threads) or fail after it
    for flag, value in (("--iters", args.iters), ("--images-per-prompt", args.images_per_prompt),
                        ("--threads", args.threads)):
        if value is not None and value < 1:
            parser.error(f"{flag} {value}: expected at least 1")
    if args.out is not None and not args.out.strip():  # "" (an empty shell variable) would mean the default folder
        parser.error(f"--out {args.out!r}: empty; give a folder, or leave --out out for the default")
    if args.threads is not None and args.threads > 4 * (os.cpu_count() or 1):  # torch overflows at 2^31
        parser.error(f"--threads {args.threads}: this machine has {os.cpu_count()} CPUs")
    return args


def train(config: str, out: Path, iters, overrides: List[str]):
    """Train (or resume) into out; returns (config, the final checkpoint folder, whether this call trained)."""
    from fastfair import checkpoint
    from fastfair.config import load_config, repeated_override, validate
    from fastfair.trainer import Trainer, interrupted_message, process_group

    repeated = repeated_override(overrides)
    if repeated:
        raise ValueError(repeated)
    owned = [text for text in overrides if text.split("=", 1)[0].strip() in ("output_dir", "resume")]
    if owned:  # the demo sets both (below): the user's would be replaced without a word
        raise ValueError(f"{owned[0]}: the demo trains into --out and resumes what it finds there; give --out DIR")
    steps = [text for text in overrides if text.split("=", 1)[0].strip() == "max_steps"]
    if iters is not None and steps:  # --iters sets max_steps (below): one of the two would be dropped silently
        raise ValueError(f"--iters {iters} and {steps[0]} both set the training iterations: give one of them")
    if config not in CONFIGS:
        from fastfair.hooks import resolve_package_path

        config = resolve_package_path(config, "--config")  # pkg://PACKAGE/PATH, as the other tools take
        if not Path(config).is_file():
            raise ValueError(f"--config {config}: neither a shipped config ({', '.join(CONFIGS)}) nor a YAML file")
    saved = checkpoint.list_checkpoints(out, resumable=False)  # also weights-only ones
    trained = max(saved, default=0)
    extra = [f"output_dir={out}", "resume=auto"] + ([f"max_steps={iters}"] if iters is not None else [])
    cfg = load_config(CONFIGS.get(config, config), list(overrides) + extra)
    if cfg.data.split != "train":  # an override or a --config file: checked on the loaded config
        raise ValueError(f"data.split={cfg.data.split}: the demo evaluates on the held-out occupations as never seen "
                         "in training, and data.split=test trains on those very prompts; the demo trains on "
                         "data.split=train only (python -m fastfair.train and fastfair.evaluate take any split)")
    validate(cfg, world_size=1, device="cpu")  # max_steps=0 and the like, before the checkpoints are read
    if saved:  # first: advice on the iteration count is no use for a run of other settings
        _check_same_run(out, saved[trained], cfg)
    if trained > cfg.max_steps:
        given = f"--iters {iters}" if iters is not None else (steps[-1] if steps else None)
        if given:  # the trainer would name max_steps and output_dir, which the demo sets itself
            raise ValueError(f"{given}: {out} holds a run trained for {trained} iterations already; give "
                             f"{'--iters ' if iters is not None else 'max_steps='}{trained} or more to go on from it, "
                             "or another --out for a shorter run")
        # trained further with --iters earlier: evaluate it as it is
        print(f"{out} holds a run trained for {trained} iterations, past the config's {cfg.max_steps}: evaluating "
              f"it as it is (--iters N trains it on to N)")
        cfg.max_steps = trained
    if trained >= cfg.max_steps and not checkpoint.is_resumable(saved[trained]):
        # finished, and its state.pt deleted to save space: nothing to resume, and its weights are all that the
        # evaluation reads (the trainer would resume an earlier checkpoint and refuse to overwrite this one)
        print(f"{out}: trained to step {trained} already, nothing to train")
        return cfg, saved[trained], False
    if saved and not any(map(checkpoint.is_resumable, saved.values())):
        # the trainer's advice (another output_dir, resume='') names settings the demo sets itself
        raise ValueError(f"{out} holds checkpoints (steps {', '.join(map(str, sorted(saved)))}) of which none can "
                         f"be resumed (each lacks state.pt or a weight file), so training cannot go on to "
                         f"{cfg.max_steps}: give another --out, or move {out} away")
    trainer, hint = None, "the same command"  # resume=auto is the demo's own setting, not the user's
    try:
        with process_group("cpu"):
            trainer = Trainer(cfg, "cpu")
            trainer.resume_hint = hint
            trainer.train()
    except KeyboardInterrupt:  # the step reached and what a rerun continues from, as python fastfair/train.py says
        print(interrupted_message(cfg, trainer, hint), file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    saved = checkpoint.list_checkpoints(cfg.output_dir, resumable=False)
    return cfg, saved[max(saved)], trainer.step > trained


def _check_same_run(out: Path, newest: Path, cfg) -> None:
    """Refuse an --out whose newest checkpoint was trained with other settings (another --config, other overrides):
    the trainer would refuse the resume and suggest another output_dir, which the demo takes only as --out."""
    from fastfair import checkpoint
    from fastfair.config import describe_changes, resume_changes

    saved = checkpoint.trained_settings(newest)
    changes = resume_changes(saved, cfg) if saved is not None else {}
    if changes:
        raise ValueError(f"{out} holds a run trained with other settings: {describe_changes(changes)}; give another "
                         "--out for this one (each --config trains into its own by default), or the run's settings "
                         "to go on with it")


def target_cells(groups, names: List[str], classes: Dict[str, List[str]]) -> List[float]:
    """The target probability of each cell of the intersection of `names` (one attribute: its classes),
    row-major in `classes` order (the evaluation classifier's): per alignment group, the sum of its target over
    the cells that agree on the named attributes, multiplied over the groups (independent of each other). A
    conditional target (age given gender) is not the product of its marginals: its intersection is scored
    against this. groups: the targets' alignment groups (`fastfair.targets.Targets.groups`)."""
    import itertools

    cells = []
    for cell in itertools.product(*(classes[name] for name in names)):
        chosen, probability = dict(zip(names, cell)), 1.0
        for group in groups:
            probability *= sum(float(p) for classes_of, p in zip(group.cells, group.target)
                               if all(chosen.get(a, k) == k for a, k in zip(group.attributes, classes_of)))
        cells.append(probability)
    return cells


def evaluate_heldout(cfg, finetuned: Path, out: Path, images_per_prompt: int) -> dict:
    """`fastfair.evaluate.evaluate` on the held-out occupations with the toy judges (module docstring)."""
    from fastfair.evaluate import evaluate
    from fastfair.evaluation.cache import StaleCacheError
    from fastfair.evaluation.scoring import load_classifiers
    from fastfair.targets import load_targets
    from fastfair.toy import detect_faces, occupation_prompts

    trained = load_targets(cfg.targets)
    names = [a.name for a in trained.attributes]
    _, classes = load_classifiers([EVAL_CLASSIFIER], names)
    for name in names:
        if set(trained.attribute(name).classes) != set(classes[name]):
            raise ValueError(f"targets: {name} classes {sorted(trained.attribute(name).classes)} differ from the "
                             f"evaluation classifier's {sorted(classes[name])}; use its class names")
    groups = trained.groups()
    targets = {name: target_cells(groups, [name], classes) for name in names}
    if len(names) >= 2:  # the intersection evaluate scores by default: its cells as trained, not a product
        targets[",".join(names)] = target_cells(groups, names, classes)

    def run():
        return evaluate(cfg.model.pretrained, [EVAL_CLASSIFIER], occupation_prompts("test"), out,
                        finetuned=str(finetuned), attributes=names, targets=targets,
                        images_per_prompt=images_per_prompt, guidance_scales=(cfg.sampler.guidance_scale,),
                        num_steps=cfg.sampler.num_steps, seed=cfg.seed + 1, batch_size=40, detector=detect_faces,
                        margin=cfg.faces.margin, semantics=SEMANTICS, grid_columns=GRID_COLUMNS,
                        dtype=cfg.model.dtype)  # as the run sampled
    _claim_evaluation(out)
    try:
        return run()
    except StaleCacheError as error:  # the demo's own folder (_claim_evaluation): its images are of an earlier
        # checkpoint (a rerun trained further) or settings, and the report must describe this one: start afresh
        print(f"{out}: re-evaluating, the cached images are of other settings ({', '.join(error.changed)})")
        shutil.rmtree(out)
        _claim_evaluation(out)
        return run()


def _claim_evaluation(out: Path) -> None:
    """Mark ``out`` (the demo's evaluation folder) as the demo's, which it may delete to re-evaluate: a fresh or
    empty folder, or one an earlier demo wrote before the mark existed (its images are of a checkpoint of the
    demo's run beside it); anything else is refused, never deleted."""
    marker = out / DEMO_MARKER
    if marker.is_file():
        return
    if out.is_dir() and any(out.iterdir()):
        from fastfair.evaluation.cache import MANIFEST

        try:
            finetuned = json.loads((out / "images" / MANIFEST).read_text())["settings"]["finetuned"]
            ours = (out.parent / "train").resolve() in Path(finetuned).resolve().parents
        except (OSError, ValueError, KeyError, TypeError):
            ours = False
        if not ours:
            raise ValueError(f"--out {out.parent}: {out} holds files the demo did not write (its evaluation goes "
                             f"there, and a stale one is deleted); give another --out, or move {out}")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by python -m fastfair.demo: it may delete this folder to re-evaluate\n")


def _slug(name: str) -> str:
    return name.replace(" ", "_")


def summarize_demo(results: dict) -> dict:
    """The demo's metrics.json content from the evaluation results."""
    from fastfair.evaluation.report import uniform_target

    (guidance, models), = results["guidance"].items()
    before, after = models["base"]["summary"], models["finetuned"]["summary"]
    metrics = {"before": {}, "after": {}, "reduction": {}, "semantics": {}, "guidance_scale": float(guidance),
               "prompts": results["prompts"], "images_per_prompt": results["settings"]["images_per_prompt"],
               "not_goals": []}
    for attribute_set in results["attribute_sets"]:
        # the paper's bias is a distance from a uniform split: toward a non-uniform target (age 75/25) it is not
        # to be reduced, a model exactly on target scores 0.5; such rows are reported, without a reduction
        uniform = "target" not in attribute_set or uniform_target(attribute_set)
        for key in ("bias", "total_variation"):
            name = f"{_slug(attribute_set['name'])}_{key}"
            for side, summary in (("before", before), ("after", after)):
                metrics[side][name] = summary[f"{attribute_set['name']}.{key}"]["mean"]
                metrics[side][name + "_std"] = summary[f"{attribute_set['name']}.{key}"]["std"]
            change = _relative_change(metrics["before"][name], metrics["after"][name])
            if key == "bias" and not uniform:
                metrics["not_goals"].append(name)
                change = None
            metrics["reduction"][name] = None if change is None else -change
    for name in results["settings"]["semantic_encoders"]:
        metrics["semantics"][f"sim_{name}"] = after[f"sim_{name}"]["mean"]
    metrics["semantics"]["diversity_before"] = before["diversity"]["mean"]
    metrics["semantics"]["diversity_after"] = after["diversity"]["mean"]
    metrics["no_face"] = {"before": before["no_face"]["total"], "after": after["no_face"]["total"]}
    return metrics


def _relative_change(before: float, after: float):
    """after / before - 1, or None where it is undefined (an original model already at 0, or no faces: NaN)."""
    if not (math.isfinite(before) and math.isfinite(after)) or before == 0:
        return None
    return after / before - 1


def _percent(change) -> str:
    return "n/a" if change is None else f"{100 * change:+.0f}%"


def table(metrics: dict) -> str:
    """The before/after table (Markdown)."""
    lines = ["| held-out occupations | before | after | change |", "|---|---|---|---|"]
    for name, value in metrics["before"].items():
        if name.endswith("_std"):
            continue
        after = metrics["after"][name]
        goal = name not in metrics.get("not_goals", ())
        label = f"{name} ↓" if goal else f"{name} (from uniform; the target is not)"
        change = _percent(_relative_change(value, after)) if goal else ""
        lines.append(f"| {label} | {value:.3f} ± {metrics['before'][name + '_std']:.3f} | "
                     f"{after:.3f} ± {metrics['after'][name + '_std']:.3f} | {change} |")
    sem = metrics["semantics"]
    for key, value in sem.items():
        if key.startswith("sim_"):
            lines.append(f"| semantics {key} ↑ | 1 | {value:.3f} | |")
    lines.append(f"| diversity | {sem['diversity_before']:.3f} | {sem['diversity_after']:.3f} | "
                 f"{_percent(_relative_change(sem['diversity_before'], sem['diversity_after']))} |")
    return "\n".join(lines) + "\n"


def _enlarge(path: Path, scale: int) -> None:
    """Nearest-neighbour upscaling in place: 32x32 portraits are too small to read at 1:1."""
    from PIL import Image

    with Image.open(path) as image:
        large = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    with atomic_path(str(path)) as temporary:
        large.save(temporary, format="PNG")


def write_pictures(results: dict, eval_dir: Path, out: Path) -> List[Path]:
    """before_after.png (per prompt: original row over finetuned row, GRID_COLUMNS images) and the Fig. 9 plots."""
    from fastfair.evaluation.report import write_grid

    (guidance, models), = results["guidance"].items()
    root = eval_dir / "images"
    rows = [[root / path for path in models[m]["images"][prompt][:GRID_COLUMNS]]
            for prompt in results["prompts"] for m in ("base", "finetuned")]
    written = [write_grid(rows, out / "before_after.png")]
    _enlarge(written[0], DISPLAY_SCALE)
    for plot in sorted((eval_dir / "plots").glob(f"g{guidance}_*.png")):
        written.append(out / plot.name.replace(f"g{guidance}_", "frequencies_"))
        with atomic_path(str(written[-1])) as temporary:
            shutil.copyfile(plot, temporary)
    return written


def _quiet_libraries() -> None:
    """Keep the demo's output to its own progress bars and table: diffusers and transformers log load-time
    notes (float32 casts, image-processor fallbacks) that say nothing about the run, and bitsandbytes (imported
    by peft and diffusers when installed) warns that an optional hub kernel is missing."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def _earlier_metrics(path: Path) -> dict:
    """The metrics.json an earlier call wrote ({} when there is none or it cannot be read)."""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return earlier if isinstance(earlier, dict) else {}


def default_out(config: str) -> Path:
    """out/demo for the gender config, out/demo_NAME for another: a rerun resumes only its own config's run."""
    return Path("out/demo" if config == "gender" else f"out/demo_{Path(config).stem}")


def _check_out(out: Path) -> None:
    """Every path the demo writes under ``out``, checked before the work (the trainer would name output_dir, which
    the demo sets itself; a folder where metrics.json goes was found after training and evaluating), and its
    evaluation folder claimed (_claim_evaluation)."""
    problem = file_instead_of_folder("--out", out, "the demo's run and results")
    for folder in ("train", "eval"):
        if problem is None and (out / folder).exists() and not (out / folder).is_dir():
            problem = f"--out {out}: {out / folder} is a file, where the demo keeps its {folder} folder"
    written = [out / "metrics.json", out / "before_after.png", *sorted(out.glob("frequencies_*.png"))]
    for path in written:
        if problem is None and path.is_dir():
            problem = f"--out {out}: {path} is a folder, where the demo writes a file"
    if problem:
        raise ValueError(problem + "; give another --out or move it")
    if (out / "eval").is_dir():
        _claim_evaluation(out / "eval")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _quiet_libraries()
    out = Path(args.out) if args.out is not None else default_out(args.config)
    _check_out(out)
    began = time.perf_counter()
    cfg, final, trained_now = train(args.config, out / "train", args.iters, args.overrides)
    trained = time.perf_counter()
    results = evaluate_heldout(cfg, final, out / "eval", args.images_per_prompt)
    train_seconds = trained - began
    if not trained_now:  # the training time is the earlier call's, which trained: kept, not the loading time
        earlier = _earlier_metrics(out / "metrics.json")
        same = earlier.get("checkpoint") and Path(earlier["checkpoint"]).resolve() == final.resolve()
        train_seconds = earlier.get("seconds", {}).get("train") if same else None
    metrics = {**summarize_demo(results),
               "seconds": {"train": train_seconds, "evaluate": time.perf_counter() - trained},
               "config": args.config, "iterations": cfg.max_steps, "checkpoint": str(final)}
    from fastfair.evaluation.report import nan_to_null

    write_text(out / "metrics.json", json.dumps(nan_to_null(metrics), indent=1, allow_nan=False))
    pictures = write_pictures(results, out / "eval", out)
    print("\n" + table(metrics))
    training = ("trained earlier" if train_seconds is None
                else f"{train_seconds:.0f} s training" + ("" if trained_now else " (earlier)"))
    print(f"{training}, {metrics['seconds']['evaluate']:.0f} s evaluation; "
          f"wrote {out / 'metrics.json'}, " + ", ".join(str(p) for p in pictures)
          + f", and the full report {out / 'eval' / 'report.html'}")
    return metrics


if __name__ == "__main__":
    from fastfair.cli import user_errors

    with user_errors("python -m fastfair.demo"):
        main()
