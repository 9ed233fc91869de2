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
def classifier_file(tmp_path_factory):
    """spec.attributes ({attribute: output indices}, e.g. the public code's [gender 2 | race 4 | age 2]) -> a tiny
    classifier file whose own named head has exactly that layout (the trainer checks targets against it)."""
    from fastfair.classifiers import AttributeClassifier, head_from_names, save_classifier

    folder = tmp_path_factory.mktemp("clf")

    def make(attributes):
        names = sorted(attributes, key=lambda name: min(attributes[name]))
        head = head_from_names(names)
        assert all(list(attributes[n]) == list(range(head.slices[n].start, head.slices[n].stop)) for n in names)
        path = folder / f"{'_'.join(names)}.safetensors"
        if not path.is_file():
            torch.manual_seed(0)
            save_classifier(AttributeClassifier(head, "small_cnn", input_size=16, width=4), str(path))
        return path

    return make


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_trains_two_iterations(config, tmp_path, world, classifier_file):
    sfnet, bank = save_tiny_face_models(tmp_path / "faces")
    cfg = load_config(config, [
        f"output_dir={tmp_path / 'run'}", "max_steps=2", "checkpoint_every=2", "resume=", f"model.pretrained={world['sd']}",
        "model.dtype=fp32", "precision.mixed=fp32", "finetune.lora.rank=4", "finetune.prefix_tokens=2",
        "sampler.num_steps=3", "sampler.num_steps_range=null", "batch.images_per_prompt=4", "faces.detector=none",
        f"faces.embedding={sfnet}", f"faces.bank={bank}", "semantics.clip_backend=transformers",
        f"semantics.clip_path={world['clip']}", f"semantics.dino_path={world['dino']}", "logging.image_every=0",
    ])
    for spec in cfg.classifiers.values():  # the configs' own attribute indices, read from a tiny file of that layout
        spec.path, spec.architecture, spec.input_size = str(classifier_file(spec.attributes)), None, None
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


def test_shipped_configs_optimize_as_the_public_code():
    """The public scripts' optimizer (sail-sg/finetune-fair-diffusion, 1-main-debias.py's arguments): AdamW at
    lr 5e-5, betas (0.9, 0.999), weight decay 1e-2, eps 1e-8, a constant schedule without warm-up, no gradient
    clipping (its --max_grad_norm is parsed but never applied), and diffusers' EMAModel at decay 0.996 (its default
    schedule: fastfair's warm-up), stepped after each finite step. The EMA had been 0.999 without warm-up."""
    for config in CONFIGS:
        o = load_config(config).optim
        assert (o.name, o.lr, tuple(o.betas), o.weight_decay, o.eps) == ("adamw", 5e-5, (0.9, 0.999), 1e-2, 1e-8)
        assert (o.scheduler, o.warmup_steps, o.grad_clip) == ("constant", 0, None), config.name
        assert (o.ema_decay, o.ema_warmup) == (0.996, True), config.name
