"""Training the toy text encoder and U-Net: standard noise-prediction (epsilon) diffusion training.

Data: a pool of captioned portraits (``captions.sample_captions``: each concept with its skew),
encoded once by the trained autoencoder (posterior mean and std; a fresh latent is drawn from the
posterior at every use). A step draws a batch from the pool, a timestep t ~ U{0..999} and noise eps,
and minimizes the min-SNR-5 weighted ||eps_theta(z_t, t, text) - eps||^2 (epsilon prediction with the
weight min(SNR_t, 5) / SNR_t, which converges faster than the plain loss). 10 % of captions are
replaced by "" so classifier-free guidance works. The text encoder is pretrained and frozen
(``text_encoder.py``), as SD's CLIP is; the U-Net trains from random weights and ends as its EMA.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F

from fastfair.testing import SD15_SCHEDULER
from fastfair.toy.captions import sample_captions
from fastfair.toy.models import build_unet
from fastfair.toy.text_encoder import tokenize
from fastfair.toy.training import fit
from fastfair.toy.world import draw_portraits

CAPTION_DROPOUT = 0.1
MIN_SNR_GAMMA = 5.0
EMA_DECAY = 0.995


@torch.no_grad()
def encode_pool(vae, count: int, seed: int, chunk: int = 512) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """``count`` captioned portraits as posterior (mean, std) [count, C, h, w] and their captions."""
    generator = torch.Generator().manual_seed(seed)
    means, stds, captions = [], [], []
    for start in range(0, count, chunk):
        batch_captions, labels = sample_captions(min(chunk, count - start), generator)
        posterior = vae.encode(draw_portraits(labels, generator).images).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += batch_captions
    return torch.cat(means), torch.cat(stds), captions


def train_unet(vae, text_encoder, tokenizer, steps: int, batch_size: int, pool_size: int, seed: int,
               lr: float = 2e-3):
    """A U-Net trained on the autoencoder's latents and the frozen text encoder's embeddings (eval mode)."""
    from diffusers import DDPMScheduler

    unet = build_unet(seed)
    noise_schedule = DDPMScheduler(**{k: SD15_SCHEDULER[k] for k in ("beta_start", "beta_end", "beta_schedule",
                                                                     "num_train_timesteps")})
    alphas_cumprod = noise_schedule.alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    means, stds, captions = encode_pool(vae, pool_size, seed + 2)
    prompts = sorted(set(captions)) + [""]
    prompt_index = torch.tensor([prompts.index(c) for c in captions])
    with torch.no_grad():
        embeddings = text_encoder(tokenize(tokenizer, prompts))[0]
    scaling = vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed + 3)

    def loss_at(step):
        rows = torch.randint(pool_size, (batch_size,), generator=generator)
        latents = (means[rows] + stds[rows] * torch.randn(means[rows].shape, generator=generator)) * scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(noise_schedule.config.num_train_timesteps, (batch_size,), generator=generator)
        dropped = torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT
        chosen = torch.where(dropped, len(prompts) - 1, prompt_index[rows])
        prediction = unet(noise_schedule.add_noise(latents, noise, timesteps), timesteps, embeddings[chosen]).sample
        weight = snr[timesteps].clamp(max=MIN_SNR_GAMMA) / snr[timesteps]
        per_sample = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        return (weight * per_sample).mean()

    fit(list(unet.parameters()), loss_at, steps, lr, "U-Net", warmup=100, ema_decay=EMA_DECAY)
    return unet.eval()
