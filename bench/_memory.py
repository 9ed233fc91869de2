"""Peak memory of a block of work, measured the same way by every benchmark in bench/.

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus ``memory_allocated()``
  at the start.
- CPU: the process's peak resident set (VmHWM in /proc/self/status, reset by writing 5 to
  /proc/self/clear_refs) minus its resident set at the start. Run the worker with ``worker_env()``: glibc's mmap
  threshold at 64 KiB (MALLOC_MMAP_THRESHOLD_) gives every tensor buffer its own mapping, returned to the OS when
  freed, so the resident set follows the live tensors (repeated runs agree to about a percent). It also
  page-faults every fresh buffer, which slows CPU work by 15-20%: time CPU work in a process without it.
"""
import os


def worker_env() -> dict:
    """The environment for a measuring subprocess (see the module docstring)."""
    return dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """``start()`` marks the level; ``peak()`` returns the bytes above it at the highest point since."""

    def __init__(self, device: str):
        self.device = str(device)
        self.base = 0

    def start(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kib("VmRSS") * 1024

    def peak(self) -> int:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated() - self.base)
        return int(_status_kib("VmHWM") * 1024 - self.base)


def peak_ratio(a, b) -> str:
    """a / b as the tables print a ratio of two peaks (3 decimals): '-' where either is missing (None) or b is not
    positive (on CPU a run can reuse memory its process freed before, so that its resident set does not grow)."""
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.3f}"
