"""The engine on CUDA (skipped without a GPU; bench/gpu_check.sh runs it): every kernel backend gives the
reference's gradient, and fp16/bf16 autocast stays close to fp32."""
import pytest
import torch

from fastfair.dft import sample
from fastfair.reference import reference_sample
from fastfair.testing import tiny_scheduler, tiny_unet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SCHED = tiny_scheduler()


def problem(dtype=torch.float32):
    unet = tiny_unet(channels=(32, 64), cross_attention_dim=32, sample_size=16).to("cuda", dtype)
    unet.requires_grad_(False)
    train = [p for n, p in unet.named_parameters() if "attn2.to_k" in n or "conv_in" in n]
    for p in train:
        p.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    z_T = torch.randn(4, 4, 16, 16, generator=g).to("cuda", dtype)
    cond = torch.randn(4, 8, 32, generator=g).to("cuda", dtype).requires_grad_()
    uncond = torch.randn(1, 8, 32, generator=g).to("cuda", dtype)
    target = torch.randn(4, 4, 16, 16, generator=g).to("cuda")
    return unet, train, z_T, cond, uncond, target


def grads(fn, prob, **kw):
    unet, train, z_T, cond, uncond, target = prob
    z0 = fn(unet, SCHED, z_T, cond, uncond, num_steps=10, **kw)
    return torch.autograd.grad(((z0.float() - target) ** 2).mean(), [cond] + train)


def rel(a, b):
    return max(((x.double() - y.double()).norm() / y.double().norm()).item() for x, y in zip(a, b))


@pytest.mark.parametrize("backend", ["torch", "native", "triton"])
def test_each_backend_matches_reference_in_float64(monkeypatch, backend):
    from fastfair.kernels import unavailable_reason

    reason = unavailable_reason(backend, "cuda")
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("FASTFAIR_KERNELS", backend)
    prob = problem(torch.float64)
    assert rel(grads(sample, prob, recompute_chunk=5), grads(reference_sample, prob)) <= 1e-8


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_close_to_fp32(dtype):
    prob = problem()
    g32 = grads(sample, prob)
    with torch.autocast("cuda", dtype=dtype):
        g_half = grads(sample, prob, recompute_chunk=5)
    assert all(torch.isfinite(g).all() for g in g_half)
    assert rel(g_half, g32) < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kept_graphs_and_attention_keeps_match_the_lean_run(dtype):
    """Whole kept graphs and attention-only keeps (fastfair.keep_attention: CUDA's fused attention kernels) give
    the lean run's gradient: the same ops on the same inputs, up to cuDNN's choice of algorithm."""
    prob = problem(dtype)
    region = torch.autocast("cuda", dtype=dtype) if dtype != torch.float32 else torch.autocast("cuda", enabled=False)
    with region:
        lean = grads(sample, prob)
        kept = grads(sample, prob, keep_graph_steps=3, keep_attention_steps=5)
    assert rel(kept, lean) < (1e-5 if dtype == torch.float32 else 1e-2)
