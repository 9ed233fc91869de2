"""Worker for tests/test_dft_distributed.py: one DeepSpeed ZeRO-2 step through fastfair.dft.sample.

Run under torchrun (2 processes, gloo, CPU). Each rank takes its half of a fixed batch, the loss is the mean
over its images, DeepSpeed averages the gradients across ranks, and an SGD step with lr = 1 turns the averaged
gradient into the parameter change, which rank 0 saves (safetensors) for the test to compare with the
single-process gradient of the whole batch.
"""
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from dft_problem import build_problem, lora_params, loss_of  # noqa: E402


def main(out_path: str, stage: int) -> None:
    import deepspeed
    from safetensors.torch import save_file

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    unet, z_T, cond, uncond, target = build_problem()
    params = lora_params(unet)
    before = {name: p.detach().clone() for name, p in params.items()}
    per_rank = z_T.shape[0] // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    config = {
        "train_micro_batch_size_per_gpu": per_rank,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips at 1.0 unless told otherwise
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.SGD(list(params.values()), lr=1.0)
    engine, optimizer, _, _ = deepspeed.initialize(model=unet, optimizer=optimizer, config=config)
    loss = loss_of(engine.module, z_T[mine], cond[mine], uncond, target[mine])
    engine.backward(loss)
    engine.step()
    if rank == 0:
        save_file({name: (before[name] - p.detach()).contiguous() for name, p in params.items()}, out_path)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
