"""Small host lists onto a GPU without a synchronization.

``torch.tensor(values, device='cuda')`` and ``cpu_tensor.to('cuda')`` copy from pageable host memory, which
makes the host wait for the stream: everything queued (a U-Net's backward, say) runs to its end before Python
launches the next kernel, and the GPU idles while the launches ramp up again. A copy from pinned memory with
``non_blocking=True`` is queued on the current stream instead; torch's caching host allocator keeps the pinned
block until that copy has run.
"""
import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``, ordered on the current stream there, without waiting for it (a
    tensor already on a GPU is copied as torch copies it)."""
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
