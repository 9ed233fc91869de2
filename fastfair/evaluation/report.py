"""Evaluation outputs from the results dict that `fastfair.evaluate.evaluate` builds.

results = {"settings": {...}, "prompts": [...], "attribute_sets": [{"name", "classes", "target"}],
           "guidance": {"<g>": {"<model>": {"per_prompt": {prompt: flat row}, "summary": {key: mean/std},
                                            "images": {prompt: [image paths]}}}}}
(image paths relative to the model's image cache: OUT/images, or for the base model settings["base_images"]
when it was given).

Files written under the output folder (paths relative to it, as the HTML links them):
- ``metrics.json``: the results dict (NaN, a metric without data, written as null);
- ``per_prompt.csv``: one row per (guidance, model, prompt);
- ``summary.md``: the seed's Tables 1-2 shape (models as rows; bias per attribute set, CLIP-T, CLIP-I, DINO
  as mean ± std over prompts), then the other protocols (TV, KL, FD, Delta) and the images without a face;
  a set whose target is not uniform heads with its TV to the target instead (``headline``);
- ``plots/g<g>_<set>.png``: Fig. 9: one class's frequency per prompt, base vs finetuned, with its target line;
- ``grids/g<g>/p<index>.png``: base images on the top row, finetuned below, the same noise per column;
- ``report.html``: one self-contained page (inline CSS, no scripts) with the tables, linking all of the above.
"""
from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence

from fastfair.files import atomic_path, write_text

MODEL_NAMES = {"base": "Original", "finetuned": "Finetuned"}
OTHER_PROTOCOLS = (("total_variation", "TV"), ("kl", "KL"), ("fairness_discrepancy", "FD"), ("delta", "Δ"))
SEMANTICS = (("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("dino", "DINO"))


def semantic_columns(results: dict) -> List[tuple]:
    """(key, label) of the semantics columns: CLIP-T / CLIP-I / DINO, a custom semantics model's encoders
    (``sim_<name>``), then the diversity of each model's images."""
    custom = [(f"sim_{name}", f"Sim {name}") for name in results["settings"].get("semantic_encoders", [])]
    return list(SEMANTICS) + custom + [("diversity", "Diversity")]


def mean_pm_std(stats) -> str:
    """{'mean': .67, 'std': .29} -> '.67±.29' (the seed's style); '—' when there is no value."""
    if not stats or stats.get("count", 0) == 0 or math.isnan(stats["mean"]):
        return "—"
    short = lambda x: f"{x:.2f}".replace("0.", ".", 1) if abs(x) < 1 else f"{x:.2f}"  # noqa: E731
    return short(stats["mean"]) + ("" if math.isnan(stats["std"]) else "±" + short(stats["std"]))


def plot_class(attribute_set: dict) -> str:
    """The class Fig. 9 plots: the one with the smallest target probability (the first on ties)."""
    target = attribute_set["target"]
    return attribute_set["classes"][target.index(min(target))]


def uniform_target(attribute_set: dict) -> bool:
    """Whether the set's target gives every class the same probability."""
    target = attribute_set["target"]
    return max(target) - min(target) <= 1e-9


def headline(attribute_set: dict) -> tuple:
    """(key, label) of a set's main column: the paper's bias, which measures the distance from balance, where
    the target is uniform; the total variation to the target otherwise (bias would rank a model exactly on a
    75/25 target below a 50/50 one)."""
    return ("bias", "Bias") if uniform_target(attribute_set) else ("total_variation", "TV")


def headline_key(attribute_set: dict) -> str:
    """The summary key of a set's headline, e.g. 'gender.bias'."""
    return f"{attribute_set['name']}.{headline(attribute_set)[0]}"


def other_protocols(attribute_set: dict) -> List[tuple]:
    """(key, label) of a set's further columns: TV, KL, FD and, for two classes, Delta (|0.5 - p| / 0.5, a
    distance from balance too, so only with a uniform target); the headline is not repeated."""
    main = headline(attribute_set)[0]
    return [(key, label) for key, label in OTHER_PROTOCOLS if key != main
            and (key != "delta" or (len(attribute_set["classes"]) == 2 and uniform_target(attribute_set)))]


def table_rows(results: dict) -> (List[str], List[List[str]]):
    """(header, rows) of the summary: per guidance scale and model, each set's headline then semantics, then
    the other protocols per set and the face-less count."""
    sets = results["attribute_sets"]
    face_less = no_face_columns(results)
    header = (["Guidance", "Model"] + [f"{headline(s)[1]} {s['name']} ↓" for s in sets]
              + [f"{label} ↑" for _, label in semantic_columns(results)]
              + [f"{label} {s['name']}" for s in sets for _, label in other_protocols(s)]
              + [label for label, _ in face_less])
    with_fid = any("fid" in data for models in results["guidance"].values() for data in models.values())
    header += ["FID ↓"] if with_fid else []
    rows = []
    for guidance, models in results["guidance"].items():
        for model, data in models.items():
            summary = data["summary"]
            row = [guidance, MODEL_NAMES.get(model, model)]
            row += [mean_pm_std(summary.get(headline_key(s))) for s in sets]
            row += [mean_pm_std(summary.get(key)) for key, _ in semantic_columns(results)]
            row += [mean_pm_std(summary.get(f"{s['name']}.{key}")) for s in sets for key, _ in other_protocols(s)]
            for _, key in face_less:
                scored = "num_images" if key == "no_face" else key.replace(".no_face", ".num_images")
                total = sum(row_.get(scored, 0) for row_ in data["per_prompt"].values())
                row.append(f"{summary.get(key, {}).get('total', 0)}/{total}")
            rows.append(row + ([f"{data['fid']:.2f}" if "fid" in data else "—"] if with_fid else []))
    return header, rows


def no_face_columns(results: dict) -> List[tuple]:
    """(label, summary key) of the face-less counts: one "No face" column where every set scores all of a
    prompt's images, else one per set over the images that set reads (the seed's protocol gives a gender set
    the first 60 of 160, so the all-image count would not be its denominator's)."""
    sets = results["attribute_sets"]
    rows = [row for models in results["guidance"].values() for data in models.values()
            for row in data["per_prompt"].values()]
    per_set = all(f"{s['name']}.num_images" in row for s in sets for row in rows)
    if not per_set or all(row[f"{s['name']}.num_images"] == row["num_images"] for s in sets for row in rows):
        return [("No face", "no_face")]
    return [(f"No face {s['name']}", f"{s['name']}.no_face") for s in sets]


def protocol_note(results: dict) -> str:
    """What the summary's numbers are over: images per set, the std, face-less images, diversity's embedding."""
    settings = results["settings"]
    counts = settings.get("images_per_set") or {}
    per_set = ", ".join(f"{name} {count}" for name, count in counts.items())
    return (f"Mean ± std (population) over {len(results['prompts'])} prompts. Bias and the other protocols per "
            f"prompt over its first images: {per_set or settings.get('images_per_prompt')} (the seed's 60 / 80 / "
            "160 for 2 / 4 / 8 classes unless --images-per-prompt was given); images without a face are left out "
            "of the class frequencies (counted under No face), and a prompt without any is left out of that "
            f"metric's mean.{_non_uniform_note(results)} " + (
                f"Diversity: mean pairwise 1 - cos in {settings['diversity_encoder']} embeddings."
                if settings.get("diversity_encoder") else
                "Diversity: not measured (no image embedding: give --clip, --dino or --semantics)."))


def _non_uniform_note(results: dict) -> str:
    names = [s["name"] for s in results.get("attribute_sets", []) if not uniform_target(s)]
    if not names:
        return ""
    return (f" {', '.join(names)}: the target is not uniform, so the table heads with the total variation to "
            "the target; the paper's bias and Delta, distances from balance, are in metrics.json only.")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def write_csv(results: dict, path: Path) -> None:
    columns: Dict[str, None] = {}
    records = []
    for guidance, models in results["guidance"].items():
        for model, data in models.items():
            for prompt, row in data["per_prompt"].items():
                records.append({"guidance": guidance, "model": model, "prompt": prompt, **row})
                columns.update(dict.fromkeys(records[-1]))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(records)


def write_plots(results: dict, folder: Path) -> List[Path]:
    """Fig. 9 per guidance scale and single-attribute set; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for guidance, models in results["guidance"].items():
        for attribute_set in results["attribute_sets"]:
            if len(attribute_set["attributes"]) != 1:
                continue
            name, cls = attribute_set["name"], plot_class(attribute_set)
            key = f"{name}.freq.{cls}"
            fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(results["prompts"]) + 2), 3.5))
            for model, style in (("finetuned", "o"), ("base", "s-")):
                if model in models:
                    values = [models[model]["per_prompt"][p][key] for p in results["prompts"]]
                    ax.plot(range(len(values)), values, style, label=MODEL_NAMES[model])
            target = attribute_set["target"][attribute_set["classes"].index(cls)]
            ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target {target:.0%}")
            ax.set_xticks(range(len(results["prompts"])))
            ax.set_xticklabels(prompt_labels(results["prompts"]), rotation=60, ha="right", fontsize=7)
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel(f"frequency of {name} = {cls}")
            ax.set_title(f"guidance {guidance}")
            ax.legend(fontsize=7)
            fig.tight_layout()
            paths.append(folder / f"g{guidance}_{_slug(name)}.png")
            with atomic_path(str(paths[-1])) as temporary:
                fig.savefig(temporary, dpi=100, format="png")
            plt.close(fig)
    return paths


def prompt_labels(prompts: Sequence[str], width: int = 32) -> List[str]:
    """Axis labels of prompts: the words they all share at the start and at the end left out ("a photo of the face
    of a librarian, a person" -> "librarian"), cut to `width` characters, and '$' escaped (matplotlib reads text
    between two as mathtext: a prompt with '$10' and '# $20' failed to draw)."""
    words = [p.split() for p in prompts]
    head = tail = 0
    if len(words) > 1:
        shortest = min(len(w) for w in words)
        while head < shortest - 1 and len({w[head] for w in words}) == 1:
            head += 1
        while tail < shortest - head - 1 and len({w[-1 - tail] for w in words}) == 1:
            tail += 1
    labels = [" ".join(w[head:len(w) - tail]).strip(" ,.;:") or p for w, p in zip(words, prompts)]
    labels = [label if len(label) <= width else label[:width - 1] + "…" for label in labels]
    return [label.replace("$", r"\$") for label in labels]


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text)


def write_grid(rows: Sequence[Sequence[Path]], path: Path) -> Path:
    """Image files in rows (base row over finetuned row) pasted into one PNG."""
    from PIL import Image

    images = [[Image.open(p).convert("RGB") for p in row] for row in rows]
    width, height = images[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in images), height * len(images)), "white")
    for y, row in enumerate(images):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(str(path)) as temporary:
        grid.save(temporary, format="PNG")
    return path


def _fingerprint(value) -> bool:
    """Whether a setting is a file fingerprint ({name: [size, mtime_ns]}), not a setting to read (images_per_set)."""
    return isinstance(value, dict) and bool(value) and all(isinstance(v, (list, tuple)) for v in value.values())


def write_html(results: dict, out: Path, files: Dict[str, List[str]]) -> Path:
    """report.html: settings, the summary table, links to the data files, the plots and the grids."""
    header, rows = table_rows(results)
    cell = lambda tag, text: f"<{tag}>{html.escape(str(text))}</{tag}>"  # noqa: E731
    table = ("<table><tr>" + "".join(cell("th", h) for h in header) + "</tr>"
             + "".join("<tr>" + "".join(cell("td", v) for v in row) + "</tr>" for row in rows) + "</table>")
    # file fingerprints (name: [size, mtime_ns]) are for the cache check and metrics.json, not for reading
    shown = {k: f"{len(v)} files" if _fingerprint(v) else v for k, v in results["settings"].items()}
    settings = "".join(f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>" for k, v in shown.items())
    links = " · ".join(f'<a href="{html.escape(f)}">{html.escape(f)}</a>' for f in files["data"])
    plots = "".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(f)}"></figure>' for f in files["plots"])
    grids = "".join(f'<figure><figcaption>{html.escape(caption)}</figcaption><a href="{html.escape(f)}">'
                    f'<img class="grid" src="{html.escape(f)}" alt="{html.escape(caption)}"></a></figure>'
                    for caption, f in files["grids"])
    finetuned = any("finetuned" in models for models in results["guidance"].values())
    rows_caption = "top: original, bottom: finetuned, same noise per column" if finetuned else "the original model"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fastfair evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:center}}img.grid{{image-rendering:pixelated;min-width:256px}}
figure{{display:inline-block;margin:0.5em}}</style></head><body>
<h1>fastfair evaluation</h1><ul>{settings}</ul>
<h2>Summary (mean ± std over {len(results["prompts"])} prompts)</h2>{table}
<p>{html.escape(protocol_note(results))}</p>
<p>Data: {links}</p><h2>Class frequency per prompt</h2>{plots}
<h2>Images ({rows_caption})</h2>{grids}
</body></html>
"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def nan_to_null(value):
    """NaN (a metric without data) -> None, so metrics.json is strict JSON."""
    if isinstance(value, dict):
        return {key: nan_to_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_null(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def write_report(results: dict, out, cache_roots: Dict[str, Path], grid_columns: int = 8) -> Dict[str, Path]:
    """Every output file of the module docstring; returns {kind: path} of the main ones. cache_roots: {model: the
    folder its images' paths are relative to}."""
    out = Path(out)
    write_text(out / "metrics.json", json.dumps(nan_to_null(results), indent=1, allow_nan=False))
    write_csv(results, out / "per_prompt.csv")
    header, rows = table_rows(results)
    (out / "summary.md").write_text("# fastfair evaluation\n\n" + markdown_table(header, rows) + "\n"
                                    + protocol_note(results) + "\n", encoding="utf-8")
    plots = write_plots(results, out / "plots")
    grids = []
    for guidance, models in results["guidance"].items():
        for index, prompt in enumerate(results["prompts"]):
            rows_of_files = [[Path(cache_roots[m]) / p for p in models[m]["images"][prompt][:grid_columns]]
                             for m in models]
            grids.append((f"guidance {guidance}: {prompt}",
                          write_grid(rows_of_files, out / "grids" / f"g{guidance}" / f"p{index:03d}.png")))
    relative = lambda p: Path(p).relative_to(out).as_posix()  # noqa: E731
    files = {"data": ["metrics.json", "per_prompt.csv", "summary.md"], "plots": [relative(p) for p in plots],
             "grids": [(caption, relative(p)) for caption, p in grids]}
    return {"html": write_html(results, out, files), "metrics": out / "metrics.json",
            "csv": out / "per_prompt.csv", "summary": out / "summary.md"}
