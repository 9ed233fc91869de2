"""The FLOP model of one training iteration, per implementation, and the device's measured matmul rate.

Units, counted once at the benchmark's shapes (``unit_flops``, torch's FlopCounterMode with attention in its
math form so that every matmul is seen): U = one U-Net forward for one image and one CFG branch; D = one VAE
decode of one image; J = the judges on one image (classifier + CLIP + DINO); E = CLIP + DINO alone (embedding an
original); T = one text-encoder forward of one prompt; Ua = the part of U that is attention (QK^T and PV);
Ur = what the baseline's gradient checkpointing (``baseline.checkpointed``) recomputes in its backward, measured
as the FLOPs of a checkpointed input-only backward less Ub: about 0.80 U in SD 1.5 at 512 px, less than the
checkpointed modules' share of U (0.89), as the first resnet's input needs no gradient and torch's checkpoint stops
each segment's recompute at the last tensor the backward needs (U where a table lacks it);
Ub = the U-Net's backward for one image and branch to its
inputs only (frozen weights: no weight gradients), counted on a real backward (``count_input_backward_flops``):
about U (0.98-1.08 U from 128 to 512 px: attention's backward has twice its forward's matmuls, the
convolutions' input backward about their forward's; Ub = U where a table lacks it). The
VAE's and judges' input-only backwards are taken as 1x their forward; the text encoder's (LoRA trains) as 2x.
Per iteration, N images, S steps, CFG (2 branches), K = steps backpropagated (S, or grad_steps), k = steps whose
graph is kept (no recompute), a = steps that keep their attention outputs only (recompute U - Ua), M = gradient
micro-batches of the baseline:

    baseline   sampling       3 * 2NS U            (finetuned and frozen passes without grad, the graph pass)
               decode/losses  3N D + 2N J              (decode three times; classifier for the targets and CLIP +
                                                       DINO of the originals: N J; the loss: N J)
               backward       2NS Ur + 2NS Ub + N D + N J  (checkpoint recompute, backward, decoder, judges)
               text           (4 + 2M) T forward, 2M * 2T backward
    fastfair   sampling       2 * 2NS U            (frozen and finetuned rows batched in the same calls)
               decode/losses  4N D + 3N J + N E        (decode both, originals, loss, its backward to z_0; the
                                                       decoder's and judges' forward again: recomputed activations)
               backward       2N(K - k - a) U + 2Na (U - Ua) + 2NK Ub  (recompute of the steps not kept, of the
                                                       attention-kept ones without attention; backward of K steps)
               text           4T forward, 2 * 2T backward
               + N D          with the judges in slices (loss.judge_images, --micro-batch): each slice's decode is
                              checkpointed whole and rebuilt block-wise inside: one more decoder forward (less
                              its last convolution, which the rebuild skips)

Approximations, measured against FlopCounterMode on whole iterations (2026-12-02; SD 1.5 shapes on the meta
device, the tiny models on the CPU): the pass counts are exact (totals within 0.15 % with attention in its math
form); attention's backward is counted as 4 matmuls (its math form: the useful work), while the fused SDPA kernels
on a GPU recompute QK^T (5): at 512 px each Ub then runs 0.065 U more than counted (the totals ~1 % low, achieved
TFLOP/s understated as much); the block-wise decoder recompute (fastfair's D in its backward, and the sliced
judges' extra decode) costs 0.68-0.70 D, not D (fastfair's totals ~0.3-0.6 % high); the text encoder's backward
through its LoRA measures 1.02 T, not 2 T (under 0.1 %).

So the U-Net alone gives, with b = Ub / U, baseline / fastfair = (8 + 2b) / (6 + 2b) (lean: 1.25 at b = 1),
(8 + 2b) / (4 + 2(S - k)/S + 2b) with kept graphs (fast), (8 + 2b) / (4 + 2(1 + b)K/S) with K of S steps (k5: 2
at b = 1); the VAE, judges and text encoder pull those ratios towards 1. The floor time is the model's FLOPs at
the device's measured dense matmul rate.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Dict, Optional

import torch


def attention_as_matmuls():
    """Context: scaled_dot_product_attention in its math form, so that a FlopCounterMode sees its matmuls."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no backend selection; fused attention is then not counted
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def count_flops(fn, ops=None) -> int:
    """FLOPs of ``fn()`` (matmuls, convolutions, attention as matmuls), run without grad; with ``ops`` (aten
    packets, e.g. ``{torch.ops.aten.bmm}``) only theirs."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), attention_as_matmuls(), FlopCounterMode(display=False) as counter:
        fn()
    if ops is None:
        return int(counter.get_total_flops())
    return int(sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if op in ops))


def count_input_backward_flops(forward, inputs) -> int:
    """FLOPs of the backward of ``forward()`` to ``inputs`` only (frozen weights: no weight gradients), with
    attention in its math form; the forward itself is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.enable_grad(), attention_as_matmuls():
        out = forward()
        with FlopCounterMode(display=False) as counter:
            # backward(inputs=...), not autograd.grad: torch's non-reentrant checkpoint refuses a leaf input there
            torch.autograd.backward(out, torch.ones_like(out), inputs=list(inputs))
    for tensor in inputs:
        tensor.grad = None
    return int(counter.get_total_flops())


def iteration_flops(impl: str, unit: Dict[str, int], images: int, steps: int, micro_batches: int = 1,
                    keep_graph_steps: int = 0, grad_steps: Optional[int] = None,
                    keep_attention_steps: int = 0, sliced_judges: bool = False) -> Dict[str, int]:
    """{phase: FLOPs} of one iteration (module docstring) and their "total"; impl "baseline*" or "fastfair*";
    ``sliced_judges``: fastfair's decoder and judges run in slices (``loss.judge_images``)."""
    U, D, J, E, T = (unit[k] for k in ("unet", "vae_decode", "judges", "embed", "text"))
    Ub, Ur = unit.get("unet_input_backward", U), unit.get("unet_recompute", U)
    n, s = images, steps
    if impl.startswith("baseline"):
        parts = {"sampling": 3 * 2 * n * s * U,
                 "decode_losses": 3 * n * D + 2 * n * J,
                 "backward": 2 * n * s * (Ur + Ub) + n * D + n * J,
                 "text": (4 + 2 * micro_batches) * T + 2 * micro_batches * 2 * T}
    elif impl.startswith("fastfair"):
        k_steps = grad_steps or s
        kept = min(keep_graph_steps, k_steps)
        attention_kept = min(keep_attention_steps, k_steps - kept)
        recompute = (k_steps - kept - attention_kept) * U + attention_kept * (U - unit.get("unet_attention", 0))
        parts = {"sampling": 2 * 2 * n * s * U,
                 "decode_losses": (5 if sliced_judges else 4) * n * D + 3 * n * J + n * E,
                 "backward": 2 * n * recompute + 2 * n * k_steps * Ub,
                 "text": 4 * T + 2 * 2 * T}
    else:
        raise ValueError(f"impl={impl!r}: expected a name starting with 'baseline' or 'fastfair'")
    parts["total"] = sum(parts.values())
    return parts


def matmul_rate(device: str, dtype: torch.dtype, size: Optional[int] = None, seconds: float = 1.0) -> float:
    """Measured FLOP/s of a dense square matmul (the best of a few timed batches)."""
    cuda = str(device).startswith("cuda")
    size = size or (8192 if cuda else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    a @ b
    sync()
    start = time.perf_counter()
    a @ b
    sync()
    reps = max(1, math.ceil(seconds / 5 / max(time.perf_counter() - start, 1e-6)))
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * size**3 / best
