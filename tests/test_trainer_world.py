"""Tiny random stand-ins for every file a training run reads, written to disk the way real weights are:
a Stable Diffusion folder (save_pretrained), a classifier file, CLIP and DINOv2 folders, a config.

Imported by the trainer, checkpoint and export tests; its own test checks the builders' outputs load.
"""
import json
from pathlib import Path

import pytest
import torch

from fastfair.testing import SD15_SCHEDULER, tiny_unet

TEXT_DIM = 16
MAX_TOKENS = 12


def _byte_chars():
    # the GPT-2/CLIP byte-to-unicode table: every byte as a printable character
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(folder: Path):
    """A CLIPTokenizer of single characters (no merges): vocab = bytes, bytes + '</w>', start, end."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=MAX_TOKENS)
    return tokenizer


def save_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """A tiny StableDiffusionPipeline (8x8x4 latents, 16x16 images) saved with save_pretrained."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = write_tokenizer(Path(folder) / "_vocab")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, bos_token_id=len(tokenizer) - 2,
        eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1, projection_dim=TEXT_DIM))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=tiny_unet(seed, cross_attention_dim=TEXT_DIM),
                                   scheduler=DPMSolverMultistepScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return Path(folder)


def save_tiny_classifier(path: Path, seed: int = 0) -> Path:
    from fastfair.classifiers import AttributeClassifier, head_from_names, save_classifier

    torch.manual_seed(seed)
    save_classifier(AttributeClassifier(head_from_names(["gender"]), "small_cnn", input_size=16, width=4), str(path))
    return Path(path)


def save_tiny_semantic_encoders(folder: Path):
    """(clip_dir, dino_dir): transformers CLIP vision and DINOv2 models at 16 px."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                 patch_size=8)
    clip_dir, dino_dir = Path(folder) / "clip", Path(folder) / "dino"
    CLIPVisionModelWithProjection(CLIPVisionConfig(**small, projection_dim=8)).save_pretrained(clip_dir)
    Dinov2Model(Dinov2Config(**small)).save_pretrained(dino_dir)
    processor = {"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}, "resample": 2}
    for d in (clip_dir, dino_dir):
        (d / "preprocessor_config.json").write_text(json.dumps(processor))
    return clip_dir, dino_dir


def whole_image_face(rgb):
    """A callable detector for faces.detector_fn: the centre half of the image is the face."""
    h, w = rgb.shape[:2]
    return [(w / 4, h / 4, 3 * w / 4, 3 * h / 4)]


def make_world(root: Path) -> dict:
    """Every file of a run under root; returns the config overrides that point at them."""
    root = Path(root)
    sd = save_tiny_sd(root / "sd")
    classifier = save_tiny_classifier(root / "gender.safetensors")
    clip_dir, dino_dir = save_tiny_semantic_encoders(root / "semantics")
    return {"sd": sd, "classifier": classifier, "clip": clip_dir, "dino": dino_dir}


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


def save_tiny_face_models(folder: Path):
    """(sfnet checkpoint, face bank) at 16 px with 8-dimensional embeddings."""
    from fastfair.faces import FaceBank, SFNet

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = SFNet(depths=(1, 1, 1, 1), channels=(4, 4, 4, 4), out_dim=8, input_size=16)
    torch.save(net.state_dict(), folder / "sfnet.pth")
    FaceBank(torch.randn(5, 8)).save(str(folder / "bank.safetensors"))
    return folder / "sfnet.pth", folder / "bank.safetensors"


def write_config(root: Path, world: dict, target: str = "text_lora", face_loss: bool = False, **overrides) -> Path:
    """A run config over the world's files: 2 iterations of 4 images, 3 sampling steps, whole-image faces."""
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
    if face_loss:
        sfnet, bank = save_tiny_face_models(Path(root) / "faces")
        cfg["faces"].update(embedding=str(sfnet), bank=str(bank))
    path = Path(root) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path
