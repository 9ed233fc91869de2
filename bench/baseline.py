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
   micro-batches add up to the full-batch loss), backward. The U-Net uses gradient checkpointing at the public
   code's granularity (``checkpointed``: that of diffusers 0.19.3, which it pins), as the public code does to fit
   the unroll in memory; the VAE and the judges keep their activations (the public code enables checkpointing on
   them too, but 0.19.3 and its transformers run it only in train mode, which they are never in).

Precision (chosen by the caller's loader): on CUDA fp16 frozen weights with fp32 LoRA, as published; on CPU fp32
(fp16 matmuls are not supported well on CPU, and bf16 would only slow it down). Attention: the published
text-encoder runs use PyTorch SDPA (diffusers 0.19.3 picks ``AttnProcessor2_0`` on torch 2; its xformers line is
commented out): ``baseline_sdpa`` is the public code's iteration. Its U-Net LoRA runs use diffusers' classic
attention (LoRA processors: explicit softmax(QK^T) V, no fused kernel), ``set_classic_attention`` here:
``baseline`` shows what the attention alone costs. Not modelled (they would add to the public code's time, not
fastfair's): the public code's face detection, alignment and face-realism network, its classifier pass on the
original images, and its 19-23 random steps (mean 21) where the benchmark fixes one count for both
implementations. Text: both implementations here encode one prompt padded to 77 tokens; the public code encodes
N copies padded to the prompt's own length (9 tokens for the benchmark's prompt: 0.7 % fewer U-Net FLOPs, for
both alike).

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


class _WholeCheckpoint(torch.nn.Module):
    """A module run under ``torch.utils.checkpoint``: it keeps its inputs only and recomputes in the backward."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


def _cross_attention_blocks(unet: torch.nn.Module) -> list:
    return [block for block in [*unet.down_blocks, *unet.up_blocks] if hasattr(block, "attentions")]


@contextlib.contextmanager
def checkpointed(unet: torch.nn.Module):
    """The public code's U-Net gradient checkpointing for the duration of a block: diffusers 0.19.3's, which it
    pins (in train mode, which the public code sets): every resnet of the down and up blocks and every whole
    attention module (Transformer2DModel) of their cross-attention blocks keep only their inputs; the mid block,
    conv_in/out, the time embedding and the up/down samplers keep their activations. Newer diffusers checkpoint the
    attention modules' inner transformer blocks instead, keeping their norm, proj_in/proj_out and residual, and
    the mid block too: at SD 1.5 shapes about 1.66x the public code's bytes per step, which would flatter
    fastfair's memory ratios, so those settings are undone here and the whole attention modules checkpointed."""
    unet.enable_gradient_checkpointing()
    for module in unet.modules():
        if module is not unet and hasattr(module, "gradient_checkpointing") and (
                hasattr(module, "transformer_blocks") or module is unet.mid_block):
            module.gradient_checkpointing = False
    blocks = _cross_attention_blocks(unet)
    originals = [block.attentions for block in blocks]
    for block in blocks:
        block.attentions = torch.nn.ModuleList(_WholeCheckpoint(attention) for attention in block.attentions)
    try:
        yield unet
    finally:
        for block, attentions in zip(blocks, originals):
            block.attentions = attentions
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
