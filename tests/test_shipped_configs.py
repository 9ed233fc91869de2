"""Every shipped experiment config, with its weight paths pointed at tiny random models on disk, trains for two
iterations: the configs' structure (targets, classifier indices, loss weights, prompt mixtures, finetuning
targets) is what the trainer runs, not just what the config loader accepts."""
from pathlib import Path

import pytest
import torch

from fastfair.config import load_config
from fastfair.trainer import Trainer
from test_trainer_world import save_tiny_face_models, world  # noqa: F401 (world: a fixture)

# the toy world's configs train on the shipped toy model in tests/test_toy_debias.py
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                 if not p.name.startswith(("_", "toy")))


@pytest.fixture(scope="module")
def gender_race_age_classifier(tmp_path_factory):
    """A tiny classifier file with the public code's 8 outputs [gender 2 | race 4 | age 2]."""
    from fastfair.classifiers import AttributeClassifier, head_from_names, save_classifier

    path = tmp_path_factory.mktemp("clf") / "fairface.safetensors"
    torch.manual_seed(0)
    save_classifier(AttributeClassifier(head_from_names(["gender", "race", "age"]), "small_cnn", input_size=16,
                                        width=4), str(path))
    return path


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_trains_two_iterations(config, tmp_path, world, gender_race_age_classifier):
    sfnet, bank = save_tiny_face_models(tmp_path / "faces")
    cfg = load_config(config, [
        f"output_dir={tmp_path / 'run'}", "max_steps=2", "checkpoint_every=2", "resume=", f"model.pretrained={world['sd']}",
        "model.dtype=fp32", "precision.mixed=fp32", "finetune.lora.rank=4", "finetune.prefix_tokens=2",
        "sampler.num_steps=3", "sampler.num_steps_range=null", "batch.images_per_prompt=4", "faces.detector=none",
        f"faces.embedding={sfnet}", f"faces.bank={bank}", "semantics.clip_backend=transformers",
        f"semantics.clip_path={world['clip']}", f"semantics.dino_path={world['dino']}", "logging.image_every=0",
    ])
    for spec in cfg.classifiers.values():  # the configs' own attribute indices, read from a tiny 8-output file
        spec.path, spec.architecture, spec.input_size = str(gender_race_age_classifier), None, None
    trainer = Trainer(cfg)
    before = {name: p.detach().clone() for name, p in trainer.model.trainable.items()}
    trainer.train()
    assert trainer.skipped == 0
    changed = [name for name, p in trainer.model.trainable.items() if not torch.equal(before[name], p.detach())]
    assert changed, f"{config.name}: no trainable weight moved"
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "weights.safetensors").is_file()


def test_shipped_configs_crop_faces_as_evaluation_judges_them():
    """The classifier sees in training the crop it is scored on: each config's faces.margin is evaluate's --margin
    (configs/_base.yaml had 0.2 against evaluation's 0.5, the public code's in both)."""
    from fastfair.config import FACE_MARGIN
    from fastfair.evaluate import parse_args

    assert parse_args(["--model", "m", "--classifier", "c", "--out", "o"]).margin == FACE_MARGIN == 0.5
    for config in CONFIGS + [CONFIGS[0].parent / "toy.yaml"]:
        assert load_config(config).faces.margin == FACE_MARGIN, config.name
