"""Graph-building U-Net calls that save less for the backward, with bit-identical gradients.

Inside ``lean_graph(unet)`` two kinds of layer keep only what their backward reads:

- a frozen ``nn.Conv2d`` (weight and bias not trainable, as in every fastfair recipe: LoRA leaves the base
  convolutions frozen): autograd's convolution saves its input for the weight gradient even when the weight needs
  none; ``FrozenConv2d`` keeps the weight only (a parameter, no new memory).
- diffusers' ``GEGLU`` (every transformer block's feed-forward): ``h * gelu(gate)`` saves the projection [.., 2F]
  and gelu(gate) [.., F]; ``GegluGate`` keeps the projection only and recomputes gelu(gate) in the backward.

At SD 1.5 shapes these are about a quarter of the bytes one step's graph holds (frozen U-Net, gradient to the text
embeddings: 139.2 vs 189.5 MiB at 128 px, 1 image; bench/results/train_step_sd15_cpu.md). The engine makes every graph-building call (kept steps, the
backward's recompute) inside it, and ``fastfair.memory_budget`` measures G the same way.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .instance_forward import forwards_replaced


class FrozenConv2d(torch.autograd.Function):
    """y = conv2d(x, W, b) for a W, b that need no gradient; saves no activation.

    Backward: dL/dx = conv2d_input(dL/dy, W) (the transposed convolution), which reads W and x's shape, not x.
    Under autocast the forward ran in y's dtype, so the backward uses W cast to that dtype and returns dL/dx in
    x's dtype: what autograd gives through autocast's cast of x.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.weight = weight  # a parameter: holding it costs nothing, and save_for_backward would refuse no-grad
        ctx.meta = (x.shape, x.dtype, stride, padding, dilation, groups)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        shape, dtype, stride, padding, dilation, groups = ctx.meta
        weight = ctx.weight.to(grad_y.dtype)
        shape_only = grad_y.new_empty(1).expand(shape)
        grad_x = torch.ops.aten.convolution_backward(
            grad_y, shape_only, weight, None, stride, padding, dilation, False, [0, 0], groups, (True, False, False)
        )[0]
        return grad_x.to(dtype), None, None, None, None, None, None


class GegluGate(torch.autograd.Function):
    """out = h * gelu(g) for p = [h, g] (the GEGLU projection [..., 2F]); saves p only.

    Backward (u = dL/dout): dL/dh = u * gelu(g), dL/dg = gelu'(g) * (u * h), the products autograd forms, in its
    order, with gelu(g) recomputed.
    """

    @staticmethod
    def forward(ctx, projection):
        ctx.save_for_backward(projection)
        h, g = projection.chunk(2, dim=-1)
        return h * F.gelu(g)

    @staticmethod
    def backward(ctx, grad_out):
        (projection,) = ctx.saved_tensors
        h, g = projection.chunk(2, dim=-1)
        grad_h = grad_out * F.gelu(g)
        grad_g = torch.ops.aten.gelu_backward(grad_out * h, g)
        return torch.cat([grad_h, grad_g], dim=-1)


def _conv_forward(conv: nn.Conv2d):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return FrozenConv2d.apply(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return forward


def _geglu_forward(geglu: nn.Module):
    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        projection = geglu.proj(hidden_states)
        if not torch.is_grad_enabled() or not projection.requires_grad:
            h, g = projection.chunk(2, dim=-1)
            return h * F.gelu(g)
        return GegluGate.apply(projection)
    return forward


def _is_frozen_conv(module: nn.Module) -> bool:
    # exact type: subclasses (LoRA-compatible convolutions, other padding) may compute something else
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
            and not module.weight.requires_grad and (module.bias is None or not module.bias.requires_grad))


def _is_geglu(module: nn.Module) -> bool:
    return type(module).__name__ == "GEGLU" and type(module).__module__.startswith("diffusers.") and \
        isinstance(getattr(module, "proj", None), nn.Module)


def lean_layers(module: nn.Module) -> List[Tuple[nn.Module, str]]:
    """(layer, kind) for each layer of ``module`` that ``lean_graph`` replaces: kind "conv" or "geglu"."""
    found = []
    for layer in module.modules():
        if _is_frozen_conv(layer):
            found.append((layer, "conv"))
        elif _is_geglu(layer):
            found.append((layer, "geglu"))
    return found


@contextlib.contextmanager
def lean_graph(module: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Within, ``module``'s frozen convolutions and GEGLU gates save less for the backward (module docstring).

    Yields the number of layers replaced; each gets its own forward back on exit, exceptions included, and a
    layer that already has an instance ``forward`` is left alone (``fastfair.instance_forward``).
    """
    kinds = dict(lean_layers(module)) if enabled else {}
    make = lambda layer: _conv_forward(layer) if kinds[layer] == "conv" else _geglu_forward(layer)  # noqa: E731
    with forwards_replaced(kinds, make) as replaced:
        yield len(replaced)
