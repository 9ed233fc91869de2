"""Argument checks of the two ops, run once by the dispatcher so every backend gets the same valid input.

They raise early, naming the argument and the fix: TypeError for a wrong type/dtype, ValueError for a wrong
shape, device, layout or a missing m_prev. On success they return the inputs made contiguous (a no-op for the
engine's tensors) and the output buffer(s), which must already be contiguous: the kernels write flat memory.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

TRAJECTORY_DTYPES = (torch.float32, torch.float64)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class StepScalars(NamedTuple):
    """The per-step scalars of solver_step, as Python floats (see kernels/reference.py for the math)."""

    guidance: float
    cz: float
    ce: float
    a: float
    b0: float
    b1: float


def _is_text(value) -> bool:
    # float("7.5") parses, and a string is a sequence of characters: text is refused, not read as numbers
    return isinstance(value, (str, bytes))


def step_scalars(guidance, cz, ce, a, b0, b1) -> StepScalars:
    values = (guidance, cz, ce, a, b0, b1)
    try:
        if any(map(_is_text, values)):
            raise TypeError("got text")
        return StepScalars(*map(float, values))
    except (TypeError, ValueError) as err:
        raise TypeError(f"solver_step: guidance, cz, ce, a, b0, b1 must be numbers ({err})") from None


def _tensor(op: str, name: str, t, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; use one of {allowed}")
    if t.layout != torch.strided:  # sparse or other layouts: torch's own error named no argument
        raise ValueError(f"{op}: {name} has layout {t.layout}; the kernels take dense tensors (pass {name}.to_dense())")


def _like(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str, shape=None) -> None:
    """t must have ref's shape (or ``shape``) and ref's device."""
    if (t.shape != ref.shape) if shape is None else (tuple(t.shape) != shape):
        like = f", the shape of {ref_name}" if shape is None else ""
        expected = tuple(ref.shape) if shape is None else shape
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {expected}{like}")
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; move it there")


def _span(t: torch.Tensor) -> Tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.nbytes


def _writable(op: str, name: str, t: torch.Tensor, taken: Sequence[Tuple[int, int]]) -> Tuple[int, int]:
    """t must be contiguous and its memory disjoint from the ``taken`` spans; returns t's span."""
    if not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (the kernels write flat memory); pass a fresh buffer")
    if t.requires_grad and torch.is_grad_enabled():  # the native and Triton kernels wrote into it unseen by autograd
        raise ValueError(f"{op}: {name} requires grad, and a write into it cannot be differentiated; pass a buffer "
                         "without grad, or no out (the result is then differentiable)")
    start, stop = span = _span(t)
    if start != stop and any(start < o_stop and o_start < stop for o_start, o_stop in taken):
        raise ValueError(f"{op}: {name} overlaps another argument's memory; write into a separate buffer")
    return span


def check_solver_step(
    z, eps_c, eps_u, m_prev, b1: float, out
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[Tuple]]:
    """Validate solver_step's tensors (b1: the validated scalar). m_prev is dropped (None) at order 1
    (b1 == 0), as the reference never reads it there."""
    op = "solver_step"
    _tensor(op, "z", z, TRAJECTORY_DTYPES)
    _tensor(op, "eps_c", eps_c, FLOAT_DTYPES)
    _like(op, "eps_c", eps_c, z, "z")
    if eps_u is not None:
        _tensor(op, "eps_u", eps_u, FLOAT_DTYPES)
        _like(op, "eps_u", eps_u, z, "z")
        if eps_u.dtype != eps_c.dtype:
            raise TypeError(f"{op}: eps_u is {eps_u.dtype} but eps_c is {eps_c.dtype}; pass both in one dtype")
    if b1 == 0.0:
        m_prev = None
    elif m_prev is None:
        raise ValueError(f"{op}: b1 != 0 (second-order step) needs m_prev, the previous step's m")
    else:
        _tensor(op, "m_prev", m_prev, (z.dtype,))
        _like(op, "m_prev", m_prev, z, "z")
    inputs = [t.contiguous() if t is not None else None for t in (z, eps_c, eps_u, m_prev)]
    if out is not None:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"{op}: out must be a pair (z_next, m) of tensors")
        taken = [_span(t) for t in inputs if t is not None]
        for t, name in zip(out, ("out[0] (z_next)", "out[1] (m)")):
            _tensor(op, name, t, (z.dtype,))
            _like(op, name, t, z, "z")
            taken.append(_writable(op, name, t, taken))
        out = tuple(out)
    return (*inputs, out)


def check_grad_fanout(
    g, scales, branch_weights, out_dtype, out
) -> Tuple[torch.Tensor, List[float], List[float], torch.Tensor]:
    """Validate grad_fanout's arguments; returns g (contiguous), the scalars as float lists and the output
    buffer: ``out``, or a new [len(scales), len(branch_weights), *g.shape] tensor of out_dtype (default g's)."""
    op = "grad_fanout"
    _tensor(op, "g", g, FLOAT_DTYPES)
    try:
        if _is_text(scales) or _is_text(branch_weights):
            raise TypeError("got text")
        scales, branch_weights = list(scales), list(branch_weights)
        if any(map(_is_text, scales + branch_weights)):
            raise TypeError("got text")
        scales = [float(s) for s in scales]
        branch_weights = [float(w) for w in branch_weights]
    except (TypeError, ValueError) as err:
        raise TypeError(f"{op}: scales and branch_weights must be sequences of numbers ({err})") from None
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype {out_dtype} is not a float dtype; use the U-Net's dtype")
    g = g.contiguous()
    if out is not None:
        _tensor(op, "out", out, FLOAT_DTYPES)
        if out_dtype is not None and out.dtype != out_dtype:
            raise TypeError(f"{op}: out has dtype {out.dtype} but out_dtype is {out_dtype}; make them agree")
        _like(op, "out", out, g, "g", (len(scales), len(branch_weights)) + tuple(g.shape))
        _writable(op, "out", out, [_span(g)])
        return g, scales, branch_weights, out
    shape = (len(scales), len(branch_weights)) + tuple(g.shape)
    return g, scales, branch_weights, torch.empty(shape, dtype=out_dtype or g.dtype, device=g.device)
