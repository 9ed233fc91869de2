"""Load the parts of a Stable Diffusion model from local files (never a hub).

``load_stable_diffusion(pretrained, dtype, attention)`` accepts
- a diffusers folder (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``, as ``save_pretrained`` writes it), or
- a single-file SD checkpoint (.safetensors/.ckpt), read by diffusers' ``from_single_file`` with a local
  diffusers folder as ``config`` (the architecture; its weights are not read).
Every part comes back frozen (``requires_grad=False``), in eval mode and in ``dtype``; `fastfair.finetune`
then adds the trainable weights in fp32. The scheduler is always a ``DPMSolverMultistepScheduler`` built from
the folder's scheduler config (the engine's solver).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from fastfair.config import (
    CHECKPOINT_SUFFIXES, DIFFUSERS_SUBFOLDERS, EXPECTED_MODEL_LAYOUT, single_file_config_problems,
)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class StableDiffusionParts:
    tokenizer: Any
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: Any  # DPMSolverMultistepScheduler

    def pipeline(self):
        """A diffusers StableDiffusionPipeline of these parts (sharing them), without a safety checker: the
        evaluation judges the images itself, and a merged export records requires_safety_checker false."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                       unet=self.unet, scheduler=self.scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)


class LatentDecoder(nn.Module):
    """The VAE's decode as a module: latents [N, C, h, w] (the sampler's, scaled) -> images [N, 3, H, W] in
    float32 (float64 from a float64 VAE), in [-1, 1] when ``clamp``. A module so that
    ``fastfair.recompute.Recomputed`` can wrap it (a checkpoint per slice of images)."""

    def __init__(self, vae: nn.Module, clamp: bool = True):
        super().__init__()
        self.vae, self.clamp = vae, clamp

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        images = images.to(torch.promote_types(images.dtype, torch.float32))
        return images.clamp(-1, 1) if self.clamp else images


def torch_dtype(name) -> torch.dtype:
    """'fp32' | 'fp16' | 'bf16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in TORCH_DTYPES:
        raise ValueError(f"dtype={name!r}: expected one of {tuple(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def _missing_layout(path: Path, key: str) -> ValueError:
    state = "lacks " + ", ".join(f"{n}/" for n in DIFFUSERS_SUBFOLDERS if not (path / n).is_dir()) \
        if path.is_dir() else ("is not a checkpoint file" if path.exists() else "does not exist")
    return ValueError(f"{key}={path} {state}: expected {EXPECTED_MODEL_LAYOUT}")


def weights_variant(part: Path) -> Optional[str]:
    """None where a model part's folder holds plain weight files (model.safetensors, diffusion_pytorch_model.bin,
    ...), else the variant its files carry ("fp16" for diffusion_pytorch_model.fp16.safetensors, as a download of
    a model's fp16 files alone leaves them); from_pretrained reads a variant only when named."""
    names = [file.name for file in part.glob("*") if file.suffix in (".safetensors", ".bin")]
    if not names or any(name.count(".") == 1 for name in names):  # plain, or plain shards (name-00001-of-00002)
        return None
    variants = {name.split(".")[1].split("-")[0] for name in names}  # name.fp16[-00001-of-00002].safetensors
    return "fp16" if "fp16" in variants else sorted(variants)[0]


def _from_folder(path: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    def load(cls, part):
        return cls.from_pretrained(path / part, local_files_only=True, variant=weights_variant(path / part))

    return (CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True),
            load(CLIPTextModel, "text_encoder"), load(UNet2DConditionModel, "unet"), load(AutoencoderKL, "vae"))


def _from_single_file(path: Path, config: Optional[str], key: str, config_key: str):
    from diffusers import StableDiffusionPipeline

    problems = single_file_config_problems(config, str(path), config_key, key)
    if problems:
        raise ValueError(problems[0])
    # the optional components are not built (a config folder may list them without holding them)
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                    safety_checker=None, feature_extractor=None)
    return pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae


def vae_factor(block_out_channels) -> int:
    """The side of the image square one latent covers, from the VAE config's block_out_channels (one entry per
    level): 2 ** (levels - 1), 8 for every SD 1.x/2.x VAE."""
    return 2 ** (len(block_out_channels) - 1)


@dataclass
class SamplingConfigs:
    """What sampling settings are checked against, read from a model's config files without its weights."""
    scheduler: Any  # DPMSolverMultistepScheduler, as load_stable_diffusion builds it
    vae_factor: int


def _is_diffusers_folder(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_dir() for name in DIFFUSERS_SUBFOLDERS)


def _is_single_file(path: Path) -> bool:
    return path.is_file() and path.suffix in CHECKPOINT_SUFFIXES


def _config_root(path: Path, config: Optional[str]) -> Optional[Path]:
    """The folder whose scheduler/ and vae/ configs build the model at `path` (load_stable_diffusion's layouts),
    else None."""
    if _is_diffusers_folder(path):
        return path
    if _is_single_file(path) and config and Path(str(config)).is_dir():
        return Path(str(config))
    return None


def sampling_configs(pretrained, config: Optional[str] = None) -> Optional[SamplingConfigs]:
    """The scheduler and VAE factor of the model load_stable_diffusion(pretrained, config=config) builds, from
    the config files alone (milliseconds, where the load takes seconds to minutes), so that a step count or a
    resolution is refused before the load; None where the layout or a config is not one it reads (the load then
    says what is wrong)."""
    import inspect

    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler

    root = _config_root(Path(str(pretrained)), config)
    if root is None:
        return None
    try:
        scheduler = DPMSolverMultistepScheduler.from_pretrained(root / "scheduler", local_files_only=True)
        vae = AutoencoderKL.load_config(root / "vae", local_files_only=True)
    except (OSError, ValueError):  # a missing or unreadable config file: the load names it
        return None
    # a key the file leaves out takes the class's default, as from_pretrained builds it
    levels = vae.get("block_out_channels",
                     inspect.signature(AutoencoderKL.__init__).parameters["block_out_channels"].default)
    return SamplingConfigs(scheduler, vae_factor(levels))


def latent_size(unet_config) -> tuple:
    """(height, width) of the U-Net's latents: its config's ``sample_size``, an int for a square model (every
    SD 1.x/2.x) or a [height, width] pair."""
    size = unet_config.sample_size
    return (size, size) if isinstance(size, int) else tuple(size)


def set_attention(unet: torch.nn.Module, attention: str) -> None:
    """'sdpa' (PyTorch scaled-dot-product attention, diffusers' default) or 'xformers' (CUDA only)."""
    if attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    elif attention == "xformers":
        if importlib.util.find_spec("xformers") is None or not torch.cuda.is_available():
            raise ValueError("attention=xformers needs xformers installed and a CUDA device: use attention=sdpa")
        unet.enable_xformers_memory_efficient_attention()
    else:
        raise ValueError(f"attention={attention!r}: expected 'sdpa' or 'xformers'")


def load_stable_diffusion(pretrained, dtype="fp32", attention: str = "sdpa", device="cpu",
                          config: Optional[str] = None, key: str = "model.pretrained",
                          config_key: str = "model.config") -> StableDiffusionParts:
    """Frozen SD parts from a local diffusers folder or single-file checkpoint (module docstring).

    config: the architecture folder of a single-file checkpoint (fastfair.config.SINGLE_FILE_CONFIG_LAYOUT);
    key / config_key name pretrained / config in error messages (config keys or command-line flags).
    """
    from diffusers import DPMSolverMultistepScheduler

    path = Path(str(pretrained))
    if not str(pretrained):
        raise ValueError(f"{key} is empty: point it at {EXPECTED_MODEL_LAYOUT}")
    if _is_diffusers_folder(path):
        if config:  # it would go unread: the folder's own configs build the model
            raise ValueError(f"{config_key}={config} is read only with a single-file checkpoint, but {key}={pretrained} "
                             f"is a diffusers folder with its own configs: leave {config_key} out")
        tokenizer, text_encoder, unet, vae = _from_folder(path)
        scheduler_dir = path / "scheduler"
    elif _is_single_file(path):
        tokenizer, text_encoder, unet, vae = _from_single_file(path, config, key, config_key)
        scheduler_dir = Path(config) / "scheduler"
    else:
        raise _missing_layout(path, key)
    scheduler = DPMSolverMultistepScheduler.from_pretrained(scheduler_dir, local_files_only=True)
    dtype = torch_dtype(dtype)
    for module in (text_encoder, unet, vae):
        # nn.Module's own cast, which diffusers' override ends in: the override first warns of "modules that should
        # be kept in float32: []" at every cast that names a dtype (it tests the empty list against None)
        nn.Module.to(module.requires_grad_(False).eval(), device=device, dtype=dtype)
    set_attention(unet, attention)
    return StableDiffusionParts(tokenizer, text_encoder, unet, vae, scheduler)
