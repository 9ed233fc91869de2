"""The native backend's library: ``fastfair._C`` (C++/OpenMP CPU kernels, CUDA kernels when built with CUDA),
compiled from ``csrc/``; importing it registers the ops ``torch.ops.fastfair.{solver_step_out,grad_fanout_out}``.

Built at install time with ``FASTFAIR_BUILD_NATIVE=1 pip install --no-build-isolation -e .`` (setup.py reads
the source lists and flags below), or compiled on demand from a source checkout by ``load(jit=True)``
(torch.utils.cpp_extension.load, cached under TORCH_EXTENSIONS_DIR; about a minute the first time).

This file imports nothing from fastfair so that setup.py can read it with runpy before fastfair is installed.
"""
import importlib
import os
import shutil
import warnings
from typing import Dict, List, Optional

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
CPU_SOURCES = ["ops.cpp", "solver_step_cpu.cpp", "grad_fanout_cpu.cpp"]
CUDA_SOURCES = ["register_cuda.cpp", "solver_step_cuda.cu", "grad_fanout_cuda.cu"]
# -falign-loops=64: the fan-out's fp32 loop ran 1.5x slower when an unrelated change moved it across a 64-byte
# boundary (same machine code; x86 CPUs fetch loops by aligned blocks): aligned, its speed stays put.
# -ffp-contract=off: no fused multiply-adds (x86-64's baseline has none; aarch64's does): one rounding per
# operation, as the torch reference rounds on the CPU
CXX_FLAGS = ["-O3", "-fopenmp", "-falign-loops=64", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3"]  # no fast-math: the kernels must round like the torch reference
LD_FLAGS = ["-fopenmp"]
CUDA_MACRO = "FASTFAIR_WITH_CUDA"  # tells ops.cpp that register_cuda.cpp is linked in
DEFAULT_CUDA_HOME = "/usr/local/cuda"

BUILD_HINT = ("build it with `FASTFAIR_BUILD_NATIVE=1 pip install --no-build-isolation -e .` "
              "or call fastfair.kernels.native.load(jit=True) from a source checkout")

_state: Dict[str, object] = {"ops": None, "error": None, "tried_import": False, "has_cuda": None}
_launch_problems: Dict[int, Optional[str]] = {}  # per GPU index: why this build's CUDA kernels fail there, or None


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit to build against: CUDA_HOME or CUDA_PATH when set, else the first of nvcc's own folder's
    parent (as found on PATH, then with links resolved) and DEFAULT_CUDA_HOME that holds both bin/nvcc and
    include/cuda_runtime_api.h; None when none does (torch's own search then decides).

    torch takes the parent of ``which nvcc`` without looking inside: a wrapper script such as /usr/local/bin/nvcc
    (``exec /usr/local/cuda-13.0/bin/nvcc "$@"``) makes that /usr/local, where the C++ compiler then finds no CUDA
    header and the linker no libcudart."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return os.environ[name]
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(path)) for path in (nvcc, nvcc and os.path.realpath(nvcc)) if path]
    for home in candidates + [DEFAULT_CUDA_HOME]:
        if (os.path.isfile(os.path.join(home, "bin", "nvcc"))
                and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))):
            return home
    return None


def use_cuda_home() -> None:
    """Set CUDA_HOME to ``find_cuda_home()`` when it is unset and one is found, so that torch.utils.cpp_extension
    (which reads it once, when first imported) builds against a whole toolkit."""
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
        home = find_cuda_home()
        if home:
            os.environ["CUDA_HOME"] = home


def cuda_buildable() -> bool:
    """Whether this torch can build CUDA sources here: a CUDA torch and nvcc under CUDA_HOME."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None and (
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None)


def cuda_arch_problem() -> Optional[str]:
    """Why torch cannot pick the GPU architectures to compile for, or None: with TORCH_CUDA_ARCH_LIST unset it
    compiles for the visible GPUs, and with none visible (a build host, CUDA_VISIBLE_DEVICES="") it fails with an
    IndexError deep in torch.utils.cpp_extension."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return None
    return ("no GPU is visible and TORCH_CUDA_ARCH_LIST is unset, so torch cannot tell which GPUs to compile the "
            "CUDA kernels for: set TORCH_CUDA_ARCH_LIST (e.g. '9.0' for H100/H200, '8.0' for A100, '8.0;9.0' for "
            "both) or FASTFAIR_BUILD_CUDA=0 for the CPU kernels only")


def sources(with_cuda: bool) -> List[str]:
    names = CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])
    return [os.path.join(CSRC, name) for name in names]


def _registered() -> bool:
    import torch

    return hasattr(torch.ops, "fastfair") and hasattr(torch.ops.fastfair, "solver_step_out")


def _jit_build(verbose: bool) -> None:
    use_cuda_home()
    from torch.utils.cpp_extension import load as cpp_load

    if not all(os.path.exists(path) for path in sources(False)):
        _state["error"] = f"csrc/ is not shipped with this install ({CSRC}); {BUILD_HINT}"
        return
    # this process can only run CUDA kernels on a visible GPU: with none (and no arch list) build the CPU ones
    with_cuda = cuda_buildable() and cuda_arch_problem() is None
    macro = [f"-D{CUDA_MACRO}"] if with_cuda else []
    try:
        cpp_load(name="fastfair_C", sources=sources(with_cuda), extra_cflags=CXX_FLAGS + macro,
                 extra_cuda_cflags=NVCC_FLAGS, extra_ldflags=LD_FLAGS, is_python_module=False, verbose=verbose)
    except Exception as err:  # a compiler error: keep the reason for unavailable_reason()
        _state["error"] = f"JIT build of csrc/ failed: {err}"


def _warn_if_stale(library: str) -> None:
    # An editable install keeps the built library beside sources that may have changed since.
    paths = [os.path.join(CSRC, name) for name in os.listdir(CSRC)] if os.path.isdir(CSRC) else []
    if paths and max(map(os.path.getmtime, paths)) > os.path.getmtime(library):
        warnings.warn(f"{library} is older than {CSRC}; rebuild it (`make setup`, or "
                      "`FASTFAIR_BUILD_NATIVE=1 pip install --no-build-isolation --no-deps -e .`)", stacklevel=3)


def load(jit: bool = False, verbose: bool = False):
    """``torch.ops.fastfair`` once the native ops are registered, else None (reason: ``unavailable_reason``).
    Tries ``import fastfair._C`` once per process; with jit=True and no installed build, compiles csrc/."""
    if _state["ops"] is None and (jit or not _state["tried_import"]):
        _state["tried_import"] = True
        if not _registered():
            try:
                _warn_if_stale(importlib.import_module("fastfair._C").__file__)
            except ImportError as err:
                _state["error"] = f"fastfair._C is not installed ({err}); {BUILD_HINT}"
        if not _registered() and jit:
            _jit_build(verbose)
        if _registered():
            import torch

            _state["ops"], _state["error"] = torch.ops.fastfair, None
    return _state["ops"]


def _launch_problem(ops, device) -> Optional[str]:
    """Why this build's kernels cannot run on ``device`` (a torch.device), or None, from one 4-element solver step
    (once per GPU): a library compiled for other GPU architectures (the build machine's TORCH_CUDA_ARCH_LIST,
    without PTX this GPU can compile) fails every launch with "no kernel image is available for execution on the
    device"."""
    import torch

    z = torch.zeros(4, device=device)
    try:
        ops.solver_step_out(z, z, None, None, torch.empty_like(z), torch.empty_like(z), 1.0, 1.0, 0.0, 1.0, 0.0, 0.0)
    except torch.cuda.OutOfMemoryError:
        raise  # the device is full, not the build wrong
    except RuntimeError as err:  # a launch error; not sticky, so the device stays usable for the other backends
        first_line = (str(err).strip().splitlines() or ["?"])[0]
        where = str(device)
        if device.type == "cuda":
            where = (f"{torch.cuda.get_device_name(device)} (compute capability "
                     f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))})")
        return (f"fastfair._C's kernels do not run on {where}: {first_line}; rebuild it on this machine or with this "
                "GPU in TORCH_CUDA_ARCH_LIST")
    return None


def unavailable_reason(device_type: str, index: Optional[int] = None) -> Optional[str]:
    """None when native kernels can run on tensors of this device type (for CUDA: on GPU ``index``, default the
    current one), else why not."""
    ops = load()
    if ops is None:
        return str(_state["error"])
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if _state["has_cuda"] is None:
            _state["has_cuda"] = bool(ops.has_cuda())
        if not _state["has_cuda"]:
            return "fastfair._C was built without CUDA (building it needs a CUDA torch and nvcc); rebuild it"
        import torch

        index = torch.cuda.current_device() if index is None else index
        if index not in _launch_problems:
            if torch.cuda.is_current_stream_capturing():  # a probe would be recorded: the first call outside decides
                return None
            _launch_problems[index] = _launch_problem(ops, torch.device("cuda", index))
        return _launch_problems[index]
    return f"there are no native kernels for {device_type} tensors"
