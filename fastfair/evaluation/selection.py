"""Rank a run's checkpoints by their evaluations (`fastfair.select_checkpoint`) and write the selection.

Input: one `fastfair.evaluate.evaluate` results dict per checkpoint, all made with the same base images,
prompts and scoring. At one guidance scale, a checkpoint's score is its headline metric (`report.headline`:
the paper's bias for a uniform target, the total variation to the target otherwise), mean over prompts, of the
attribute set ranked by, or the mean of every set's when none is named; each metric averaged over the same
prompts for every checkpoint: those every eligible-so-far checkpoint has a value on (`common_prompts`; a prompt
whose images show no face has none, and a mean over fewer, easier prompts would score better). A checkpoint is
eligible when it has a value on every prompt the original has one on (`faces_lost`: one that loses the faces of
the hardest prompts is not the method's aim) and every ``min_semantics``
floor holds (e.g. ``clip_i >= 0.8``: a low bias bought by images that no longer resemble the original's is not
the method's aim, Eq. 9-10). The best is the eligible checkpoint with the lowest score; on a tie, the earliest
(the least drift from the original).

Files under the sweep's folder:
- ``selection.json``: {"guidance", "rank_by", "rank_keys", "scored_prompts": {key: how many prompts the scores
  average}, "min_semantics", "best", "original": {metric: mean},
  "checkpoints": [{"name", "step", "folder", "score", "eligible", "why_not", "faces_lost_on": [prompt],
  "metrics": {metric: mean}}]};
- ``selection.md``: one row per checkpoint (the original first), its score and eligibility, each set's headline,
  the semantics and the fraction of images without a face;
- ``selection.png``: each set's headline over the training steps, the original's as a dashed line.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from fastfair.evaluation.report import headline, headline_key, markdown_table, nan_to_null, semantic_columns
from fastfair.files import atomic_path, write_text


@dataclass
class Candidate:
    """One evaluated checkpoint: its folder name, its training step (None for an export) and results dict."""

    name: str
    step: Optional[int]
    folder: str
    results: dict


def _means(results: dict, guidance: str, model: str) -> Dict[str, float]:
    """{metric: mean over prompts} of `model` at `guidance`: each set's headline and the semantics columns, and
    ``no_face``: the fraction of its scored images without a face."""
    data = results["guidance"][guidance][model]
    summary = data["summary"]
    keys = [headline_key(s) for s in results["attribute_sets"]]
    keys += [key for key, _ in semantic_columns(results)]
    means = {key: summary[key]["mean"] if key in summary else math.nan for key in keys}
    images = sum(row["num_images"] for row in data["per_prompt"].values())
    means["no_face"] = sum(row["no_face"] for row in data["per_prompt"].values()) / images if images else math.nan
    return means


def faces_lost(results: dict, guidance: str, keys: Sequence[str]) -> List[str]:
    """The prompts on which the finetuned model has no value of some key (no face in the images a set reads)
    where the original has one: the mean over prompts skips them, so a checkpoint that loses the faces of the
    hardest prompts would otherwise score better."""
    models = results["guidance"][guidance]
    base, tuned = models["base"]["per_prompt"], models["finetuned"]["per_prompt"]
    return [prompt for prompt, row in tuned.items()
            if any(_missing(row.get(key)) and not _missing(base[prompt].get(key)) for key in keys)]


def _missing(value) -> bool:
    return value is None or math.isnan(value)  # None: null in a results dict read back


def common_prompts(candidates: Sequence[Candidate], guidance: str, keys: Sequence[str]) -> Dict[str, List[str]]:
    """{key: the prompts on which every candidate's finetuned model has a value of key}."""
    rows = [candidate.results["guidance"][guidance]["finetuned"]["per_prompt"] for candidate in candidates]
    return {key: [prompt for prompt in rows[0] if all(not _missing(row[prompt].get(key)) for row in rows)]
            for key in keys}


def _score(candidate: Candidate, guidance: str, prompts: Dict[str, List[str]]) -> float:
    """The mean over keys of each key's mean over its prompts; NaN where a key has no prompt or no value."""
    row = candidate.results["guidance"][guidance]["finetuned"]["per_prompt"]
    means = []
    for key, scored in prompts.items():
        values = [row[prompt].get(key) for prompt in scored]
        if not values or any(_missing(value) for value in values):
            return math.nan
        means.append(math.fsum(values) / len(values))
    # fsum: the exact sum, whatever the order; a plain sum's rounding followed the prompt order, so two candidates
    # with the same values in other prompts scored 1 ulp apart and the tie went to the later one
    return math.fsum(means) / len(means)


def check_rank(rank_by: Optional[str], set_names: Sequence[str]) -> None:
    """A --rank naming no evaluated attribute set is refused, with the names there are."""
    if rank_by is not None and rank_by not in set_names:
        raise ValueError(f"--rank {rank_by}: not an evaluated attribute set; expected one of {', '.join(set_names)}")


def rank_keys(results: dict, rank_by: Optional[str]) -> List[str]:
    """The summary keys a score averages: the headline of set `rank_by`, or of every set when None."""
    sets = {s["name"]: s for s in results["attribute_sets"]}
    check_rank(rank_by, list(sets))
    chosen = [sets[rank_by]] if rank_by is not None else list(sets.values())
    return [headline_key(s) for s in chosen]


def check_floors(results: dict, min_semantics: Mapping[str, float]) -> None:
    """A floor on a metric the evaluation does not score is refused by name, with the ones it does."""
    summaries = [models["finetuned"]["summary"] for models in results["guidance"].values()]
    scored = [key for key, _ in semantic_columns(results) if key != "diversity"
              and any(summary.get(key, {}).get("count", 0) > 0 for summary in summaries)]
    unknown = [key for key in min_semantics if key not in scored]
    if unknown:
        raise ValueError(f"--min-semantics {unknown[0]}: not scored by this evaluation; scored: "
                         f"{', '.join(scored)} (clip_t and clip_i need --clip, dino --dino, sim_<name> --semantics)")


def select(candidates: Sequence[Candidate], guidance: str, rank_by: Optional[str] = None,
           min_semantics: Optional[Mapping[str, float]] = None) -> dict:
    """The selection dict of the module docstring (its "best" is None when no checkpoint is eligible)."""
    if not candidates:
        raise ValueError("no checkpoints to select from")
    min_semantics = dict(min_semantics or {})
    first = candidates[0].results
    keys = rank_keys(first, rank_by)
    check_floors(first, min_semantics)
    lost = {candidate.name: faces_lost(candidate.results, guidance, keys) for candidate in candidates}
    # scored on the prompts the checkpoints that keep the original's faces all have values on
    scored = common_prompts([c for c in candidates if not lost[c.name]] or candidates, guidance, keys)
    rows = []
    for candidate in candidates:
        metrics = _means(candidate.results, guidance, "finetuned")
        score = _score(candidate, guidance, scored)
        # a NaN semantics mean (no value) fails its floor: an unmeasured checkpoint is not selected
        below = [key for key, floor in min_semantics.items() if not metrics.get(key, math.nan) >= floor]
        unscored = [key for key, prompts in scored.items() if not prompts]
        why_not = (f"no face on {len(lost[candidate.name])} prompt(s) the original has faces on"
                   if lost[candidate.name] else
                   f"no prompt on which every checkpoint has a value of {', '.join(unscored)}" if unscored else
                   "below " + ", ".join(f"{key} >= {min_semantics[key]:g}" for key in below) if below else None)
        rows.append({"name": candidate.name, "step": candidate.step, "folder": candidate.folder, "score": score,
                     "eligible": why_not is None, "why_not": why_not, "faces_lost_on": lost[candidate.name],
                     "metrics": metrics})
    eligible = [row for row in rows if row["eligible"]]
    # min keeps the first of equal scores: the candidates come in training order (select_checkpoint sorts them)
    best = min(eligible, key=lambda row: row["score"])["name"] if eligible else None
    return {"guidance": guidance, "rank_by": rank_by or "mean of " + ", ".join(keys), "rank_keys": keys,
            "scored_prompts": {key: len(prompts) for key, prompts in scored.items()},
            "min_semantics": min_semantics, "best": best, "original": _means(first, guidance, "base"),
            "checkpoints": rows}


def _cell(value: float) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.3f}"


def selection_table(selection: dict, results: dict) -> str:
    """selection.md's Markdown: the original, then each checkpoint in order, the best marked."""
    # a semantics column no model has a value in (CLIP without --clip, ...) says nothing: left out
    rows_of_metrics = [selection["original"]] + [row["metrics"] for row in selection["checkpoints"]]
    metric_keys = [key for key in selection["original"]
                   if not all(metrics[key] is None or math.isnan(metrics[key]) for metrics in rows_of_metrics)]
    labels = {headline_key(s): f"{headline(s)[1]} {s['name']} ↓" for s in results["attribute_sets"]}
    labels.update({key: f"{label} ↑" for key, label in semantic_columns(results)})
    labels["no_face"] = "No face"
    header = ["Checkpoint", "Step", "Score ↓", "Eligible"] + [labels[key] for key in metric_keys]
    rows = [["Original", "—", "—", "—"] + [_cell(selection["original"][key]) for key in metric_keys]]
    for row in selection["checkpoints"]:
        name = f"**{row['name']}** (best)" if row["name"] == selection["best"] else row["name"]
        rows.append([name, "—" if row["step"] is None else str(row["step"]), _cell(row["score"]),
                     "yes" if row["eligible"] else f"no: {row['why_not']}"]
                    + [_cell(row["metrics"][key]) for key in metric_keys])
    floors = ", ".join(f"{key} >= {value:g}" for key, value in selection["min_semantics"].items()) or "none"
    best = selection["best"] or "none (no checkpoint is eligible)"
    counts = sorted(set(selection.get("scored_prompts", {}).values()))
    over = f"mean over the {'/'.join(map(str, counts))} prompts every checkpoint has a value on" if counts else \
        "mean over prompts"
    return (f"# Checkpoint selection\n\nGuidance {selection['guidance']}; score: {selection['rank_by']} ({over}); "
            f"semantics floors: {floors}. Best: {best}.\n\n" + markdown_table(header, rows))


def plot_selection(selection: dict, results: dict, path: Path) -> Optional[Path]:
    """selection.png: each set's headline per checkpoint (by step; by order where a step is unknown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = selection["checkpoints"]
    steps = [row["step"] for row in rows]
    x = steps if all(step is not None for step in steps) else list(range(len(rows)))
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for s in results["attribute_sets"]:
        key = headline_key(s)
        line, = axes.plot(x, [row["metrics"][key] for row in rows], marker="o", label=f"{headline(s)[1]} {s['name']}")
        axes.axhline(selection["original"][key], color=line.get_color(), linestyle="--", linewidth=1)
    for row, position in zip(rows, x):
        if row["name"] == selection["best"]:
            axes.axvline(position, color="grey", linewidth=1)
    axes.set_xlabel("training step" if x is steps else "checkpoint")
    axes.set_ylabel("mean over prompts (dashed: original)")
    axes.set_title(f"guidance {selection['guidance']}" + (f"; best {selection['best']}" if selection["best"] else ""))
    axes.legend(fontsize="small")
    figure.tight_layout()
    with atomic_path(str(path)) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
    return path


def write_selection(selection: dict, results: dict, out) -> Dict[str, Path]:
    """selection.json, selection.md and selection.png under out; returns their paths."""
    out = Path(out)
    files = {"json": out / "selection.json", "markdown": out / "selection.md", "plot": out / "selection.png"}
    write_text(files["json"], json.dumps(nan_to_null(selection), indent=1, allow_nan=False))
    write_text(files["markdown"], selection_table(selection, results))
    plot_selection(selection, results, files["plot"])
    return files
