"""Keep a step's attention outputs only: the middle ground between a kept graph and a full recompute.

A kept step holds its whole graph (G bytes) and skips the backward's recompute; a lean step holds nothing and
recomputes the whole U-Net call. ``attention_kept(fn, *inputs)`` holds the outputs of the scaled-dot-product
attention kernels only (their output and log-sum-exp: a few percent of G) and recomputes everything else in the
backward, where the attention kernels return the kept outputs instead of running again. The gradient is the
plain backward's, bit for bit: the recompute runs the same deterministic ops on the same inputs.

What it saves is the attention's share of the forward time: most of it on a CPU at SD's token counts and in
test-sized models, less on a GPU at 512 px. Built on torch's selective activation checkpointing
(``torch.utils.checkpoint.create_selective_checkpoint_contexts``, torch >= 2.4) around a non-reentrant checkpoint.
Attention written as explicit matmuls (diffusers' classic ``AttnProcessor``) runs no such kernel: nothing is
kept and such a step costs what a recomputed one does.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, FrozenSet

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint


def _attention_ops() -> FrozenSet:
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_fused_attention_overrideable")
    return frozenset(getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name))


ATTENTION_OPS = _attention_ops()  # the fused attention kernels F.scaled_dot_product_attention dispatches to


def selective_checkpointing_available() -> bool:
    """Whether this torch has selective activation checkpointing (torch >= 2.4), which ``attention_kept`` needs."""
    try:
        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts  # noqa: F401
    except ImportError:
        return False
    return True


def _selective_contexts():
    try:
        from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    except ImportError:
        raise RuntimeError(
            f"keep_attention_steps needs torch >= 2.4 (selective activation checkpointing); torch {torch.__version__} "
            "has none: set keep_attention_steps=0"
        ) from None

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def attention_kept(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """fn(*inputs) keeping only its attention kernels' outputs (and ``inputs``) for the backward.

    fn must be deterministic (it runs again in the backward, under the forward's autocast); its parameters'
    and inputs' gradients are the plain call's.
    """
    return checkpoint(fn, *inputs, use_reentrant=False, context_fn=_selective_contexts(), preserve_rng_state=False)


class _AttentionOutputs(TorchDispatchMode):
    """Records the storages of the attention kernels' outputs (by data_ptr: views and repeats count once)."""

    def __init__(self):
        super().__init__()
        self.storages: Dict[int, torch.UntypedStorage] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in ATTENTION_OPS:
            for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                    storage = tensor.untyped_storage()
                    self.storages[storage.data_ptr()] = storage
        return out


def attention_kept_bytes(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> int:
    """Bytes ``attention_kept(fn, *inputs)`` holds until the backward: the attention outputs, the inputs that
    require no gradient (a fresh latent batch; leaves that require one are the caller's) and the output. Runs one
    forward with grad enabled and no backward."""
    with torch.enable_grad():
        recorder = _AttentionOutputs()

        def recorded(*args):
            with recorder:
                return fn(*args)

        out = attention_kept(recorded, *inputs)
    storages = dict(recorder.storages)
    for tensor in (*inputs, out):
        if isinstance(tensor, torch.Tensor) and not (tensor.requires_grad and tensor.grad_fn is None):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage()
    return sum(storage.nbytes() for storage in storages.values())
