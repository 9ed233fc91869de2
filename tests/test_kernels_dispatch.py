"""The kernel dispatcher: backend choice (FASTFAIR_KERNELS / backend=), argument checks, the torch backend's
out= buffers and the fan-out layout. Backend numerics are in test_kernels_native.py / test_kernels_triton.py
(the fan-out's narrow-output bits: test_kernels_rounding.py)."""
import warnings

import pytest
import torch

import fastfair.kernels as K
from fastfair.kernels import dispatch, native, testing

CPU = torch.device("cpu")
STEP = dict(guidance=7.5, cz=1.2, ce=-0.4, a=0.9, b0=0.3, b1=-0.1)


def test_env_is_read_at_call_time_and_keyword_wins(monkeypatch):
    monkeypatch.setenv("FASTFAIR_KERNELS", "torch")
    assert K.resolve_backend(CPU) == "torch"
    monkeypatch.setenv("FASTFAIR_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="FASTFAIR_KERNELS='cuda-please'"):
        K.resolve_backend(CPU)
    assert K.resolve_backend(CPU, backend="torch") == "torch"
    with pytest.raises(ValueError, match="backend='fast'"):
        K.resolve_backend(CPU, backend="fast")


@pytest.mark.parametrize("native_reason, expected", [("not built", "torch"), (None, "native")])
def test_auto_picks_fastest_available_quietly(monkeypatch, native_reason, expected):
    monkeypatch.setattr(native, "unavailable_reason", lambda device_type, index=None: native_reason)
    monkeypatch.delenv("FASTFAIR_KERNELS", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert K.resolve_backend(CPU) == expected
    # No auto choice ever interprets Triton, and unknown devices fall back to torch.
    assert K.resolve_backend(torch.device("meta")) == "torch"


def test_float64_steps_avoid_a_triton_that_rounds_their_coefficients(monkeypatch):
    """triton 3.0 (torch 2.4's) passes the kernel's tl.float64 scalars as float32: a float64 trajectory would step
    with coefficients rounded to 6e-8. auto then takes the next backend for float64 (on CUDA: torch when native is
    not built), an explicit triton says why; float32 steps are unaffected (the kernel computes in float32)."""
    triton = pytest.importorskip("triton")
    from fastfair.kernels import solver_step_triton

    if not dispatch.triton_support.interpreting():
        version = tuple(int(part) for part in triton.__version__.split(".")[:2])
        if version >= (3, 6):  # constraints.txt's triton reads the annotation
            assert solver_step_triton.float64_scalars_exact()
        elif version <= (3, 0):  # constraints-torch2.4.txt's does not
            assert not solver_step_triton.float64_scalars_exact()
    monkeypatch.setattr(solver_step_triton, "float64_scalars_exact", lambda: False)
    monkeypatch.setattr(native, "unavailable_reason", lambda device_type, index=None: "not built")
    monkeypatch.setattr(dispatch.triton_support, "unavailable_reason", lambda device_type: None)
    monkeypatch.setattr(dispatch.triton_support, "interpreting", lambda: False)
    monkeypatch.delenv("FASTFAIR_KERNELS", raising=False)
    cuda = torch.device("cuda")
    assert K.resolve_backend(cuda, None, torch.float64) == "torch"
    assert K.resolve_backend(cuda, None, torch.float32) == K.resolve_backend(cuda) == "triton"
    z = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"float64 needs triton >= 3.6: .* use backend='native' or 'torch'"):
        solver_step_triton.solver_step_triton(z, z, None, None, dispatch.step_scalars(**STEP))


def test_explicit_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setattr(native, "unavailable_reason", lambda device_type, index=None: "fastfair._C is not installed")
    with pytest.raises(RuntimeError, match="'native' cannot run on cpu tensors: fastfair._C is not installed"):
        K.solver_step(torch.zeros(2), torch.zeros(2), None, None, **STEP | dict(b1=0.0), backend="native")
    if dispatch.triton_support.interpreting():
        pytest.skip("this process interprets Triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        K.grad_fanout(torch.zeros(2), [1.0], [1.0], backend="triton")


z4 = torch.zeros(2, 4, 3, 3)
BAD_STEPS = [
    (dict(z=z4.half()), TypeError, "z has dtype torch.float16"),
    (dict(z=z4.numpy()), TypeError, "z must be a torch.Tensor"),
    (dict(eps_c=torch.zeros(2, 4, 3)), ValueError, r"eps_c has shape \(2, 4, 3\), expected \(2, 4, 3, 3\)"),
    (dict(eps_c=z4.long()), TypeError, "eps_c has dtype torch.int64"),
    (dict(eps_u=z4.half()), TypeError, "eps_u is torch.float16 but eps_c is torch.float32"),
    (dict(eps_u=torch.zeros(2, 4, 3, 3, device="meta")), ValueError, "eps_u is on meta but z is on cpu"),
    (dict(m_prev=None), ValueError, "b1 != 0 .* needs m_prev"),
    (dict(m_prev=z4.double()), TypeError, "m_prev has dtype torch.float64"),
    (dict(out=(z4.clone(),)), TypeError, r"out must be a pair \(z_next, m\)"),
    (dict(out=(z4.clone(), z4.clone().transpose(2, 3))), ValueError, r"out\[1\] \(m\) must be contiguous"),
    (dict(out=(z4.clone(), z4.clone().double())), TypeError, r"out\[1\] \(m\) has dtype torch.float64"),
    (dict(out="z"), TypeError, "out must be a pair"),
    (dict(z=z4.to_sparse()), ValueError, r"z has layout torch.sparse_coo; the kernels take dense tensors"),
    # native and Triton wrote into it unseen by autograd (torch's backend raised autograd's in-place error)
    (dict(out=(z4.clone().requires_grad_(), z4.clone())), ValueError, r"out\[0\] \(z_next\) requires grad"),
]


@pytest.mark.parametrize("bad, error, match", BAD_STEPS, ids=[m for _, _, m in BAD_STEPS])
def test_solver_step_rejects_bad_arguments(bad, error, match):
    args = dict(z=z4, eps_c=z4.clone(), eps_u=z4.clone(), m_prev=z4.clone())
    args.update(bad)
    out = args.pop("out", None)
    with pytest.raises(error, match=match):
        K.solver_step(args["z"], args["eps_c"], args["eps_u"], args["m_prev"], **STEP, out=out, backend="torch")


def test_outputs_must_not_overlap_inputs():
    z, eps = torch.randn(2, 8), torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"out\[0\] \(z_next\) overlaps"):
        K.solver_step(z, eps, None, None, **STEP | dict(b1=0.0), out=(z, torch.empty_like(z)))
    with pytest.raises(ValueError, match=r"out\[1\] \(m\) overlaps"):
        K.solver_step(z, eps, None, None, **STEP | dict(b1=0.0), out=(torch.empty_like(z), eps))
    buffer = torch.empty(2, 2, 8)  # the two outputs share 8 elements
    with pytest.raises(ValueError, match=r"out\[1\] \(m\) overlaps"):
        K.solver_step(z, eps, None, None, **STEP | dict(b1=0.0), out=(buffer[0], buffer.view(-1)[8:24].view(2, 8)))
    with pytest.raises(ValueError, match="out overlaps"):
        K.grad_fanout(eps, [1.0], [1.0], out=eps.view(1, 1, 2, 8))


BAD_FANOUTS = [
    (dict(g=[1.0, 2.0]), TypeError, "g must be a torch.Tensor"),
    (dict(scales=1.0), TypeError, "scales and branch_weights must be sequences of numbers"),
    (dict(scales="12"), TypeError, "scales and branch_weights must be sequences of numbers"),  # not [1.0, 2.0]
    (dict(branch_weights=["0.5"]), TypeError, "scales and branch_weights must be sequences of numbers"),
    (dict(out_dtype=torch.int32), TypeError, "out_dtype torch.int32 is not a float dtype"),
    (dict(out=torch.zeros(2, 2, 3, 4)), ValueError, r"out has shape \(2, 2, 3, 4\), expected \(2, 1, 3, 4\)"),
    (dict(out=torch.zeros(2, 1, 3, 4), out_dtype=torch.float16), TypeError, "out has dtype torch.float32 but"),
    (dict(out=torch.zeros(2, 1, 4, 3).transpose(2, 3)), ValueError, "out must be contiguous"),
    (dict(out=torch.zeros(2, 1, 3, 4, requires_grad=True)), ValueError, "out requires grad"),
    (dict(g=torch.zeros(3, 4).to_sparse()), ValueError, "g has layout torch.sparse_coo"),
]


@pytest.mark.parametrize("bad, error, match", BAD_FANOUTS, ids=[m for _, _, m in BAD_FANOUTS])
def test_grad_fanout_rejects_bad_arguments(bad, error, match):
    args = dict(g=torch.zeros(3, 4), scales=[1.0, 2.0], branch_weights=[1.0], out_dtype=None, out=None)
    args.update(bad)
    with pytest.raises(error, match=match):
        K.grad_fanout(args["g"], args["scales"], args["branch_weights"], out_dtype=args["out_dtype"],
                      out=args["out"], backend="torch")


def test_fanout_layout_is_step_major_then_branch_exact_in_float64():
    """out[j, b] = scales[j] * branch_weights[b] * g, float64 exact; out's dtype is the default out_dtype."""
    g = torch.randn(2, 3, dtype=torch.float64)
    scales, weights = [0.5, -2.0, 3.25], [-6.5, 7.5]
    out = torch.full((3, 2, 2, 3), float("nan"), dtype=torch.float64)
    assert K.grad_fanout(g, scales, weights, out=out) is out
    for j, s in enumerate(scales):
        for b, w in enumerate(weights):
            assert torch.equal(out[j, b], g * (s * w))
    assert K.grad_fanout(g.float(), scales, weights, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert K.grad_fanout(g, [], weights).shape == (0, 2, 2, 3)


def test_solver_step_reference_math_float64():
    """The torch backend is the DESIGN.md step, evaluated by hand in float64, with out= buffers filled."""
    (z, eps_c, eps_u, m_prev), s = testing.step_inputs(testing.StepCase((2, 5), torch.float64, torch.float64,
                                                                        True, 2))
    eps = eps_u + s["guidance"] * (eps_c - eps_u)
    m = s["cz"] * z + s["ce"] * eps
    z_next = s["a"] * z + s["b0"] * m + s["b1"] * m_prev
    out = (torch.full_like(z, float("nan")), torch.full_like(z, float("nan")))
    got = K.solver_step(z, eps_c, eps_u, m_prev, **s, out=out, backend="torch")
    assert got[0] is out[0] and got[1] is out[1]
    torch.testing.assert_close(got[1], m, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(got[0], z_next, rtol=1e-15, atol=1e-15)


def test_non_contiguous_inputs_are_accepted():
    (z, eps_c, eps_u, m_prev), s = testing.step_inputs(testing.StepCase((4, 6), torch.float32, torch.float32,
                                                                        True, 2))
    t = [x.t().contiguous().t() for x in (z, eps_c, eps_u, m_prev)]
    got = K.solver_step(*t, **s)
    want = K.solver_step_torch(z, eps_c, eps_u, m_prev, **s)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **testing.STEP_TOL[torch.float32])


def test_order1_ignores_m_prev_torch():
    testing.check_order1_ignores_m_prev("torch")


def test_scalars_must_be_numbers():
    for text in ("high", "7.5"):  # float() parses the second; the reference refuses both
        with pytest.raises(TypeError, match="guidance, cz, ce, a, b0, b1 must be numbers"):
            K.solver_step(z4, z4, None, None, **STEP | dict(guidance=text, b1=0.0))


def test_grad_fanout_checks_the_backend_of_an_empty_chunk(monkeypatch):
    """An empty chunk writes nothing, but a bad backend is the same error as for a full one."""
    with pytest.raises(ValueError, match="backend='bogus'"):
        K.grad_fanout(torch.zeros(2, 3), [], [1.0], backend="bogus")
    monkeypatch.setenv("FASTFAIR_KERNELS", "nativ")
    with pytest.raises(ValueError, match="FASTFAIR_KERNELS='nativ'"):
        K.grad_fanout(torch.zeros(2, 3), [], [1.0])


def test_inputs_that_require_grad_get_the_differentiable_backend(monkeypatch):
    """Only the torch backend records a graph: auto takes it for inputs that require grad (the native one would
    return outputs without a gradient, unseen), an explicit other backend refuses; no_grad leaves auto as it is."""
    monkeypatch.setattr(native, "unavailable_reason", lambda device_type, index=None: None)
    monkeypatch.delenv("FASTFAIR_KERNELS", raising=False)
    z, eps = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    z_next, m = K.solver_step(z, eps, None, None, **STEP | dict(b1=0.0))
    (eps_grad,) = torch.autograd.grad(z_next.sum(), eps)
    assert torch.allclose(eps_grad, torch.full_like(eps, STEP["b0"] * STEP["ce"]))  # dz_next/deps = b0 ce
    g = torch.randn(3, requires_grad=True)
    (g_grad,) = torch.autograd.grad(K.grad_fanout(g, [2.0, 3.0], [0.5, 1.0]).sum(), g)
    assert torch.allclose(g_grad, torch.full_like(g, 5.0 * 1.5))
    for backend in ("native", "triton"):
        with pytest.raises(RuntimeError, match=f"'{backend}' records no autograd graph, but an input requires grad"):
            K.solver_step(z, eps, None, None, **STEP | dict(b1=0.0), backend=backend)
        with pytest.raises(RuntimeError, match=f"'{backend}' records no autograd graph"):
            K.grad_fanout(g, [1.0], [1.0], backend=backend)
    assert K.resolve_backend(CPU) == "native"
    with torch.no_grad():
        assert K.resolve_backend(CPU, differentiable=dispatch._differentiable(eps)) == "native"


@pytest.mark.parametrize("value", ["1", "true", "off"])
def test_triton_interpret_values_are_read_as_triton_reads_them(value):
    """Before triton is imported, interpreting() must say what the triton it then imports will do (newer ones take
    TRITON_INTERPRET=true as 1; a refusal would name TRITON_INTERPRET=1 to a process that interprets), and plain
    values are read without the slow import."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = ("import sys; from fastfair.kernels import triton_support as t; {first}"
            "print(t.interpreting(), t.unavailable_reason('cpu') is None, 'triton' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_INTERPRET": value}
    fresh, after_import = (subprocess.run([sys.executable, "-c", code.format(first=first)], env=env, text=True,
                                          capture_output=True, check=True).stdout.split()
                           for first in ("", "import triton; "))
    assert fresh[:2] == after_import[:2] and fresh[0] == fresh[1]
    assert fresh[2] == str(value not in ("1", "0", "off"))


class _OpsBuiltForAnotherGpu:
    """torch.ops.fastfair as a library built for other GPU architectures loads it: every launch fails."""
    launches = 0

    def has_cuda(self):
        return True

    def solver_step_out(self, *args):
        type(self).launches += 1
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nCUDA kernel errors "
                           "might be asynchronously reported")


def test_native_built_for_another_gpu_is_unavailable_there(monkeypatch):
    """A fastfair._C built elsewhere (TORCH_CUDA_ARCH_LIST of the build machine) fails every launch on this GPU:
    one probe launch per GPU finds it, auto goes on to the next backend, an explicit native says why; the
    device the tensors are on is the one probed."""
    ops = _OpsBuiltForAnotherGpu()
    monkeypatch.setattr(native, "load", lambda: ops)
    monkeypatch.setitem(native._state, "has_cuda", None)
    monkeypatch.setattr(native, "_launch_problems", {})
    probed = []

    def probe(ops_, device):  # the real probe's tensors need a CUDA torch: run it on the CPU instead
        probed.append(device)
        return native_launch_problem(ops_, torch.device("cpu"))

    native_launch_problem = native._launch_problem
    monkeypatch.setattr(native, "_launch_problem", probe)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(dispatch.triton_support, "unavailable_reason", lambda device_type: None)
    monkeypatch.setattr(dispatch.triton_support, "interpreting", lambda: False)
    monkeypatch.delenv("FASTFAIR_KERNELS", raising=False)
    assert K.resolve_backend(torch.device("cuda", 1)) == "triton"
    assert K.resolve_backend(torch.device("cuda", 1)) == "triton"
    assert probed == [torch.device("cuda", 1)] and ops.launches == 1  # once per GPU, not per call
    with pytest.raises(RuntimeError, match=r"'native' cannot run on cuda tensors: fastfair._C's kernels do not run "
                                           r"on cpu: CUDA error: no kernel image is available for execution on the "
                                           r"device; rebuild it on this machine or with this GPU in TORCH_CUDA_ARCH"):
        K.resolve_backend(torch.device("cuda", 1), backend="native")
    assert ops.launches == 1
    # Another GPU is probed on its own; inside a CUDA graph capture nothing is launched (nor remembered).
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert K.resolve_backend(torch.device("cuda", 0)) == "native" and ops.launches == 1
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert K.resolve_backend(torch.device("cuda", 0)) == "triton" and probed[-1] == torch.device("cuda", 0)


def test_native_probe_passes_a_build_that_runs():
    """The probe is a real solver step: on the CPU build it runs, so nothing is reported."""
    ops = native.load()
    if ops is None:
        pytest.skip(native.unavailable_reason("cpu"))
    assert native._launch_problem(ops, torch.device("cpu")) is None
