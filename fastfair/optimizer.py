"""The optimizer (AdamW, or bitsandbytes' 8-bit AdamW) and learning-rate schedule of a training run, and the size
of the optimizer's state for the memory plan."""
from __future__ import annotations

import math
from typing import Optional

import torch

from fastfair.config import TrainConfig


def lr_lambda(cfg: TrainConfig):
    """LambdaLR's factor of optim.lr at a step: a linear warm-up over optim.warmup_steps, then optim.scheduler's
    constant, linear or cosine decay toward max_steps."""
    warmup, total, kind = cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return {"constant": 1.0, "linear": max(0.0, 1 - progress),
                "cosine": 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))}[kind]
    return factor


def build_optimizer(cfg: TrainConfig, params):
    o = cfg.optim
    if o.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as error:  # an optional package (the quant extra)
            raise ValueError(f"optim.name=adamw8bit needs bitsandbytes ({error}): pip install bitsandbytes, or "
                             "use optim.name=adamw") from None

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def optimizer_state_bytes(name: str, params, deepspeed: bool = False, zero_ranks: Optional[int] = None) -> int:
    """The bytes of one rank's optimizer state once it has stepped (AdamW makes it lazily, at its first step): two
    moments per weight, in the weight's dtype (adamw), or one byte each for tensors of 4096 elements or more
    (bitsandbytes' 8-bit AdamW, plus a float32 absmax per 256-element block; smaller ones stay 32-bit).
    deepspeed: the moments are float32 whatever the model copies' half dtype. zero_ranks: under ZeRO stage >= 1,
    the ranks it splits the state over: each rank's optimizer holds one flat partition of all the weights (its one
    parameter group), so the 8-bit optimizer sees one large tensor, not each weight (LoRA's are mostly under 4096
    elements)."""
    if zero_ranks:
        return _moment_bytes(name, math.ceil(sum(p.numel() for p in params) / zero_ranks), 4)
    return sum(_moment_bytes(name, p.numel(), 4 if deepspeed else p.element_size()) for p in params)


def _moment_bytes(name: str, numel: int, element_size: int) -> int:
    if name == "adamw8bit" and numel >= 4096:
        return 2 * (numel + 4 * math.ceil(numel / 256))
    return 2 * numel * (4 if name == "adamw8bit" else element_size)


def saved_optimizer_name(state: Optional[dict]) -> Optional[str]:
    """optim.name of a saved optimizer state (checkpoints before optimizer_name was saved): bitsandbytes' 8-bit
    AdamW keeps its moments as state1/state2, torch's AdamW as exp_avg/exp_avg_sq; None before any step."""
    for param_state in (state or {}).get("state", {}).values():
        return "adamw8bit" if "state1" in param_state else "adamw"
    return None
