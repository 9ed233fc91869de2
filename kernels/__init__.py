"""Fused per-step kernels of the DFT engine, installed as ``fastfair.kernels``.

Two ops (DESIGN.md, "Kernels"), each with a torch reference, a Triton and a native (C++/OpenMP, CUDA) backend:

- ``solver_step``: CFG combine + data prediction + DPM-Solver++ update in one pass.
- ``grad_fanout``: the scaled, CFG-split upstream gradients of a chunk of steps in one pass.

``solver_step`` and ``grad_fanout`` dispatch by ``FASTFAIR_KERNELS=auto|triton|native|torch`` or ``backend=``
(dispatch.py) after one argument check (checks.py). The backends live one per file: reference.py (torch),
*_triton.py (+ triton_support.py), *_native.py (+ native.py, which loads fastfair._C built from csrc/).
testing.py holds the inputs and comparisons the tests and bench/kernels.py share.
"""
from .dispatch import BACKENDS, grad_fanout, resolve_backend, solver_step, unavailable_reason
from .reference import grad_fanout_torch, solver_step_torch

__all__ = [
    "solver_step",
    "grad_fanout",
    "resolve_backend",
    "unavailable_reason",
    "BACKENDS",
    "solver_step_torch",
    "grad_fanout_torch",
]
