"""fastfair.lean_graph: the replaced layers give autograd's gradients bit for bit, in each dtype, while saving
fewer bytes; the layers get their own forward back; the engine and G use it."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastfair.dft import sample
from fastfair.lean_graph import FrozenConv2d, GegluGate, lean_graph, lean_layers
from fastfair.memory_budget import graph_bytes_per_step, saved_tensor_bytes
from fastfair.testing import tiny_scheduler, tiny_unet

# [B, C_in, H, W], C_out, kernel, stride, padding, dilation, groups: odd sizes, strided, grouped, 1x1
CONVS = [
    ((2, 4, 8, 8), 6, 3, 1, 1, 1, 1),
    ((3, 5, 17, 13), 7, 3, 2, 1, 1, 1),
    ((1, 6, 9, 11), 6, 3, 1, 2, 2, 3),
    ((2, 8, 7, 7), 4, 1, 1, 0, 1, 1),
]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _weights(c_in, c_out, k, groups, dtype, bias=True):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(c_out, c_in // groups, k, k, generator=g).to(dtype)
    return w, (torch.randn(c_out, generator=g).to(dtype) if bias else None)


@pytest.mark.parametrize("spec,dtype,bias", list(itertools.product(CONVS, DTYPES, [True, False])))
def test_frozen_conv_matches_autograd_bit_for_bit(spec, dtype, bias):
    shape, c_out, k, stride, padding, dilation, groups = spec
    w, b = _weights(shape[1], c_out, k, groups, dtype, bias)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    args = ((stride, stride), (padding, padding), (dilation, dilation), groups)
    y_ref = F.conv2d(x, w, b, *args)
    u = torch.randn_like(y_ref)
    (g_ref,) = torch.autograd.grad(y_ref, x, u)
    y = FrozenConv2d.apply(x, w, b, *args)
    (g,) = torch.autograd.grad(y, x, u)
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref) and g.dtype == x.dtype


def test_frozen_conv_under_autocast_returns_the_input_dtype_gradient():
    w, b = _weights(4, 6, 3, 1, torch.float32)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    pad = ((1, 1), (1, 1), (1, 1), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, y = F.conv2d(x, w, b, *pad), FrozenConv2d.apply(x, w, b, *pad)
    u = torch.randn_like(y_ref)
    g_ref, g = torch.autograd.grad(y_ref, x, u)[0], torch.autograd.grad(y, x, u)[0]
    assert y.dtype == torch.bfloat16 and g.dtype == torch.float32
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)


@pytest.mark.parametrize("shape,dtype", list(itertools.product([(2, 5, 2 * 12), (3, 17, 2 * 7), (1, 2 * 3)],
                                                               DTYPES)))
def test_geglu_gate_matches_autograd_bit_for_bit(shape, dtype):
    p = torch.randn(shape, dtype=dtype, requires_grad=True)
    h, g = p.chunk(2, dim=-1)
    out_ref = h * F.gelu(g)
    u = torch.randn_like(out_ref)
    (grad_ref,) = torch.autograd.grad(out_ref, p, u)
    out = GegluGate.apply(p)
    (grad,) = torch.autograd.grad(out, p, u)
    assert torch.equal(out, out_ref) and torch.equal(grad, grad_ref)
    # the gate saves the projection only: gelu(g) is not kept
    assert saved_tensor_bytes(lambda: GegluGate.apply(p), [p]) < saved_tensor_bytes(
        lambda: p.chunk(2, -1)[0] * F.gelu(p.chunk(2, -1)[1]), [p])


def _lora_unet(dtype):
    from peft import LoraConfig

    unet = tiny_unet(dtype=dtype).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    unet.conv_in.requires_grad_(True)  # a trainable convolution: it must stay autograd's
    return unet.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unet_gradients_identical_and_fewer_bytes(dtype):
    unet = _lora_unet(dtype)
    kinds = [kind for _, kind in lean_layers(unet)]
    assert "geglu" in kinds and "conv" in kinds
    assert unet.conv_in not in [layer for layer, _ in lean_layers(unet)]
    params = [p for p in unet.parameters() if p.requires_grad]
    x = torch.randn(3, 4, 8, 8, dtype=dtype)
    emb = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    t = torch.tensor([10, 500, 900])
    call = lambda: unet(x, t, encoder_hidden_states=emb).sample  # noqa: E731
    u = torch.randn(3, 4, 8, 8, dtype=dtype)
    plain = torch.autograd.grad(call(), [emb, *params], u)
    with lean_graph(unet) as replaced:
        assert replaced == len(kinds)
        lean = torch.autograd.grad(call(), [emb, *params], u)
    assert all(torch.equal(a, b) for a, b in zip(lean, plain))
    held = [*unet.parameters(), emb]
    with lean_graph(unet):
        lean_bytes = saved_tensor_bytes(call, held)
    assert lean_bytes < 0.85 * saved_tensor_bytes(call, held)


def test_layers_get_their_forward_back_even_after_an_error():
    unet = tiny_unet()
    layers = [layer for layer, _ in lean_layers(unet)]
    with pytest.raises(RuntimeError, match="boom"):
        with lean_graph(unet):
            assert all("forward" in layer.__dict__ for layer in layers)
            raise RuntimeError("boom")
    assert not any("forward" in layer.__dict__ for layer in layers)
    with lean_graph(unet, enabled=False) as replaced:
        assert replaced == 0


def test_someone_elses_forward_wrapper_is_left_alone():
    net = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)).requires_grad_(False)
    theirs = lambda x: x + 1  # noqa: E731
    net[0].forward = theirs
    with lean_graph(net) as replaced:
        assert replaced == 1 and net[0].forward is theirs
    assert net[0].forward is theirs and "forward" not in net[1].__dict__


def test_no_grad_calls_compute_the_same_output():
    unet = tiny_unet()
    x, emb, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.tensor([3, 700])
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=emb).sample
        with lean_graph(unet):
            lean = unet(x, t, encoder_hidden_states=emb).sample
    assert torch.equal(lean, plain)


def test_engine_gradient_identical_and_G_smaller():
    """sample(lean_graph=True) (the default) equals plain autograd bit for bit, with kept and recomputed steps, and
    the G it is budgeted with is the smaller, lean one."""
    unet = _lora_unet(torch.float64)
    g = torch.Generator().manual_seed(0)
    z_T = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 5, 16, generator=g, dtype=torch.float64).requires_grad_()
    uncond = torch.randn(1, 5, 16, generator=g, dtype=torch.float64).requires_grad_()
    params = [p for p in unet.parameters() if p.requires_grad]
    sched = tiny_scheduler()

    def grads(lean):
        z0 = sample(unet, sched, z_T, cond, uncond, num_steps=4, keep_graph_steps=2, lean_graph=lean)
        return torch.autograd.grad(z0.sin().sum(), [cond, uncond, *params])

    assert all(torch.equal(a, b) for a, b in zip(grads(True), grads(False)))
    lean, plain = (graph_bytes_per_step(unet, z_T, 0, cond, uncond, 7.5, lean=flag) for flag in (True, False))
    assert lean < 0.85 * plain


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unet_gradients_on_cuda(dtype):
    """cuDNN may pick another algorithm for the input-only backward: equal up to the dtype's rounding."""
    unet = _lora_unet(torch.float32).cuda().to(dtype)
    x = torch.randn(2, 4, 8, 8, device="cuda", dtype=dtype)
    emb = torch.randn(2, 5, 16, device="cuda", dtype=dtype, requires_grad=True)
    t = torch.tensor([10, 900], device="cuda")
    u = torch.randn(2, 4, 8, 8, device="cuda", dtype=dtype)
    plain = torch.autograd.grad(unet(x, t, encoder_hidden_states=emb).sample, emb, u)[0]
    with lean_graph(unet):
        lean = torch.autograd.grad(unet(x, t, encoder_hidden_states=emb).sample, emb, u)[0]
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(lean.float(), plain.float(), rtol=tol, atol=tol * plain.abs().max().item())


def test_a_convolution_with_a_trainable_bias_or_of_a_subclass_is_left_as_it_is():
    """FrozenConv2d returns no bias gradient, and a Conv2d subclass may compute more than conv2d (LoRA-compatible
    convolutions): neither may be replaced."""
    class Shifted(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) + 1

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Shifted(4, 4, 3, padding=1)).requires_grad_(False)
    model[0].bias.requires_grad_(True)
    assert lean_layers(model) == []
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    model(x).square().sum().backward()
    expected = model[0].bias.grad.clone()
    model[0].bias.grad = None
    with lean_graph(model):
        model(x).square().sum().backward()
    torch.testing.assert_close(model[0].bias.grad, expected)
