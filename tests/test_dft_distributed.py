"""fastfair.dft.sample under DeepSpeed ZeRO-2 on two CPU processes equals the single-process gradient."""
import os
import socket
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "dist"))
from dft_problem import build_problem, lora_params, loss_of  # noqa: E402

pytest.importorskip("deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage", [2])
def test_zero_two_processes_equal_single_process(tmp_path, stage):
    from safetensors.torch import load_file

    unet, z_T, cond, uncond, target = build_problem()
    params = lora_params(unet)
    grads = torch.autograd.grad(loss_of(unet, z_T, cond, uncond, target), list(params.values()))
    expected = dict(zip(params, grads))

    out = tmp_path / "update.safetensors"
    worker = os.path.join(os.path.dirname(__file__), "dist", "dft_zero2_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           worker, str(out), str(stage)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    update = load_file(str(out))
    assert set(update) == set(expected)
    for name, grad in expected.items():
        assert grad.norm() > 0
        torch.testing.assert_close(update[name], grad, rtol=1e-4, atol=1e-7)
