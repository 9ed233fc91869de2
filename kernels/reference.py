"""PyTorch reference of the two engine ops; every other backend is tested against it.

Step math (one DPM-Solver++ step, data prediction, DESIGN.md, "The one fact the speed rests on"):

    eps    = eps_u + w (eps_c - eps_u)          (eps = eps_c when eps_u is None)
    m      = cz * z + ce * eps                  (x0 prediction; epsilon: cz = 1/alpha, ce = -sigma/alpha)
    z_next = a * z + b0 * m + b1 * m_prev       (b1 = 0 and m_prev may be None at order 1)

Fan-out math: out[j, b] = scales[j] * branch_weights[b] * g.
"""
from typing import Optional, Sequence, Tuple

import torch


def solver_step_torch(
    z: torch.Tensor,
    eps_c: torch.Tensor,
    eps_u: Optional[torch.Tensor],
    m_prev: Optional[torch.Tensor],
    *,
    guidance: float,
    cz: float,
    ce: float,
    a: float,
    b0: float,
    b1: float,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One solver step, unfused. z, m_prev: [B, ...] in the trajectory dtype (fp32 or fp64);
    eps_c, eps_u: [B, ...] in any float dtype (cast to z's dtype). Returns (z_next, m), z's dtype,
    written into ``out = (z_next, m)`` when given. m_prev is read only when b1 != 0."""
    eps = eps_c.to(z.dtype)
    if eps_u is not None:
        eps_u = eps_u.to(z.dtype)
        eps = eps_u + guidance * (eps - eps_u)
    m = cz * z + ce * eps
    z_next = a * z + b0 * m
    if b1 != 0.0:
        if m_prev is None:
            raise ValueError("solver_step: b1 != 0 (second-order step) needs m_prev")
        z_next = z_next + b1 * m_prev
    if out is None:
        return z_next, m
    out[0].copy_(z_next)
    out[1].copy_(m)
    return out


def grad_fanout_torch(
    g: torch.Tensor,
    scales: Sequence[float],
    branch_weights: Sequence[float],
    *,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Upstream gradients of a chunk of steps. g: [B, ...]; returns [len(scales), len(branch_weights), B, ...]
    with out[j, b] = scales[j] * branch_weights[b] * g, computed in g's dtype (or fp32 if lower) then cast."""
    out_dtype = out_dtype or (out.dtype if out is not None else g.dtype)
    compute = g if g.dtype in (torch.float32, torch.float64) else g.float()
    if out is None:
        out = torch.empty((len(scales), len(branch_weights)) + tuple(g.shape), dtype=out_dtype, device=g.device)
    for j, s in enumerate(scales):
        for b, wb in enumerate(branch_weights):
            out[j, b].copy_(compute * (float(s) * float(wb)))
    return out
