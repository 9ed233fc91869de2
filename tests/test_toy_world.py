"""The toy world's parts that need no trained weights: portraits, captions, tokenizer, augmentation, box coding;
the layout of its text encoder file."""
import copy
import math
import os

import pytest
import torch

from fastfair.toy import captions
from fastfair.toy.augment import random_blur
from fastfair.toy.detector import STRIDE, ToyDetectorNet, ToyFaceDetector, decode_boxes, detection_targets
from fastfair.pipeline_folder import save_tokenizer
from fastfair.toy.tokenizer import build_tokenizer, words_of
from fastfair.toy.world import ATTRIBUTES, SKIN_TONES, draw_portraits, draw_random_portraits


def labels(gender, race, age, count=4):
    return {name: torch.full((count,), value) for name, value in (("gender", gender), ("race", race), ("age", age))}


def draw(seed, **values):
    return draw_portraits(labels(**values), torch.Generator().manual_seed(seed))


def test_portraits_are_deterministic_for_a_seed():
    first, again, other = draw_random_portraits(8, 3), draw_random_portraits(8, 3), draw_random_portraits(8, 4)
    assert first.images.shape == (8, 3, 32, 32)
    assert torch.equal(first.images, again.images) and torch.equal(first.boxes, again.boxes)
    assert not torch.equal(first.images, other.images)
    assert first.images.min() >= -1 and first.images.max() <= 1


def pixel(images, x, y):
    """[N, 3] colours at per-image continuous coordinates x, y [N]."""
    rows, cols = y.long().clamp(0, 31), x.long().clamp(0, 31)
    return images[torch.arange(len(images)), :, rows, cols]


def test_each_attribute_changes_its_own_cue_only():
    base = draw(0, gender=1, race=0, age=0)  # short dark hair, light skin
    x0, y0, x1, y1 = base.boxes.unbind(1)
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2 + 0.15 * (y1 - y0)  # between the eyes and the mouth
    beside_face = (x1 + 1.5, centre_y)  # where long hair falls, right of the face
    above_forehead = (centre_x, y0 + 0.08 * (y1 - y0))  # the hair cap

    other_race = draw(0, gender=1, race=2, age=0)
    face_colour = (pixel(other_race.images, centre_x, centre_y) + 1) / 2
    assert torch.allclose(face_colour, SKIN_TONES[2].expand_as(face_colour), atol=0.06)
    # only the faint anti-aliasing tail of the face edge reaches the hair's place
    assert torch.allclose(pixel(other_race.images, *beside_face), pixel(base.images, *beside_face), atol=0.06)

    long_hair = draw(0, gender=0, race=0, age=0)
    assert (pixel(long_hair.images, *beside_face) - pixel(base.images, *beside_face)).abs().amax(1).min() > 0.1
    assert torch.allclose(pixel(long_hair.images, centre_x, centre_y), pixel(base.images, centre_x, centre_y),
                          atol=0.01)

    old = draw(0, gender=1, race=0, age=1)  # grey hair is light: brighter hair cap
    assert (pixel(old.images, *above_forehead).mean(1) - pixel(base.images, *above_forehead).mean(1)).min() > 0.5
    assert torch.allclose(pixel(old.images, centre_x, centre_y), pixel(base.images, centre_x, centre_y), atol=0.01)
    assert torch.equal(old.boxes, base.boxes)  # nuisance does not depend on the attributes


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match="keys"):
        draw_portraits({"gender": torch.zeros(2, dtype=torch.long)}, torch.Generator())
    bad = labels(0, 4, 0)
    with pytest.raises(ValueError, match="race"):
        draw_portraits(bad, torch.Generator())
    none = draw_random_portraits(0, 1)  # no portraits: empty tensors, not a reduction error
    assert none.images.shape == (0, 3, 32, 32) and none.boxes.shape == (0, 4)


def test_concepts_are_skewed_and_splits_disjoint():
    for concept in captions.CONCEPTS:
        for name, classes in ATTRIBUTES.items():
            assert len(concept.probabilities[name]) == len(classes)
            assert sum(concept.probabilities[name]) == pytest.approx(1.0)
        if concept.kind != "person":
            assert max(concept.probabilities["gender"]) >= 0.85
    train = {c.name for c in captions.concepts("train")}
    heldout = {c.name for c in captions.concepts("heldout")}
    assert len(heldout) == 14 and not train & heldout
    assert "a photo of the face of an accountant, a person" in captions.prompts("heldout", "occupation")
    with pytest.raises(ValueError, match="split"):
        captions.concepts("test")


def test_sampled_captions_follow_each_concepts_skew():
    prompts, sampled = captions.sample_captions(20000, torch.Generator().manual_seed(0))
    for concept in captions.concepts("train", "occupation")[:4]:
        rows = torch.tensor([p == concept.prompt for p in prompts])
        female = (sampled["gender"][rows] == 0).double().mean().item()
        assert rows.sum() > 400
        assert female == pytest.approx(concept.probabilities["gender"][0], abs=0.05)


def test_tokenizer_needs_no_download_and_keeps_toy_words_whole(tmp_path):
    texts = [c.prompt for c in captions.CONCEPTS]
    tokenizer = build_tokenizer(texts)
    assert all(len(tokenizer(word, add_special_tokens=False).input_ids) == 1 for word in words_of(texts))
    save_tokenizer(tokenizer, str(tmp_path))
    os.remove(tmp_path / "tokenizer.json")  # what an older transformers' slow CLIPTokenizer reads
    from transformers import CLIPTokenizer

    reloaded = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert [reloaded(t).input_ids for t in texts] == [tokenizer(t).input_ids for t in texts]
    unknown = reloaded("a zebra!").input_ids
    assert reloaded.unk_token_id not in unknown[1:-1] and len(unknown) > 4


def test_blur_keeps_flat_images_and_smooths_noise():
    generator = torch.Generator().manual_seed(0)
    flat = torch.full((3, 3, 16, 16), 0.3)
    assert torch.allclose(random_blur(flat, generator), flat, atol=1e-6)
    noise = torch.randn(64, 3, 16, 16, generator=generator)
    assert random_blur(noise, generator).std() < 0.8 * noise.std()


def test_detector_box_coding_round_trips():
    boxes = torch.tensor([[5.3, 7.1, 17.9, 22.4], [12.0, 3.0, 20.5, 14.0]])
    scores, regression = detection_targets(boxes, 32 // STRIDE)
    decoded = decode_boxes(regression)  # every cell decodes to the same true box
    assert torch.allclose(decoded, boxes[:, :, None, None].expand_as(decoded), atol=1e-4)
    peak = scores.flatten(1).argmax(1)
    centre_cells = (((boxes[:, 1] + boxes[:, 3]) / 2 // STRIDE) * 8 + (boxes[:, 0] + boxes[:, 2]) / 2 // STRIDE).long()
    assert torch.equal(peak, centre_cells)


def test_box_coding_runs_on_the_device_of_its_input():
    """The cell grid was made on the CPU: box coding of CUDA tensors failed (shapes only here: the meta device)."""
    boxes = torch.tensor([[5.3, 7.1, 17.9, 22.4]], device="meta")
    scores, regression = detection_targets(boxes, 8)
    assert scores.device.type == regression.device.type == decode_boxes(regression).device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.sh runs it)")
def test_detector_network_follows_the_images_device():
    """The trainer detects on its device: the network (no module of the trainer's) stayed on the CPU where it was
    built, and the first toy iteration on CUDA failed."""
    network = ToyDetectorNet()
    portraits = draw_random_portraits(3, 0).images
    expected = ToyFaceDetector(copy.deepcopy(network))(portraits)
    found = ToyFaceDetector(network)(portraits.cuda())
    assert len(found) == 3 and all(len(a) == len(b) for a, b in zip(found, expected))
    assert all(math.isclose(x, y, abs_tol=1e-3) for a, b in zip(found, expected) for fa, fb in zip(a, b)
               for x, y in zip(fa, fb))


def test_text_encoder_file_uses_the_layout_every_transformers_reads(tmp_path):
    """The shipped text encoder's keys sit under ``text_model.`` (transformers 4 loads nothing else, silently);
    prefix_text_encoder_keys rewrites a file saved unprefixed into that layout, and it loads to the same model."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from fastfair.toy import WEIGHTS_DIR
    from fastfair.pipeline_folder import prefix_text_encoder_keys

    shipped = load_file(os.path.join(WEIGHTS_DIR, "pipeline", "text_encoder", "model.safetensors"))
    assert shipped and all(name.startswith("text_model.") for name in shipped)
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=50, max_position_embeddings=8))
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    bare = {name.split("text_model.", 1)[-1]: tensor for name, tensor in load_file(str(path)).items()}
    save_file(bare, str(path), metadata={"format": "pt"})  # as transformers 5 writes it
    prefix_text_encoder_keys(str(path))
    assert all(name.startswith("text_model.") for name in load_file(str(path)))
    ids = torch.tensor([[1, 5, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(CLIPTextModel.from_pretrained(tmp_path)(ids)[0], model(ids)[0], rtol=0, atol=0)


def test_face_boxes_are_in_pixels_of_the_drawn_size_and_follow_the_roll():
    small, large = draw_random_portraits(64, 3, size=32), draw_random_portraits(64, 3, size=64)
    torch.testing.assert_close(large.boxes, small.boxes * 2)
    # the bounding box of the rolled face ellipse (semi-axes 5 x 6.3 at scale 1): squarer than the upright one's
    width, height = (small.boxes[:, 2:] - small.boxes[:, :2]).unbind(1)
    ratio = width / height
    assert (ratio >= 5 / 6.3 - 1e-5).all() and (ratio - 5 / 6.3).abs().max() > 0.01


def test_measure_leaves_images_without_a_face_unclassified():
    from fastfair.toy.classifiers import ToyClassifier
    from fastfair.toy.measure import classify_faces, frequencies

    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    predicted = classify_faces(images, lambda batch: [[], [(4.0, 4.0, 20.0, 20.0, 0.9)], []],
                               ToyClassifier("small_cnn", {"width": 8}))
    assert all(p[[0, 2]].tolist() == [-1, -1] and p[1] >= 0 for p in predicted.values())
    assert sum(frequencies(predicted["gender"], 2)) == pytest.approx(1)


def test_a_saved_pipeline_folder_has_the_layout_transformers_4_reads(tmp_path):
    """save_pipeline_folder: the text encoder's keys under ``text_model.``; beside tokenizer.json the slow tokenizer's
    vocab.json and merges.txt, whose first line is the version header transformers 4 skips (a merge written there
    is lost)."""
    import json
    from types import SimpleNamespace

    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from fastfair.pipeline_folder import save_pipeline_folder

    tokenizer = build_tokenizer([c.prompt for c in captions.CONCEPTS])
    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=50, max_position_embeddings=8))

    def save_pretrained(folder, safe_serialization):  # as a diffusers pipeline saves its parts
        encoder.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=safe_serialization)
        tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    save_pipeline_folder(SimpleNamespace(tokenizer=tokenizer, save_pretrained=save_pretrained), str(tmp_path))
    keys = load_file(str(tmp_path / "text_encoder" / "model.safetensors"))
    assert keys and all(name.startswith("text_model.") for name in keys)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    lines = (tmp_path / "tokenizer" / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [" ".join(m) if not isinstance(m, str) else m for m in model["merges"]]
    assert lines[0].startswith("#version") and lines[1:] == merges and merges
    assert json.loads((tmp_path / "tokenizer" / "vocab.json").read_text(encoding="utf-8")) == model["vocab"]
