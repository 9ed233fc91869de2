"""DeepSpeed ZeRO for the trainer: an engine over the trainable parameters, and its optimizer shards.

fastfair's models are never called through the DeepSpeed engine: sampling runs ``fastfair.dft.sample`` on the
U-Net and the text encoder directly. The engine only owns the trainable parameters (the same Parameter objects
the models hold, gathered in one module), reduces their gradients across ranks (ZeRO-1/2 partition the
optimizer state and gradients), applies fp16 dynamic loss scaling or bf16, clips, and steps. ZeRO-3 would
partition the parameters themselves, which the direct U-Net calls cannot see: it is refused.

Checkpoints: each rank's optimizer shard is gathered to rank 0 and stored in the checkpoint's ``state.pt``
(so the checkpoint stays one atomic folder); a resume needs the same number of ranks.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from fastfair.optional import MissingPackage


class TrainableParameters(nn.Module):
    """The trainable parameters as one module, for ``deepspeed.initialize``."""

    def __init__(self, params: Dict[str, nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(list(params.values()))

    def forward(self):  # pragma: no cover - the engine is never called forward
        raise RuntimeError("TrainableParameters only hands parameters to DeepSpeed; it has no forward")


def deepspeed_engine(ds_config: dict, params: Dict[str, nn.Parameter], optimizer, lr_scheduler):
    """``deepspeed.initialize`` over ``params`` with the given (client) optimizer and LR scheduler."""
    try:
        import deepspeed
    except ImportError:
        raise MissingPackage("deepspeed.config is set but deepspeed is not installed: "
                             "pip install 'fastfair[train]'") from None
    refused = ("deepspeed: the config sets ZeRO stage 3, which partitions the parameters fastfair's direct U-Net "
               "calls cannot gather; use stage 1 or 2 (deepspeed.zero_stage=2)")
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ValueError(refused)
    # fastfair passes a torch optimizer; DeepSpeed calls that "untested" with ZeRO but supports it.
    ds_config = {**ds_config, "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=TrainableParameters(params), optimizer=optimizer,
                                           lr_scheduler=lr_scheduler, config=ds_config, dist_init_required=False)
    if engine.zero_optimization_stage() == 3:  # the stage as DeepSpeed read it (e.g. from a string): a backstop
        raise ValueError(refused)
    return engine


def gather_optimizer_shards(engine) -> Optional[List[dict]]:
    """Every rank's optimizer state (its ZeRO partition), gathered on rank 0; None on the other ranks."""
    shard = engine.optimizer.state_dict()
    shards = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(shard, shards, dst=0)
    return shards


def load_optimizer_shard(engine, shards: List[dict]) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    if len(shards) != world:
        raise ValueError(f"resume: the checkpoint holds DeepSpeed optimizer shards of {len(shards)} ranks; this run "
                         f"has {world}. Resume with the same number of processes.")
    optimizer = engine.optimizer
    # Each of DeepSpeed's optimizers stores its clip_grad in its state and takes the saving run's back on loading:
    # kept from this run, so that optim.grad_clip as resumed takes effect (as lr and weight decay do).
    clip = getattr(optimizer, "clip_grad", None)
    if type(optimizer).__name__ in ("DeepSpeedZeroOptimizer", "BF16_Optimizer"):
        # ZeRO-1/2, and bf16 with fp32 gradient accumulation: every shard in, its own rank's kept, from its fp32
        # master weights
        optimizer.load_state_dict(shards, load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(shards[rank])
    if hasattr(optimizer, "clip_grad"):
        optimizer.clip_grad = clip


def allow_deepspeed_state_in_weights_only_load() -> None:
    """Register the few DeepSpeed classes that its optimizer state holds, so ``torch.load(weights_only=True)``
    reads checkpoints of DeepSpeed runs (no arbitrary code)."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return
    torch.serialization.add_safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])
