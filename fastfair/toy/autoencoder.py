"""Training the toy ``AutoencoderKL``: 32x32 portraits <-> 8x8x4 latents.

Loss per batch of fresh world images x: mean squared reconstruction error of decode(z), z drawn from
the encoder's posterior, plus ``KL_WEIGHT`` x the posterior's KL divergence to N(0, I) per latent
value (a light regularizer, as SD's autoencoder uses, so the latent space stays smooth). Afterwards
``scaling_factor`` = 1 / std of the posterior means, the convention SD's 0.18215 comes from.
"""
import torch
import torch.nn.functional as F

from fastfair.toy.models import build_vae
from fastfair.toy.training import fit
from fastfair.toy.world import draw_random_portraits

KL_WEIGHT = 1e-5


def autoencoder_loss(vae, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    posterior = vae.encode(images).latent_dist
    latents = posterior.sample(generator)
    reconstruction = vae.decode(latents).sample
    kl = posterior.kl().sum() / posterior.mean.numel()
    return F.mse_loss(reconstruction, images) + KL_WEIGHT * kl


@torch.no_grad()
def latent_std(vae, seed: int, count: int = 512) -> float:
    images = draw_random_portraits(count, seed).images
    return vae.encode(images).latent_dist.mean.std().item()


def train_autoencoder(steps: int, batch_size: int, seed: int, std_images: int = 512, lr: float = 3e-3):
    """A trained toy ``AutoencoderKL`` (eval mode); ``scaling_factor`` from ``std_images`` fresh portraits."""
    vae = build_vae(seed)
    generator = torch.Generator().manual_seed(seed)

    def loss_at(step):
        images = draw_random_portraits(batch_size, seed=seed * 1_000_003 + step).images
        return autoencoder_loss(vae, images, generator)

    fit(list(vae.parameters()), loss_at, steps, lr, "autoencoder")
    vae.eval()
    vae.register_to_config(scaling_factor=1.0 / latent_std(vae, seed + 1, std_images))
    return vae
