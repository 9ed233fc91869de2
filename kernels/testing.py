"""Inputs and checks shared by the kernel tests (tests/test_kernels_*.py) and the benchmark (bench/kernels.py):
every backend is compared with the torch reference on fresh random inputs, its outputs NaN-poisoned first so
an element it fails to write shows up as a mismatch.
"""
import contextlib
import itertools
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from .dispatch import grad_fanout, solver_step
from .reference import grad_fanout_torch, solver_step_torch

# The last shape is flat and prime: no block or vector width divides it, so every tail path runs.
SHAPES = ((1, 4, 8, 8), (3, 4, 17, 13), (8, 4, 64, 64), (10007,))
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRAJECTORY_DTYPES = (torch.float32, torch.float64)

# A fused step computes in the trajectory dtype from exactly upcast inputs; it may differ from the unfused
# reference only by FMA contraction, a few ulps of that dtype (values are O(10)).
STEP_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}
# The fan-out forms the same product as the reference, then rounds it once: at most one ulp of the output dtype.
FANOUT_TOL = {
    torch.float16: dict(rtol=1e-3, atol=1e-7),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-7),
    torch.float32: dict(rtol=2.5e-7, atol=1e-12),
    torch.float64: dict(rtol=1e-15, atol=0.0),
}


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the body with n intra-op threads. The test matrices use one: on a loaded 2-core machine OpenMP
    barriers stall for milliseconds waiting on a descheduled thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class StepCase(NamedTuple):
    shape: Tuple[int, ...]
    trajectory_dtype: torch.dtype
    eps_dtype: torch.dtype
    cfg: bool  # eps_u given (classifier-free guidance) or None
    order: int  # 1: b1 = 0 and m_prev None; 2: b1 != 0 with m_prev


class FanoutCase(NamedTuple):
    shape: Tuple[int, ...]
    g_dtype: torch.dtype
    out_dtype: torch.dtype
    n_steps: int
    n_branches: int


def step_cases(shapes=SHAPES) -> List[StepCase]:
    return [StepCase(*c) for c in itertools.product(shapes, TRAJECTORY_DTYPES, FLOATS, (True, False), (1, 2))]


def fanout_cases(shapes=SHAPES) -> List[FanoutCase]:
    # Engine chunks: one kept step with both branches, and a chunk of steps with one or two branches.
    counts = ((1, 2), (5, 1), (3, 2))
    return [FanoutCase(s, g, o, *c) for s, g, o, c in itertools.product(shapes, (torch.float32, torch.float64),
                                                                         FLOATS, counts)]


def case_id(case) -> str:
    names = [("x".join(map(str, v)) if isinstance(v, tuple) else str(v).replace("torch.", "")) for v in case]
    return "-".join(f"{k}={v}" for k, v in zip(case._fields, names))


def _randn(shape, dtype, device, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def step_inputs(case: StepCase, device="cpu", seed: int = 0) -> Tuple[tuple, Dict[str, float]]:
    """((z, eps_c, eps_u, m_prev), scalars) for one step; the scalars are drawn around real schedule values."""
    gen = torch.Generator().manual_seed(seed)
    z = _randn(case.shape, case.trajectory_dtype, device, gen)
    eps_c = _randn(case.shape, case.eps_dtype, device, gen)
    eps_u = _randn(case.shape, case.eps_dtype, device, gen) if case.cfg else None
    m_prev = _randn(case.shape, case.trajectory_dtype, device, gen) if case.order == 2 else None
    u = torch.rand(6, generator=gen, dtype=torch.float64).tolist()
    scalars = dict(guidance=1.0 + 9.0 * u[0], cz=1.0 + u[1], ce=-0.2 - u[2], a=0.5 + 0.5 * u[3], b0=0.1 + u[4],
                   b1=(-0.3 * u[5] - 0.01) if case.order == 2 else 0.0)
    return (z, eps_c, eps_u, m_prev), scalars


def check_solver_step(backend: str, case: StepCase, device="cpu", seed: int = 0) -> None:
    """Assert that ``backend`` matches the reference, writing every element of NaN-poisoned outputs."""
    args, scalars = step_inputs(case, device, seed)
    expected = solver_step_torch(*args, **scalars)
    z = args[0]
    out = (torch.full_like(z, float("nan")), torch.full_like(z, float("nan")))
    result = solver_step(*args, **scalars, out=out, backend=backend)
    assert result[0] is out[0] and result[1] is out[1], "solver_step must return the out buffers it wrote"
    for name, got, want in zip(("z_next", "m"), result, expected):
        torch.testing.assert_close(got, want, **STEP_TOL[z.dtype], msg=lambda m: f"{name} ({backend}): {m}")


def fanout_inputs(case: FanoutCase, device="cpu", seed: int = 0) -> Tuple[torch.Tensor, List[float], List[float]]:
    gen = torch.Generator().manual_seed(seed)
    g = _randn(case.shape, case.g_dtype, device, gen)
    scales = (torch.rand(case.n_steps, generator=gen, dtype=torch.float64) * 4 + 0.1).tolist()
    guidance = 7.5
    weights = [1.0 - guidance, guidance] if case.n_branches == 2 else [guidance]
    return g, scales, weights


def check_grad_fanout(backend: str, case: FanoutCase, device="cpu", seed: int = 0,
                      out: Optional[torch.Tensor] = None) -> None:
    """Assert that ``backend`` matches the reference, writing every element of a NaN-poisoned output."""
    g, scales, weights = fanout_inputs(case, device, seed)
    expected = grad_fanout_torch(g, scales, weights, out_dtype=case.out_dtype)
    if out is None:
        out = torch.full(expected.shape, float("nan"), dtype=case.out_dtype, device=device)
    result = grad_fanout(g, scales, weights, out_dtype=case.out_dtype, out=out, backend=backend)
    assert result is out, "grad_fanout must return the out buffer it wrote"
    torch.testing.assert_close(result, expected, **FANOUT_TOL[case.out_dtype],
                               msg=lambda m: f"grad_fanout ({backend}): {m}")


def check_order1_ignores_m_prev(backend: str, device="cpu") -> None:
    """At order 1 (b1 = 0) m_prev must not be read (the reference never reads it): a NaN m_prev changes nothing.
    Also covers the path without ``out`` (freshly allocated results)."""
    args, scalars = step_inputs(StepCase((3, 4, 17, 13), torch.float32, torch.float16, True, 1), device)
    z, eps_c, eps_u, _ = args
    stale = torch.full_like(z, float("nan"))
    got = solver_step(z, eps_c, eps_u, stale, **scalars, backend=backend)
    want = solver_step_torch(*args, **scalars)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and g.is_contiguous()
        torch.testing.assert_close(g, w, **STEP_TOL[torch.float32])


def check_cuda_graph_capture(backend: str, steps: int = 20) -> None:
    """A whole sampling loop of ``steps`` solver steps captured in one CUDA graph replays like eager execution
    (no host sync, allocation outside the graph pool, or host-to-device copy in the step)."""
    case = StepCase((8, 4, 64, 64), torch.float32, torch.float16, True, 2)
    (z0, eps_c, eps_u, m0), _ = step_inputs(case, "cuda")
    scalars = dict(guidance=3.0, cz=1.0, ce=-0.5, a=0.5, b0=0.4, b1=-0.05)  # a contracting loop: stays O(1)

    def loop(z, m):
        for _ in range(steps):
            z, m = solver_step(z, eps_c, eps_u, m, **scalars, backend=backend)
        return z, m

    eager = loop(z0, m0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (Triton compiles here)
        loop(z0, m0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = loop(z0, m0)
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, eager):
        torch.testing.assert_close(got, want, **STEP_TOL[torch.float32])
