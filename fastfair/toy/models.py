"""The toy text-to-image model: Stable Diffusion 1.x's architecture at toy size, in diffusers format.

32x32 RGB images <-> 8x8x4 latents (a trained ``AutoencoderKL``, downsampling 4x); a 2-layer CLIP text
encoder (64 wide, 32 tokens); a two-level ``UNet2DConditionModel`` with cross-attention at the 4x4
level and in the middle; SD 1.5's ``DPMSolverMultistepScheduler`` (scaled_linear betas, epsilon).
The folder loads with ``StableDiffusionPipeline.from_pretrained(path, safety_checker=None,
requires_safety_checker=False)`` like real SD weights.
"""
import os
from typing import Optional

import torch

from fastfair.testing import SD15_SCHEDULER
from fastfair.pipeline_folder import save_pipeline_folder
from fastfair.toy.tokenizer import MODEL_MAX_LENGTH

IMAGE_SIZE = 32
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE, layers_per_block=1,
    block_out_channels=(16, 32, 64), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=4,
)
LATENT_SIZE = IMAGE_SIZE // 2 ** (len(VAE_CONFIG["block_out_channels"]) - 1)
TEXT_WIDTH = 64
UNET_CONFIG = dict(
    sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_WIDTH, attention_head_dim=4, norm_num_groups=16,
)
TEXT_CONFIG = dict(
    hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=MODEL_MAX_LENGTH, projection_dim=TEXT_WIDTH, hidden_act="quick_gelu",
)


def build_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def build_unet(seed: int):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def build_text_encoder(tokenizer, seed: int):
    """A randomly initialized ``CLIPTextModel`` sized for the tokenizer's vocabulary and special tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TEXT_CONFIG)
    return CLIPTextModel(config)


def build_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**SD15_SCHEDULER)


def assemble_pipeline(vae, text_encoder, tokenizer, unet):
    """The parts as a ``StableDiffusionPipeline`` (no safety checker, no feature extractor)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_pipeline(pipeline, folder: str) -> None:
    """Write the diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), readable
    under transformers 4 and 5 (`fastfair.pipeline_folder`)."""
    save_pipeline_folder(pipeline, folder)


def load_pipeline(folder: str, dtype: Optional[torch.dtype] = None):
    """``StableDiffusionPipeline.from_pretrained`` on a toy folder, the way real SD weights load."""
    from diffusers import StableDiffusionPipeline

    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder (no model_index.json); "
                                "run `python -m fastfair.toy.build` to make one")
    options = {} if dtype is None else {"torch_dtype": dtype}
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   **options)
