"""fastfair.keep_attention: a step that keeps only its attention outputs gives the plain gradient bit for bit,
holds what attention_kept_bytes counts, does not run attention again in the backward, and the engine's
keep_attention_steps leaves the adjusted gradient unchanged."""
import itertools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastfair.dft import sample
from fastfair.keep_attention import ATTENTION_OPS, attention_kept, attention_kept_bytes
from fastfair.memory_budget import attention_bytes_per_step, graph_bytes_per_step
from fastfair.reference import reference_sample
from fastfair.testing import tiny_unet

sys.path.insert(0, str(Path(__file__).parent))
from test_dft import SCHED, grads_of, make_problem, max_rel  # noqa: E402


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))

    def attention_forwards(self):
        return sum(n for func, n in self.counts.items() if func in ATTENTION_OPS)


def _unet_call(dtype, autocast=None):
    unet = tiny_unet(dtype=dtype).requires_grad_(False)
    unet.conv_in.requires_grad_(True)  # a trainable weight inside: its gradient must match too
    x = torch.randn(3, 4, 8, 8, dtype=dtype)
    emb = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    t = torch.tensor([1, 500, 900])

    def call(x_rows, emb_rows):
        if autocast is None:
            return unet(x_rows, t, encoder_hidden_states=emb_rows).sample
        with torch.autocast("cpu", dtype=autocast):
            return unet(x_rows, t, encoder_hidden_states=emb_rows).sample

    return unet, call, x, emb


@pytest.mark.parametrize("dtype,autocast,scoped", [(torch.float64, None, True), (torch.float32, None, True),
                                                   (torch.float32, torch.bfloat16, True), (torch.float64, None, False)])
def test_same_gradient_bit_for_bit_and_no_attention_forward_in_the_backward(dtype, autocast, scoped):
    unet, call, x, emb = _unet_call(dtype, autocast)
    inputs = [emb, *unet.conv_in.parameters()]
    out = call(x, emb)
    u = torch.randn_like(out)
    plain = torch.autograd.grad(out, inputs, u)
    kept = attention_kept(call, x, emb, scope=unet if scoped else None)
    with OpCounter() as backward_ops:
        selective = torch.autograd.grad(kept, inputs, u)
    assert all(torch.equal(a, b) for a, b in zip(selective, plain))
    assert backward_ops.attention_forwards() == 0  # the kept outputs are used, not recomputed
    with OpCounter() as forward_ops:
        call(x, emb)
    assert forward_ops.attention_forwards() > 0  # the model does run fused attention kernels


def test_scoped_cache_sees_only_the_attention_layers_ops(monkeypatch):
    """With the U-Net as scope, only ops inside its attention layers pass through the Python dispatch mode (the
    speed of the rest of the call); without, every op does. Both keep the same bytes."""
    import fastfair.keep_attention as keep_attention

    unet, call, x, emb = _unet_call(torch.float32)
    seen = []
    original = keep_attention._AttentionCache.__torch_dispatch__

    def counting(self, func, types, args=(), kwargs=None):
        seen.append(func)
        return original(self, func, types, args, kwargs)

    monkeypatch.setattr(keep_attention._AttentionCache, "__torch_dispatch__", counting)
    with OpCounter() as everything:
        call(x, emb)
    scoped = attention_kept_bytes(call, x, emb, scope=unet)
    in_scope = len(seen)
    seen.clear()
    unscoped = attention_kept_bytes(call, x, emb)
    assert scoped == unscoped
    assert len(seen) == sum(everything.counts.values())
    assert 0 < in_scope < len(seen) / 2
    assert sum(func in ATTENTION_OPS for func in seen) == everything.attention_forwards()


def test_counted_bytes_are_the_attention_outputs_inputs_and_output():
    """A hand-sized case: the only attention kernel's outputs, the fresh input x and the output are held."""
    torch.manual_seed(0)
    proj = torch.nn.Linear(8, 8).requires_grad_(False)
    x = torch.randn(2, 5, 8)
    w = torch.randn(8, requires_grad=True)  # a leaf the caller holds: not counted

    def call(x_rows, weight):
        q = proj(x_rows * weight).view(2, 5, 2, 4).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q).sum(1)

    with OpCounter() as ops:
        call(x, w)
    (kernel,) = [func for func in ops.counts if func in ATTENTION_OPS]
    q = torch.randn(2, 2, 5, 4)
    outputs = kernel(q, q, q)
    attention = sum(t.untyped_storage().nbytes() for t in outputs if isinstance(t, torch.Tensor))
    out_bytes = 2 * 5 * 4 * 4
    assert attention_kept_bytes(call, x, w) == attention + x.untyped_storage().nbytes() + out_bytes


def test_unet_step_keeps_a_small_fraction_of_a_graph():
    unet, z_T, cond, uncond, _ = (lambda p: (p[0], p[2], p[3], p[4], p[5]))(make_problem(torch.float32, lora=True))
    whole = graph_bytes_per_step(unet, z_T, 0, cond, uncond, 7.5)
    attention = attention_bytes_per_step(unet, z_T, 0, cond, uncond, 7.5)
    assert 0 < attention < 0.3 * whole


@pytest.mark.parametrize("kw,lora,cfg", list(itertools.product(
    [dict(keep_attention_steps=3), dict(keep_graph_steps=1, keep_attention_steps=2),
     dict(keep_attention_steps=5, recompute_chunk=2), dict(keep_attention_steps=2, lean_graph=False)],
    [False, True], [True, False])))
def test_engine_gradient_unchanged(kw, lora, cfg):
    problem = make_problem(lora=lora, diffusers=True)
    _, g_lean = grads_of(sample, problem, cfg, num_steps=5)
    _, g_kept = grads_of(sample, problem, cfg, num_steps=5, **kw)
    assert all(torch.equal(a, b) for a, b in zip(g_kept, g_lean))
    _, g_ref = grads_of(reference_sample, problem, cfg, num_steps=5)
    assert max_rel(g_kept, g_ref) <= 1e-8


def test_engine_with_frozen_rows_and_a_frozen_unet():
    """Text-side training (the U-Net frozen, cond trained) with frozen rows riding along: the kept call covers the
    differentiated rows only, like a whole kept graph."""
    unet, _, z_T, cond, uncond, _ = make_problem(diffusers=True, train_names=())
    grads = {}
    for name, kw in (("lean", {}), ("attention", dict(keep_attention_steps=3)), ("graph", dict(keep_graph_steps=3))):
        z0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=3, frozen_rows=1, **kw)
        grads[name] = torch.autograd.grad(z0.sin().sum(), [cond, uncond])
    for name in ("attention", "graph"):  # a kept step splits its batch in two calls: equal to rounding
        for a, b in zip(grads[name], grads["lean"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(grads["attention"], grads["graph"]))


def test_input_errors():
    unet, _, z_T, cond, uncond, _ = make_problem(diffusers=True)
    with pytest.raises(ValueError, match="keep_attention_steps"):
        sample(unet, SCHED, z_T, cond, uncond, num_steps=3, keep_attention_steps=-1)


def test_no_fused_attention_kernel_means_no_attention_keeps():
    """Classic attention (explicit matmuls) runs no fused kernel: G_att is None and the budget keeps whole graphs."""
    from diffusers.models.attention_processor import AttnProcessor

    from fastfair.memory_budget import GIB, MemoryBudget

    unet, _, z_T, cond, uncond, _ = make_problem(torch.float32, lora=True)
    unet.set_attn_processor(AttnProcessor())
    assert attention_bytes_per_step(unet, z_T, 0, cond, uncond, 7.5) is None
    per_step = graph_bytes_per_step(unet, z_T, 0, cond, uncond, 7.5)
    assert MemoryBudget(2.5 * per_step / GIB).keeps(unet, z_T, cond, uncond, 4, 7.5) == (2, 0)
