"""Image-semantics encoders for the toy world, standing in for CLIP and DINOv2 (seed Eq. 7).

No CLIP or DINOv2 weights exist for 32x32 toy portraits, and random-weight ViTs would measure little.
Two frozen encoders that see what the toy images are made of:

- ``latent``: the toy model's own trained VAE encoder, its posterior mean flattened ([N, 4 * 8 * 8]);
  it encodes the whole image (layout, colours, the face cues) the way the generator does;
- ``layout``: the image average-pooled to 8x8 RGB, minus each image's mean ([N, 192]): pose, size,
  background and clothing colour, the nuisance the debiasing must leave alone.

Both are differentiable, so the semantics loss's gradient reaches the finetuned images, and their
cosine similarities are what the toy demo reports as semantics preservation.
"""
from typing import Optional

import torch

from fastfair.losses.semantics import Preprocess, SemanticEncoder, SemanticsLoss
from fastfair.toy.face_bank import PooledPixels
from fastfair.toy.world import IMAGE_SIZE

LAYOUT_SIZE = 8
# identity preprocessing: [-1, 1] -> [0, 1] -> (x - 0.5) / 0.5 = [-1, 1], the VAE's own input range
IDENTITY = Preprocess(IMAGE_SIZE, (IMAGE_SIZE, IMAGE_SIZE), (0.5,) * 3, (0.5,) * 3)


def _vae_latent(vae, pixels: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixels).latent_dist.mean.flatten(1)


def toy_semantics(spec=None, weights_dir: Optional[str] = None) -> SemanticsLoss:
    """The toy semantics loss {"latent", "layout"} (module docstring); ``spec`` (a config entry) is unused."""
    from diffusers import AutoencoderKL

    from fastfair.toy.files import PIPELINE, weights_path

    vae = AutoencoderKL.from_pretrained(weights_path(PIPELINE, weights_dir), subfolder="vae", local_files_only=True)
    return SemanticsLoss({"latent": SemanticEncoder(vae, IDENTITY, _vae_latent),
                          "layout": SemanticEncoder(PooledPixels(LAYOUT_SIZE), IDENTITY, lambda model, pixels: model(pixels))})
