"""Native backend of ``solver_step``: the C++/OpenMP (CPU) or CUDA kernel in csrc/, via torch.ops.fastfair."""
from typing import Optional, Tuple

import torch

from .checks import StepScalars
from .native import load


def solver_step_native(
    z: torch.Tensor,
    eps_c: torch.Tensor,
    eps_u: Optional[torch.Tensor],
    m_prev: Optional[torch.Tensor],
    scalars: StepScalars,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(z_next, m) of one step; arguments as validated by ``fastfair.kernels.solver_step``."""
    z_next, m = out if out is not None else (torch.empty_like(z), torch.empty_like(z))
    load().solver_step_out(z, eps_c, eps_u, m_prev, z_next, m, *scalars)
    return z_next, m
