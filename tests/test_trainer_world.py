"""The files of a training run on tiny random models (fastfair.testing.make_world) as a fixture, and a run config
over them. Imported by the trainer, checkpoint, export and evaluation tests; its own test checks the files load.
"""
from pathlib import Path

import pytest
import torch

from fastfair.testing import (  # noqa: F401 (re-exported for the test modules)
    MAX_TOKENS, TEXT_DIM, make_world, save_tiny_classifier, save_tiny_face_models, save_tiny_sd,
    save_tiny_semantic_encoders, write_tokenizer,
)

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The files of a run, inside a 1-process gloo group (import this fixture into a test module)."""
    from fastfair.trainer import process_group

    with process_group():
        yield make_world(tmp_path_factory.mktemp("world"))


def test_world_files_load(tmp_path):
    from fastfair.classifiers import load_classifier
    from fastfair.losses import load_semantic_encoder

    world = make_world(tmp_path)
    assert load_classifier(str(world["classifier"])).head.describe()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    for backend, key in (("clip", "clip"), ("dinov2", "dino")):
        assert load_semantic_encoder(backend, str(world[key]))(images).shape[0] == 2


def write_config(root: Path, world: dict, target: str = "text_lora", face_loss: bool = False, **overrides) -> Path:
    """A run config over the world's files: 2 iterations of 4 images, 3 sampling steps, whole-image faces;
    overrides replace top-level settings (max_steps=3)."""
    import yaml

    cfg = {
        "output_dir": str(Path(root) / "run"), "max_steps": 2, "checkpoint_every": 1, "keep_last": 2,
        "resume": "", "seed": 0,
        "model": {"pretrained": str(world["sd"]), "dtype": "fp32"},
        "finetune": {"target": target, "prefix_tokens": 2, "lora": {"rank": 4}},
        "sampler": {"num_steps": 3, "guidance_scale": 3.0},
        "data": {"sets": {"occupations": {"weight": 1.0}}},
        "batch": {"images_per_prompt": 4},
        "targets": {"attributes": [{"name": "gender", "classes": {"female": 0, "male": 1},
                                    "probabilities": "uniform"}]},
        "classifiers": {"gender": {"path": str(world["classifier"])}},
        "faces": {"detector": "none", "margin": 0.2},
        "loss": {"face_loss": face_loss, "lambda_face": 1.0, "confidence_threshold": 0.5},
        "semantics": {"clip_backend": "transformers", "clip_path": str(world["clip"]),
                      "dino_path": str(world["dino"])},
        "optim": {"lr": 0.01, "ema_decay": 0.5},
        "precision": {"mixed": "fp32", "tf32": False},
        "logging": {"image_every": 1, "log_every": 1},
    }
    cfg.update(overrides)
    if face_loss:
        sfnet, bank = save_tiny_face_models(Path(root) / "faces")
        cfg["faces"].update(embedding=str(sfnet), bank=str(bank))
    path = Path(root) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def flatten_text_names(folder: Path) -> None:
    """Rewrite a checkpoint's weights with the text encoder's names as transformers 5 gives them (no text_model.),
    the layout checkpoints had before fastfair.checkpoint.stable_name."""
    from safetensors.torch import load_file, save_file

    for name in ("weights.safetensors", "ema.safetensors"):
        tensors = load_file(str(folder / name))
        save_file({key.replace("text_encoder.text_model.", "text_encoder.", 1): t for key, t in tensors.items()},
                  str(folder / name))
