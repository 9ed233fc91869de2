"""The judges a run builds (fastfair.trainer.build_judges): every one frozen and in eval mode, whatever built it, and
a face embedder that embeds as the face bank was built."""
import json

import pytest
import torch
from torch import nn

from fastfair.config import load_config
from fastfair.faces import FaceBank, FaceEmbedder
from fastfair.trainer import build_judges
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


def batch_dependent_semantics(spec):
    return _BatchDependent()


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
    from fastfair.evaluation.scoring import load_classifiers  # evaluation: --classifier-head names the outputs

    from fastfair.classifiers import MobileNetV3Large

    torch.save(MobileNetV3Large(8).state_dict(), tmp_path / "fairface.pt")  # the public code's architecture
    with pytest.raises(ValueError, match="--classifier-head"):
        load_classifiers([str(tmp_path / "fairface.pt")])
    judges, classes = load_classifiers([str(tmp_path / "fairface.pt")], head_names=["gender", "race", "age"])
    assert list(classes) == ["gender", "race", "age"] and len(classes["race"]) == 4
    with pytest.raises(ValueError, match="--classifier-head gender,hair: unknown attribute"):
        load_classifiers([str(tmp_path / "fairface.pt")], head_names=["gender", "hair"])
