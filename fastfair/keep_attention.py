"""Keep a step's attention outputs only: the middle ground between a kept graph and a full recompute.

A kept step holds its whole graph (G bytes) and skips the backward's recompute; a lean step holds nothing and
recomputes the whole U-Net call. An attention-kept step (``fastfair.dft.sample``'s keep_attention_steps) is a lean
step whose sampling call records the fused scaled-dot-product attention kernels' outputs (output and log-sum-exp)
for the rows the backward differentiates, and whose recompute replays them instead of running those kernels
again: about a tenth of G for the attention's share of a recompute. The sampling call stays the one batched
no-grad call of a lean step (frozen rows and all), so the trajectory is the lean run's, bit for bit.

The attention backward then combines the recorded output and log-sum-exp with the recompute's q, k, v, which
match the sampling call's to rounding (the same ops on a smaller batch): the gradient equals the lean run's to
rounding (float64: below 1e-12 relative), as the lean recompute itself equals the sampling call's activations.

Both run through a dispatch mode that is active only inside the scope's attention layers (diffusers'
``Attention``), so the U-Net's other ops run at full speed. Attention written as explicit matmuls (diffusers'
classic ``AttnProcessor``) or through xformers runs no fused kernel: nothing is recorded, and
``fastfair.memory_budget`` then plans whole graphs only.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import FrozenSet, Iterator, List, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .instance_forward import forwards_replaced
from .kernels.host_copy import to_device


def _attention_ops() -> FrozenSet:
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_fused_attention_overrideable")
    return frozenset(getattr(torch.ops.aten, name).default for name in names if hasattr(torch.ops.aten, name))


ATTENTION_OPS = _attention_ops()  # the fused attention kernels F.scaled_dot_product_attention dispatches to


@functools.lru_cache(maxsize=None)
def _log_sumexp_argument(func) -> Optional[int]:
    """The position of the kernel's compute_log_sumexp flag (efficient and cuDNN kernels: CUDA's SDPA sets it
    only when grad is enabled, so a no-grad sampling call gets an empty log-sum-exp, which the recompute's
    attention backward needs), or None (flash kernels always compute it)."""
    names = [argument.name for argument in func._schema.arguments]
    return names.index("compute_log_sumexp") if "compute_log_sumexp" in names else None


def _outputs(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _per_row(index: int, value) -> bool:
    """Whether a kernel's index-th output is per batch row [B, ...]: every fused attention kernel returns its output
    and log-sum-exp first; what follows (philox seed and offset, sequence lengths, a debug mask) is not."""
    return index < 2 and isinstance(value, torch.Tensor) and value.dim() >= 1


def _select_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """tensor[rows] (a copy) laid out in memory like ``tensor``: the kernels hand out e.g. [B, H, L, d] stored as
    [B, L, H, d], and their backward then gets the layout it made."""
    order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))  # outermost in memory first
    picked = tensor.permute(order).index_select(order.index(0), rows)
    return picked.permute([order.index(d) for d in range(tensor.dim())])


def _join_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.cat(tensors) along the batch, laid out in memory like the first (see ``_select_rows``)."""
    first = tensors[0]
    order = sorted(range(first.dim()), key=lambda d: -first.stride(d))
    joined = torch.cat([t.permute(order) for t in tensors], dim=order.index(0))
    return joined.permute([order.index(d) for d in range(first.dim())])


def attention_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> int:
    """Multiply-adds x 2 of one attention kernel call on q [B, H, Lq, d], k [B, Hk, Lk, d], v [B, Hk, Lk, dv]:
    2 B H Lq Lk d for the scores Q K^T plus 2 B H Lq Lk dv for P V (softmax and scaling: not counted, as matmul
    FLOP counters do not count them)."""
    batch, heads, length_q, dim = query.shape
    return 2 * batch * heads * length_q * key.shape[-2] * (dim + value.shape[-1])


class AttentionRecorder(TorchDispatchMode):
    """Records, per attention kernel call in call order, its outputs at batch rows ``rows`` (a copy: the other
    rows' memory is not held), and counts the calls' FLOPs over the whole batch (``flops``); every other op runs
    as it is.

    rows: indices into the call's batch dimension B (the U-Net batch: diffusers' processors hand the kernels
    [B, heads, L, d]); a kernel called with another batch size is an error (the layout is not the U-Net's)."""

    def __init__(self, rows: Sequence[int], batch: int):
        super().__init__()
        self.batch = int(batch)
        self.rows = torch.as_tensor(list(rows), dtype=torch.long)
        self.calls: List[tuple] = []
        self.kernels: List = []  # the kernel of each call: the replay hands a call's outputs to the same kernel only
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        flag = _log_sumexp_argument(func) if func in ATTENTION_OPS else None
        if flag is not None:  # the same output, and the log-sum-exp the backward replay needs
            if "compute_log_sumexp" in kwargs or len(args) <= flag:
                kwargs["compute_log_sumexp"] = True
            else:
                args = (*args[:flag], True, *args[flag + 1:])
        out = func(*args, **kwargs)
        if func in ATTENTION_OPS:
            if args[0].shape[0] != self.batch:
                raise RuntimeError(f"keep_attention_steps: an attention kernel ran on a batch of {args[0].shape[0]}, "
                                   f"the U-Net call's is {self.batch}; this U-Net's attention layout is not "
                                   "supported: set keep_attention_steps=0")
            if self.rows.device != args[0].device:  # moved once: the kernels of one call share a device
                self.rows = to_device(self.rows, args[0].device)
            rows = self.rows
            self.flops += attention_flops(*args[:3])
            self.kernels.append(func)
            self.calls.append(tuple(_select_rows(t, rows) if _per_row(k, t)
                                    else (t.detach() if isinstance(t, torch.Tensor) else t)
                                    for k, t in enumerate(_outputs(out))))
        return out

    def nbytes(self) -> int:
        """Bytes the recorded outputs hold (distinct storages)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for call in self.calls for t in call if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        return sum(storages.values())


class AttentionReplay(TorchDispatchMode):
    """Hands back the recorded outputs instead of running the attention kernels: the j-th kernel call gets the
    j-th recorded call of each recording, joined along the batch in the order given (the recompute's batch of
    several steps is their rows stacked in that order); every other op runs as it is. picked: positions among
    each recording's rows to hand back (a recompute of some of the images), in that order; None: all."""

    def __init__(self, recordings: Sequence[AttentionRecorder], picked: Optional[Sequence[int]] = None):
        super().__init__()
        self.recordings = list(recordings)
        self.picked = None if picked is None else torch.as_tensor(list(picked), dtype=torch.long)
        self.position = 0
        self.warned = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in ATTENTION_OPS:
            return func(*args, **(kwargs or {}))
        j = self.position
        self.position += 1
        if any(j >= len(r.calls) for r in self.recordings):
            raise RuntimeError("keep_attention_steps: the recompute ran more attention kernels than the sampling call "
                               "recorded; the U-Net must be deterministic")
        recorded = {r.kernels[j] for r in self.recordings}
        if recorded != {func}:  # another kernel's outputs have another layout (e.g. flash vs efficient): run it
            if not self.warned:
                warnings.warn(f"keep_attention_steps: the recompute's attention kernel {func} is not the sampling "
                              f"call's ({', '.join(map(str, recorded))}): SDPA picked another backend with grad "
                              "enabled; such calls run their attention again (exact, slower)", stacklevel=2)
                self.warned = True
            return func(*args, **(kwargs or {}))
        rows = sum(len(r.rows) if self.picked is None else len(self.picked) for r in self.recordings)
        if args[0].shape[0] != rows:
            raise RuntimeError(f"keep_attention_steps: the recompute's attention batch is {args[0].shape[0]}, the "
                               f"recorded rows are {rows}")
        calls = [r.calls[j] for r in self.recordings]
        if self.picked is not None:
            if self.picked.device != args[0].device:  # moved once: the kernels share a device
                self.picked = to_device(self.picked, args[0].device)
            calls = [tuple(_select_rows(t, self.picked) if _per_row(k, t) else t for k, t in enumerate(call))
                     for call in calls]
        joined = [_join_rows([call[k] for call in calls]) if _per_row(k, first) and len(calls) > 1
                  else (first.detach() if isinstance(first, torch.Tensor) else first)  # a fresh alias each time
                  for k, first in enumerate(calls[0])]
        return tuple(joined) if len(func._schema.returns) > 1 else joined[0]


def _is_attention_layer(module: nn.Module) -> bool:
    return type(module).__name__ == "Attention" and type(module).__module__.startswith("diffusers.")


@contextlib.contextmanager
def in_attention_layers(mode: TorchDispatchMode, scope: Optional[nn.Module]) -> Iterator[None]:
    """Within, ``mode`` is active inside each attention layer of ``scope`` only; with no scope or no such layer
    (a custom U-Net), for the whole region (slower: every op then passes through Python)."""
    layers = [m for m in scope.modules() if _is_attention_layer(m) and "forward" not in m.__dict__] if scope else []
    if not layers:
        with mode:
            yield
        return

    def within(layer: nn.Module):
        def forward(*args, **kwargs):
            with mode:
                return type(layer).forward(layer, *args, **kwargs)
        return forward

    with forwards_replaced(layers, within):
        yield
