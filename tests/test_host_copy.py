"""kernels/host_copy.py: small host tensors onto a GPU without waiting for its stream."""
import pytest
import torch

from fastfair.kernels.host_copy import to_device


def test_cpu_target_is_a_plain_copy():
    host = torch.tensor([3, 1, 2])
    assert torch.equal(to_device(host, torch.device("cpu")), host)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copy_is_queued_not_waited_for():
    """The copy returns while the stream is still busy (a pageable copy would wait for it to drain), and lands
    the values once the stream gets to it."""
    device = torch.device("cuda")
    host = torch.arange(7, dtype=torch.long)
    # the process's first pinned block comes from cudaHostAlloc, which may wait for the device: taken before the
    # stream is made busy, its block cached for the copy below
    host.clone().pin_memory()  # freed at once, into the cache
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # keeps the stream busy for a while
    on_gpu = to_device(host, device)
    still_busy = not torch.cuda.current_stream().query()
    host.fill_(-1)  # the host tensor may change at once: the copy reads a pinned copy of it
    torch.cuda.synchronize()
    assert still_busy
    assert torch.equal(on_gpu.cpu(), torch.arange(7))
