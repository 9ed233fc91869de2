"""The summary table's columns: the paper's bias where the target is uniform, the distance to it otherwise."""
import math

from fastfair.evaluation.report import protocol_note, table_rows
from fastfair.metrics import bias, kl_divergence, total_variation


def _stats(value):
    return {"mean": value, "std": 0.0, "count": 1}


def _summary(name, freqs, target):
    return {f"{name}.bias": _stats(bias(freqs)), f"{name}.total_variation": _stats(total_variation(freqs, target)),
            f"{name}.kl": _stats(kl_divergence(freqs, target)), f"{name}.fairness_discrepancy": _stats(0.0),
            f"{name}.delta": _stats(abs(0.5 - freqs[0]) / 0.5)}


def _results(models_freqs):
    """One prompt; gender uniform, age 75/25; models_freqs: {model: (gender freqs, age freqs)}."""
    sets = [{"name": "gender", "attributes": ["gender"], "classes": ["female", "male"], "target": [0.5, 0.5]},
            {"name": "age", "attributes": ["age"], "classes": ["young", "old"], "target": [0.75, 0.25]}]
    models = {}
    for model, (gender, age) in models_freqs.items():
        summary = {**_summary("gender", gender, [0.5, 0.5]), **_summary("age", age, [0.75, 0.25]),
                   "clip_t": _stats(float("nan")), "clip_i": _stats(float("nan")), "dino": _stats(float("nan")),
                   "diversity": _stats(0.3), "no_face": {"total": 0}}
        models[model] = {"summary": summary, "per_prompt": {"p": {"num_images": 4}}}
    return {"settings": {"images_per_set": {"gender": 60, "age": 60}}, "prompts": ["p"], "attribute_sets": sets,
            "guidance": {"7.5": models}}


def test_non_uniform_target_heads_with_distance_to_target():
    # base: age 50/50 (the paper's bias 0, but 0.25 from the target); finetuned: exactly on 75/25 (bias 0.5)
    results = _results({"base": ([0.5, 0.5], [0.5, 0.5]), "finetuned": ([0.5, 0.5], [0.75, 0.25])})
    header, rows = table_rows(results)
    assert header[2:4] == ["Bias gender ↓", "TV age ↓"]
    assert "Bias age ↓" not in header and "Δ age" not in header and "TV age" not in header[4:]
    assert "Δ gender" in header and "TV gender" in header  # a uniform set keeps every protocol
    base, tuned = (dict(zip(header, row)) for row in rows)
    assert base["TV age ↓"] == ".25±.00" and tuned["TV age ↓"] == ".00±.00"  # the finetuned model ranks first
    assert "KL age" in header and math.isclose(float(tuned["KL age"].split("±")[0]), 0.0, abs_tol=1e-12)
    note = protocol_note(results)
    assert "age: the target is not uniform" in note and "gender:" not in note


def test_uniform_targets_keep_the_papers_columns():
    results = _results({"base": ([0.9, 0.1], [0.5, 0.5])})
    results["attribute_sets"][1]["target"] = [0.5, 0.5]
    header, rows = table_rows(results)
    assert header[2:4] == ["Bias gender ↓", "Bias age ↓"] and "Δ age" in header
    assert dict(zip(header, rows[0]))["Bias gender ↓"] == ".80±.00"
    assert "not uniform" not in protocol_note(results)
    # diversity's embedding named, or said to be absent (it read "in no embeddings")
    results["settings"]["diversity_encoder"] = "clip"
    assert protocol_note(results).endswith("Diversity: mean pairwise 1 - cos in clip embeddings.")
    results["settings"]["diversity_encoder"] = None
    assert protocol_note(results).endswith("Diversity: not measured (no image embedding: give --clip, --dino or "
                                           "--semantics).")


def test_face_less_images_are_counted_over_each_sets_own_images():
    """The seed's protocol scores gender on a prompt's first 60 images and gender x race on all 160: the
    face-less count beside each must be over the images that set read."""
    results = _results({"base": ([0.5, 0.5], [0.5, 0.5])})
    data = results["guidance"]["7.5"]["base"]
    data["per_prompt"]["p"].update({"num_images": 160, "no_face": 9, "gender.num_images": 60, "gender.no_face": 2,
                                    "age.num_images": 160, "age.no_face": 9})
    data["summary"].update({"no_face": {"total": 9}, "gender.no_face": {"total": 2}, "age.no_face": {"total": 9}})
    header, rows = table_rows(results)
    cells = dict(zip(header, rows[0]))
    assert (cells["No face gender"], cells["No face age"]) == ("2/60", "9/160") and "No face" not in cells
    # every set over all of the prompt's images: one column
    data["per_prompt"]["p"].update({"gender.num_images": 160, "gender.no_face": 9})
    header, rows = table_rows(results)
    assert dict(zip(header, rows[0]))["No face"] == "9/160" and "No face gender" not in header


def test_summary_sums_each_sets_face_less_count():
    from fastfair.metrics import summarize

    rows = {"p": {"num_images": 4, "no_face": 3, "gender.no_face": 1, "gender.bias": 0.5},
            "q": {"num_images": 4, "no_face": 2, "gender.no_face": 2, "gender.bias": 0.1}}
    summary = summarize(rows)
    assert summary["no_face"] == {"total": 5} and summary["gender.no_face"] == {"total": 3}
    assert summary["gender.bias"]["mean"] == 0.3


def test_fig9_plots_the_class_with_the_smallest_target():
    from fastfair.evaluation.report import plot_class

    assert plot_class({"classes": ["young", "old"], "target": [0.75, 0.25]}) == "old"
    assert plot_class({"classes": ["female", "male"], "target": [0.5, 0.5]}) == "female"


def test_prompt_labels_keep_what_tells_the_prompts_apart_and_escape_dollars():
    from fastfair.evaluation.report import prompt_labels

    assert prompt_labels(["a photo of the face of a librarian, a person",
                          "a photo of the face of an air traffic controller, a person"]) == [
        "a librarian", "an air traffic controller"]
    assert prompt_labels(["a nurse"]) == ["a nurse"]  # one prompt: nothing shared to leave out
    assert prompt_labels(["a cook", "a cook at work"]) == ["cook", "cook at work"]  # one word stays at least
    assert prompt_labels(["x " * 40, "y " * 40])[0] == ("x " * 16)[:31] + "…"  # 32 characters
    assert prompt_labels(["a banker and $10 # $20", "a $ painter"]) == [r"banker and \$10 # \$20", r"\$ painter"]


def test_plots_draw_prompts_with_dollar_signs_and_the_page_shows_settings_as_they_are(tmp_path):
    """Text between two '$' is matplotlib mathtext: such a prompt stopped the report before report.html; a dict
    setting (images_per_set) is shown, only file fingerprints are counted; without a finetuned model the grids'
    heading does not speak of one."""
    from fastfair.evaluation.report import write_html, write_plots

    results = _results({"base": ([0.5, 0.5], [0.75, 0.25])})
    results["prompts"] = ["a banker and $10 # $20", r"a photo of a $\notacommand$ painter"]
    for model in results["guidance"]["7.5"].values():
        model["per_prompt"] = {p: {"gender.freq.female": 0.5, "age.freq.old": 0.25} for p in results["prompts"]}
    assert len(write_plots(results, tmp_path / "plots")) == 2
    results["settings"]["classifier_files"] = {"a.safetensors": [10, 123], "b.safetensors": [11, 124]}
    page = write_html(results, tmp_path, {"data": [], "plots": [], "grids": []}).read_text()
    assert "images_per_set: <code>{&#x27;gender&#x27;: 60, &#x27;age&#x27;: 60}</code>" in page
    assert "classifier_files: <code>2 files</code>" in page
    assert "Images (the original model)" in page and "finetuned" not in page
