"""Recompute the loss models' activations in the backward instead of keeping them (``loss.recompute_judges``).

After the sampler, one iteration builds, for the finetuned images, the graphs of the VAE decode and of every
judge (attribute classifiers, semantic encoders, face embedder) before one backward walks them all. Their
activations then coexist: at 512x512 the decoder's alone are gigabytes per image, and the judges' come on top.
With activation checkpointing each frozen model keeps only its input; its activations are rebuilt, one model
(for the decoder one block) at a time, while the backward passes through it:

    peak(decode + losses) = sum_m A_m   ->   max_m A_m + sum_m I_m      (A_m: activations, I_m: inputs of m)

at the cost of one more forward of each (small beside the S-step sampler and its recompute). The recompute is
exact: the models are frozen and deterministic (eval mode), so the gradients are those of the plain backward.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _needs_graph(values: Iterable) -> bool:
    return torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


class Recomputed(nn.Module):
    """``module`` whose forward keeps no activations when it builds a graph: they are recomputed in the backward
    (non-reentrant ``torch.utils.checkpoint``, which replays autocast and RNG state). Without a graph to build
    it is a plain call. Attributes the wrapper lacks (``input_size``, ``embed_originals``, ...) are the wrapped
    module's."""

    def __init__(self, module: nn.Module):
        super().__init__()
        if isinstance(module, Recomputed):
            raise ValueError("Recomputed: the module is already wrapped")
        self.module = module

    def forward(self, *args, **kwargs):
        if _needs_graph(args) or _needs_graph(kwargs.values()):
            return checkpoint(self.module, *args, use_reentrant=False, **kwargs)
        return self.module(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def recompute_decoder(vae: nn.Module) -> nn.Module:
    """Turn on diffusers' block-wise gradient checkpointing of the VAE (the decoder's mid and up blocks keep only
    their inputs); a VAE without it is refused rather than silently left as is."""
    supported = getattr(vae, "_supports_gradient_checkpointing", False)
    if not supported or not hasattr(vae, "enable_gradient_checkpointing"):
        raise ValueError(f"loss.recompute_judges: the VAE ({type(vae).__name__}) has no gradient checkpointing; "
                         "set loss.recompute_judges=false")
    vae.enable_gradient_checkpointing()
    return vae


def recompute_semantics(semantics: nn.Module) -> nn.Module:
    """Each encoder of a SemanticsLoss-like module (an ``encoders`` ModuleDict) recomputed on its own, so only
    one encoder's activations exist at a time; a module without ``encoders`` is wrapped whole."""
    encoders = getattr(semantics, "encoders", None)
    if isinstance(encoders, nn.ModuleDict):
        for name, encoder in list(encoders.items()):
            if not isinstance(encoder, Recomputed):
                encoders[name] = Recomputed(encoder)
        return semantics
    return semantics if isinstance(semantics, Recomputed) else Recomputed(semantics)


def recompute_judges(vae: nn.Module, semantics: nn.Module, judges: Dict[str, Optional[nn.Module]]):
    """``loss.recompute_judges`` on one iteration's models: the decoder block-wise (in place), the semantics per
    encoder, and every other judge wrapped in ``Recomputed``; names that share one module share one wrapper, None
    stays None. Returns (semantics, {name: judge})."""
    recompute_decoder(vae)
    wrapped: Dict[int, Recomputed] = {}
    out = {name: None if module is None else wrapped.setdefault(id(module), Recomputed(module))
           for name, module in judges.items()}
    return recompute_semantics(semantics), out
