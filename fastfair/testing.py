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
