"""The gradient fan-out's fp16/bf16 outputs are bit-identical to torch's conversion, on every backend and device.

The fan-out writes the U-Net's upstream gradients in its dtype: out = to_narrow(fp32(g) * fp32(s * w)), one
multiply then one rounding, which every backend performs in the reference's order, so the narrow bits must agree
exactly (the solver step is not checked this way: its CUDA kernels contract a multiply and an add into one FMA).
The inputs are the delicate cases of round-to-nearest-even (ties, overflow thresholds, subnormals, signed zeros,
NaN and infinity) and every fp16/bf16 bit pattern of g.

Native on CPU runs everywhere (csrc/ is JIT-built without an installed fastfair._C); native and Triton on CUDA
need a GPU (bench/gpu_check.sh runs this file last of its CUDA tests). Triton on CPU is left out: its interpreter
truncates fp32 to bf16 instead of rounding (tests/test_kernels_triton.py allows that ulp there).
"""
import importlib.util
import os
import shutil

import pytest
import torch

from fastfair.kernels import grad_fanout, grad_fanout_torch, native, testing

TARGETS = [("native", "cpu"), ("native", "cuda"), ("triton", "cuda")]


def _skip_unless_runs(backend: str, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if backend == "native":
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler to build fastfair._C")
        if native.load(jit=True) is None:
            pytest.fail(native.unavailable_reason("cpu"))
        reason = native.unavailable_reason(device)
        if reason:
            pytest.skip(reason)


def _rounding_specials() -> torch.Tensor:
    """fp32 values where fp16/bf16 rounding is delicate: NaN (quiet, signalling, with payload), +-inf, +-0, fp16's
    and bf16's overflow thresholds, fp16 and fp32 subnormals, and ties at exactly half an ulp: above every finite
    fp16 value, and on every bf16 value (low half 0x8000, with 0x7FFF / 0x8001 beside it)."""
    bits = torch.tensor([0x7FC00000, 0xFFC00000, 0x7FC00001, 0x7F800001, 0x7F800000, 0xFF800000, 0, 0x80000000,
                         0x7F7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x7F7E8000, 1, 0x80000001, 0x8000, 0x18000])
    values = torch.tensor([65504.0, 65519.996, 65520.0, -65520.0, 65536.0, 2.0**-24, 2.0**-25, -(2.0**-25),
                           3 * 2.0**-26, 2.0**-14 - 2.0**-25, 1 + 2.0**-11, 1 + 3 * 2.0**-11])
    fp16 = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16)
    fp16 = fp16[torch.isfinite(fp16)]
    above = torch.nextafter(fp16, torch.tensor(float("inf"), dtype=torch.float16))
    fp16_ties = fp16.float() + (above.float() - fp16.float()) / 2  # exact in fp32
    bf16_ties = torch.cat([(torch.arange(2**16) << 16) | low for low in (0x8000, 0x7FFF, 0x8001)])
    as_f32 = lambda b: b.to(torch.int32).view(torch.float32)  # noqa: E731 (wraps bits >= 2^31 to the sign)
    return torch.cat([as_f32(bits), values, fp16_ties[torch.isfinite(fp16_ties)], as_f32(bf16_ties)])


def _every_bit_pattern(dtype: torch.dtype) -> torch.Tensor:
    return torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


def _assert_same_bits(result: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal 16-bit patterns wherever torch has a number; NaN where torch has NaN (its payload may differ)."""
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(result), nan)
    same = result.view(torch.int16)[~nan] == expected.view(torch.int16)[~nan]
    if not bool(same.all()):
        first = int((~same).nonzero()[0])
        got, want = result[~nan][first].item(), expected[~nan][first].item()
        raise AssertionError(f"{int((~same).sum())} elements differ from torch's rounding; first: {got!r}, "
                             f"torch {want!r}")


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("g_dtype", testing.FLOATS, ids=str)
@pytest.mark.parametrize("backend,device", TARGETS, ids=lambda x: x)
def test_grad_fanout_rounds_like_torch(backend, device, g_dtype, out_dtype):
    """Every element of every (step, branch) output, with coefficients that scale into the subnormal and
    overflow ranges; an odd length leaves vector tails, and a view starting one element in takes the
    unaligned path."""
    _skip_unless_runs(backend, device)
    g = _rounding_specials().to(g_dtype)
    if g_dtype in (torch.float16, torch.bfloat16):
        g = torch.cat([g, _every_bit_pattern(g_dtype)])
    g = g[: g.numel() // 2 * 2 - 1].to(device)
    scales, weights = [1.0, -3.0], [1.0, 2.0**-20, 0.1]
    with testing.torch_threads(1):
        for view in (g, g[1:]):
            expected = grad_fanout_torch(view, scales, weights, out_dtype=out_dtype)
            _assert_same_bits(grad_fanout(view, scales, weights, out_dtype=out_dtype, backend=backend), expected)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", TARGETS, ids=lambda x: x)
def test_grad_fanout_rounds_like_torch_in_short_tails(backend, device, out_dtype):
    """Vector loops leave the last elements (fewer than a vector) to a scalar loop of their own, and the long
    inputs above end in NaN bit patterns there: here every element passes through that loop, in calls of 1 to
    7 elements over a sample of the finite specials (ties, thresholds, subnormals)."""
    _skip_unless_runs(backend, device)
    g = _rounding_specials()
    g = g[torch.isfinite(g)]
    g = g[:: g.numel() // 1500].to(device)
    scales, weights = [1.0, -3.0], [1.0, 0.1]
    start, length = 0, 1
    with testing.torch_threads(1):
        while start < g.numel():
            piece = g[start:start + length]
            expected = grad_fanout_torch(piece, scales, weights, out_dtype=out_dtype)
            _assert_same_bits(grad_fanout(piece, scales, weights, out_dtype=out_dtype, backend=backend), expected)
            start, length = start + length, length % 7 + 1
