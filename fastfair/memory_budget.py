"""Pick the engine's ``keep_graph_steps`` from a memory budget (``sampler.memory_budget_gb``).

The finetuned sampling's memory is modelled as linear in the number k of steps whose graph is kept (the model
``bench/train_step.py``'s ``keep_for_budget`` fits to measured peaks):

    P(k) = R + k G,    keep = clamp(floor((budget - R) / G), 0, S)

- G: the bytes one kept step holds until the backward, measured, not guessed: the storages autograd saves during
  the graph-building U-Net call made as the engine makes it (the rows it differentiates: frozen rows and an
  uncond branch nothing trainable feeds are left out; the run's dtype and autocast), plus the kept eps
  (`graph_bytes_per_step`). Weights, buffers and the text embeddings exist anyway and are not counted.
- R, "reserved": what the lean run (k = 0) holds anyway besides kept graphs: on CUDA,
  ``torch.cuda.memory_allocated()`` when the decision is taken (weights, optimizer state, ...); on CPU 0, so there
  the budget covers the kept graphs only.

Not in the model: the VAE decode and loss graphs, which live beside the kept graphs until the backward, and one
recompute chunk's graph in the backward (the kept graphs are freed before it): leave headroom for them.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from fastfair.dft import _autocast_state, _unet_eps, graph_branches, graph_inputs, unet_input_dtype
from fastfair.lean_graph import lean_graph

GIB = 2 ** 30


def _is_cached_weight_cast(tensor: torch.Tensor, weights: set) -> bool:
    """Whether ``tensor`` (or the tensor it views) is autocast's low-precision copy of a trainable weight: its
    grad_fn is a ToCopy whose input is that weight's AccumulateGrad. Autocast caches one such copy per weight for
    its whole region, shared by every step, so it is no step's own memory."""
    root = tensor if tensor._base is None else tensor._base
    node = root.grad_fn
    if node is None or type(node).__name__ != "ToCopyBackward0":
        return False
    return any(id(getattr(source, "variable", None)) in weights for source, _ in node.next_functions)


def saved_tensor_bytes(forward: Callable[[], torch.Tensor], held: Iterable[torch.Tensor] = (),
                       skip: Callable[[torch.Tensor], bool] = lambda tensor: False) -> int:
    """Bytes of the graph ``forward()`` builds: the distinct storages (by data_ptr, so views are counted once)
    that autograd saves, plus the output's storage; storages of ``held`` tensors and saved tensors for which
    ``skip`` is true are left out. Runs with grad enabled and no backward."""
    held_storages = {tensor.untyped_storage().data_ptr() for tensor in held}
    storages: Dict[int, torch.UntypedStorage] = {}  # referenced until the end: no address is reused meanwhile

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held_storages and not skip(tensor):
            storages[storage.data_ptr()] = storage
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    storages[out.untyped_storage().data_ptr()] = out.untyped_storage()
    return sum(storage.nbytes() for storage in storages.values())


def graph_bytes_per_step(unet: torch.nn.Module, latents: torch.Tensor, t: int, cond: torch.Tensor,
                         uncond: Optional[torch.Tensor], guidance_scale: float, frozen_rows: int = 0,
                         lean: bool = True) -> int:
    """G: the bytes one kept step's graph holds, for the graph-building U-Net call the engine's kept step makes.

    latents: z [B, C, H, W]; t: a timestep (activation sizes do not depend on it); cond, uncond: text embeddings
    [B or 1, L, D] as ``fastfair.dft.sample`` receives them (uncond None or guidance_scale 1: no CFG);
    frozen_rows, lean: ``sample``'s frozen_rows and lean_graph. Like the engine, the graph covers the images from
    ``frozen_rows`` on, and the uncond branch only when something trainable feeds it (uncond requires grad or the
    U-Net has trainable parameters), with the engine's ``lean_graph`` setting. Runs one forward under the ambient autocast, under ``saved_tensors_hooks``, with no backward.
    """
    if not isinstance(latents, torch.Tensor) or latents.dim() < 2:
        raise ValueError("latents: expected a latent tensor [B, C, H, W]")
    if not isinstance(frozen_rows, int) or not 0 <= frozen_rows < latents.shape[0]:
        raise ValueError(f"frozen_rows={frozen_rows!r}: expected an integer in [0, batch={latents.shape[0]})")
    use_cfg = uncond is not None and float(guidance_scale) != 1.0
    need_uncond = use_cfg and (uncond.requires_grad or any(p.requires_grad for p in unet.parameters()))
    branches = graph_branches(use_cfg, need_uncond)
    # fresh leaves like the engine's: the embeddings' own graph (text encoder) is not part of a step's
    cond = cond.detach().requires_grad_(cond.requires_grad)
    uncond = uncond.detach().requires_grad_(uncond.requires_grad) if branches == 2 else None

    def one_step() -> torch.Tensor:
        with lean_graph(unet, lean):
            return _unet_eps(unet, *graph_inputs(latents[frozen_rows:].detach(), t, (cond, uncond), branches,
                                                 frozen_rows, unet_input_dtype(unet)))

    held = [*unet.parameters(), *unet.buffers(), cond] + ([uncond] if uncond is not None else [])
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    _, autocast_on, _ = _autocast_state(latents.device.type)
    if autocast_on and torch.is_autocast_cache_enabled():
        return saved_tensor_bytes(one_step, held, lambda tensor: _is_cached_weight_cast(tensor, trainable))
    return saved_tensor_bytes(one_step, held)


def keep_graph_steps_for_budget(budget_bytes: float, per_step_bytes: int, num_steps: int,
                                reserved_bytes: float = 0) -> int:
    """clamp(floor((budget - reserved) / per_step), 0, num_steps): the kept graphs that fit (module docstring).

    A budget below ``reserved_bytes`` gives 0 (the lean run is the least memory there is); a step whose graph
    holds nothing (per_step_bytes 0) always fits.
    """
    for name, value in (("budget_bytes", budget_bytes), ("reserved_bytes", reserved_bytes)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value!r}: expected a finite number of bytes >= 0")
    for name, value in (("per_step_bytes", per_step_bytes), ("num_steps", num_steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}: expected an integer >= 0")
    if budget_bytes < reserved_bytes:
        return 0
    if per_step_bytes == 0:
        return num_steps
    return min(num_steps, int((budget_bytes - reserved_bytes) // per_step_bytes))


def reserved_now(device: torch.device) -> int:
    """R: the memory allocated now on a CUDA device; 0 on any other (the budget then covers kept graphs only)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


class MemoryBudget:
    """``sampler.memory_budget_gb`` -> keep_graph_steps; measures G once per input shape and decides once per
    (shape, step count), so repeated iterations cost a dictionary look-up."""

    def __init__(self, budget_gb: float, lean: bool = True):
        if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not 0 < budget_gb < math.inf:
            raise ValueError(f"sampler.memory_budget_gb={budget_gb!r}: expected a positive number of GiB")
        self.budget_bytes = float(budget_gb) * GIB
        self.lean = bool(lean)  # the engine's lean_graph setting: G is measured as the engine builds graphs
        self._per_step: Dict[Tuple, int] = {}
        self._keep: Dict[Tuple, int] = {}

    def keep_graph_steps(self, unet: torch.nn.Module, z_T: torch.Tensor, cond: torch.Tensor,
                         uncond: Optional[torch.Tensor], num_steps: int, guidance_scale: float,
                         frozen_rows: int = 0) -> int:
        """The keep_graph_steps to pass to ``fastfair.dft.sample`` with these arguments."""
        shapes = (tuple(z_T.shape), tuple(cond.shape), None if uncond is None else tuple(uncond.shape),
                  float(guidance_scale) != 1.0, frozen_rows, cond.requires_grad,
                  uncond is not None and uncond.requires_grad)
        if (shapes, num_steps) not in self._keep:
            reserved = reserved_now(z_T.device)  # read before the measuring forward: its graph is transient
            if shapes not in self._per_step:
                self._per_step[shapes] = graph_bytes_per_step(unet, z_T, 0, cond, uncond, guidance_scale,
                                                                 frozen_rows, self.lean)
            self._keep[shapes, num_steps] = keep_graph_steps_for_budget(
                self.budget_bytes, self._per_step[shapes], num_steps, reserved)
        return self._keep[shapes, num_steps]
