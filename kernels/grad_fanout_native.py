"""Native backend of ``grad_fanout``: the C++/OpenMP (CPU) or CUDA kernel in csrc/, via torch.ops.fastfair."""
from typing import List

import torch

from .native import load


def grad_fanout_native(g: torch.Tensor, scales: List[float], branch_weights: List[float],
                       out: torch.Tensor) -> torch.Tensor:
    """Writes out[j, b] = scales[j] * branch_weights[b] * g; arguments as validated by
    ``fastfair.kernels.grad_fanout``."""
    load().grad_fanout_out(g, scales, branch_weights, out)
    return out
