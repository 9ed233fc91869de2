"""The exponential moving average of the trained weights that export and evaluation use by default."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn


class EMA:
    """fp32 exponential moving average of named parameters, updated after each optimizer step taken:

        ema <- d_t ema + (1 - d_t) p,   d_t = min(decay, (1 + s) / (10 + s)),  s = t - 1 > 0; d_1 = 0   (warmup)
                                        d_t = decay                                                 (no warmup)

    at the t-th step taken. The warm-up is the cap of diffusers' EMAModel's default schedule (the public code's
    EMA; EMAModel's use_ema_warmup=True is another, power-law, schedule): d_1 = 0, so the average starts at the
    first step's weights, and it follows the run closely until (1 + s) / (10 + s) passes decay (s ~ 2200 for
    0.996). Without it the start weights fade as decay^t: at decay 0.999, 82 % of the average at
    step 200 (a first checkpoint) is the untrained model."""

    def __init__(self, params: Dict[str, nn.Parameter], decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {name: p.detach().float().clone() for name, p in params.items()}

    def decay_at(self, taken: int) -> float:
        """d_t for the t-th optimizer step taken (t >= 1)."""
        if not self.warmup:
            return self.decay
        s = taken - 1
        return 0.0 if s <= 0 else min(self.decay, (1 + s) / (10 + s))

    @torch.no_grad()
    def update(self, params: Dict[str, nn.Parameter], taken: int) -> None:
        """After the t-th optimizer step taken (t = taken: skipped steps do not count)."""
        weight = 1 - self.decay_at(taken)
        for name, p in params.items():
            self.shadow[name].lerp_(p.detach().float(), weight)
