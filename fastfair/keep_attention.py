"""Keep a step's attention outputs only: the middle ground between a kept graph and a full recompute.

A kept step holds its whole graph (G bytes) and skips the backward's recompute; a lean step holds nothing and
recomputes the whole U-Net call. ``attention_kept(fn, *inputs, scope=unet)`` holds the outputs of the fused
scaled-dot-product attention kernels only (output and log-sum-exp: about a tenth of G at SD's shapes) and
recomputes everything else in the backward, where each attention kernel hands back its kept outputs instead of
running again. The gradient is the plain backward's, bit for bit: the recompute runs the same deterministic ops
on the same inputs, and the attention backward gets the very outputs the forward made.

How: a non-reentrant ``torch.utils.checkpoint`` (its inputs are kept, its activations rebuilt in the backward)
whose forward records and whose recompute replays the attention kernels' outputs, through a dispatch mode that is
active only inside ``scope``'s attention layers (diffusers' ``Attention``): the U-Net's other ops run at full
speed (torch's own selective checkpointing would route every op through Python). What it saves is the
attention's share of the forward time: most of it in test-sized models on a CPU, less on a GPU at 512 px. Attention
written as explicit matmuls (diffusers' classic ``AttnProcessor``) runs no fused kernel: nothing is kept and such a
step costs what a recomputed one does.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import checkpoint


def _attention_ops() -> FrozenSet:
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_fused_attention_overrideable")
    return frozenset(getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name))


ATTENTION_OPS = _attention_ops()  # the fused attention kernels F.scaled_dot_product_attention dispatches to
_active = threading.local()  # .cache: the _AttentionCache recording or replaying on this thread, else absent


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


class _AttentionCache(TorchDispatchMode):
    """Records the attention kernels' outputs in call order (``replay`` False), or hands them back in the same
    order instead of running the kernels (``replay`` True). Every other op runs as it is."""

    def __init__(self):
        super().__init__()
        self.outputs: List = []
        self.replay = False
        self.position = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in ATTENTION_OPS:
            return func(*args, **kwargs)
        if not self.replay:
            out = func(*args, **kwargs)
            self.outputs.append(tree_map(_detached, out))
            return out
        if self.position >= len(self.outputs):
            raise RuntimeError("attention_kept: the backward's recompute ran more attention kernels than the forward; "
                               "the function must be deterministic")
        out, self.outputs[self.position] = self.outputs[self.position], None  # handed back once, then freed
        self.position += 1
        return out


@contextlib.contextmanager
def _using(cache: _AttentionCache, replay: bool) -> Iterator[None]:
    previous = getattr(_active, "cache", None)
    cache.replay, cache.position = replay, 0
    _active.cache = cache
    try:
        yield
    finally:
        _active.cache = previous
        if replay:
            cache.outputs.clear()


def _is_attention_layer(module: nn.Module) -> bool:
    return type(module).__name__ == "Attention" and type(module).__module__.startswith("diffusers.")


@contextlib.contextmanager
def _attention_layers_cached(scope: Optional[nn.Module]) -> Iterator[None]:
    """Within, each attention layer of ``scope`` runs under the active cache's dispatch mode; with no scope or no
    such layer, the whole region does (slower: every op passes through Python)."""
    layers = [m for m in scope.modules() if _is_attention_layer(m) and "forward" not in m.__dict__] if scope else []
    if not layers:
        with _active.cache:
            yield
        return

    def cached(layer: nn.Module):
        def forward(*args, **kwargs):
            with _active.cache:
                return type(layer).forward(layer, *args, **kwargs)
        return forward

    for layer in layers:
        layer.forward = cached(layer)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def attention_kept(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor,
                   scope: Optional[nn.Module] = None) -> torch.Tensor:
    """fn(*inputs), keeping only its attention kernels' outputs (and ``inputs``) for the backward.

    scope: the module whose attention layers fn calls (the U-Net); None routes all of fn through the recording
    dispatch mode. fn must be deterministic: it runs again in the backward, under the forward's autocast.
    """
    cache = _AttentionCache()

    def recorded(*args):
        with _attention_layers_cached(scope):
            return fn(*args)

    return checkpoint(recorded, *inputs, use_reentrant=False, preserve_rng_state=False,
                      context_fn=lambda: (_using(cache, replay=False), _using(cache, replay=True)))


def attention_kept_bytes(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor,
                         scope: Optional[nn.Module] = None) -> Optional[int]:
    """Bytes ``attention_kept(fn, *inputs, scope=scope)`` holds until the backward: the attention outputs (distinct
    storages), the inputs that are not leaves requiring a gradient (a fresh latent batch; such leaves are the
    caller's) and the output; None when fn runs no fused attention kernel (classic or xformers attention: such a
    keep would hold the inputs and save nothing). Runs one forward with grad enabled and no backward."""
    storages: Dict[int, torch.UntypedStorage] = {}
    with torch.enable_grad():
        cache = _AttentionCache()
        with _using(cache, replay=False), _attention_layers_cached(scope):
            out = fn(*inputs)
        if not cache.outputs:
            return None
        for value in cache.outputs:
            for tensor in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                    storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage()
    for tensor in (*inputs, out):
        if isinstance(tensor, torch.Tensor) and not (tensor.requires_grad and tensor.grad_fn is None):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage()
    return sum(storage.nbytes() for storage in storages.values())
