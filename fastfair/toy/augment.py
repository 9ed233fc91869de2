"""Augmentations that make the toy classifiers and detector robust to generated (decoded, blurrier) images."""
import torch
import torch.nn.functional as F

BLUR_TAPS = 5


def random_blur(images: torch.Tensor, generator: torch.Generator, max_sigma: float = 1.2) -> torch.Tensor:
    """Gaussian blur with a per-image sigma ~ U(0, max_sigma) pixels; images [N, C, H, W]."""
    count, channels = images.shape[:2]
    sigma = (max_sigma * torch.rand(count, generator=generator)).clamp(min=0.05)
    offsets = torch.arange(BLUR_TAPS, dtype=images.dtype) - BLUR_TAPS // 2
    taps = torch.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    taps = (taps / taps.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # [N * C, taps]
    flat = F.pad(images.reshape(1, count * channels, *images.shape[2:]), [BLUR_TAPS // 2] * 4, mode="replicate")
    flat = F.conv2d(flat, taps[:, None, :, None], groups=count * channels)
    flat = F.conv2d(flat, taps[:, None, None, :], groups=count * channels)
    return flat.reshape(images.shape)


def random_noise(images: torch.Tensor, generator: torch.Generator, max_std: float = 0.08) -> torch.Tensor:
    """Add Gaussian pixel noise with a per-image std ~ U(0, max_std), clamped to [-1, 1]."""
    std = max_std * torch.rand(images.shape[0], 1, 1, 1, generator=generator)
    return (images + std * torch.randn(images.shape, generator=generator)).clamp(-1, 1)


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur then noise: what the trained autoencoder's decoder does to sharp world images, roughly."""
    return random_noise(random_blur(images, generator), generator)
