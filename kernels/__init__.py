"""Fused per-step kernels of the DFT engine, installed as ``fastfair.kernels``.

Two ops (DESIGN.md, "Kernels"):

- ``solver_step``: CFG combine + data prediction + DPM-Solver++ update in one pass.
- ``grad_fanout``: the scaled, CFG-split upstream gradients of a chunk of steps.

This module exposes the public functions; the backends live one per file.
"""
from .reference import grad_fanout_torch, solver_step_torch

solver_step = solver_step_torch
grad_fanout = grad_fanout_torch

__all__ = ["solver_step", "grad_fanout", "solver_step_torch", "grad_fanout_torch"]
