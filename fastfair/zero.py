"""DeepSpeed ZeRO for the trainer: an engine over the trainable parameters, and its optimizer shards.

fastfair's models are never called through the DeepSpeed engine: sampling runs ``fastfair.dft.sample`` on the
U-Net and the text encoder directly. The engine only owns the trainable parameters (the same Parameter objects
the models hold, gathered in one module), reduces their gradients across ranks (ZeRO-1/2 partition the
optimizer state and gradients), applies fp16 dynamic loss scaling or bf16, clips, and steps. ZeRO-3 would
partition the parameters themselves, which the direct U-Net calls cannot see: it is refused.

Checkpoints: each rank's optimizer shard is gathered to rank 0 and stored in the checkpoint's ``state.pt``
(so the checkpoint stays one atomic folder). A resume on another number of ranks re-partitions them: each
parameter's fp32 master weights and optimizer state are put together from the saved partitions and cut again
along this run's (``resharded``).
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
    """This rank's part of the checkpoint's optimizer state into ``engine``. ZeRO-1/2 shards (DeepSpeed's
    ``DeepSpeedZeroOptimizer`` and ``BF16_Optimizer``) saved by another number of ranks are re-partitioned first
    (``resharded``); without ZeRO (stage 0) every rank saved the whole state, and any one of them serves."""
    rank, world = dist.get_rank(), dist.get_world_size()
    optimizer = engine.optimizer
    partitioned = type(optimizer).__name__ in ("DeepSpeedZeroOptimizer", "BF16_Optimizer")
    if partitioned and len(shards) != world:
        if rank == 0:
            print(f"resume: re-partitioning the optimizer state that {len(shards)} rank(s) saved over this run's "
                  f"{world}")
        shards = [resharded(engine, shards)] * world  # each rank reads its own index
    # Each of DeepSpeed's optimizers stores its clip_grad in its state and takes the saving run's back on loading:
    # kept from this run, so that optim.grad_clip as resumed takes effect (as lr and weight decay do).
    clip = getattr(optimizer, "clip_grad", None)
    if partitioned:
        # ZeRO-1/2, and bf16 with fp32 gradient accumulation: every shard in, its own rank's kept, from its fp32
        # master weights
        optimizer.load_state_dict(shards, load_from_fp32_weights=True)
    else:  # stage 0: every rank saved the whole state; on another number of ranks, the first serves
        optimizer.load_state_dict(shards[rank] if len(shards) == world else shards[0])
    if hasattr(optimizer, "clip_grad"):
        optimizer.clip_grad = clip


def reassembled(shards: List[dict], names: Optional[set] = None) -> Dict[str, Dict[str, torch.Tensor]]:
    """{engine parameter name: {"fp32": master weights, state key: optimizer state}}, each flat [numel], from the
    ZeRO-1/2 or bf16 shards of any number of ranks. A shard's ``param_slice_mappings[g]`` gives each parameter's
    (start, numel) in that rank's flat partition of group g; a parameter cut by a partition boundary continues
    at the start of the next rank's, so its fragments, taken in rank order, concatenate to the whole. ``names``:
    only those parameters (a rank needs its own partition's; all of them would be the whole state per rank)."""
    pieces: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    for shard in shards:
        base = shard["base_optimizer_state"]
        if not isinstance(base, dict):
            raise ValueError("resume: the checkpoint's DeepSpeed optimizer state is in the elastic layout "
                             "(zero_optimization.elastic_checkpoint), which fastfair does not re-partition: resume "
                             "with as many processes as saved it")
        for g, (mapping, fp32) in enumerate(zip(shard["param_slice_mappings"],
                                                shard["single_partition_of_fp32_groups"])):
            state = base["state"].get(base["param_groups"][g]["params"][0], {})
            flat = {"fp32": fp32, **{k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1}}
            padding = (shard.get("group_paddings") or [0] * (g + 1))[g]  # ZeRO-1/2 save fp32 without it
            for key, value in flat.items():
                if not (value.is_floating_point() and fp32.numel() <= value.numel() <= fp32.numel() + padding):
                    raise ValueError(f"resume: the checkpoint's optimizer state {key!r} ({value.dtype}, "
                                     f"{value.numel()} values for a partition of {fp32.numel()}) is not one float per "
                                     "weight, as 8-bit AdamW's quantized blocks are not; fastfair re-partitions only "
                                     "such states: resume with as many processes as saved it")
            for name, address in mapping.items():
                if names is not None and name not in names:
                    continue
                parts = pieces.setdefault(name, {})
                for key, tensor in flat.items():
                    parts.setdefault(key, []).append(tensor[address.start:address.start + address.numel])
    return {name: {key: torch.cat(values) for key, values in parts.items()} for name, parts in pieces.items()}


def resharded(engine, shards: List[dict]) -> dict:
    """This rank's shard, as ``engine.optimizer.state_dict()`` lays it out in this run, holding the values of
    ``shards`` (saved by another number of ranks): each of this rank's parameter fragments (``_hp_mapping``: where
    in the parameter, where in the partition) is cut from the reassembled whole; per-group scalars (Adam's step)
    and the loss-scaler state are the saving run's (equal on every rank)."""
    optimizer = engine.optimizer
    template = optimizer.state_dict()
    name_of = {id(p): name for name, p in engine.module.named_parameters()}
    # a parameter without an _hp_mapping has no fragment in this rank's partition
    here = [p for p in engine.module.parameters() if getattr(p, "_hp_mapping", None) is not None]
    whole = reassembled(shards, {name_of[id(p)] for p in here})
    saved = shards[0]["base_optimizer_state"]
    flat_params = [group["params"][0] for group in optimizer.optimizer.param_groups]  # this rank's partitions
    fp32 = [torch.zeros(p.numel(), dtype=torch.float32) for p in flat_params]
    states = []
    for g, flat in enumerate(flat_params):
        old = saved["state"].get(saved["param_groups"][g]["params"][0], {})
        states.append({key: (torch.zeros(flat.numel(), dtype=value.dtype) if torch.is_tensor(value) and value.dim() == 1
                             else value) for key, value in old.items()})
    for p in here:
        mapping = p._hp_mapping
        where, there = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
        g, values = mapping.param_group_index, whole[name_of[id(p)]]
        fp32[g][there.start:there.start + there.numel] = values["fp32"][where.start:where.start + where.numel]
        for key, tensor in states[g].items():
            if torch.is_tensor(tensor) and tensor.dim() == 1:
                tensor[there.start:there.start + there.numel] = values[key][where.start:where.start + where.numel]
    base = template["base_optimizer_state"]
    shard = {**template, "single_partition_of_fp32_groups": fp32,
             "base_optimizer_state": {"state": {group["params"][0]: state
                                                for group, state in zip(base["param_groups"], states)},
                                      "param_groups": base["param_groups"]}}
    for key in ("loss_scaler", "dynamic_loss_scale", "overflow", "clip_grad"):  # scalars the saving ranks shared
        if key in shards[0]:
            shard[key] = shards[0][key]
    return shard


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
