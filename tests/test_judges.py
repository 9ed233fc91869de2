"""The judges a run builds (fastfair.judges.build_judges): every one frozen and in eval mode, whatever built it, and
a face embedder that embeds as the face bank was built."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fastfair.config import load_config
from fastfair.faces import FaceBank, FaceEmbedder, SFNet
from fastfair.judges import build_judges
from test_trainer_world import world, write_config  # noqa: F401 (world: a fixture)


class _BatchDependent(nn.Module):
    """Batch statistics and dropout: in train mode its output for one image depends on the rest of the batch."""

    def __init__(self, out_dim: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, out_dim), nn.BatchNorm1d(out_dim),
                                 nn.Dropout(0.5))

    def forward(self, x):
        return self.net(x)


def batch_dependent_embedder(flip: bool = True):
    return FaceEmbedder(_BatchDependent(), flip=flip, input_size=16)


def mirror_free_embedder():
    return batch_dependent_embedder(flip=False)


class _BatchDependentSemantics(_BatchDependent):
    """With a semantics module's interface (semantics.factory's contract), its forward unused here."""

    def embed_originals(self, originals):
        return {"net": self(originals)}


def batch_dependent_semantics(spec):
    return _BatchDependentSemantics()


def _config(root, world, *overrides):
    return load_config(write_config(root, world, face_loss=True), list(overrides))


def test_judges_from_factories_are_frozen_and_in_eval_mode(tmp_path, world):
    judges = build_judges(_config(tmp_path, world, "faces.embedding_fn=test_judges:batch_dependent_embedder",
                                  "semantics.factory=test_judges:batch_dependent_semantics"), "cpu")
    for judge in (judges.face_embedder, judges.semantics):
        assert not any(module.training for module in judge.modules())
        assert not any(p.requires_grad for p in judge.parameters())
    faces = torch.rand(4, 3, 16, 16) * 2 - 1
    alone = judges.face_embedder(faces[:1])
    assert torch.equal(alone, judges.face_embedder(faces[:1]))  # no dropout
    torch.testing.assert_close(alone, judges.face_embedder(faces)[:1])  # no batch statistics


def test_two_classifiers_giving_one_attribute_are_refused(tmp_path, world):
    """Files that describe themselves: validate sees no attributes, and the judges kept the last one's silently."""
    cfg = load_config(write_config(tmp_path, world), [f"classifiers.again.path={world['classifier']}"])
    with pytest.raises(ValueError, match=r"classifiers.gender and classifiers.again both predict 'gender': name the "
                                         r"attributes each one gives \(classifiers.<name>.attributes\)"):
        build_judges(cfg, "cpu")


def _bank_built_with(path, flip):
    FaceBank(torch.randn(5, 8), info={"settings": json.dumps({"flip": flip})}).save(str(path))
    return path


def test_the_face_embedder_embeds_as_the_bank_was_built(tmp_path, world):
    no_flip = _bank_built_with(tmp_path / "no_flip.safetensors", False)
    judges = build_judges(_config(tmp_path, world, f"faces.bank={no_flip}"), "cpu")
    assert judges.face_embedder.flip is False and judges.face_bank.flip is False
    flipped = _bank_built_with(tmp_path / "flip.safetensors", True)
    assert build_judges(_config(tmp_path, world, f"faces.bank={flipped}"), "cpu").face_embedder.flip is True
    with pytest.raises(ValueError, match=r"faces.embedding_fn=test_judges:mirror_free_embedder embeds with "
                                         r"flip=False, but the faces.bank .* was built with flip=True"):
        build_judges(_config(tmp_path, world, f"faces.bank={flipped}",
                             "faces.embedding_fn=test_judges:mirror_free_embedder"), "cpu")
    unrecorded = tmp_path / "unrecorded.safetensors"  # a bank built otherwise: the embedder's own setting
    FaceBank(torch.randn(5, 8)).save(str(unrecorded))
    assert FaceBank.load(str(unrecorded)).flip is None
    judges = build_judges(_config(tmp_path, world, f"faces.bank={unrecorded}",
                                  "faces.embedding_fn=test_judges:mirror_free_embedder"), "cpu")
    assert judges.face_embedder.flip is False


alias_embedder = batch_dependent_embedder  # a re-export: another 'module:function' for the same embedder


def other_embedder():
    torch.manual_seed(1)
    return batch_dependent_embedder()


def bare_network():
    """What python -m fastfair.faces.build_bank --embedder-factory takes: a network, not a FaceEmbedder."""
    network = _BatchDependent()
    network.input_size = 16
    return network


def _bank_recording(path, embedder, dim=8, **settings):
    FaceBank(torch.randn(5, dim), info={"settings": json.dumps({"embedder": embedder, "flip": True, **settings})}
             ).save(str(path))
    return path


def test_a_bank_of_another_dimension_is_refused_when_the_judges_are_built(tmp_path, world):
    """Not at the first iteration as 'queries must be [N, 16], got (2, 8)': naming the bank, its embedder, the fix."""
    wide = _bank_recording(tmp_path / "wide.safetensors", "/data/sfnet20.pth", dim=16)
    with pytest.raises(ValueError, match=r"faces.bank .*wide.safetensors holds 16-dimensional embeddings \(built with "
                                         r"/data/sfnet20.pth\), but faces.embedding=.*sfnet.pth embeds a face as "
                                         r"\(1, 8\), not \[1, 16\]: rebuild the bank .*build_bank.* or set "
                                         r"faces.embedding=/data/sfnet20.pth"):
        build_judges(_config(tmp_path, world, f"faces.bank={wide}"), "cpu")
    unrecorded = tmp_path / "unrecorded.safetensors"
    FaceBank(torch.randn(5, 16)).save(str(unrecorded))
    with pytest.raises(ValueError, match=r"\(built with an embedder it does not record\), but faces.embedding_fn="
                                         r"test_judges:batch_dependent_embedder embeds a face as \(1, 8\)"):
        build_judges(_config(tmp_path, world, f"faces.bank={unrecorded}",
                             "faces.embedding_fn=test_judges:batch_dependent_embedder"), "cpu")


def test_a_bank_built_with_another_embedder_of_the_same_dimension_is_refused(tmp_path, world):
    built = _bank_recording(tmp_path / "fn.safetensors", "test_judges:batch_dependent_embedder")
    for same in ("batch_dependent_embedder", "alias_embedder"):
        build_judges(_config(tmp_path, world, f"faces.bank={built}", f"faces.embedding_fn=test_judges:{same}"), "cpu")
    for other in ("faces.embedding_fn=test_judges:other_embedder", None):  # None: the config's faces.embedding file
        with pytest.raises(ValueError, match=r"faces.bank .*fn.safetensors was built with the embedder test_judges:"
                                             r"batch_dependent_embedder, not faces.embedding.*: the face loss would "
                                             r"compare .*, or set faces.embedding_fn=test_judges:batch_dependent_"):
            build_judges(_config(tmp_path, world, f"faces.bank={built}", *[other] if other else []), "cpu")
    factory = _bank_recording(tmp_path / "factory.safetensors", "test_judges:bare_network")  # --embedder-factory
    judges = build_judges(_config(tmp_path, world, f"faces.bank={factory}", "faces.embedding_fn=test_judges:"
                                                                             "bare_network"), "cpu")
    assert isinstance(judges.face_embedder, FaceEmbedder) and judges.face_embedder.flip is True  # as build_bank


def test_a_bank_built_from_a_checkpoint_takes_the_same_file_a_copy_or_the_same_name_elsewhere(tmp_path, world):
    from fastfair.faces.build_bank import main as build_bank_main

    cfg = _config(tmp_path, world)
    sfnet = cfg.faces.embedding
    images = tmp_path / "real"
    images.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (20, 20, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    bank = str(tmp_path / "bank.safetensors")
    build_bank_main(["--images", str(images), "--out", bank, "--embedder", os.path.relpath(sfnet), "--detector",
                     "none"])
    recorded = json.loads(FaceBank.load(bank).info["settings"])
    assert recorded["embedder"] == os.path.relpath(sfnet) and recorded["embedder_file"]["path"] == sfnet
    assert build_judges(_config(tmp_path, world, f"faces.bank={bank}"), "cpu").face_bank is not None
    copy = tmp_path / "copy" / "renamed.pth"
    copy.parent.mkdir()
    shutil.copy(sfnet, copy)  # byte-identical
    build_judges(_config(tmp_path, world, f"faces.bank={bank}", f"faces.embedding={copy}"), "cpu")
    torch.manual_seed(1)
    torch.save(SFNet(depths=(1, 1, 1, 1), channels=(4, 4, 4, 4), out_dim=8, input_size=16).state_dict(), copy)
    with pytest.raises(ValueError, match=rf"was built with the embedder {os.path.relpath(sfnet)}, not "
                                         rf"faces.embedding={copy}: .*or set faces.embedding={sfnet} \(and no "):
        build_judges(_config(tmp_path, world, f"faces.bank={bank}", f"faces.embedding={copy}"), "cpu")
    elsewhere = _bank_recording(tmp_path / "elsewhere.safetensors", "/other/machine/sfnet.pth")  # not here: by name
    build_judges(_config(tmp_path, world, f"faces.bank={elsewhere}"), "cpu")
    with pytest.raises(ValueError, match="was built with the embedder /other/machine/sfnet.pth, not faces.embedding"):
        build_judges(_config(tmp_path, world, f"faces.bank={elsewhere}", f"faces.embedding={copy}"), "cpu")


def test_a_classifier_file_without_metadata_runs_as_the_config_maps_its_outputs(tmp_path, world):
    """The public code's classifiers are bare state dicts (.pt): a run config names the attribute it judges
    (classifiers.<n>.attributes) and the targets its outputs; loading refused them, asking for a Python head=."""
    from fastfair.classifiers import SmallCNN
    from fastfair.trainer import Trainer, process_group

    torch.manual_seed(0)
    network = SmallCNN(6).eval()
    torch.save(network.state_dict(), tmp_path / "public.pt")
    overrides = [f"classifiers.gender.path={tmp_path / 'public.pt'}", "classifiers.gender.architecture=small_cnn",
                 "classifiers.gender.input_size=16", "classifiers.gender.attributes={gender: [4, 5]}",
                 "targets.attributes=[{name: gender, classes: {female: 4, male: 5}, probabilities: uniform}]"]
    cfg = load_config(write_config(tmp_path, world), overrides)
    judge = build_judges(cfg, "cpu").classifiers["gender"]
    crops = torch.rand(3, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(judge(crops), network(crops))
    with process_group():
        trainer = Trainer(cfg)
        part = trainer.iteration(0)
    assert torch.isfinite(torch.tensor(part["loss"]))
    beyond = load_config(write_config(tmp_path, world), overrides[:3] + [
        "classifiers.gender.attributes={gender: [4, 5], age: [6, 7]}", overrides[4]])  # age declared, never read
    with pytest.raises(ValueError, match=r"classifiers.gender.attributes.age: .*public.pt has 6 outputs \(0-5\), so "
                                         r"it has no outputs \[6, 7\]"):
        build_judges(beyond, "cpu")
    from fastfair.evaluation.scoring import load_classifiers  # evaluation: --classifier-head names the outputs

    from fastfair.classifiers import MobileNetV3Large

    torch.save(MobileNetV3Large(8).state_dict(), tmp_path / "fairface.pt")  # the public code's architecture
    with pytest.raises(ValueError, match="--classifier-head"):
        load_classifiers([str(tmp_path / "fairface.pt")])
    judges, classes = load_classifiers([str(tmp_path / "fairface.pt")], head_names=["gender", "race", "age"])
    assert list(classes) == ["gender", "race", "age"] and len(classes["race"]) == 4
    with pytest.raises(ValueError, match="--classifier-head gender,hair: unknown attribute"):
        load_classifiers([str(tmp_path / "fairface.pt")], head_names=["gender", "hair"])


def test_a_detector_list_is_tried_in_order_as_the_public_code_fell_back(tmp_path, world, monkeypatch):  # noqa: F811
    """faces.detector took one backend: the public code's insightface with a fallback for the images it finds no
    face in could not be set for training. A list builds a FallbackDetector (as evaluate's --detector does)."""
    import sys
    import types

    from fastfair.faces.detect import FallbackDetector, WholeImageDetector
    from fastfair.faces.haar import HaarDetector
    from fastfair.faces.mtcnn_backend import MTCNNDetector

    monkeypatch.setitem(sys.modules, "facenet_pytorch", types.SimpleNamespace(MTCNN=lambda **options: None))
    cfg = _config(tmp_path, world, "faces.detector=opencv, mtcnn,none", "faces.detector_fn=null")
    detector = build_judges(cfg, "cpu").detector
    assert isinstance(detector, FallbackDetector)
    assert [type(d) for d in detector.detectors] == [HaarDetector, MTCNNDetector, WholeImageDetector]
    single = build_judges(_config(tmp_path / "one", world, "faces.detector=none", "faces.detector_fn=null"), "cpu")
    assert isinstance(single.detector, WholeImageDetector)


def test_head_disagreements_read_the_attributes_own_span_of_outputs():
    """A file whose race outputs follow gender's (2-5): the race target's indices are checked against that span, and
    a class against its own output there, not against its position from 0."""
    from types import SimpleNamespace

    from fastfair.classifiers.heads import Attribute, AttributeHead
    from fastfair.judges import head_disagreements

    head = AttributeHead([Attribute("gender", ("female", "male")),
                          Attribute("race", ("White", "Black", "Indian", "Asian"))])

    def race(**classes):
        return SimpleNamespace(name="race", classes=list(classes), indices=list(classes.values()))

    assert head_disagreements(race(White=2, Black=3, Indian=4, Asian=5), head) == []
    assert "reads outputs [6], outside the file's race outputs" in head_disagreements(
        race(White=6, Black=3, Indian=4, Asian=5), head)[0]  # one past the span's end
    swapped = head_disagreements(race(White=3, Black=2, Indian=4, Asian=5), head)
    assert len(swapped) == 2 and "class 'White' reads output 3, but the file's 'White' is output 2" in swapped[0]


def test_a_zero_face_weight_builds_no_face_judges(tmp_path, world):
    """loss.lambda_face=0 turns the face loss off as loss.face_loss=false does: no bank or embedder is loaded (none
    is needed: check_files asks for none)."""
    judges = build_judges(_config(tmp_path, world, "loss.lambda_face=0", "faces.bank=", "faces.embedding="), "cpu")
    assert judges.face_embedder is None and judges.face_bank is None


def test_the_judges_are_stored_in_the_autocast_dtype_not_the_frozen_models(tmp_path, world):
    """precision.mixed, the dtype they compute in under the trainer's autocast, whatever model.dtype is."""
    judges = build_judges(_config(tmp_path, world, "model.dtype=fp32", "precision.mixed=bf16",
                                  "faces.embedding_fn=test_judges:batch_dependent_embedder",
                                  "semantics.factory=test_judges:batch_dependent_semantics"), "cpu")
    for judge in [*judges.classifiers.values(), judges.semantics, judges.face_embedder]:
        assert {p.dtype for p in judge.parameters()} == {torch.bfloat16}
