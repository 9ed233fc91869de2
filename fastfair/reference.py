"""The literal Algorithm A.1 (seed paragraph 0114): the whole unrolled graph, for tests and the baseline.

``reference_sample`` builds the full autograd graph of the S-step sampler. Adjusted (the default): the U-Net
input is detached (B_t = I) and a hook scales the gradient of the CFG-combined eps by C_i. Unadjusted: neither
(the exact gradient of Eq. 9, seed Fig. 6a). The solver step is either fastfair's own float64 step
(``step="fastfair"``) or diffusers' ``scheduler.step`` (``step="diffusers"``, float32 inside), the cross-check.
Memory grows linearly with S: that is what ``fastfair.dft.sample`` avoids.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .dft import _unet_eps, schedule_for, unet_input_dtype
from .schedule import diffusers_scheduler


def reference_sample(
    unet: torch.nn.Module,
    scheduler: Any,
    z_T: torch.Tensor,
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor] = None,
    *,
    num_steps: int = 20,
    guidance_scale: float = 7.5,
    coefficients: str = "paper",
    adjusted: bool = True,
    step: str = "fastfair",
) -> torch.Tensor:
    """z_0 [B, C, H, W] with the full graph of the unrolled sampler (arguments as ``fastfair.dft.sample``).

    adjusted: detach the U-Net input and scale dL/d eps_i by C_i (Algorithm A.1); False gives the exact,
        unadjusted gradient. step: ``fastfair`` (float64-capable coefficients of ``fastfair.schedule``) or
        ``diffusers`` (``DPMSolverMultistepScheduler.step``).
    """
    if step not in ("fastfair", "diffusers"):
        raise ValueError(f"step={step!r}: expected 'fastfair' or 'diffusers'")
    sched = schedule_for(scheduler, num_steps)
    C = sched.adjustment(coefficients)
    w = float(guidance_scale)
    use_cfg = uncond is not None and w != 1.0
    batch = z_T.shape[0]
    emb = cond.expand(batch, *cond.shape[1:])
    if use_cfg:
        emb = torch.cat([uncond.expand(batch, *uncond.shape[1:]), emb])
    unet_dtype = unet_input_dtype(unet)

    if step == "diffusers":
        stepper = diffusers_scheduler(scheduler)
        stepper.set_timesteps(num_steps)

    z = z_T.to(torch.float64 if z_T.dtype == torch.float64 else torch.float32)
    m_prev = None
    for i in range(num_steps):
        t_int = int(sched.timesteps[i])
        z_in = z.detach() if adjusted else z
        x = z_in.to(unet_dtype)
        x = torch.cat([x, x]) if use_cfg else x
        t = torch.full((x.shape[0],), t_int, dtype=torch.long, device=z.device)
        eps = _unet_eps(unet, x, t, emb)
        eps = eps[:batch] + w * (eps[batch:] - eps[:batch]) if use_cfg else eps
        if adjusted and eps.requires_grad:
            eps.register_hook(lambda grad, c=float(C[i]): grad * c)
        if step == "diffusers":
            z = stepper.step(eps.to(z.dtype), t_int, z).prev_sample
        else:
            m = sched.cz[i] * z + sched.ce[i] * eps.to(z.dtype)
            z_next = sched.a[i] * z + sched.b0[i] * m
            if sched.b1[i] != 0.0:
                z_next = z_next + sched.b1[i] * m_prev
            z, m_prev = z_next, m
    return z
