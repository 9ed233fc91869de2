"""Triton backend of ``grad_fanout``: kernel, launcher, functional wrapper.

One program loads BLOCK elements of g once (upcast to fp32, or kept fp64) and, for every (step, branch)
coefficient c = scales[j] * branch_weights[b], stores c * g into that copy of the output, in the output's
dtype. The coefficients are read from a small float64 tensor; offsets are int64.
"""
import struct
from collections import OrderedDict
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from .host_copy import to_device
from .triton_support import LAUNCH_OPTIONS, block_size, on_device_of


@triton.jit
def grad_fanout_kernel(g_ptr, coef_ptr, out_ptr, n_elements, n_coefs, COMPUTE: tl.constexpr, NARROW: tl.constexpr,
                       BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    g = tl.load(g_ptr + offsets, mask=mask).to(COMPUTE)
    dst = out_ptr + offsets
    # A while loop, not `for c in range(n_coefs)`: Triton 3.6's interpreter turns a runtime loop bound into an
    # int with int(1-element array), which numpy >= 2.4 refuses; compiled, both lower to the same loop.
    c = 0
    while c < n_coefs:
        value = tl.load(coef_ptr + c).to(COMPUTE) * g
        if NARROW:
            # fp16/bf16 outputs round via fp32, as torch's casts do (and the interpreter mis-casts fp64 -> bf16)
            value = value.to(tl.float32)
        tl.store(dst, value.to(out_ptr.dtype.element_ty), mask=mask)
        dst += n_elements  # the next (step, branch) copy; pointer arithmetic is 64-bit
        c += 1


class _CoefficientCache:
    """The coefficient lists as float64 tensors on their device, made once per (list, device), the 256 most recently
    used kept: a run with all steps differentiated repeats the same few lists (its chunks' scales) every iteration,
    and a cached list needs no copy (a CUDA graph can hold it). A new list (a random subset of steps,
    ``grad_steps``) is copied without a synchronization (host_copy.py), ordered on the stream it was made on: a
    use on another stream first waits for that copy (an event; nothing waits once it is done) and marks the tensor
    used there (record_stream: once evicted, its memory is not reused before that stream's kernels ran). In a CUDA
    graph capture a new list is refused (the capture would record a copy from a pinned buffer the allocator
    reuses), and a list used in one is never evicted: the graph reads its memory at every replay.

    Keyed by the values' bits: 0.0 == -0.0 as floats, and a list differing only in a zero's sign took the other's
    tensor (its zero gradients got the other sign); a NaN, unequal to itself, never hit."""

    size = 256

    def __init__(self):
        self.entries: "OrderedDict[tuple, list]" = OrderedDict()  # key -> [tensor, copy event, stream, in a graph]
        self.hits = self.misses = 0

    def get(self, values: Tuple[float, ...], device: torch.device) -> torch.Tensor:
        key = (struct.pack(f"<{len(values)}d", *values), device)
        entry = self.entries.get(key)
        capturing = _capturing(device)
        if entry is None:
            if capturing:
                raise RuntimeError("grad_fanout (triton): a coefficient list not used before is not copied to the "
                                   "GPU inside a CUDA graph capture; run the same call once before capturing")
            self.misses += 1
            tensor = to_device(torch.tensor(values, dtype=torch.float64), device)
            done = stream = None
            if device.type == "cuda":  # after the copy, on the stream it was queued on (the device's current one)
                stream = torch.cuda.current_stream(device)
                done = torch.cuda.Event()
                done.record(stream)
            entry = self.entries[key] = [tensor, done, stream, False]
            self._evict()
            return tensor
        self.hits += 1
        self.entries.move_to_end(key)
        tensor, done, stream, _ = entry
        if capturing:
            entry[3] = True
        elif done is not None:  # a capture began with a synchronization: the copy is done
            if done.query():
                entry[1] = None
            else:
                torch.cuda.current_stream(device).wait_event(done)
        if stream is not None and not capturing and torch.cuda.current_stream(device) != stream:
            tensor.record_stream(torch.cuda.current_stream(device))
        return tensor

    def _evict(self) -> None:
        """Drop the least recently used lists beyond ``size``, except those a captured graph reads."""
        for key in [key for key, entry in self.entries.items() if not entry[3]]:
            if len(self.entries) <= self.size:
                break
            del self.entries[key]

    def clear(self) -> None:
        self.entries.clear()
        self.hits = self.misses = 0


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_coefficients = _CoefficientCache()


def grad_fanout_triton(g: torch.Tensor, scales: List[float], branch_weights: List[float],
                       out: torch.Tensor) -> torch.Tensor:
    """Writes out[j, b] = scales[j] * branch_weights[b] * g; arguments as validated by
    ``fastfair.kernels.grad_fanout``."""
    n = g.numel()
    # Products in double, as the reference forms float(s) * float(w) before scaling g.
    coefs = _coefficients.get(tuple(float(s) * float(w) for s in scales for w in branch_weights), g.device)
    compute = tl.float64 if g.dtype == torch.float64 else tl.float32
    block = block_size()
    with on_device_of(g):  # Triton launches on the current device, which need not be g's
        grad_fanout_kernel[(triton.cdiv(n, block),)](g, coefs, out, n, coefs.numel(), COMPUTE=compute,
                                                     NARROW=out.element_size() == 2, BLOCK=block, **LAUNCH_OPTIONS)
    return out
