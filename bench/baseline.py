"""The public reference code's training iteration, re-implemented on fastfair's loaders (issue 9).

One iteration on N images of one prompt (what the public code does, and the choices made here):

1. sampling pass 1, no grad: the finetuned model (text encoder with LoRA) samples z_0 from z_T; its images are
   decoded and classified to compute the alignment targets over the whole batch (they need every image before
   any gradient is taken);
2. sampling pass 2, no grad: the frozen model (adapters off) samples from the same z_T; its images are decoded
   and embedded for the semantics loss;
3. gradient pass, in micro-batches of ``micro_batch`` images: the text is encoded again with grad and the
   finetuned model samples again with the autograd graph of the whole unroll (``fastfair.reference``: the
   literal Algorithm A.1: U-Net input detached, a hook on the CFG-combined eps scales its gradient by the
   ``paper`` coefficient C_i); decode, loss of the micro-batch (a sum over its rows divided by N, so the
   micro-batches add up to the full-batch loss), backward. The U-Net uses diffusers' per-block gradient
   checkpointing (``unet.enable_gradient_checkpointing()``: each resnet/attention block keeps only its input and
   is recomputed in the backward), as the public code does to fit the unroll in memory.

Precision (chosen by the caller's loader): on CUDA fp16 frozen weights with fp32 LoRA, as published; on CPU fp32
(fp16 matmuls are not supported well on CPU, and bf16 would only slow it down). Attention: the published code
runs diffusers' classic attention (``AttnProcessor``: explicit softmax(QK^T) V, no fused kernel), selectable here
with ``set_classic_attention``; ``baseline_sdpa`` keeps PyTorch SDPA (``AttnProcessor2_0``) to separate the
attention gain from the algorithmic one.

The objective (``objective``) is passed in, so the baseline and fastfair optimize the same loss; the sampler's
gradient equals fastfair's exact adjusted gradient (tests/test_baseline.py checks it).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from fastfair.reference import reference_sample


def set_classic_attention(unet: torch.nn.Module) -> None:
    """diffusers' classic attention processor on every U-Net attention layer (the published code's attention)."""
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())


@contextlib.contextmanager
def checkpointed(unet: torch.nn.Module):
    """diffusers' per-block gradient checkpointing for the duration of a block."""
    unet.enable_gradient_checkpointing()
    try:
        yield unet
    finally:
        unet.disable_gradient_checkpointing()


def _no_timer(name: str):
    return contextlib.nullcontext()


def baseline_iteration(model, scheduler, objective, z_T: torch.Tensor, prompt: str, *, num_steps: int,
                       guidance_scale: float = 7.5, micro_batch: Optional[int] = None,
                       phase: Callable[[str], contextlib.AbstractContextManager] = _no_timer) -> torch.Tensor:
    """Accumulate the iteration's gradient into the trainable parameters' ``.grad``; returns the loss (detached).

    model: ``fastfair.finetune.FinetunedModel`` (text LoRA); scheduler: the DPM-Solver++ scheduler;
    objective: ``decode(z) -> images``, ``targets(images) -> q [N, K]``, ``embed_originals(images)``,
    ``loss(images, q, originals, total) -> scalar`` (sum over rows / total); z_T: [N, 4, h, w];
    micro_batch: images per gradient pass (None: all N); phase(name): a context timing the named phase.
    """
    n = z_T.shape[0]
    if micro_batch is not None and (not isinstance(micro_batch, int) or micro_batch < 1):
        raise ValueError(f"micro_batch={micro_batch!r}: expected a positive integer or None (= all images)")
    micro_batch = micro_batch or n
    sampler = dict(num_steps=num_steps, guidance_scale=guidance_scale, coefficients="paper")
    with torch.no_grad():
        with phase("sampling"):
            z_ft = reference_sample(model.unet, scheduler, z_T, model.encode([prompt]),
                                    model.encode([""], positive=False), **sampler)
            with model.original_unet() as frozen:
                z_orig = reference_sample(frozen, scheduler, z_T, model.encode_original([prompt]),
                                          model.encode_original([""]), **sampler)
        with phase("decode_losses"):
            q = objective.targets(objective.decode(z_ft))
            originals = objective.embed_originals(objective.decode(z_orig))
    total = z_T.new_zeros(())
    with checkpointed(model.unet):
        for start in range(0, n, micro_batch):
            rows = slice(start, start + micro_batch)
            with phase("sampling"):
                z0 = reference_sample(model.unet, scheduler, z_T[rows], model.encode([prompt]),
                                      model.encode([""], positive=False), **sampler)
            with phase("decode_losses"):
                loss = objective.loss(objective.decode(z0), q[rows], {k: v[rows] for k, v in originals.items()}, n)
            with phase("backward"):
                loss.backward()
            total = total + loss.detach()
    return total
