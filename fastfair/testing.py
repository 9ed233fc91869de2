"""Tiny, randomly initialized Stable-Diffusion-shaped models for tests and CPU benchmarks (no downloads)."""
from __future__ import annotations

from typing import Any, Dict

import torch

# Stable Diffusion 1.x's scheduler, as shipped in its scheduler/scheduler_config.json.
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
