"""Backend selection for the two ops: ``FASTFAIR_KERNELS=auto|triton|native|torch`` (read at every call) or
the ``backend=`` keyword, which wins over the environment.

- ``auto``: the fastest backend available for the tensors' device, falling back quietly to torch.
- an explicit name: that backend, or a RuntimeError saying why it cannot run on this device.

Only the torch backend records autograd graphs. With grad enabled and an input that requires grad, ``auto`` takes
torch and an explicit triton/native raises (their outputs would silently carry no gradient); the engine calls
the ops on detached tensors, where every backend applies.

Arguments are validated once here (kernels/checks.py), so every backend sees the same valid input.
"""
import importlib
import os
from typing import Callable, Optional, Sequence, Tuple

import torch

from . import native, triton_support
from .checks import StepScalars, check_grad_fanout, check_solver_step, step_scalars
from .reference import grad_fanout_torch, solver_step_torch

ENV = "FASTFAIR_KERNELS"
BACKENDS = ("auto", "triton", "native", "torch")
# Fastest first. On CUDA, native before Triton: at the launch-bound real sizes one C++ dispatch costs less than
# Triton's Python launcher, and both stream at large sizes (bench/gpu_check.sh measures it). On CPU, Triton
# only interprets.
AUTO_ORDER = {"cuda": ("native", "triton", "torch"), "cpu": ("native", "torch")}


def _solver_step_torch(z, eps_c, eps_u, m_prev, scalars: StepScalars, out=None):
    return solver_step_torch(z, eps_c, eps_u, m_prev, **scalars._asdict(), out=out)


def _grad_fanout_torch(g, scales, branch_weights, out):
    return grad_fanout_torch(g, scales, branch_weights, out=out)


# Every backend function takes the validated arguments: solver_step(z, eps_c, eps_u, m_prev, scalars, out)
# and grad_fanout(g, scales, branch_weights, out). Strings name modules imported on first use.
_FUNCTIONS = {
    "solver_step": {"torch": _solver_step_torch, "native": ".solver_step_native", "triton": ".solver_step_triton"},
    "grad_fanout": {"torch": _grad_fanout_torch, "native": ".grad_fanout_native", "triton": ".grad_fanout_triton"},
}


def unavailable_reason(backend: str, device_type: str, index: Optional[int] = None) -> Optional[str]:
    """None when ``backend`` can run on tensors of this device type (CUDA: on GPU ``index``, default the current
    one), else a sentence saying why not."""
    if backend == "torch":
        return None
    if backend == "native":
        return native.unavailable_reason(device_type, index)
    if backend == "triton":
        return triton_support.unavailable_reason(device_type)
    raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def _triton_steps_inexactly(dtype: Optional[torch.dtype]) -> bool:
    """A float64 solver step on a triton that rounds its float64 scalars (solver_step_triton.float64_scalars_exact)."""
    if dtype != torch.float64:
        return False
    from .solver_step_triton import float64_scalars_exact

    return not float64_scalars_exact()


def resolve_backend(device: torch.device, backend: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                    differentiable: bool = False) -> str:
    """The concrete backend (triton, native or torch) that runs an op on ``device`` (for a solver step, on a
    trajectory of ``dtype``); ``differentiable``: the call must record an autograd graph (only torch does)."""
    name = backend if backend is not None else os.environ.get(ENV) or "auto"
    if name not in BACKENDS:
        source = "backend=" if backend is not None else f"{ENV}="
        raise ValueError(f"{source}{name!r} is not a kernel backend; choose one of {', '.join(BACKENDS)}")
    if differentiable and name != "torch":
        if name == "auto":
            return "torch"
        raise RuntimeError(f"kernel backend {name!r} records no autograd graph, but an input requires grad: its "
                           "outputs would carry no gradient. Call it under torch.no_grad() or on detached tensors, "
                           "or use backend='torch'")
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ()):
            if candidate == "triton" and triton_support.interpreting():
                continue  # the interpreter works on CUDA tensors too, but far slower than torch
            if unavailable_reason(candidate, device.type, device.index) is None:
                if candidate == "triton" and _triton_steps_inexactly(dtype):
                    continue
                return candidate
        return "torch"
    reason = unavailable_reason(name, device.type, device.index)
    if reason is not None:
        raise RuntimeError(f"kernel backend {name!r} cannot run on {device.type} tensors: {reason}")
    return name


def _differentiable(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def backend_function(op: str, backend: str) -> Callable:
    """The implementation of ``op`` ('solver_step' or 'grad_fanout') in ``backend``; imports it on first use."""
    fn = _FUNCTIONS[op][backend]
    if isinstance(fn, str):
        fn = getattr(importlib.import_module(fn, __package__), f"{op}_{backend}")
        _FUNCTIONS[op][backend] = fn
    return fn


def solver_step(
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
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """One fused DPM-Solver++ step (kernels/reference.py has the math). z, m_prev: [B, ...] fp32 or fp64;
    eps_c, eps_u: [B, ...] fp16/bf16/fp32/fp64 (one dtype), eps_u None without CFG; m_prev is read only when
    b1 != 0. Computes in z's dtype; returns (z_next, m), new tensors or ``out = (z_next, m)`` (contiguous)."""
    scalars = step_scalars(guidance=guidance, cz=cz, ce=ce, a=a, b0=b0, b1=b1)
    z, eps_c, eps_u, m_prev, out = check_solver_step(z, eps_c, eps_u, m_prev, scalars.b1, out)
    differentiable = _differentiable(z, eps_c, eps_u, m_prev)
    fn = backend_function("solver_step", resolve_backend(z.device, backend, z.dtype, differentiable))
    return fn(z, eps_c, eps_u, m_prev, scalars, out)


def grad_fanout(
    g: torch.Tensor,
    scales: Sequence[float],
    branch_weights: Sequence[float],
    *,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Upstream gradients of a chunk of steps in one pass: g [B, ...] -> [len(scales), len(branch_weights), B, ...]
    with out[j, b] = scales[j] * branch_weights[b] * g, computed in fp32 (fp64 for an fp64 g), stored in
    ``out_dtype`` (default: out's dtype, else g's), into ``out`` (contiguous) when given."""
    g, scales, branch_weights, out = check_grad_fanout(g, scales, branch_weights, out_dtype, out)
    name = resolve_backend(g.device, backend, differentiable=_differentiable(g))  # checked for an empty chunk too
    if out.numel() == 0:
        return out
    return backend_function("grad_fanout", name)(g, scales, branch_weights, out)
