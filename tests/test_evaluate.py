"""python -m fastfair.evaluate on tiny random models loaded from disk: outputs, HTML links, paired noise, resume."""
import csv
import json
import math
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastfair.evaluate import evaluate, main
from fastfair.evaluation.cache import from_png, paired_noise
from fastfair.evaluation.fid import frechet_distance
from fastfair.evaluation.report import mean_pm_std
from fastfair.evaluation.scoring import attribute_sets, images_per_set, set_metrics
from fastfair.evaluation.sources import resolve_model
from fastfair.testing import save_tiny_clip
from test_trainer_world import flatten_text_names, make_world, write_config

PROMPTS = ["a photo of the face of a nurse, a person", "a photo of the face of a pilot, a person"]


def odd_corner_has_no_face(rgb):
    """A detector: no face when the top-left red value is odd, else the centre half of the image."""
    h, w = rgb.shape[:2]
    return [] if rgb[0, 0, 0] % 2 else [(w / 4, h / 4, 3 * w / 4, 3 * h / 4)]


def save_identity_checkpoint(root: Path, world: dict) -> Path:
    """A text-LoRA training checkpoint whose LoRA B matrices are zero: the finetuned model equals the base."""
    from fastfair.checkpoint import save_checkpoint
    from fastfair.config import load_config
    from fastfair.finetune import FinetunedModel
    from fastfair.models import load_stable_diffusion

    cfg = load_config(write_config(root, world))
    (Path(cfg.output_dir)).mkdir(parents=True)
    (Path(cfg.output_dir) / "config.yaml").write_text((root / "config.yaml").read_text())
    parts = load_stable_diffusion(cfg.model.pretrained)
    model = FinetunedModel(parts.tokenizer, parts.text_encoder, parts.unet, cfg.finetune.target,
                           cfg.finetune.prefix_tokens, cfg.finetune.lora)
    weights = {name: p.detach() for name, p in model.trainable.items()}
    assert all(w.abs().max() == 0 for n, w in weights.items() if "lora_B" in n)  # peft's init: an identity
    return save_checkpoint(cfg.output_dir, 1, weights, weights, {})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    world = make_world(root)
    world["clip_full"] = save_tiny_clip(root / "clip_full")
    world["checkpoint"] = save_identity_checkpoint(root / "train", world)
    flatten_text_names(world["checkpoint"])  # evaluation reads either transformers layout (checkpoint.for_model)
    return world


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for key, value in attrs if key in ("href", "src")]


def run(files, out, **overrides):
    options = dict(model=str(files["sd"]), classifiers=[str(files["classifier"])], prompts=PROMPTS, out=out,
                   finetuned=str(files["checkpoint"]), images_per_prompt=3, guidance_scales=(2.0, 5.0), num_steps=2,
                   batch_size=2, detector=odd_corner_has_no_face, clip=str(files["clip_full"]),
                   dino=str(files["dino"]), device="cpu", progress=False)
    return evaluate(**{**options, **overrides})


def test_full_run_outputs_pairing_and_resume(files, tmp_path):
    out = tmp_path / "eval"
    results = run(files, out)
    assert len(results["generated"]) == 2 * 2 * 2 * 3  # guidance x model x prompt x image

    for name in ("metrics.json", "per_prompt.csv", "summary.md", "report.html", "images/manifest.json"):
        assert (out / name).is_file(), name
    links = Links()
    links.feed((out / "report.html").read_text())
    assert any(link.startswith("plots/") for link in links.links) and any("grids/g5/" in l for l in links.links)
    for link in links.links:
        assert (out / link).is_file(), link
    with open(out / "per_prompt.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 2 * 2 * 2

    metrics = json.loads((out / "metrics.json").read_text())
    no_faces = [row["no_face"] for models in metrics["guidance"].values() for data in models.values()
                for row in data["per_prompt"].values()]
    assert 0 < sum(no_faces) < 3 * len(no_faces)  # the run has images with and without a face
    for guidance, models in metrics["guidance"].items():
        for model, data in models.items():
            for p, prompt in enumerate(PROMPTS):
                # faces missing in the cached PNGs are counted, and only the rest are classified
                pixels = from_png([out / "images" / path for path in data["images"][prompt]])
                rgb = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                no_face = sum(not odd_corner_has_no_face(image) for image in rgb)
                row = data["per_prompt"][prompt]
                assert row["no_face"] == no_face and row["num_images"] == 3
                if no_face < 3:
                    assert row["gender.freq.female"] + row["gender.freq.male"] == pytest.approx(1)
            assert data["summary"]["no_face"]["total"] == sum(r["no_face"] for r in data["per_prompt"].values())
        # paired noise: the identity checkpoint reproduces every base image exactly
        for prompt in PROMPTS:
            base, tuned = (from_png([out / "images" / p for p in models[m]["images"][prompt]])
                           for m in ("base", "finetuned"))
            assert torch.equal(base, tuned)
            assert models["finetuned"]["per_prompt"][prompt]["clip_i"] == pytest.approx(1)
            assert models["finetuned"]["per_prompt"][prompt]["dino"] == pytest.approx(1)
            assert -1 <= models["base"]["per_prompt"][prompt]["clip_t"] <= 1

    # resume: exactly the deleted images are generated again, the others are not touched
    images = out / "images"
    deleted = ["g2/base/p000/0001.png", "g5/finetuned/p001/0002.png", "g5/base/p001/0000.png"]
    before = {p: p.stat().st_mtime_ns for p in images.rglob("*.png")}
    for path in deleted:
        (images / path).unlink()
    again = run(files, out)
    assert sorted(again["generated"]) == sorted(deleted)
    for path, mtime in before.items():
        if path.relative_to(images).as_posix() not in deleted:
            assert path.stat().st_mtime_ns == mtime
    assert json.loads((out / "metrics.json").read_text())["guidance"] == metrics["guidance"]

    with pytest.raises(ValueError, match="other settings.*steps"):
        run(files, out, num_steps=3)
    with pytest.raises(ValueError, match="other settings.*dtype"):  # images of another precision
        run(files, out, dtype="bf16")


def test_evaluating_a_runs_own_training_prompts_is_warned_of(files, tmp_path):
    """The world's run trains on the shipped occupations: 'nurse' is one of them, 'pilot' is not. A warning, not an
    error: measuring the training prompts can be deliberate."""
    quick = dict(images_per_prompt=1, guidance_scales=(2.0,), num_steps=1, clip=None, dino=None)
    with pytest.warns(UserWarning, match=r"--prompts: 1 of 2 evaluation prompts are among the prompts the finetuned "
                                         r"run trained on .*config.yaml\), e.g. 'a photo of the face of a nurse, a "
                                         r"person'"):
        run(files, tmp_path / "eval", **quick)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(files, tmp_path / "eval_heldout", prompts=PROMPTS[1:], **quick)
    assert not [w for w in caught if str(w.message).startswith(("--prompts:", "--finetuned:"))]  # held out, checked


def test_cli_with_exported_unet_and_prompt_file(files, tmp_path):
    from fastfair.testing import tiny_unet

    export = tmp_path / "export"
    tiny_unet(seed=1, cross_attention_dim=16).save_pretrained(export / "unet")
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS + ["a photo of the face of a chef, a person"]) + "\n")
    extractor = torch.jit.script(PixelStatistics())
    extractor.save(str(tmp_path / "features.pt"))
    reference = tmp_path / "reference"
    reference.mkdir()
    for index, size in enumerate((16, 24, 16)):  # sizes may differ
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            reference / f"{index}.png")
    out = tmp_path / "cli"
    main(["--model", str(files["sd"]), "--finetuned", str(export), "--classifier", str(files["classifier"]),
          "--prompts", str(prompt_file), "--max-prompts", "1", "--images-per-prompt", "2", "--steps", "2",
          "--guidance-scales", "3", "--detector", "none", "--target", "gender=0.25,0.75", "--device", "cpu",
          "--fid-reference", str(reference), "--fid-inception", str(tmp_path / "features.pt"), "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == PROMPTS[:1] and metrics["attribute_sets"][0]["target"] == [0.25, 0.75]
    models = metrics["guidance"]["3"]
    base, tuned = (from_png([out / "images" / p for p in models[m]["images"][PROMPTS[0]]]) for m in models)
    assert not torch.equal(base, tuned)  # the exported U-Net is used
    row = models["base"]["per_prompt"][PROMPTS[0]]
    assert row["no_face"] == 0 and row["clip_t"] is None  # detector "none"; no CLIP given (NaN -> null)
    assert row["gender.total_variation"] == pytest.approx(abs(row["gender.freq.female"] - 0.25))
    assert (out / "plots" / "g3_gender.png").is_file() and (out / "grids" / "g3" / "p000.png").is_file()
    summary = (out / "summary.md").read_text()  # a 25/75 target: the table heads with TV, not the paper's bias
    assert "TV gender ↓" in summary and "Bias gender" not in summary and "FID" in summary
    assert all(np.isfinite(models[m]["fid"]) and models[m]["fid"] > 0 for m in models)


class PixelStatistics(torch.nn.Module):
    """A stand-in Inception: uint8 [N, 3, H, W] -> per-channel mean and std [N, 6]."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().flatten(2) / 255
        return torch.cat([x.mean(-1), x.std(-1)], dim=1)


def test_frechet_distance_against_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 3))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    # 1-d: (mu_a - mu_b)^2 + var_a + var_b - 2 sqrt(var_a var_b)
    x, y = rng.normal(1, 2, (40, 1)), rng.normal(-1, 0.5, (30, 1))
    va, vb = x.var(ddof=1), y.var(ddof=1)
    expected = (x.mean() - y.mean()) ** 2 + va + vb - 2 * np.sqrt(va * vb)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-9)
    # a shift by d adds ||d||^2
    assert frechet_distance(a, a + [1.0, 2.0, 0.0]) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, a[:, :2])


@pytest.mark.filterwarnings("error")
def test_frechet_distance_with_fewer_images_than_dimensions():
    """Singular covariances (N < D, and dead feature columns): against tr (S_a S_b)^(1/2) = ||X_a X_b^T||_*, the
    nuclear norm of the centred cross matrix (X^T X = S), whose singular values are sqrt(eig(S_a S_b)); no
    complex parts, no warnings."""
    rng = np.random.default_rng(1)
    for n, m, d in ((5, 9, 300), (12, 12, 64)):
        a, b = rng.normal(size=(n, d)), rng.normal(0.2, 1.5, size=(m, d))
        a[:, :d // 2], b[:, :d // 2] = 0.0, 0.5  # dead features
        xa, xb = ((x - x.mean(0)) / np.sqrt(len(x) - 1) for x in (a, b))
        expected = (((a.mean(0) - b.mean(0)) ** 2).sum() + (xa ** 2).sum() + (xb ** 2).sum()
                    - 2 * np.linalg.svd(xa @ xb.T, compute_uv=False).sum())
        assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_paired_noise_is_independent_of_the_batch():
    full = paired_noise(7, "a prompt", [0, 1, 2], (4, 8, 8))
    assert torch.equal(paired_noise(7, "a prompt", [2], (4, 8, 8))[0], full[2])
    assert not torch.equal(full[0], full[1])
    assert not torch.equal(paired_noise(7, "another prompt", [0], (4, 8, 8))[0], full[0])


def test_intersection_metrics_and_defaults():
    classes = {"gender": ("female", "male"), "race": ("a", "b", "c", "d")}
    sets = attribute_sets(classes, {"gender": [0.25, 0.75]}, joint=["gender", "race"])
    joint = sets[-1]
    assert joint.name == "gender x race" and joint.num_classes == 8
    assert joint.target[0] == pytest.approx(0.25 / 4) and joint.target[4] == pytest.approx(0.75 / 4)
    # images generated per prompt (fastfair.evaluate): the largest count a set is scored on
    assert [max(images_per_set(part).values()) for part in (sets[:1], sets[1:2], sets)] == [60, 80, 160]
    # 4 images with a face: (female, a), (female, a), (male, b), (male, d); one without a face
    labels = {"gender": np.array([0, 0, 1, 1, -1]), "race": np.array([0, 0, 1, 3, 2])}
    row = set_metrics(labels, joint, {"gender": 2, "race": 4})
    freqs = np.array([0.5, 0, 0, 0, 0, 0.25, 0, 0.25])
    pairs = [abs(a - b) for i, a in enumerate(freqs) for b in freqs[i + 1:]]
    assert row["gender x race.bias"] == pytest.approx(sum(pairs) / 28)
    assert row["gender x race.total_variation"] == pytest.approx(0.5 * np.abs(freqs - joint.target).sum())
    gender = set_metrics(labels, sets[0], {"gender": 2, "race": 4})
    assert gender["gender.delta"] == pytest.approx(0) and gender["gender.freq.female"] == 0.5
    # each set counts its face-less images among those it reads: the first 4 of 5 have a face
    assert (row["gender x race.num_images"], row["gender x race.no_face"]) == (5, 1)
    first = set_metrics(labels, sets[0], {"gender": 2, "race": 4}, count=4)
    assert (first["gender.num_images"], first["gender.no_face"]) == (4, 0)
    with pytest.raises(ValueError, match="--target gender"):
        attribute_sets(classes, {"gender": [0.5, 0.6]})
    with pytest.raises(ValueError, match="--joint"):
        attribute_sets(classes, {}, joint=["gender", "age"])


def test_several_intersections_are_scored_side_by_side():
    """The paper's table: gender, race and gender x race from a gender/race/age classifier, beside the 16-cell
    intersection of all three, in one run (repeated --joint flags give comma-separated strings)."""
    from fastfair.evaluate import parse_args

    classes = {"gender": ("female", "male"), "race": ("a", "b", "c", "d"), "age": ("young", "old")}
    joint = parse_args(["--model", "m", "--classifier", "c", "--out", "o", "--joint", "gender,race",
                        "--joint", "gender, race, age"]).joint
    sets = attribute_sets(classes, {"age": [0.75, 0.25]}, joint=joint)
    assert [s.name for s in sets] == ["gender", "race", "age", "gender x race", "gender x race x age"]
    assert [s.num_classes for s in sets[3:]] == [8, 16]
    assert sets[4].target[0] == pytest.approx(0.5 * 0.25 * 0.75)
    # a list of lists, a flat list (one intersection) and '' (none) give what they say
    assert [s.name for s in attribute_sets(classes, {}, joint=[["race", "age"], ["gender", "age"]])][3:] == [
        "race x age", "gender x age"]
    assert [s.name for s in attribute_sets(classes, {}, joint=["race", "gender"])][3:] == ["race x gender"]
    assert len(attribute_sets(classes, {}, joint=[""])) == 3
    for bad, message in ((["gender,race", "age"], "--joint age: an intersection needs at least 2 attributes"),
                         (["gender,gender"], "--joint gender,gender: an attribute named twice"),
                         (["gender,race", "gender,race"], "--joint gender,race: given twice"),
                         (["gender,sex"], r"--joint gender,sex: \['sex'\] not among")):
        with pytest.raises(ValueError, match=message):
            attribute_sets(classes, {}, joint=bad)


def test_an_intersection_takes_a_joint_target_and_its_attributes_the_marginals():
    """A conditional target (young 90 % among women, 50 % among men) is not the product of its marginals: given as
    the intersection's cells it is scored as given, each attribute's marginal follows from it, and targets that
    disagree, a cell count that does not fit and an intersection that is not evaluated are refused."""
    from fastfair.evaluate import parse_args, _targets

    classes = {"gender": ("female", "male"), "age": ("young", "old")}
    cells = [0.45, 0.05, 0.25, 0.25]  # female/young, female/old, male/young, male/old
    sets = attribute_sets(classes, {"gender,age": cells}, joint=["gender", "age"])
    assert sets[-1].target == tuple(cells) and sets[-1].classes == ("female/young", "female/old", "male/young",
                                                                      "male/old")
    assert sets[0].target == pytest.approx((0.5, 0.5)) and sets[1].target == pytest.approx((0.7, 0.3))
    assert attribute_sets(classes, {"gender,age": cells, "age": [0.7, 0.3]}, joint=["gender", "age"])[1].target == (
        0.7, 0.3)
    for targets, joint, message in (
            ({"gender,age": cells, "age": [0.5, 0.5]}, ["gender", "age"],
             r"--target gender,age and --target age give age other targets \(\[0.7, 0.3\] and \[0.5, 0.5\]\)"),
            ({"gender,age": cells[:3]}, ["gender", "age"], r"--target gender,age: expected 4 probabilities \(cells "
                                                           r"female/young, female/old, male/young, male/old\)"),
            ({"gender,age": cells}, [""], "a target for an intersection that is not evaluated; add --joint gender,age"),
            ({"gender,sex": cells}, ["gender", "age"], r"--target gender,sex: not among the evaluated attributes")):
        with pytest.raises(ValueError, match=message):
            attribute_sets(classes, targets, joint=joint)
    given = parse_args(["--model", "m", "--classifier", "c", "--out", "o", "--target", "gender, age=0.45,0.05,0.25,0.25"])
    assert _targets(given.target) == {"gender,age": cells}
    # targets a rounding off 1 each (accepted within 1e-6): their product is scored, not refused for missing 1 by 2e-6
    near = attribute_sets(classes, {"gender": [0.4999996] * 2, "age": [0.4999996] * 2}, joint=["gender", "age"])
    assert math.isclose(sum(near[-1].target), 1.0, abs_tol=1e-12)


def test_every_intersection_is_scored_against_what_the_joint_targets_fix_of_it():
    """A joint target over gender x race x age also fixes gender x race (its marginal, not the product of the
    marginals); a joint target given in another order of its attributes is read in its own order; one that fixes
    part of a larger intersection enters it times the other attributes' targets; two that overlap inside one are
    refused."""
    classes = {"gender": ("f", "m"), "race": ("a", "b"), "age": ("y", "o")}
    g = np.array([0.3, 0.7])
    r_given_g = np.array([[0.2, 0.8], [0.6, 0.4]])
    a_given_r = np.array([[0.9, 0.1], [0.5, 0.5]])
    table = g[:, None, None] * r_given_g[:, :, None] * a_given_r[None, :, :]  # [gender, race, age]
    sets = attribute_sets(classes, {"gender,race,age": table.ravel().tolist()},
                          [["gender", "race", "age"], ["gender", "race"], ["age", "gender"]])
    by_name = {s.name: np.array(s.target) for s in sets}
    np.testing.assert_allclose(by_name["gender x race x age"], table.ravel(), atol=1e-15)
    np.testing.assert_allclose(by_name["gender x race"], table.sum(2).ravel(), atol=1e-15)
    np.testing.assert_allclose(by_name["age x gender"], table.sum(1).T.ravel(), atol=1e-15)
    np.testing.assert_allclose(by_name["race"], table.sum((0, 2)), atol=1e-15)
    # the same cells given in the order race, gender for the intersection --joint gender,race
    swapped = attribute_sets(classes, {"race,gender": table.sum(2).T.ravel().tolist()}, [["gender", "race"]])
    np.testing.assert_allclose(swapped[-1].target, table.sum(2).ravel(), atol=1e-15)
    # gender x race fixed, age's own target beside it
    partial = attribute_sets(classes, {"gender,race": table.sum(2).ravel().tolist(), "age": [0.75, 0.25]},
                             [["gender", "race"], ["gender", "race", "age"]])
    np.testing.assert_allclose(partial[-1].target, (table.sum(2)[:, :, None] * np.array([0.75, 0.25])).ravel(),
                               atol=1e-15)
    with pytest.raises(ValueError, match=r"--target gender,race and --target race,age both fix part of the "
                                         r"intersection gender x race x age: give its own --target"):
        attribute_sets(classes, {"gender,race": table.sum(2).ravel().tolist(),
                                 "race,age": table.sum(0).ravel().tolist()},
                       [["gender", "race"], ["race", "age"], ["gender", "race", "age"]])


def test_mean_pm_std_uses_the_seed_style():
    assert mean_pm_std({"mean": 0.674, "std": 0.29, "count": 3}) == ".67±.29"
    assert mean_pm_std({"mean": float("nan"), "std": float("nan"), "count": 0}) == "—"


def test_toy_model_name_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    files = pytest.importorskip("fastfair.toy.files")
    monkeypatch.setattr(files, "WEIGHTS_DIR", tmp_path / "no-weights")
    with pytest.raises(ValueError, match="toy weights are not installed"):
        resolve_model("toy")
    with pytest.raises(ValueError, match="not a registered name"):
        resolve_model(str(tmp_path / "missing"))


def test_pairwise_diversity_against_brute_force():
    from fastfair.evaluation.scoring import pairwise_diversity

    embeddings = torch.randn(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pairs = [1 - torch.nn.functional.cosine_similarity(embeddings[i], embeddings[j], dim=0).item()
             for i in range(5) for j in range(5) if i != j]
    assert pairwise_diversity(embeddings) == pytest.approx(np.mean(pairs), abs=1e-12)
    assert pairwise_diversity(embeddings[:1].repeat(4, 1)) == pytest.approx(0, abs=1e-12)  # a collapsed set
    assert np.isnan(pairwise_diversity(embeddings[:1]))


def test_custom_semantics_model_is_scored_and_reported(files, tmp_path):
    """A SemanticsLoss (here the toy world's) scores finetuned vs base per encoder; its columns reach the table."""
    from fastfair.toy import toy_semantics

    out = tmp_path / "eval"
    results = run(files, out, clip=None, dino=None, guidance_scales=(2.0,), semantics=toy_semantics())
    assert results["settings"]["semantic_encoders"] == ["latent", "layout"]
    models = results["guidance"]["2"]
    for prompt in PROMPTS:  # the identity checkpoint: the same images, so similarity 1 and equal diversity
        row = models["finetuned"]["per_prompt"][prompt]
        assert row["sim_latent"] == pytest.approx(1) and row["sim_layout"] == pytest.approx(1)
        assert row["diversity"] == pytest.approx(models["base"]["per_prompt"][prompt]["diversity"])
        assert row["diversity"] > 0
        assert np.isnan(row["clip_i"])
    summary = (out / "summary.md").read_text()
    assert "Sim latent" in summary and "Sim layout" in summary and "Diversity" in summary


def _chromium():
    import shutil

    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 for path in [shutil.which(name)] if path), None)


@pytest.mark.skipif(_chromium() is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(files, tmp_path):
    """The report as a browser shows it: its pictures load (a copy without them renders differently)."""
    import shutil
    import subprocess

    out = tmp_path / "eval"
    run(files, out, guidance_scales=(2.0,))
    bare = tmp_path / "bare"
    shutil.copytree(out, bare)
    shutil.rmtree(bare / "grids")
    shutil.rmtree(bare / "plots")

    def screenshot(folder: Path) -> np.ndarray:
        png = folder.parent / f"{folder.name}.png"
        subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={folder.parent / (folder.name + '-profile')}", "--window-size=1000,2400",
                        f"--screenshot={png}", (folder / "report.html").as_uri()],
                       check=True, capture_output=True, timeout=120)
        return np.asarray(Image.open(png).convert("RGB"))

    full, without = screenshot(out), screenshot(bare)
    assert full.shape == without.shape and full.std() > 0
    assert (full != without).any(axis=-1).mean() > 0.01  # the plots and grids are drawn


def test_a_clip_folder_without_the_text_tower_is_refused_by_name(tmp_path):
    """CLIP-T needs both towers: a vision-only folder (model_type clip_vision_model) crashed inside transformers."""
    from fastfair.evaluation.scoring import _load_clip
    from fastfair.testing import save_tiny_semantic_encoders

    vision_only, _ = save_tiny_semantic_encoders(tmp_path)
    with pytest.raises(ValueError, match=r"--clip \S+: expected a local transformers CLIPModel folder .*found "
                                         r"model_type 'clip_vision_model'"):
        _load_clip(vision_only, "cpu")
    with pytest.raises(ValueError, match="found no config.json"):
        _load_clip(tmp_path / "nothing", "cpu")


def test_default_run_generates_the_largest_set_count_and_scores_the_intersection(files, tmp_path, monkeypatch):
    """Without --images-per-prompt each set reads its own first images and the largest count is generated; with
    several attributes and no --joint their intersection is scored too (here 2 / 3 / 4 images stand in for the
    paper's 60 / 80 / 160, to keep the run small)."""
    from fastfair.classifiers import AttributeClassifier, head_from_names, save_classifier
    import fastfair.evaluate as evaluate_module

    torch.manual_seed(1)
    race = tmp_path / "race.safetensors"
    save_classifier(AttributeClassifier(head_from_names(["race"]), "small_cnn", input_size=16, width=4), str(race))
    monkeypatch.setattr(evaluate_module, "images_per_set",
                        lambda sets, n=None: {s.name: {2: 2, 4: 3, 8: 4}[s.num_classes] for s in sets})
    results = run(files, tmp_path / "eval", classifiers=[str(files["classifier"]), str(race)], images_per_prompt=None,
                  guidance_scales=(2.0,), clip=None, dino=None, finetuned=None)
    assert [s["name"] for s in results["attribute_sets"]] == ["gender", "race", "gender x race"]
    assert results["settings"]["images_per_prompt"] == 4 and len(results["generated"]) == 2 * 4
    row = results["guidance"]["2"]["base"]["per_prompt"][PROMPTS[0]]
    assert row["num_images"] == 4
    assert [row[f"{name}.num_images"] for name in ("gender", "race", "gender x race")] == [2, 3, 4]


def test_the_first_classifier_that_predicts_an_attribute_judges_it(tmp_path):
    from fastfair.classifiers import load_classifier
    from fastfair.evaluation.scoring import load_classifiers
    from fastfair.testing import save_tiny_classifier

    first, second = save_tiny_classifier(tmp_path / "a.safetensors", 0), save_tiny_classifier(tmp_path / "b.safetensors", 1)
    judges, classes = load_classifiers([str(first), str(second)])
    expected = load_classifier(str(first)).network.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in judges["gender"].network.state_dict().items())
    assert classes == {"gender": ("female", "male")}


def test_the_classifier_judges_the_largest_face_cropped_with_the_margin():
    from fastfair.classifiers import head_from_names
    from fastfair.evaluation.scoring import Scorer
    from fastfair.faces import CallableDetector, crop_boxes

    class Recording(torch.nn.Module):
        head, input_size = head_from_names(["gender"]), 8

        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, crops):
            self.seen.append(crops.clone())
            return torch.zeros(len(crops), 2)

    classifier = Recording()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scorer = Scorer({"gender": classifier}, CallableDetector(lambda rgb: [(4, 6, 12, 10)]), margin=0.5)
    assert scorer.labels(images)["gender"].tolist() == [0, 0]
    # the 8 x 4 box made square (side 8 x 1.5) around its centre (8, 8), shrunk as a resized picture (a
    # classifier that does not say otherwise was trained on such: fastfair's, the public code's)
    expected = crop_boxes(images, torch.tensor([[2.0, 2.0, 14.0, 14.0]] * 2), 8, antialias=True)
    torch.testing.assert_close(classifier.seen[0], expected)
    classifier.antialias, classifier.seen = False, []  # one trained on bilinear samples of boxes (the toy's)
    scorer.labels(images)
    torch.testing.assert_close(classifier.seen[0], crop_boxes(images, torch.tensor([[2.0, 2.0, 14.0, 14.0]] * 2), 8))


def test_diversity_is_measured_in_the_first_semantic_encoder():
    from fastfair.evaluation.scoring import Scorer, pairwise_diversity

    class Mean(torch.nn.Module):
        def forward(self, images):
            return images.mean(dim=(2, 3))

    semantics = torch.nn.Module()
    semantics.encoders = torch.nn.ModuleDict({"pixels": torch.nn.Flatten(), "mean": Mean()})
    scorer = Scorer({}, "none", semantics=semantics)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scores = scorer.semantics("a prompt", {"base": images})
    assert scorer.diversity_encoder == "pixels"
    assert scores["base"]["diversity"] == pytest.approx(pairwise_diversity(images.flatten(1)))
    assert scores["base"]["diversity"] != pytest.approx(pairwise_diversity(images.mean(dim=(2, 3))))


def test_a_cached_image_of_another_prompt_is_generated_again(tmp_path):
    """The prompt list changed under the same --out: image p000/0000 now shows another prompt, so it is missing."""
    from fastfair.evaluation.cache import ImageCache, Job, image_path

    settings = {"seed": 0, "model": "m"}
    cache = ImageCache(tmp_path / "images", settings)
    job = Job(image_path(2.0, "base", 0, 0), "base", 2.0, 0, "a photo of a nurse", 0)
    cache.store([job], torch.zeros(1, 3, 4, 4))
    reopened = ImageCache(tmp_path / "images", settings)
    other = Job(job.path, "base", 2.0, 0, "a photo of a pilot", 0)
    assert reopened.has(job) and not reopened.has(other) and reopened.missing([job, other]) == [other]


def test_a_target_with_another_number_of_classes_is_refused():
    classes = {"gender": ("female", "male")}
    with pytest.raises(ValueError, match="--target gender: expected 2 probabilities"):
        attribute_sets(classes, {"gender": [0.2, 0.3, 0.5]})


def test_a_non_square_model_is_sampled_at_its_own_shape(files, tmp_path):
    """A U-Net config's sample_size may be a [height, width] pair: evaluate, generate and the trainer use it."""
    import shutil

    from fastfair.config import load_config
    from fastfair.generate import main as generate_main
    from fastfair.trainer import Trainer, process_group
    from test_trainer_world import write_config

    model = shutil.copytree(files["sd"], tmp_path / "wide")
    config = json.loads((model / "unet" / "config.json").read_text())
    (model / "unet" / "config.json").write_text(json.dumps({**config, "sample_size": [8, 12]}))
    results = run(files, tmp_path / "eval", model=str(model), finetuned=None, images_per_prompt=2,
                  guidance_scales=(5.0,), prompts=PROMPTS[:1], clip=None, dino=None, detector="none")
    assert results["settings"]["resolution"] == [16, 24]  # the VAE's factor 2
    image = Image.open(tmp_path / "eval" / "images" / results["generated"][0])
    assert image.size == (24, 16)  # PIL: (width, height)
    generate_main(["--model", str(model), "--prompt", PROMPTS[0], "--num-images", "1", "--steps", "2",
                   "--out", str(tmp_path / "gen")])
    assert Image.open(next((tmp_path / "gen").glob("*.png"))).size == (24, 16)
    with process_group():
        trainer = Trainer(load_config(write_config(tmp_path / "run", {**files, "sd": model})))
        assert trainer.latent_shape == (4, 8, 12)
        square = Trainer(load_config(write_config(tmp_path / "run2", {**files, "sd": model}),
                                     ["model.resolution=32"]))
        assert square.latent_shape == (4, 16, 16)  # model.resolution: a square of that side


def test_a_square_model_s_images_are_keyed_by_their_side(files, tmp_path):
    """Caches written before [height, width] pairs were read stay valid: a square model's resolution is an int."""
    results = run(files, tmp_path / "eval", finetuned=None, images_per_prompt=1, guidance_scales=(5.0,),
                  prompts=PROMPTS[:1], clip=None, dino=None, detector="none")
    width, height = Image.open(tmp_path / "eval" / "images" / results["generated"][0]).size
    assert width == height and results["settings"]["resolution"] == width


@pytest.mark.parametrize("changed", [dict(classifiers=["other.pt"]), dict(attributes=["gender"]),
                                     dict(targets={"gender": [0.2, 0.8]}), dict(joint=[]), dict(device="meta"),
                                     dict(classifier_head=["gender:female,male"])],
                         ids=["classifiers", "attributes", "targets", "joint", "device", "classifier_head"])
def test_classifiers_held_between_evaluations_are_loaded_again_under_other_settings(monkeypatch, changed):
    import fastfair.evaluate as evaluate_module
    from fastfair.evaluation.shared import SharedLoads

    loaded = []

    def load_classifiers(classifiers, attributes, device, classifier_head):
        loaded.append((list(classifiers), attributes, device, classifier_head))
        return {}, {"gender": ["female", "male"], "race": ["a", "b", "c", "d"]}

    monkeypatch.setattr(evaluate_module, "load_classifiers", load_classifiers)
    shared = SharedLoads()
    first = dict(classifiers=["gender.pt"], attributes=None, targets=None, joint=None, device="cpu",
                 classifier_head=None)
    held = evaluate_module.evaluated_sets(**first, shared=shared)
    assert evaluate_module.evaluated_sets(**first, shared=shared) is held and len(loaded) == 1
    second = {**first, **changed}
    assert evaluate_module.evaluated_sets(**second, shared=shared) == evaluate_module.evaluated_sets(**second)
    # loaded with the second's arguments (files, attributes, device, head), not the first's held
    asked = (second["classifiers"], second["attributes"], second["device"], second["classifier_head"])
    assert len(loaded) == 3 and loaded[1] == loaded[2] == asked


@pytest.mark.parametrize("models", [("clip", "semantics"), ("dino", "clip", "semantics"), ("clip",)],
                         ids=["clip_and_semantics", "all", "clip"])
def test_diversity_is_measured_in_the_encoder_the_report_names(tmp_path, models):
    from fastfair.evaluation.scoring import Scorer, pairwise_diversity
    from fastfair.testing import save_tiny_semantic_encoders

    semantics = torch.nn.Module()
    semantics.encoders = torch.nn.ModuleDict({"pixels": torch.nn.Flatten()})
    _, dino = save_tiny_semantic_encoders(tmp_path)
    scorer = Scorer({}, "none", clip_dir=save_tiny_clip(tmp_path / "clip") if "clip" in models else None,
                    dino_dir=dino if "dino" in models else None,
                    semantics=semantics if "semantics" in models else None)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    embedded = scorer.embed(images)
    named = {"dinov2": embedded.dino, "pixels": images.flatten(1), "clip": embedded.clip}[scorer.diversity_encoder]
    assert scorer.diversity_encoder == ("dinov2" if "dino" in models else "pixels" if "semantics" in models
                                        else "clip")
    assert scorer.semantics("a prompt", {"base": images})["base"]["diversity"] == pytest.approx(
        pairwise_diversity(named))


def test_a_semantics_model_s_similarity_pairs_the_finetuned_images_with_the_base_ones():
    from fastfair.evaluation.scoring import Scorer

    semantics = torch.nn.Module()
    semantics.encoders = torch.nn.ModuleDict({"pixels": torch.nn.Flatten()})
    generator = torch.Generator().manual_seed(0)
    base, tuned = (torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1 for _ in range(2))
    scores = Scorer({}, "none", semantics=semantics).semantics("a prompt", {"base": base, "finetuned": tuned})
    expected = float(torch.nn.functional.cosine_similarity(tuned.flatten(1).double(), base.flatten(1).double()).mean())
    assert scores["finetuned"]["sim_pixels"] == pytest.approx(expected) and expected < 0.9
