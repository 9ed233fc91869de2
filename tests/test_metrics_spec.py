"""The evaluation metrics against the method's definitions (seed 0107, 0124, 0132, Tables 1-2), by hand.

Covers what tests/test_metrics.py and tests/test_evaluate.py leave open: hard (argmax) labels of the largest
face, CLIP-T / CLIP-I / DINO against known embeddings (CLIP-I must compare finetuned image j with *base* image
j), the joint cell order, non-uniform and zero-probability targets, prompts without any face, a single image,
the aggregation over prompts (population std, NaN prompts skipped) and that per_prompt.csv, metrics.json and
the summary agree, and the demo's before/after table.
"""
import csv
import itertools
import json
import math

import numpy as np
import pytest
import torch

from fastfair.classifiers.heads import Attribute, AttributeHead
from fastfair.evaluation.report import mean_pm_std, nan_to_null, protocol_note, write_csv
from fastfair.evaluation.scoring import Scorer, attribute_sets, images_per_set, pairwise_diversity, set_metrics
from fastfair.metrics import (bias, binary_delta, class_frequencies, frequency_metrics, joint_labels,
                              kl_divergence, mean_std, summarize)

EXACT = dict(abs=1e-12)


def paper_bias(freqs):
    """Seed 0124, literally: 1 / (K(K-1)/2) * sum_{i<j} |freq(i) - freq(j)|."""
    k = len(freqs)
    return sum(abs(freqs[i] - freqs[j]) for i in range(k) for j in range(i + 1, k)) / (k * (k - 1) / 2)


# --- bias (seed 0124) -----------------------------------------------------------------------------------------

def test_bias_two_classes_from_labels():
    labels = [0] * 9 + [1]                                  # freq (.9, .1)
    assert bias(class_frequencies(labels, 2).freqs) == pytest.approx(0.8, **EXACT)
    # the seed's Fig. 8 numbers are of this form: gender bias .84 <=> frequencies (.92, .08)
    assert bias([0.92, 0.08]) == pytest.approx(0.84, **EXACT)


def test_bias_three_classes_with_a_class_never_predicted():
    labels = [0, 0, 0, 1]                                   # freq (.75, .25, 0): class 2 never predicted
    freqs = class_frequencies(labels, 3).freqs
    assert freqs.tolist() == [0.75, 0.25, 0.0]
    # pairs: |.75-.25| = .5, |.75-0| = .75, |.25-0| = .25 -> 1.5 / 3
    assert bias(freqs) == pytest.approx(0.5, **EXACT)


def test_bias_of_a_joint_gender_race_table():
    # a 2 x 4 table of counts (gender rows, race columns), 20 images with a face
    table = np.array([[6, 2, 0, 2],
                      [4, 4, 1, 1]])
    gender = np.repeat([0, 1], table.sum(1))
    race = np.concatenate([np.repeat(np.arange(4), row) for row in table])
    cells = joint_labels([gender, race], [2, 4])
    freqs = class_frequencies(cells, 8).freqs
    assert freqs.tolist() == pytest.approx((table.ravel() / 20).tolist(), **EXACT)   # row-major cells
    assert bias(freqs) == pytest.approx(paper_bias(table.ravel() / 20), **EXACT)
    # marginals: gender (.5, .5) -> 0; race (.5, .3, .05, .15)
    assert bias(class_frequencies(gender, 2).freqs) == pytest.approx(0.0, **EXACT)
    assert bias(class_frequencies(race, 4).freqs) == pytest.approx(paper_bias([0.5, 0.3, 0.05, 0.15]), **EXACT)


def test_joint_cell_names_follow_the_label_order():
    """'<set>.freq.<g>/<r>' must be the frequency of exactly that gender and race (names and indices agree)."""
    classes = {"gender": ("female", "male"), "race": ("WMELH", "Asian", "Black", "Indian")}
    joint = attribute_sets(classes, {}, joint=["gender", "race"])[-1]
    labels = {"gender": np.array([1, 1, 1, 0]), "race": np.array([2, 2, 0, 3])}
    row = set_metrics(labels, joint, {"gender": 2, "race": 4})
    assert row["gender x race.freq.male/Black"] == pytest.approx(0.5)
    assert row["gender x race.freq.male/WMELH"] == pytest.approx(0.25)
    assert row["gender x race.freq.female/Indian"] == pytest.approx(0.25)
    assert sum(v for k, v in row.items() if ".freq." in k) == pytest.approx(1)


def test_bias_is_the_paper_formula_for_random_frequencies():
    rng = np.random.default_rng(0)
    for k in (2, 3, 4, 8, 16):
        freqs = rng.dirichlet(np.ones(k))
        assert bias(freqs) == pytest.approx(paper_bias(freqs), abs=1e-12)


# --- distances to a target (seed 0132: age 75 / 25) -------------------------------------------------------------

def test_total_variation_to_a_non_uniform_target():
    labels = [0, 0, 1, 1, 1, 1, 1, 1]                       # young .25, old .75; target young .75, old .25
    metrics = frequency_metrics(labels, 2, target=[0.75, 0.25])
    assert metrics["total_variation"] == pytest.approx(0.5, **EXACT)
    # bias ignores the target (seed 0124: "considers a perfectly balanced target distribution")
    assert metrics["bias"] == pytest.approx(0.5, **EXACT)
    assert frequency_metrics([0, 0, 0, 1], 2, target=[0.75, 0.25])["total_variation"] == pytest.approx(0, **EXACT)


def test_joint_target_is_the_product_of_the_marginals():
    """Age 75/25 in every gender cell (seed 0132's conditional target) = the product of the marginals."""
    classes = {"gender": ("female", "male"), "age": ("young", "old")}
    sets = attribute_sets(classes, {"age": [0.75, 0.25]}, joint=["gender", "age"])
    joint = sets[-1]
    assert joint.classes == ("female/young", "female/old", "male/young", "male/old")
    assert joint.target == pytest.approx((0.375, 0.125, 0.375, 0.125))
    # 8 faces: female young x3, female old x1, male young x1, male old x3
    labels = {"gender": np.array([0, 0, 0, 0, 1, 1, 1, 1]), "age": np.array([0, 0, 0, 1, 0, 1, 1, 1])}
    row = set_metrics(labels, joint, {"gender": 2, "age": 2})
    freqs = np.array([3, 1, 1, 3]) / 8
    assert row["gender x age.total_variation"] == pytest.approx(0.5 * np.abs(freqs - joint.target).sum(), **EXACT)
    assert row["gender x age.total_variation"] == pytest.approx(0.25, **EXACT)


def test_target_with_a_zero_probability_class():
    sets = attribute_sets({"age": ("young", "old")}, {"age": [1.0, 0.0]})
    row = set_metrics({"age": np.array([0, 0, 0, 1])}, sets[0], {"age": 2})
    assert row["age.total_variation"] == pytest.approx(0.25, **EXACT)
    assert math.isfinite(row["age.kl"]) and row["age.kl"] > 1        # floored, large, finite
    assert kl_divergence([1.0, 0.0], [1.0, 0.0]) == 0.0                # nothing in the excluded class: 0


@pytest.mark.parametrize("target", [[float("nan"), float("nan")], [float("nan"), 1.0]])
def test_target_with_nan_is_refused(target):
    """A NaN target passes `abs(sum - 1) > 1e-6` and `min < 0` (both False for NaN), so every TV / KL / FD of
    that attribute becomes NaN and the summary shows '—' instead of an error naming --target."""
    with pytest.raises(ValueError, match="--target gender"):
        attribute_sets({"gender": ("female", "male")}, {"gender": target})


# --- images without a face, a single image, no image ---------------------------------------------------------

def test_prompt_without_any_face_is_nan_and_left_out_of_the_mean():
    sets = attribute_sets({"gender": ("female", "male")}, {})
    rows = {"p0": set_metrics({"gender": np.array([0, 0, 0, 1])}, sets[0], {"gender": 2}),   # bias .5
            "p1": set_metrics({"gender": np.array([0, 1, -1, -1])}, sets[0], {"gender": 2}),  # bias 0
            "p2": set_metrics({"gender": np.array([-1, -1, -1, -1])}, sets[0], {"gender": 2})}  # no face
    counts = {"gender.num_images", "gender.no_face"}
    assert all(math.isnan(rows["p2"][key]) for key in set(rows["p2"]) - counts)  # bias, TV, KL, FD, delta, freqs
    assert (rows["p2"]["gender.num_images"], rows["p2"]["gender.no_face"]) == (4, 4)
    summary = summarize(rows)
    assert summary["gender.no_face"] == {"total": 6}
    assert summary["gender.bias"] == pytest.approx({"mean": 0.25, "std": 0.25, "count": 2}, **EXACT)
    assert summary["gender.freq.female"]["count"] == 2
    assert math.isnan(binary_delta(float("nan")))


def test_single_image_and_no_image():
    assert frequency_metrics([1], 2)["bias"] == 1.0                   # one face: one class has frequency 1
    assert frequency_metrics([3], 4)["bias"] == pytest.approx(0.5, **EXACT)   # 3 of 6 pairs differ by 1
    empty = frequency_metrics([], 2)
    assert math.isnan(empty["bias"]) and empty["num_images"] == 0 and empty["no_face"] == 0
    assert math.isnan(pairwise_diversity(torch.ones(1, 4)))


# --- aggregation over prompts -----------------------------------------------------------------------------------

def test_summary_is_population_std_over_prompts():
    values = [0.1, 0.4, 0.7]
    stats = mean_std(values)
    assert stats["mean"] == pytest.approx(0.4, **EXACT)
    assert stats["std"] == pytest.approx(math.sqrt(((0.3 ** 2) * 2) / 3), **EXACT)     # ddof = 0
    assert stats["std"] != pytest.approx(float(np.std(values, ddof=1)))


def test_csv_metrics_json_and_summary_agree(tmp_path):
    sets = attribute_sets({"gender": ("female", "male"), "race": ("a", "b", "c", "d")}, {"gender": [0.25, 0.75]},
                          joint=["gender", "race"])
    rng = np.random.default_rng(1)
    per_prompt = {}
    for p in range(5):
        found = rng.random(12) > (0.2 if p else 1.1)                  # prompt 0 has no face at all
        labels = {"gender": np.where(found, rng.integers(0, 2, 12), -1),
                  "race": np.where(found, rng.integers(0, 4, 12), -1)}
        row = {"num_images": 12, "no_face": int((~found).sum())}
        for s in sets:
            row.update(set_metrics(labels, s, {"gender": 2, "race": 4}))
        row.update(clip_t=float(rng.random()), diversity=float(rng.random()))
        per_prompt[f"prompt {p}"] = row
    summary = summarize(per_prompt)
    results = {"guidance": {"7.5": {"base": {"per_prompt": per_prompt, "summary": summary}}}}
    write_csv(results, tmp_path / "per_prompt.csv")
    with open(tmp_path / "per_prompt.csv", newline="") as handle:
        records = list(csv.DictReader(handle))
    assert [r["prompt"] for r in records] == list(per_prompt)
    for key in ("gender.bias", "race.bias", "gender x race.bias", "gender.total_variation", "clip_t", "diversity"):
        column = np.array([float(r[key]) for r in records])
        kept = column[~np.isnan(column)]
        assert summary[key]["count"] == kept.size == (4 if "." in key else 5)
        assert summary[key]["mean"] == pytest.approx(kept.mean(), abs=1e-12)
        assert summary[key]["std"] == pytest.approx(kept.std(ddof=0), abs=1e-12)
    assert summary["no_face"]["total"] == sum(int(r["no_face"]) for r in records)
    saved = json.loads(json.dumps(nan_to_null(results), allow_nan=False))
    assert saved["guidance"]["7.5"]["base"]["per_prompt"]["prompt 0"]["gender.bias"] is None


def test_summary_cell_formatting():
    assert mean_pm_std({"mean": 0.2349, "std": 0.1351, "count": 10}) == ".23±.14"
    assert mean_pm_std({"mean": -0.05, "std": 0.01, "count": 2}) == "-.05±.01"
    assert mean_pm_std({"mean": 0.5, "std": float("nan"), "count": 1}) == ".50"


# --- labels: hard argmax of the largest face --------------------------------------------------------------------

class RedClassifier(torch.nn.Module):
    """gender logits (m, -m) with m the crop's mean red value: red faces are 'female' (0), dark ones 'male'."""

    head = AttributeHead([Attribute("gender", ("female", "male"))])
    input_size = 8

    def forward(self, crops):
        m = crops[:, 0].mean(dim=(1, 2))
        return torch.stack([0.2 * m, -0.2 * m], dim=1)                # softmax ~ (.6, .4): argmax matters


def two_faces_or_none(rgb):
    """Green pixel (0, 0) selects the case: 0 -> a small red face and a large dark one; 255 -> no face;
    else one small red face."""
    green = rgb[0, 0, 1]
    small, large = (1, 6, 4, 9), (9, 5, 15, 11)
    return [small, large] if green < 64 else [] if green > 192 else [small]


def test_labels_are_the_argmax_of_the_largest_face():
    images = -torch.ones(3, 3, 16, 16)
    images[:, 0, :, :8] = 1                                           # left half red, right half dark
    images[1, 1], images[2, 1] = 1.0, 0.0                             # the detector's case selector
    scorer = Scorer({"gender": RedClassifier()}, two_faces_or_none, margin=0.0)
    labels = scorer.labels(images)["gender"]
    assert labels.tolist() == [1, -1, 0]       # the larger (dark) face, no face, the only (red) face
    # hard labels: 2 of 2 faces -> frequencies (.5, .5), not the mean probability (~.6 / ~.4 mixed)
    assert class_frequencies(labels, 2).freqs.tolist() == [0.5, 0.5]


# --- CLIP-T, CLIP-I, DINO, diversity (Table 1) -----------------------------------------------------------------

class FakeClip:
    """CLIP whose image embedding is the first 3 pixel values and whose text embedding is fixed."""

    text = torch.tensor([[1.0, 2.0, -1.0]])

    def get_image_features(self, pixel_values):
        return pixel_values.flatten(1)[:, :3]

    def get_text_features(self, input_ids, attention_mask=None):
        return self.text


class FakeTokens(dict):
    def to(self, device):
        return self


def fake_scorer():
    scorer = object.__new__(Scorer)
    scorer.device, scorer.batch_size, scorer.encoders = torch.device("cpu"), 2, {}
    scorer.clip, scorer.clip_preprocess = FakeClip(), (lambda x: x)
    scorer.clip_tokenizer = lambda texts, **_: FakeTokens(input_ids=torch.zeros(1, 4, dtype=torch.long))
    scorer.dino = lambda x: x.flatten(1)[:, 3:6]
    return scorer


def cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_clip_t_clip_i_dino_and_diversity_against_known_embeddings():
    g = torch.Generator().manual_seed(0)
    base, tuned = torch.randn(4, 3, 1, 2, generator=g, dtype=torch.float64), torch.randn(4, 3, 1, 2, generator=g,
                                                                                           dtype=torch.float64)
    scores = fake_scorer().semantics("a prompt", {"base": base, "finetuned": tuned})
    fb, ft, text = base.flatten(1), tuned.flatten(1), FakeClip.text[0].double()
    n = 4
    expected = {
        "base": {"clip_t": np.mean([cos(fb[j, :3], text) for j in range(n)]),
                 "diversity": np.mean([1 - cos(fb[i, 3:], fb[j, 3:]) for i, j in itertools.permutations(range(n), 2)])},
        "finetuned": {"clip_t": np.mean([cos(ft[j, :3], text) for j in range(n)]),
                      "clip_i": np.mean([cos(ft[j, :3], fb[j, :3]) for j in range(n)]),    # same noise j
                      "dino": np.mean([cos(ft[j, 3:], fb[j, 3:]) for j in range(n)]),
                      "diversity": np.mean([1 - cos(ft[i, 3:], ft[j, 3:])
                                            for i, j in itertools.permutations(range(n), 2)])}}
    for model, values in expected.items():
        for key, value in values.items():
            assert scores[model][key] == pytest.approx(value, abs=1e-6), (model, key)
    # CLIP-I pairs image j with image j: a shuffled base gives another value
    shuffled = fake_scorer().semantics("a prompt", {"base": base.flip(0), "finetuned": tuned})
    assert shuffled["finetuned"]["clip_i"] != pytest.approx(scores["finetuned"]["clip_i"], abs=1e-6)


# --- the demo's table -------------------------------------------------------------------------------------------

def test_demo_summary_reports_the_evaluation_means():
    from fastfair.demo import summarize_demo, table

    def summary(bias_values, tv_values, sim, diversity):
        return {"gender.bias": mean_std(bias_values), "gender.total_variation": mean_std(tv_values),
                "sim_latent": mean_std(sim), "diversity": mean_std(diversity), "no_face": {"total": 1}}

    results = {"guidance": {"3": {"base": {"summary": summary([0.8, 1.0], [0.4, 0.5], [1, 1], [0.5, 0.7])},
                                  "finetuned": {"summary": summary([0.2, 0.0], [0.1, 0.0], [0.9, 0.8], [0.7, 0.9])}}},
               "attribute_sets": [{"name": "gender"}], "prompts": ["a", "b"],
               "settings": {"images_per_prompt": 4, "semantic_encoders": ["latent"]}}
    metrics = summarize_demo(results)
    assert metrics["before"]["gender_bias"] == pytest.approx(0.9) and metrics["after"]["gender_bias"] == pytest.approx(0.1)
    assert metrics["before"]["gender_bias_std"] == pytest.approx(0.1)          # population std over prompts
    assert metrics["reduction"]["gender_bias"] == pytest.approx(1 - 0.1 / 0.9)
    assert metrics["semantics"]["sim_latent"] == pytest.approx(0.85)
    text = table(metrics)
    assert "| gender_bias ↓ | 0.900 ± 0.100 | 0.100 ± 0.100 | -89% |" in text
    assert "| diversity | 0.600 | 0.800 | +33% |" in text


def test_demo_reports_no_reduction_of_bias_toward_a_non_uniform_target():
    """Age 75/25: the paper's bias measures the distance from 50/50, which a model exactly on target has at 0.5;
    it is reported without ↓ or a reduction, the total variation to the target is the goal."""
    from fastfair.demo import summarize_demo, table

    def summary(bias_values, tv_values):
        return {"age.bias": mean_std(bias_values), "age.total_variation": mean_std(tv_values),
                "diversity": mean_std([0.5]), "no_face": {"total": 0}}

    results = {"guidance": {"3": {"base": {"summary": summary([0.9], [0.2])},
                                  "finetuned": {"summary": summary([0.5], [0.0])}}},
               "attribute_sets": [{"name": "age", "target": [0.75, 0.25]}], "prompts": ["a"],
               "settings": {"images_per_prompt": 4, "semantic_encoders": []}}
    metrics = summarize_demo(results)
    assert metrics["reduction"] == {"age_bias": None, "age_total_variation": 1.0}
    text = table(metrics)
    assert "| age_bias (from uniform; the target is not) | 0.900 ± 0.000 | 0.500 ± 0.000 |  |" in text
    assert "| age_total_variation ↓ | 0.200 ± 0.000 | 0.000 ± 0.000 | -100% |" in text


def test_demo_table_when_the_original_is_already_unbiased():
    """A reduction from 0 is undefined: n/a (null in metrics.json), not a ZeroDivisionError after training."""
    from fastfair.demo import summarize_demo, table

    def summary(bias_values, diversity):
        return {"gender.bias": mean_std(bias_values), "gender.total_variation": mean_std(bias_values),
                "diversity": mean_std(diversity), "no_face": {"total": 0}}

    results = {"guidance": {"3": {"base": {"summary": summary([0.0, 0.0], [0.0, 0.0])},
                                  "finetuned": {"summary": summary([0.2, 0.0], [0.1, 0.1])}}},
               "attribute_sets": [{"name": "gender"}], "prompts": ["a", "b"],
               "settings": {"images_per_prompt": 4, "semantic_encoders": []}}
    metrics = summarize_demo(results)
    assert metrics["reduction"]["gender_bias"] is None
    text = table(metrics)
    assert "| gender_bias ↓ | 0.000 ± 0.000 | 0.100 ± 0.100 | n/a |" in text and "| diversity | 0.000 | 0.100 | n/a |" in text
    json.dumps(nan_to_null(metrics), allow_nan=False)


# --- images per attribute set (seed 0124: 60 / 80 / 160) --------------------------------------------------------

def test_each_set_is_scored_on_the_papers_image_count_unless_one_is_given():
    sets = attribute_sets({"gender": ("female", "male"), "race": ("a", "b", "c", "d")}, {}, ["gender", "race"])
    assert max(images_per_set(sets).values()) == 160  # generated per prompt
    assert images_per_set(sets) == {"gender": 60, "race": 80, "gender x race": 160}
    assert images_per_set(sets, 40) == {"gender": 40, "race": 40, "gender x race": 40}
    note = protocol_note({"prompts": ["p"], "settings": {"images_per_set": images_per_set(sets),
                                                         "diversity_encoder": "dinov2"}})
    assert "gender 60, race 80, gender x race 160" in note and "dinov2" in note and "population" in note


def test_set_metrics_counts_only_the_first_images_of_a_prompt():
    labels = {"gender": np.array([0] * 60 + [1] * 100)}            # 160 images: the first 60 all class 0
    gender = attribute_sets({"gender": ("female", "male")}, {})[0]
    assert set_metrics(labels, gender, {"gender": 2}, 60)["gender.bias"] == pytest.approx(1.0, **EXACT)
    assert set_metrics(labels, gender, {"gender": 2})["gender.bias"] == pytest.approx(40 / 160, **EXACT)
