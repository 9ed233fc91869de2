"""Evaluate a run's checkpoints and pick the best, as the method reports its results (paragraphs 0121-0123:
a checkpoint every 200 iterations, the best one reported):

    python -m fastfair.select_checkpoint RUN_DIR [--every 200] [--rank SET] [--min-semantics clip_i=0.8] \\
        --model SD --classifier CLF --prompts occupations:test --out DIR   (and any other flag of evaluate)

RUN_DIR: a training run's output folder (its checkpoints with weights, in step order); or give checkpoint or
export folders themselves (several). Each is evaluated by `fastfair.evaluate.evaluate` into DIR/<its folder
name>/ (a full report each); the base model's images are generated once, into DIR/base_images/, and shared,
so a sweep over n checkpoints samples n + 1 models' images, not 2n. Then DIR/selection.json, selection.md and
selection.png rank them (`fastfair.evaluation.selection`). Rerun the same command to resume: images already
cached are not generated again (each checkpoint is scored again, which costs little next to sampling).
Do not run two sweeps over one DIR at the same time (they would share DIR/base_images/'s manifest).
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from fastfair.evaluate import evaluate, evaluate_options, evaluation_parser
from fastfair.evaluation.cache import StaleCacheError
from fastfair.evaluation.selection import Candidate, check_floors, rank_keys, select, write_selection

BASE_IMAGES = "base_images"


def expand_checkpoints(folders: Sequence[str], every: Optional[int] = None) -> List[Tuple[str, Optional[int], Path]]:
    """[(name, step, folder)] in order: a run folder gives its checkpoints with weights by step (every: only the
    steps divisible by it), a checkpoint or export folder itself; names (the folders' names) must differ."""
    from fastfair.checkpoint import checkpoint_dir, checkpoint_step, list_checkpoints
    from fastfair.evaluation.sources import finetuned_kind

    if every is not None and every < 1:
        raise ValueError(f"--every {every}: expected a step interval >= 1 (e.g. 200, the method's)")
    found = []
    # absolute: the evaluations' image caches are keyed by the folder's path (a rerun spelling it otherwise
    # would be refused), and '.' has a name
    for folder in (Path(folder).resolve() for folder in folders):
        if checkpoint_dir(folder).is_dir() and not (folder / "weights.safetensors").is_file():
            steps = list_checkpoints(folder, resumable=False)
            if not steps:
                raise ValueError(f"{folder}: a training run's folder without a checkpoint with weights yet")
            found += [(path.name, step, path) for step, path in steps.items()]
        else:
            try:  # a clear error for anything else, before any evaluation
                finetuned_kind(folder, "checkpoints")
            except ValueError as error:
                raise ValueError(f"{error}; or a training run's folder (RUN, holding checkpoints/)") from None
            found.append((folder.name, checkpoint_step(folder), folder))
    # training order (the tie-break picks the earliest): by step, folders without one last, as given
    found.sort(key=lambda item: (item[1] is None, item[1] or 0))
    if every is not None:
        found = [item for item in found if item[1] is not None and item[1] % every == 0]
        if not found:
            raise ValueError(f"--every {every}: no checkpoint's step is a multiple of it")
    names = [name for name, _, _ in found]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"checkpoints named alike ({', '.join(repeated)}): their reports would share a folder; "
                         "sweep one run at a time, or evaluate each with python -m fastfair.evaluate --base-images "
                         "DIR (one DIR for all: its base images are shared)")
    if BASE_IMAGES in names:
        raise ValueError(f"a checkpoint folder named {BASE_IMAGES!r}: the sweep keeps the base images there; "
                         "rename the folder")
    return found


def parse_floors(items: Sequence[str]) -> dict:
    """['clip_i=0.8', ...] -> {'clip_i': 0.8, ...}."""
    floors = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            floors[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--min-semantics {item!r}: expected METRIC=VALUE, e.g. clip_i=0.8") from None
    return floors


def _check_floor_sources(min_semantics: dict, evaluate_kwargs: dict) -> None:
    """A floor on a metric no given model scores is refused before any image is made (the names of a
    --semantics model's encoders are checked after the first evaluation, `check_floors`)."""
    sources = {"clip_t": "clip", "clip_i": "clip", "dino": "dino"}
    for key in min_semantics:
        needed = "semantics" if key.startswith("sim_") else sources.get(key)
        if needed is None:
            raise ValueError(f"--min-semantics {key}: not a semantics metric; expected clip_t, clip_i, dino or "
                             "sim_<name> (a --semantics model's encoder)")
        if not evaluate_kwargs.get(needed):
            raise ValueError(f"--min-semantics {key}: scored only with --{needed}; give it, or drop the floor")


def select_checkpoint(checkpoints: Sequence[str], out, every: Optional[int] = None, rank_by: Optional[str] = None,
                      min_semantics: Optional[dict] = None, progress: bool = True, **evaluate_kwargs) -> dict:
    """Evaluate each checkpoint (module docstring) and write the selection; returns the selection dict with
    "evaluations": {name: evaluate's results}. evaluate_kwargs: `fastfair.evaluate.evaluate`'s, except out,
    finetuned and base_images, which the sweep sets."""
    from tqdm.auto import tqdm

    taken = {"out", "finetuned", "base_images"} & set(evaluate_kwargs)
    if taken:
        raise ValueError(f"select_checkpoint sets {', '.join(sorted(taken))} itself: leave them out")
    found = expand_checkpoints(checkpoints, every)
    min_semantics = dict(min_semantics or {})
    _check_floor_sources(min_semantics, evaluate_kwargs)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: a file; give a folder for the reports")
    candidates, evaluations = [], {}
    bar = tqdm(found, desc="checkpoints", unit="ckpt", disable=not progress)
    for name, step, folder in bar:
        bar.set_postfix_str(name)
        if not folder.is_dir():  # pruned by a run still training (keep_last) since it was listed
            warnings.warn(f"{folder}: deleted since the sweep started (a running training's keep_last?); skipped",
                          stacklevel=2)
            continue
        try:
            results = evaluate(out=out / name, finetuned=str(folder), base_images=out / BASE_IMAGES,
                               progress=progress, **evaluate_kwargs)
        except StaleCacheError as error:  # its fix names evaluate's flags; the sweep's folders all hang off --out
            raise StaleCacheError(error.problem, error.changed, "--out") from None
        if not candidates:  # a wrong --rank or floor is reported after the first evaluation, not the last
            rank_keys(results, rank_by)
            check_floors(results, min_semantics)
        candidates.append(Candidate(name, step, str(folder), results))
        evaluations[name] = results
    if not candidates:
        raise ValueError("every listed checkpoint was deleted before its evaluation; nothing to select from")
    guidance = next(iter(candidates[0].results["guidance"]))  # the first --guidance-scales value
    selection = select(candidates, guidance, rank_by, min_semantics)
    write_selection(selection, candidates[0].results, out)
    return {**selection, "evaluations": evaluations}


def parse_args(argv=None) -> argparse.Namespace:
    parser = evaluation_parser("Evaluate a run's checkpoints with shared base images and pick the best.",
                               finetuned=False)
    parser.add_argument("checkpoints", nargs="+",
                        help="a training run's folder (its checkpoints, in step order), or checkpoint / export "
                             "folders")
    parser.add_argument("--every", type=int, help="only checkpoints whose step is a multiple of N (e.g. 200)")
    parser.add_argument("--rank", help="the attribute set whose headline metric ranks the checkpoints (default: "
                                       "the mean over every evaluated set's); e.g. race, or 'gender x race' for the "
                                       "intersection")
    parser.add_argument("--min-semantics", action="append", default=[],
                        help="METRIC=VALUE: only checkpoints whose mean METRIC (clip_t, clip_i, dino, sim_<name>) "
                             "is at least VALUE can be the best (repeatable)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    options = evaluate_options(args)
    out = options.pop("out")
    floors = parse_floors(args.min_semantics)
    selection = select_checkpoint(args.checkpoints, out, args.every, args.rank, floors, **options)
    print(Path(out) / "selection.md")
    best = next((row for row in selection["checkpoints"] if row["name"] == selection["best"]), None)
    if best is None:
        print("best: none (no checkpoint is eligible)")
    else:
        print(f"best: {best['name']} ({best['folder']}); to use it: python -m fastfair.export {best['folder']} "
              "--out DIR")


if __name__ == "__main__":
    from fastfair.cli import user_errors

    with user_errors("python -m fastfair.select_checkpoint"):
        main()
