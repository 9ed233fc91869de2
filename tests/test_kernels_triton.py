"""The Triton backend against the torch reference.

On CUDA the kernels run compiled, in this process. Without CUDA they run in Triton's interpreter, which needs
TRITON_INTERPRET=1 before triton is imported: test_interpreted_in_subprocess reruns this file in a child
process with it set, leaving this process's triton (if any) untouched. test_compiles_for_sm90 compiles the
kernels for an H100/H200 target without a GPU, which checks the compiled path's typing and lowering.
"""
import importlib.util
import inspect
import os
import re
import struct
import subprocess
import sys

import pytest
import torch

from fastfair.kernels import testing

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_HERE = HAS_TRITON and (INTERPRETING or DEVICE == "cuda")
CASE_ARGS = dict(ids=testing.case_id)

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
runs_here = pytest.mark.skipif(not RUNS_HERE, reason="Triton runs on CPU only interpreted: see the subprocess test")


@pytest.fixture
def one_thread():
    with testing.torch_threads(1):  # the reference side runs on the CPU too
        yield


@runs_here
@pytest.mark.parametrize("case", testing.step_cases(), **CASE_ARGS)
def test_solver_step(case, one_thread):
    testing.check_solver_step("triton", case, DEVICE)


@runs_here
@pytest.mark.parametrize("case", testing.fanout_cases(), **CASE_ARGS)
def test_grad_fanout(case, one_thread):
    testing.check_grad_fanout("triton", case, DEVICE)


@runs_here
def test_fanout_coefficients_are_made_once_per_list():
    """The coefficients reach the device once per (scales, weights) list: a repeated list needs no host-to-device
    copy (a CUDA graph can hold it); the trainer repeats its lists. On CUDA, a use on another stream is ordered
    after the copy, and a new list inside a graph capture is refused (it would record a reused pinned buffer)."""
    from fastfair.kernels import grad_fanout
    from fastfair.kernels.grad_fanout_triton import _coefficients

    g = torch.randn(2, 4, 5, 3, device=DEVICE)
    _coefficients.clear()
    outs = [grad_fanout(g, [0.5, 2.0], [-6.5, 7.5], backend="triton") for _ in range(3)]
    assert (_coefficients.misses, _coefficients.hits) == (1, 2)
    expected = torch.tensor([0.5 * -6.5, 0.5 * 7.5, 2.0 * -6.5, 2.0 * 7.5], dtype=torch.float64)
    assert torch.equal(_coefficients.get(tuple(expected.tolist()), g.device).cpu(), expected)
    assert all(torch.equal(out, outs[0]) for out in outs)
    _coefficients.size = 2  # the least recently used list goes first
    try:
        for scale in (1.0, 2.0, 3.0):
            grad_fanout(g, [scale], [1.0], backend="triton")
        assert len(_coefficients.entries) == 2
        assert all(key[0] != struct.pack("<d", 1.0) for key in _coefficients.entries)
    finally:
        _coefficients.size = 256
    if g.is_cuda:
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            on_side = grad_fanout(g, [0.25], [4.0], backend="triton")
        side.synchronize()
        torch.testing.assert_close(on_side, g.unsqueeze(0).unsqueeze(0).expand_as(on_side))  # 0.25 * 4 = 1
        graph = torch.cuda.CUDAGraph()
        with pytest.raises(RuntimeError, match="not copied to the GPU inside a CUDA graph capture"):
            with torch.cuda.graph(graph):
                grad_fanout(g, [0.125], [8.0], backend="triton")


@runs_here
def test_coefficient_lists_differing_in_a_zeros_sign_are_not_confused(one_thread):
    """0.0 == -0.0: a list (-0.0, 0.0) took the cached (0.0, -0.0) and its zero gradients got the other sign
    (the reference and the native backend keep them)."""
    from fastfair.kernels import grad_fanout, grad_fanout_torch
    from fastfair.kernels.grad_fanout_triton import _coefficients

    g = torch.tensor([[1.0, -2.0]], device=DEVICE)
    _coefficients.clear()
    for scales in ([0.0], [-0.0]):
        out = grad_fanout(g, scales, [1.0, -1.0], backend="triton")
        expected = grad_fanout_torch(g.cpu(), scales, [1.0, -1.0])
        assert torch.equal(out.cpu().signbit(), expected.signbit()), scales
    assert _coefficients.misses == 2


@runs_here
def test_a_list_used_in_a_graph_capture_is_never_evicted(monkeypatch):
    """A captured graph reads the cached tensor at every replay: evicted (256 newer lists), its memory was freed
    and reused, and a replay read other numbers."""
    from fastfair.kernels import grad_fanout_triton

    cache = grad_fanout_triton._CoefficientCache()
    cache.size = 2
    device = torch.device(DEVICE)
    held = cache.get((0.5, 2.0), device)
    monkeypatch.setattr(grad_fanout_triton, "_capturing", lambda device: True)
    assert cache.get((0.5, 2.0), device) is held  # used inside a capture
    monkeypatch.setattr(grad_fanout_triton, "_capturing", lambda device: False)
    for scale in range(5):
        cache.get((float(scale),), device)
    assert cache.get((0.5, 2.0), device) is held and cache.misses == 6 and len(cache.entries) == 2


@runs_here
def test_order1_ignores_m_prev():
    testing.check_order1_ignores_m_prev("triton", DEVICE)


@runs_here
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
def test_cuda_graph_capture():
    testing.check_cuda_graph_capture("triton")


@pytest.mark.skipif(RUNS_HERE or DEVICE == "cuda", reason="the Triton tests run in this process")
def test_interpreted_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.mark.skipif(INTERPRETING or DEVICE == "cuda", reason="interpreted, or compiled for real on this GPU")
def test_compiles_for_sm90():
    """Both kernels lower to PTX for sm_90 in the dtype combinations the engine uses, with the float64
    scalars kept float64 up to the one rounding into the compute dtype."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastfair.kernels.grad_fanout_triton import grad_fanout_kernel
    from fastfair.kernels.solver_step_triton import solver_step_kernel
    from fastfair.kernels.triton_support import LAUNCH_OPTIONS

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        pytest.skip(f"triton {triton.__version__}'s ASTSource predates constexprs= (the compiler API this check "
                    "speaks); the kernels themselves are tested under the interpreter")

    def ptx(kernel, signature, constexprs):
        source = ASTSource(kernel, signature, constexprs=constexprs)
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=LAUNCH_OPTIONS).asm["ptx"]

    flags = dict(HAS_UNCOND=True, HAS_PREV=True, BLOCK=1024)
    for traj, eps in (("fp32", "fp16"), ("fp32", "bf16"), ("fp64", "fp64")):
        signature = {name: f"*{traj}" for name in ("z_ptr", "m_prev_ptr", "z_next_ptr", "m_ptr")}
        signature.update(eps_c_ptr=f"*{eps}", eps_u_ptr=f"*{eps}", n_elements="i64")
        signature.update({name: "fp64" for name in ("guidance", "cz", "ce", "a", "b0", "b1")})
        signature.update({name: "constexpr" for name in flags})
        code = ptx(solver_step_kernel, signature, flags)
        assert ".param .f64" in code
        if traj == "fp32":
            assert "cvt.rn.f32.f64" in code and "mul.f64" not in code  # scalars rounded once, math in fp32
    for g, out in (("fp32", "bf16"), ("fp64", "fp16"), ("fp32", "fp32")):
        signature = dict(g_ptr=f"*{g}", coef_ptr="*fp64", out_ptr=f"*{out}", n_elements="i64", n_coefs="i32",
                         COMPUTE="constexpr", NARROW="constexpr", BLOCK="constexpr")
        constexprs = dict(COMPUTE=tl.float64 if g == "fp64" else tl.float32, NARROW=out != "fp32", BLOCK=1024)
        code = ptx(grad_fanout_kernel, signature, constexprs)
        assert "st.global" in code
        # the narrow output rounds to nearest even from fp32 as torch's conversion does (an fp64 g through fp32,
        # as torch's double -> half goes), subnormals kept: test_kernels_rounding.py checks the bits on a GPU
        if out != "fp32":
            assert f"cvt.rn.{out.replace('fp', 'f')}.f32" in code
        assert not re.search(r"\.(rz|ftz)\b", code)
