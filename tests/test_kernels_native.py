"""The native backend (csrc/: C++/OpenMP on CPU, CUDA) against the torch reference.

Without an installed fastfair._C the module JIT-builds csrc/ once (cached by torch under TORCH_EXTENSIONS_DIR).
The CUDA sources are compile-checked with nvcc even without a CUDA torch; CUDA runs skip without a GPU.
"""
import os
import re
import shutil
import subprocess

import pytest
import torch

from fastfair.kernels import grad_fanout, grad_fanout_torch, native, solver_step, testing

CASE_ARGS = dict(ids=testing.case_id)
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module", autouse=True)
def native_ops():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build fastfair._C")
    ops = native.load(jit=True)
    if ops is None:
        pytest.fail(native.unavailable_reason("cpu"))
    return ops


@pytest.fixture
def one_thread():
    with testing.torch_threads(1):
        yield


@pytest.mark.parametrize("case", testing.step_cases(), **CASE_ARGS)
def test_solver_step_cpu(case, one_thread):
    testing.check_solver_step("native", case)


@pytest.mark.parametrize("case", testing.fanout_cases(), **CASE_ARGS)
def test_grad_fanout_cpu(case, one_thread):
    testing.check_grad_fanout("native", case)


@pytest.mark.parametrize("z_dtype", [torch.float32, torch.float64], ids=str)
def test_solver_step_cpu_reads_every_fp16_eps_exactly(z_dtype, one_thread):
    """fp16 U-Net outputs are widened to fp32 (by F16C where the CPU has it) exactly as torch's .to() does: every
    fp16 bit pattern, subnormals and infinities included, gives the reference's bits (NaN where it has NaN);
    an odd length leaves vector tails; with and without CFG, order 1 and 2."""
    eps = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)[:-3]
    other = eps[torch.randperm(eps.numel(), generator=torch.Generator().manual_seed(0))]
    z, m_prev = (torch.randn(eps.shape, dtype=z_dtype, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    for eps_u, b1 in ((None, 0.0), (other, -0.1)):
        coefs = dict(guidance=7.5, cz=1.2, ce=-0.4, a=0.9, b0=0.3, b1=b1)
        expected = solver_step(z, eps, eps_u, m_prev, **coefs, backend="torch")
        result = solver_step(z, eps, eps_u, m_prev, **coefs, backend="native")
        for want, got in zip(expected, result):
            nan = torch.isnan(want)
            assert torch.equal(torch.isnan(got), nan)
            assert torch.equal(got[~nan], want[~nan])


@pytest.mark.parametrize("dtype", testing.FLOATS, ids=str)
def test_threaded_chunks(dtype):
    """Several OpenMP chunks (grain 2^14 elements), each written once and in the right place, for every eps and
    fan-out output dtype: an fp16 eps and fp16/bf16 outputs take tiled paths of their own, fp32/fp64 outputs
    another, and a chunk starting past 0 must index each stream from there."""
    shape = (5, 4, 61, 67)
    with testing.torch_threads(2):
        for cfg, order in ((True, 2), (False, 2), (True, 1)):
            testing.check_solver_step("native", testing.StepCase(shape, torch.float32, dtype, cfg, order))
        for g_dtype in (torch.float32, torch.float64):
            testing.check_grad_fanout("native", testing.FanoutCase(shape, g_dtype, dtype, 3, 2))


def test_order1_ignores_m_prev_cpu():
    testing.check_order1_ignores_m_prev("native")


def test_op_checks_guard_direct_calls(native_ops):
    """torch.ops.fastfair.* check sizes themselves: a direct call with a short buffer raises, never overruns."""
    z = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError, match="z_next has shape"):
        native_ops.solver_step_out(z, z, None, None, torch.empty(3), torch.empty_like(z), 1.0, 1.0, 1.0, 1.0,
                                   1.0, 0.0)
    with pytest.raises(ValueError, match="needs m_prev"):
        native_ops.solver_step_out(z, z, None, None, torch.empty_like(z), torch.empty_like(z), 1.0, 1.0, 1.0,
                                   1.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="out has"):
        native_ops.grad_fanout_out(z, [1.0, 2.0], [1.0], torch.empty(1, 1, *z.shape))
    with pytest.raises(ValueError, match="out has"):  # a larger out is as wrong: its layout is not out[j, b]
        native_ops.grad_fanout_out(z, [1.0], [1.0], torch.empty(2, 1, *z.shape))


def test_op_checks_guard_direct_calls_layout_and_dtype(native_ops):
    """The ops read raw memory in z's layout and each tensor's own dtype: a direct call with a strided view, an
    eps_u of another dtype than eps_c (read with eps_c's element size) or an out buffer of another dtype than z
    raises instead of reading or writing the wrong elements."""
    z = torch.randn(2, 4, 8, 8)
    out = (torch.empty_like(z), torch.empty_like(z))
    scalars = (7.5, 1.0, -0.5, 0.9, 0.3, 0.0)
    with pytest.raises(ValueError, match="eps_c must be contiguous"):
        native_ops.solver_step_out(z, z.transpose(2, 3), None, None, *out, *scalars)
    with pytest.raises(TypeError, match="eps_u and eps_c dtypes differ"):
        native_ops.solver_step_out(z, z, z.half(), None, *out, *scalars)
    with pytest.raises(TypeError, match="z_next has dtype"):
        native_ops.solver_step_out(z, z, None, None, torch.empty_like(z, dtype=torch.float64), out[1], *scalars)
    with pytest.raises(ValueError, match="g must be contiguous"):
        native_ops.grad_fanout_out(z.transpose(2, 3), [1.0], [1.0], torch.empty(1, 1, *z.shape))


def test_op_order1_ignores_m_prev_in_direct_calls(native_ops):
    """At b1 = 0 the op itself leaves a passed m_prev unread (the Python dispatcher drops it first, a direct call
    does not): a NaN m_prev changes nothing."""
    (z, eps_c, eps_u, _), scalars = testing.step_inputs(testing.StepCase((3, 4, 17, 13), torch.float32,
                                                                         torch.float32, True, 1))
    want = solver_step(z, eps_c, eps_u, None, **scalars, backend="torch")
    got = (torch.empty_like(z), torch.empty_like(z))
    native_ops.solver_step_out(z, eps_c, eps_u, torch.full_like(z, float("nan")), *got,
                               *(scalars[k] for k in ("guidance", "cz", "ce", "a", "b0", "b1")))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **testing.STEP_TOL[torch.float32])


cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _require_native_cuda():
    reason = native.unavailable_reason("cuda")
    if reason:
        pytest.skip(reason)


@cuda_only
@pytest.mark.parametrize("case", testing.step_cases(), **CASE_ARGS)
def test_solver_step_cuda(case):
    _require_native_cuda()
    testing.check_solver_step("native", case, "cuda")


@cuda_only
@pytest.mark.parametrize("case", testing.fanout_cases(), **CASE_ARGS)
def test_grad_fanout_cuda(case):
    _require_native_cuda()
    testing.check_grad_fanout("native", case, "cuda")


@cuda_only
def test_cuda_misaligned_and_graph_capture():
    """A view starting 1 element in takes the unvectorized path; the step loop captures in a CUDA graph."""
    _require_native_cuda()
    g = torch.randn(4 * 64 + 1, device="cuda")[1:].view(4, 64)
    out = torch.full((2, 1, 4, 64), float("nan"), device="cuda")
    torch.testing.assert_close(grad_fanout(g, [2.0, 3.0], [1.0], out=out, backend="native"),
                               grad_fanout_torch(g, [2.0, 3.0], [1.0]))
    testing.check_order1_ignores_m_prev("native", "cuda")
    testing.check_cuda_graph_capture("native")


@cuda_only
def test_cuda_grid_stride_loop_and_fanout_launches_split_past_128_coefficients():
    """Paths no other test reaches: more elements than one pass of the capped grid covers (65536 blocks of 256
    threads, 4 elements each on the vector path), and a fan-out of more coefficients than one launch takes."""
    _require_native_cuda()
    from fastfair.kernels import solver_step_torch

    n = 65536 * 256 * 4 + 4 * 1000  # past one pass of the vector path, still a multiple of 4
    z, eps_c, eps_u, m_prev = (torch.randn(n, device="cuda") for _ in range(4))
    scalars = dict(guidance=7.5, cz=1.1, ce=-0.4, a=0.7, b0=0.2, b1=-0.1)
    got = solver_step(z, eps_c, eps_u, m_prev, **scalars, backend="native")
    want = solver_step_torch(z, eps_c, eps_u, m_prev, **scalars)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, **testing.STEP_TOL[torch.float32])
    del z, eps_c, eps_u, m_prev, got, want
    g = torch.randn(3, 4, 17, 13, device="cuda")
    scales = [0.5 + 0.01 * i for i in range(80)]  # 80 steps x 2 branches: 160 coefficients
    torch.testing.assert_close(grad_fanout(g, scales, [1.0, -6.5], backend="native"),
                               grad_fanout_torch(g, scales, [1.0, -6.5]), **testing.FANOUT_TOL[torch.float32])


def _cuda_compile_commands(tmp_path):
    """nvcc --ptx of each .cu with the build's flags (the front end checks host and device code, then device codegen
    for sm_90) and a syntax check of the CUDA registration file, with torch's headers. A CPU torch wheel lacks
    c10's generated cuda_cmake_macros.h, which only matters on Windows: C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips it."""
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    common = ["-I", include, "-I", os.path.join(include, "torch", "csrc", "api", "include"), "-std=c++20",
              "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
    commands = [[NVCC, "--ptx", "-arch=sm_90", *native.NVCC_FLAGS, *common, "-D__CUDA_NO_HALF_OPERATORS__",
                 "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                 os.path.join(native.CSRC, name), "-o", str(tmp_path / (name + ".ptx"))]
                for name in native.CUDA_SOURCES if name.endswith(".cu")]
    commands.append(["c++", "-fsyntax-only", *common, os.path.join(native.CSRC, "register_cuda.cpp")])
    return commands


NVCC = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


@pytest.mark.skipif(not os.path.exists(NVCC), reason="nvcc not found")
def test_cuda_sources_compile(tmp_path):
    commands = _cuda_compile_commands(tmp_path)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in commands]
    failures = []
    for cmd, proc in zip(commands, procs):
        output, _ = proc.communicate(timeout=600)
        if proc.returncode:
            failures.append(f"{' '.join(cmd)}\n{output[-4000:]}")
    assert not failures, "\n\n".join(failures)
    # the fan-out's narrow outputs round to nearest even from fp32, subnormals kept, as torch's conversion
    # (no fast-math): test_kernels_rounding.py checks the bits where a GPU runs them
    fanout = (tmp_path / "grad_fanout_cuda.cu.ptx").read_text()
    assert "cvt.rn.f16.f32" in fanout and "cvt.rn.bf16.f32" in fanout
    assert not re.search(r"\.(rz|ftz)\b", fanout)
