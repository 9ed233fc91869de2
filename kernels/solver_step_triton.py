"""Triton backend of ``solver_step``: kernel, launcher, functional wrapper.

One program handles BLOCK consecutive elements: it loads z, eps_c (eps_u, m_prev), computes in z's dtype
    eps = eps_u + w (eps_c - eps_u);  m = cz z + ce eps;  z_next = a z + b0 m (+ b1 m_prev)
and stores z_next and m. Offsets are int64 so tensors past 2^31 elements index correctly.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .checks import StepScalars
from .triton_support import LAUNCH_OPTIONS, block_size, on_device_of


@triton.jit
def _as(value, dtype):
    # A scalar in the compute dtype. tl.full keeps a float64 argument exact under the interpreter, where
    # `.to()`/tl.cast would first round a Python float to float32.
    return tl.full([1], value, dtype)


@triton.jit
def solver_step_kernel(
    z_ptr, eps_c_ptr, eps_u_ptr, m_prev_ptr, z_next_ptr, m_ptr, n_elements,
    guidance: tl.float64, cz: tl.float64, ce: tl.float64, a: tl.float64, b0: tl.float64, b1: tl.float64,
    HAS_UNCOND: tl.constexpr, HAS_PREV: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    z = tl.load(z_ptr + offsets, mask=mask)
    dtype = z.dtype
    eps = tl.load(eps_c_ptr + offsets, mask=mask).to(dtype)
    if HAS_UNCOND:
        eps_u = tl.load(eps_u_ptr + offsets, mask=mask).to(dtype)
        eps = eps_u + _as(guidance, dtype) * (eps - eps_u)
    m = _as(cz, dtype) * z + _as(ce, dtype) * eps
    z_next = _as(a, dtype) * z + _as(b0, dtype) * m
    if HAS_PREV:
        z_next = z_next + _as(b1, dtype) * tl.load(m_prev_ptr + offsets, mask=mask)
    tl.store(z_next_ptr + offsets, z_next, mask=mask)
    tl.store(m_ptr + offsets, m, mask=mask)


def float64_scalars_exact() -> bool:
    """Whether launches pass the kernel's tl.float64-annotated scalars as float64: interpreted (Python floats), or
    compiled by a triton whose binder reads the annotation (3.6 and later do; 3.0's, which torch 2.4 pins, types
    every Python float float32, and a float64 trajectory then steps with coefficients rounded to 6e-8)."""
    from .triton_support import interpreting

    if interpreting():
        return True
    params = {p.name: p for p in getattr(solver_step_kernel, "params", ())}
    return getattr(params.get("guidance"), "annotation_type", "") == "fp64"


def solver_step_triton(
    z: torch.Tensor,
    eps_c: torch.Tensor,
    eps_u: Optional[torch.Tensor],
    m_prev: Optional[torch.Tensor],
    scalars: StepScalars,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(z_next, m) of one step; arguments as validated by ``fastfair.kernels.solver_step``."""
    if z.dtype == torch.float64 and not float64_scalars_exact():
        raise RuntimeError(f"the Triton solver step in float64 needs triton >= 3.6: triton {triton.__version__} "
                           "passes its float64 coefficients as float32; use backend='native' or 'torch' for float64 "
                           "(FASTFAIR_KERNELS=auto does)")
    z_next, m = out if out is not None else (torch.empty_like(z), torch.empty_like(z))
    n = z.numel()
    if n:
        block = block_size()
        # Absent tensors get z as a placeholder pointer: the constexpr flags compile their loads away. Launched on
        # the tensors' GPU: Triton launches on the current device, which need not be theirs.
        with on_device_of(z):
            solver_step_kernel[(triton.cdiv(n, block),)](
                z, eps_c, z if eps_u is None else eps_u, z if m_prev is None else m_prev, z_next, m, n, *scalars,
                HAS_UNCOND=eps_u is not None, HAS_PREV=m_prev is not None, BLOCK=block, **LAUNCH_OPTIONS,
            )
    return z_next, m
