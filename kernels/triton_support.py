"""What the two Triton backends share: whether Triton can run on a device, and the launch block size.

On CUDA tensors Triton compiles its kernels; on CPU tensors it can only interpret them, which needs
TRITON_INTERPRET=1 in the environment before triton is first imported (the kernels' @triton.jit then builds
interpreted functions). Importing triton is slow, so nothing here imports it until a Triton backend is asked for.
"""
import functools
import importlib.util
import os
import sys
from typing import Optional

# Compiled: 1024 elements = 8 per thread at 4 warps, enough in flight to saturate HBM. Interpreted: every
# program costs Python overhead, so fewer, larger programs keep the CPU tests fast.
BLOCK_COMPILED = 1024
BLOCK_INTERPRETED = 1 << 14
# Compile options of every launch. FMA contraction on (explicitly: Triton 3.9 warns when it is left to the
# default, which flips in 3.10): one rounding instead of two, within the tests' tolerances of the reference.
LAUNCH_OPTIONS = dict(num_warps=4, enable_fp_fusion=True)


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter in this process (decided when triton was imported)."""
    value = os.environ.get("TRITON_INTERPRET", "")
    if "triton" not in sys.modules:
        if value == "1":
            return True
        if value.lower() in ("", "0", "false", "off", "no", "n"):
            return False
        # true/on/yes read as 1 by newer tritons, not by older ones (3.0 tests == "1"): ask the installed one
        if not _installed():
            return False
    from triton.runtime.interpreter import InterpretedFunction
    from .solver_step_triton import solver_step_kernel

    return isinstance(solver_step_kernel, InterpretedFunction)


def on_device_of(tensor):
    """A context making the tensor's CUDA device current (Triton launches on the current one); for a CPU
    tensor (the interpreter) nothing."""
    import contextlib

    import torch

    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def block_size() -> int:
    return BLOCK_INTERPRETED if interpreting() else BLOCK_COMPILED


@functools.lru_cache(maxsize=None)
def _installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(device_type: str) -> Optional[str]:
    """None when the Triton kernels can run on tensors of this device type, else why not."""
    if not _installed():
        return "triton is not installed (pip install triton)"
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if interpreting():
            return None
        return ("Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before triton is "
                "imported (e.g. in a fresh process)")
    return f"the Triton kernels are not built for {device_type} tensors"
