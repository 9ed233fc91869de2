"""Recompute the loss models' activations in the backward instead of keeping them (``loss.recompute_judges``).

After the sampler, one iteration builds, for the finetuned images, the graphs of the VAE decode and of every
judge (attribute classifiers, semantic encoders, face embedder) before one backward walks them all. Their
activations then coexist: at 512x512 the decoder's alone are gigabytes per image, and the judges' come on top.
With activation checkpointing each frozen model keeps only its input; its activations are rebuilt, one model
(for the decoder one block) at a time, while the backward passes through it:

    peak(decode + losses) = sum_m A_m   ->   max_m A_m + sum_m I_m      (A_m: activations, I_m: inputs of m)

at the cost of one more forward of each (small beside the S-step sampler and its recompute). The recompute is
exact: the models are frozen and deterministic (eval mode), so the gradients are those of the plain backward.

That peak still grows with the images a process judges: A_m is model m's activations over the whole batch. With
``loss.judge_images`` = r, every model runs on slices of r images, each slice its own checkpoint; autograd
finishes one slice's backward (the slices are independent branches, the latest first) before it rebuilds the
next one's activations, so

    peak(decode + losses) = max_m A_m(r) + sum_m I_m(N)

flat in N but for the kept inputs (latents, images, crops: a few MiB per image at 512 px). The decoder keeps its
block-wise checkpointing inside each slice's rebuild (nested): one more decoder forward, but the rebuild holds one
block's activations instead of the whole decoder's, which at one image is more than the block-wise whole batch's
(SD 1.5 at 256 px: 1489 MiB checkpointed per image as a whole against 815 MiB block-wise for a batch of one;
bench/results/judge_memory_whole_slice_sd15_cpu.md).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastfair.models import LatentDecoder


def _needs_graph(values: Iterable) -> bool:
    return torch.is_grad_enabled() and any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


class Recomputed(nn.Module):
    """``module`` whose forward keeps no activations when it builds a graph: they are recomputed in the backward
    (non-reentrant ``torch.utils.checkpoint``, which replays autocast and RNG state). Without a graph to build
    it is a plain call. Attributes the wrapper lacks (``input_size``, ``embed_originals``, ...) are the wrapped
    module's.

    rows: when set, the module's one tensor argument [N, ...] goes through in slices of ``rows`` along dim 0, each
    a checkpoint of its own (and without a graph a call of its own), and the slices' outputs [rows, ...] are
    concatenated: the activations that exist at once, forward or backward, are those of ``rows`` images. The
    module must treat rows independently, as frozen models in eval mode do."""

    def __init__(self, module: nn.Module, rows: Optional[int] = None):
        super().__init__()
        if isinstance(module, Recomputed):
            raise ValueError("Recomputed: the module is already wrapped")
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ValueError(f"Recomputed: rows={rows!r}, expected a positive integer or None (the whole batch)")
        self.module, self.rows = module, rows

    def _call(self, *args, **kwargs):
        if _needs_graph(args) or _needs_graph(kwargs.values()):
            return checkpoint(self.module, *args, use_reentrant=False, **kwargs)
        return self.module(*args, **kwargs)

    def forward(self, *args, **kwargs):
        if self.rows is None:
            return self._call(*args, **kwargs)
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) or args[0].ndim == 0:
            raise TypeError(f"Recomputed(rows={self.rows}) slices one tensor argument [N, ...] along N; got "
                            f"{len(args)} positional argument(s) and keyword(s) {sorted(kwargs)}")
        batch = args[0]
        if batch.shape[0] == 0:  # nothing to slice: the module's own answer to no rows
            return self._call(batch)
        outputs = [self._call(batch[start:start + self.rows]) for start in range(0, batch.shape[0], self.rows)]
        for start, out in zip(range(0, batch.shape[0], self.rows), outputs):
            rows = min(self.rows, batch.shape[0] - start)
            if not isinstance(out, torch.Tensor) or out.ndim == 0 or out.shape[0] != rows:
                raise TypeError(f"Recomputed(rows={self.rows}): {type(self.module).__name__} must return a tensor "
                                f"with one row per input row ({rows}), got "
                                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

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


def recompute_semantics(semantics: nn.Module, rows: Optional[int] = None) -> nn.Module:
    """Each encoder of a SemanticsLoss-like module (an ``encoders`` ModuleDict) recomputed on its own (in slices
    of ``rows`` images when set), so only one encoder's activations exist at a time; a module without
    ``encoders`` is wrapped whole, unsliced (its forward takes the originals' embeddings beside the images)."""
    encoders = getattr(semantics, "encoders", None)
    if isinstance(encoders, nn.ModuleDict):
        for name, encoder in list(encoders.items()):
            if not isinstance(encoder, Recomputed):
                encoders[name] = Recomputed(encoder, rows)
        return semantics
    return semantics if isinstance(semantics, Recomputed) else Recomputed(semantics)


def recompute_judges(decoder: LatentDecoder, semantics: nn.Module, judges: Dict[str, Optional[nn.Module]],
                     rows: Optional[int] = None):
    """``loss.recompute_judges`` on one iteration's models: the decoder block-wise (its VAE, in place), the
    semantics per encoder, and every other judge wrapped in ``Recomputed``; names that share one module share
    one wrapper, None stays None. With ``rows`` (``loss.judge_images``) every model runs in slices of that many
    images, the decoder checkpointed per slice and block-wise inside it. Returns (decoder, semantics,
    {name: judge})."""
    recompute_decoder(decoder.vae)
    if rows is not None and not isinstance(decoder, Recomputed):
        decoder = Recomputed(decoder, rows)
    wrapped: Dict[int, Recomputed] = {}
    out = {name: None if module is None else wrapped.setdefault(id(module), Recomputed(module, rows))
           for name, module in judges.items()}
    return decoder, recompute_semantics(semantics, rows), out
