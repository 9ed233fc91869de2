"""Tiny, randomly initialized Stable-Diffusion-shaped models for tests and CPU benchmarks (no downloads).

Besides the in-memory builders, ``make_world`` writes every file a training run reads the way real weights are
written (a Stable Diffusion folder via save_pretrained, a classifier file, CLIP and DINOv2 folders), so tests and
benchmarks go through the real loading code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import torch

# Stable Diffusion 1.x's noise schedule (its scheduler/scheduler_config.json's betas, offset and prediction) as a
# DPM-Solver++ of order 2, with "leading" timestep spacing (941 ... 48 at 20 steps). The shipped file names no
# spacing, so a real SD 1.5 folder, which the trainer reads its scheduler from, gets DPMSolverMultistepScheduler's
# default "linspace" (999 ... 50), as the public code did. Tests, benchmarks and the toy world use this one;
# the spacing changes the trajectory, not the cost.
SD15_SCHEDULER: Dict[str, Any] = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    steps_offset=1, prediction_type="epsilon", timestep_spacing="leading", algorithm_type="dpmsolver++",
    solver_order=2, lower_order_final=True, final_sigmas_type="zero",
)


def tiny_unet_config(*, channels=(8, 16), cross_attention_dim: int = 16, sample_size: int = 8,
                     in_channels: int = 4) -> Dict[str, Any]:
    """A UNet2DConditionModel config with SD's block structure, at toy width."""
    return dict(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        block_out_channels=tuple(channels), layers_per_block=1, cross_attention_dim=cross_attention_dim,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(channels) - 1),
        up_block_types=("UpBlock2D",) * (len(channels) - 1) + ("CrossAttnUpBlock2D",),
        norm_num_groups=4, attention_head_dim=2,
    )


def tiny_unet(seed: int = 0, dtype: torch.dtype = torch.float32, **config) -> torch.nn.Module:
    """A randomly initialized tiny UNet2DConditionModel in eval mode (its zero-initialized output conv is
    re-drawn so that every parameter affects the output)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(**config))
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.05)
    return unet.to(dtype).eval()


def tiny_scheduler(**overrides):
    """SD 1.5's DPMSolverMultistepScheduler with optional config overrides."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**{**SD15_SCHEDULER, **overrides})


class TinyCondNet(torch.nn.Module):
    """A very small text-conditioned noise predictor with UNet2DConditionModel's call signature.

    eps = conv_out(silu(conv_in(x) + time_mlp(t) + cross_attention(pixels -> text))): nonlinear in x, t and
    the text embeddings, so gradient tests detect a wrong chain, at a fraction of a diffusers U-Net's
    per-call overhead. Used where many U-Net calls are needed; tests of real diffusers/peft wiring use
    ``tiny_unet``.
    """

    def __init__(self, channels: int = 4, hidden: int = 8, text_dim: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.time_mlp = torch.nn.Linear(2, hidden)
        self.to_q = torch.nn.Linear(hidden, hidden)
        self.to_k = torch.nn.Linear(text_dim, hidden)
        self.to_v = torch.nn.Linear(text_dim, hidden)
        self.conv_out = torch.nn.Conv2d(hidden, channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def forward(self, x, t, encoder_hidden_states):
        from types import SimpleNamespace

        h = self.conv_in(x)
        tt = t.to(h.dtype)[:, None] / 1000.0
        h = h + self.time_mlp(torch.cat([tt.sin(), tt.cos()], dim=1))[:, :, None, None]
        q = self.to_q(h.flatten(2).transpose(1, 2))                          # [B, HW, hidden]
        k, v = self.to_k(encoder_hidden_states), self.to_v(encoder_hidden_states)
        attn = torch.softmax(q @ k.transpose(1, 2) / k.shape[-1] ** 0.5, dim=-1) @ v
        h = h + attn.transpose(1, 2).reshape(h.shape)
        return SimpleNamespace(sample=self.conv_out(torch.nn.functional.silu(h)))


# ----------------------------------------------------------------------------- files on disk

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
    with torch.no_grad():  # decoded images well inside (-1, 1) (|x| < 0.8 for any latent, the decoder normalizes
        # before conv_out): the losses clamp them, and a pixel at the clamp's edge would switch its gradient on or
        # off between runs that differ only by rounding (2 ranks vs 1 process), beyond rounding in the weights
        vae.decoder.conv_out.weight.mul_(0.3)
        vae.decoder.conv_out.bias.mul_(0.3)
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


def save_tiny_clip(folder: Path) -> Path:
    """A transformers CLIPModel (text and vision towers) with its tokenizer, at 16 px."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = write_tokenizer(folder)
    ids = dict(bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    text = dict(**small, **ids, vocab_size=len(tokenizer), max_position_embeddings=MAX_TOKENS)
    CLIPModel(CLIPConfig(text_config=text, vision_config=dict(**small, image_size=16, patch_size=8),
                         projection_dim=8)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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


def make_world(root: Path) -> dict:
    """Every file of a run under root; returns the config overrides that point at them."""
    root = Path(root)
    sd = save_tiny_sd(root / "sd")
    classifier = save_tiny_classifier(root / "gender.safetensors")
    clip_dir, dino_dir = save_tiny_semantic_encoders(root / "semantics")
    return {"sd": sd, "classifier": classifier, "clip": clip_dir, "dino": dino_dir}


def save_tiny_face_models(folder: Path):
    """(sfnet checkpoint, face bank) at 16 px with 8-dimensional embeddings. 8 channels a stage: at 4 (seed 0)
    every ReLU of a stage was dead, so every face embedded alike and the face loss gave the images no gradient."""
    from fastfair.faces import FaceBank, SFNet

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = SFNet(depths=(1, 1, 1, 1), channels=(8, 8, 8, 8), out_dim=8, input_size=16)
    torch.save(net.state_dict(), folder / "sfnet.pth")
    FaceBank(torch.randn(5, 8)).save(str(folder / "bank.safetensors"))
    return folder / "sfnet.pth", folder / "bank.safetensors"


# ----------------------------------------------------------------------------- single-file checkpoints
# The inverse of diffusers' single-file conversion (diffusers/loaders/single_file_utils.py:
# convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint): each table maps a diffusers
# module path to its original LDM path; the inner tables rename the layers inside a mapped module.

_UNET_INNER = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_INNER = {"conv_shortcut": "nin_shortcut", "group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
              "to_out.0": "proj_out"}


def _unet_paths(config) -> Dict[str, str]:
    """UNet2DConditionModel module -> LDM module. With L = layers_per_block, down block b's layer j is
    input_blocks[1 + b(L+1) + j] (resnet .0, attention .1) and its downsampler input_blocks[1 + b(L+1) + L].0.op;
    up block b's layer j is output_blocks[b(L+1) + j], its upsampler after the last layer's attention (if any)."""
    L, step = config.layers_per_block, config.layers_per_block + 1
    paths = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    for b, up_type in enumerate(config.up_block_types):
        for j in range(L):
            paths[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{1 + b * step + j}.0"
            paths[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{1 + b * step + j}.1"
        for j in range(step):
            paths[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{b * step + j}.0"
            paths[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{b * step + j}.1"
        paths[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{1 + b * step + L}.0.op"
        upsampler = 2 if "CrossAttn" in up_type else 1
        paths[f"up_blocks.{b}.upsamplers.0.conv"] = f"output_blocks.{b * step + L}.{upsampler}.conv"
    return paths


def _vae_paths(config) -> Dict[str, str]:
    """AutoencoderKL module -> LDM module (the LDM decoder numbers its up blocks from the lowest resolution)."""
    n, L = len(config.block_out_channels), config.layers_per_block
    paths = {}
    for side in ("encoder", "decoder"):
        paths.update({f"{side}.conv_norm_out": f"{side}.norm_out",
                      f"{side}.mid_block.attentions.0": f"{side}.mid.attn_1",
                      f"{side}.mid_block.resnets.0": f"{side}.mid.block_1",
                      f"{side}.mid_block.resnets.1": f"{side}.mid.block_2"})
    for i in range(n):
        paths[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        paths[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
        for j in range(L + 1):
            paths[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
            paths[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
    return paths


def _to_ldm(state: Dict[str, torch.Tensor], paths: Dict[str, str], inner: Dict[str, str], prefix: str):
    """Rename every key: its longest module path found in paths is replaced, the layer path below it renamed
    by inner; keys under no mapped module keep their name. All get prefix."""
    out = {}
    for key, tensor in state.items():
        parts = key.split(".")
        head = next((k for k in range(len(parts) - 1, 0, -1) if ".".join(parts[:k]) in paths), None)
        if head is not None:
            layer = ".".join(parts[head:-1])
            key = ".".join(filter(None, (paths[".".join(parts[:head])], inner.get(layer, layer), parts[-1])))
        out[prefix + key] = tensor.contiguous()
    return out


def ldm_state_dict(unet=None, vae=None, text_encoder=None) -> Dict[str, torch.Tensor]:
    """The given diffusers/transformers parts' weights under their original single-file (CompVis/LDM) names:
    model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.text_model.*."""
    out = {}
    if unet is not None:
        out.update(_to_ldm(unet.state_dict(), _unet_paths(unet.config), _UNET_INNER, "model.diffusion_model."))
    if vae is not None:
        for key, tensor in _to_ldm(vae.state_dict(), _vae_paths(vae.config), _VAE_INNER, "first_stage_model.").items():
            projection = ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))
            out[key] = tensor[:, :, None, None] if projection else tensor  # LDM: 1x1 convolutions
    if text_encoder is not None:
        out.update({"cond_stage_model.transformer.text_model." + key.removeprefix("text_model."): tensor.contiguous()
                    for key, tensor in text_encoder.state_dict().items()})
    return out


def save_tiny_single_file(diffusers_folder: Path, path: Path) -> Path:
    """A diffusers SD folder's U-Net, VAE and CLIP text encoder written as one original-layout .safetensors
    checkpoint (`ldm_state_dict`), what diffusers' from_single_file reads back with the folder as config."""
    from safetensors.torch import save_file

    from fastfair.models import load_stable_diffusion

    parts = load_stable_diffusion(diffusers_folder, "fp32")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(ldm_state_dict(parts.unet, parts.vae, parts.text_encoder), str(path))
    return Path(path)
