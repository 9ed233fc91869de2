"""The shipped toy weights: they load like real SD weights, generate deterministically, carry the built-in
bias, and the toy detector, classifiers and face bank work on world and generated images."""
import json

import pytest
import torch

from fastfair.faces import Face, FaceBank, get_detector, locate_faces
from fastfair.toy import (WEIGHTS_DIR, detect_faces, eval_classifier, load_toy_classifier, load_toy_detector,
                          load_toy_face_bank, toy_face_embedder, toy_pipeline_path, train_classifier)
from fastfair.toy.captions import concepts
from fastfair.toy.classifiers import heldout_crops
from fastfair.toy.detector import detection_rate, face_free_images
from fastfair.toy.face_bank import embed_faces
from fastfair.toy.files import BUILD_RECORD, combined_checksum, weight_checksums
from fastfair.toy.measure import TOY_GUIDANCE_SCALE, classify_faces, measure_prompts
from fastfair.toy.world import ATTRIBUTES, draw_random_portraits

# seeds no build stage uses, so these are fresh images
FRESH = 123_456_789


@pytest.fixture(scope="module")
def pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(toy_pipeline_path(), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def detector():
    return load_toy_detector()


def test_shipped_files_are_the_recorded_build_and_small():
    record = json.loads((WEIGHTS_DIR / BUILD_RECORD).read_text())
    sums = weight_checksums(str(WEIGHTS_DIR))
    assert sums == record["files"] and combined_checksum(sums) == record["checksum"]
    assert not record["quick"]
    total = sum(path.stat().st_size for path in WEIGHTS_DIR.rglob("*") if path.is_file())
    assert total <= 20 * 2 ** 20


def test_generation_is_deterministic_for_a_seed(pipeline):
    def generate(seed):
        return pipeline(["a photo of the face of a chef, a person"] * 2, num_inference_steps=20, output_type="pt",
                        generator=torch.Generator().manual_seed(seed)).images

    first = generate(0)
    assert first.shape == (2, 3, 32, 32)
    assert torch.equal(first, generate(0))
    assert not torch.allclose(first, generate(1), atol=1e-2)


def test_model_reproduces_the_skew_on_heldout_occupations(pipeline, detector):
    heldout = concepts("heldout", "occupation")
    report = measure_prompts(pipeline, [c.prompt for c in heldout], detector, load_toy_classifier("eval"),
                             count=16, seed=FRESH)  # at the toy's guidance scale
    assert sum(r["faces_found"] for r in report.values()) >= 0.9 * 16 * len(heldout)
    # a model that ignored the skew (female share 0.5) would show about 0.2 at 16 images per prompt
    assert sum(r["gender"]["bias"] for r in report.values()) / len(report) > 0.6
    close = [abs(report[c.prompt]["gender"]["frequencies"][0] - c.probabilities["gender"][0]) <= 0.25 for c in heldout]
    assert sum(close) >= 0.8 * len(heldout)


def test_detector_finds_world_faces_and_none_on_noise(detector):
    portraits = draw_random_portraits(256, FRESH)
    assert detection_rate(detector, portraits.images, portraits.boxes) >= 0.97
    noise = [torch.rand(64, 3, 32, 32) * 2 - 1, torch.randn(64, 3, 32, 32).clamp(-1, 1), torch.zeros(4, 3, 32, 32),
             face_free_images(100, torch.Generator().manual_seed(FRESH))]
    assert all(faces == [] for images in noise for faces in detector(images))
    bigger = torch.nn.functional.interpolate(portraits.images[:32], scale_factor=2, mode="bilinear")
    assert detection_rate(detector, bigger, portraits.boxes[:32] * 2) >= 0.9  # other sizes: boxes in their pixels


def test_detector_hook_works_through_the_faces_interface():
    images = draw_random_portraits(6, FRESH).images
    per_array = locate_faces(images, get_detector(detect_faces))  # one uint8 image at a time
    batched = locate_faces(images, get_detector(detect_faces, batched=True))
    assert per_array.found.all() and batched.found.all()
    assert torch.allclose(per_array.boxes, batched.boxes, atol=0.5)  # the uint8 copy rounds the pixels


def test_detector_finds_faces_on_generated_images(pipeline, detector):
    images = pipeline([c.prompt for c in concepts("heldout", "occupation")[:8]], num_inference_steps=20,
                      output_type="pt", generator=torch.Generator().manual_seed(FRESH)).images * 2 - 1
    assert sum(bool(faces) for faces in detector(images)) >= 7


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_classifiers_are_accurate_on_fresh_world_images(kind):
    classifier = load_toy_classifier(kind)
    crops, labels = heldout_crops(512, FRESH)
    with torch.no_grad():
        predicted = classifier.probabilities(crops)
        whole = classifier.probabilities(draw_random_portraits(512, FRESH).images)
    for name in ATTRIBUTES:
        assert (predicted[name].argmax(1) == labels[name]).double().mean() >= 0.95, name
        assert (whole[name].argmax(1) == labels[name]).double().mean() >= 0.9, name


def test_classifiers_agree_on_generated_faces(pipeline, detector):
    """No labels exist for generated images; two independent classifiers agreeing shows both transfer."""
    prompts = [c.prompt for c in concepts("heldout", "occupation")]
    images = pipeline(prompts * 6, num_inference_steps=20, guidance_scale=TOY_GUIDANCE_SCALE, output_type="pt",
                      generator=torch.Generator().manual_seed(FRESH)).images * 2 - 1
    train, evaluation = (classify_faces(images, detector, load_toy_classifier(kind)) for kind in ("train", "eval"))
    for name, least in (("gender", 0.85), ("race", 0.75), ("age", 0.9)):
        found = (train[name] >= 0) & (evaluation[name] >= 0)
        assert (train[name][found] == evaluation[name][found]).double().mean() >= least, name


def test_classifiers_are_independent_models():
    train, evaluation = train_classifier(), eval_classifier()  # the config factories
    assert type(train.network) is not type(evaluation.network)
    assert train.head == evaluation.head and train.head.num_outputs == 8


def test_face_bank_holds_world_faces():
    bank = load_toy_face_bank()
    assert isinstance(bank, FaceBank) and len(bank) >= 1000
    portraits = draw_random_portraits(16, FRESH)
    faces = embed_faces(portraits.images, [[Face(tuple(box))] for box in portraits.boxes.tolist()])
    noise = embed_faces(torch.rand(16, 3, 32, 32) * 2 - 1, [[Face((8.0, 8.0, 20.0, 22.0))]] * 16)
    assert faces.shape[1] == bank.dim == toy_face_embedder()(torch.zeros(1, 3, 112, 112)).shape[1]
    face_similarity, noise_similarity = bank.nearest(faces)[1], bank.nearest(noise)[1]
    assert face_similarity.min() > noise_similarity.max()


def test_detector_boxes_fit_the_faces_closely_at_any_aspect_ratio(detector):
    """IoU >= 0.7, not only 0.5: a box read off a neighbouring cell still overlaps by half. A non-square image
    (stretched 2x in width) gives its boxes in its own pixels, x and y scaled apart."""
    portraits = draw_random_portraits(256, FRESH)
    assert detection_rate(detector, portraits.images, portraits.boxes, min_iou=0.7) >= 0.97
    wide = torch.nn.functional.interpolate(portraits.images[:32], size=(32, 64), mode="bilinear")
    assert detection_rate(detector, wide, portraits.boxes[:32] * torch.tensor([2.0, 1.0, 2.0, 1.0]), min_iou=0.7) >= 0.9
