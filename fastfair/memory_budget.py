"""Pick the engine's kept steps from a memory budget (``sampler.memory_budget_gb``).

The finetuned sampling's memory is modelled as linear in the numbers k of steps whose whole graph is kept and a
of steps that keep their attention outputs only (``fastfair.keep_attention``):

    P(k, a) = R + k G + a G_att,    (k, a) = keeps_for_budget(budget - R, G, G_att, S)

- G: the bytes one kept step holds until the backward, measured, not guessed: the storages autograd saves during
  the graph-building U-Net call made as the engine makes it (the rows it differentiates: frozen rows and an
  uncond branch nothing trainable feeds are left out; the run's dtype, autocast and ``lean_graph``), plus the kept
  eps (`graph_bytes_per_step`). Weights, buffers and the text embeddings exist anyway and are not counted.
- G_att: the same for a step that keeps its attention outputs only (`attention_bytes_per_step`): the attention
  kernels' outputs at the differentiated rows, recorded in the sampling call.
- R, "reserved": what the lean run (k = a = 0) holds anyway besides kept graphs: on CUDA,
  ``torch.cuda.memory_allocated()`` when the decision is taken (weights, optimizer state, ...); on CPU 0, so there
  the budget covers the kept graphs only.

Not in the model: the VAE decode and loss graphs, which live beside the kept graphs until the backward, and one
recompute chunk's graph in the backward (the kept graphs are freed before it): leave headroom for them.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from fastfair.dft import (_autocast_state, _embeddings, _unet_eps, graph_branches, graph_inputs, graph_rows,
                          sampling_call_inputs, unet_input_dtype)
from fastfair.keep_attention import AttentionRecorder, in_attention_layers
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


def _check_latents(latents, frozen_rows) -> None:
    if not isinstance(latents, torch.Tensor) or latents.dim() < 2:
        raise ValueError("latents: expected a latent tensor [B, C, H, W]")
    if not isinstance(frozen_rows, int) or not 0 <= frozen_rows < latents.shape[0]:
        raise ValueError(f"frozen_rows={frozen_rows!r}: expected an integer in [0, batch={latents.shape[0]})")


def _need_uncond(unet, uncond, guidance_scale) -> Tuple[bool, bool]:
    """(use_cfg, whether something trainable feeds the uncond branch), as the engine decides them."""
    use_cfg = uncond is not None and float(guidance_scale) != 1.0
    return use_cfg, use_cfg and (uncond.requires_grad or any(p.requires_grad for p in unet.parameters()))


def graph_bytes_per_step(unet: torch.nn.Module, latents: torch.Tensor, t: int, cond: torch.Tensor,
                         uncond: Optional[torch.Tensor], guidance_scale: float, frozen_rows: int = 0,
                         lean: bool = True) -> int:
    """G: the bytes one kept step's graph holds, for the graph-building U-Net call the engine's kept step makes.

    latents: z [B, C, H, W]; t: a timestep (activation sizes do not depend on it); cond, uncond: text embeddings
    [B or 1, L, D] as ``fastfair.dft.sample`` receives them (uncond None or guidance_scale 1: no CFG);
    frozen_rows, lean: ``sample``'s frozen_rows and lean_graph. Like the engine, the graph covers the images from
    ``frozen_rows`` on, and the uncond branch only when something trainable feeds it (uncond requires grad or the
    U-Net has trainable parameters), with the engine's ``lean_graph`` setting. Runs one forward under the ambient
    autocast, under ``saved_tensors_hooks``, with no backward.
    """
    _check_latents(latents, frozen_rows)
    use_cfg, need_uncond = _need_uncond(unet, uncond, guidance_scale)
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


def attention_bytes_per_step(unet: torch.nn.Module, latents: torch.Tensor, t: int, cond: torch.Tensor,
                             uncond: Optional[torch.Tensor], guidance_scale: float,
                             frozen_rows: int = 0) -> Optional[int]:
    """G_att: the bytes one attention-kept step (``sample``'s keep_attention_steps) holds until the backward: its
    attention kernels' outputs at the rows the backward differentiates, recorded in the batched no-grad sampling
    call as the engine records them (``fastfair.keep_attention.AttentionRecorder``); its latent is held as a lean
    step's is. None when the U-Net runs no fused attention kernel (such keeps would save nothing). Arguments as
    ``graph_bytes_per_step``'s."""
    _check_latents(latents, frozen_rows)
    use_cfg, need_uncond = _need_uncond(unet, uncond, guidance_scale)
    batch, branches = latents.shape[0], 2 if use_cfg else 1
    x, timesteps = sampling_call_inputs(latents.detach(), t, branches, unet_input_dtype(unet))
    emb = _embeddings(cond.detach(), uncond.detach() if use_cfg else None, batch, branches)
    recorder = AttentionRecorder(graph_rows(batch, frozen_rows, use_cfg, graph_branches(use_cfg, need_uncond)),
                                 x.shape[0])
    with torch.no_grad(), in_attention_layers(recorder, unet):
        _unet_eps(unet, x, timesteps, emb)
    return recorder.nbytes() if recorder.calls else None


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


def keeps_for_budget(available_bytes: float, graph_bytes: int, attention_bytes: Optional[int], num_steps: int,
                     start: Tuple[int, int] = (0, 0)) -> Tuple[int, int]:
    """(keep_graph_steps, keep_attention_steps) that fit ``available_bytes`` more than ``start`` (such a pair)
    holds, each step kept at most once.

    Attention-only keeps come first: each holds attention_bytes (G_att) and saves the attention's share r of one
    recompute, a whole graph holds graph_bytes (G) and saves all of it, so per byte the attention keep wins
    whenever r > G_att / G (a few percent in SD's U-Net; r is far larger). Once every step keeps its attention,
    what is left upgrades steps to whole graphs at G - G_att each. attention_bytes None: whole graphs only.
    """
    keep_graph, keep_attention = start
    for name, value in (("graph_bytes", graph_bytes), ("num_steps", num_steps), ("keep_graph_steps", keep_graph),
                        ("keep_attention_steps", keep_attention)) + ((("attention_bytes", attention_bytes),)
                                                                     if attention_bytes is not None else ()):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}: expected an integer >= 0")
    if keep_graph + keep_attention > num_steps:
        raise ValueError(f"start={start!r}: keeps more than num_steps={num_steps} steps")
    if attention_bytes is None or attention_bytes >= graph_bytes:  # whole graphs only
        return keep_graph + keep_graph_steps_for_budget(available_bytes, graph_bytes,
                                                        num_steps - keep_graph - keep_attention), keep_attention
    added = keep_graph_steps_for_budget(available_bytes, attention_bytes, num_steps - keep_graph - keep_attention)
    keep_attention += added
    if keep_graph + keep_attention < num_steps:
        return keep_graph, keep_attention
    upgrades = keep_graph_steps_for_budget(available_bytes - added * attention_bytes, graph_bytes - attention_bytes,
                                           keep_attention)
    return keep_graph + upgrades, keep_attention - upgrades


class MemoryBudget:
    """``sampler.memory_budget_gb`` -> (keep_graph_steps, keep_attention_steps); measures G and G_att once per
    input shape and decides once per (shape, step count), so repeated iterations cost a dictionary look-up."""

    def __init__(self, budget_gb: float, lean: bool = True):
        if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not 0 < budget_gb < math.inf:
            raise ValueError(f"sampler.memory_budget_gb={budget_gb!r}: expected a positive number of GiB")
        self.budget_bytes = float(budget_gb) * GIB
        self.lean = bool(lean)  # the engine's lean_graph setting: G is measured as the engine builds graphs
        self._per_step: Dict[Tuple, Tuple[int, Optional[int]]] = {}
        self._keep: Dict[Tuple, Tuple[int, int]] = {}

    def keeps(self, unet: torch.nn.Module, z_T: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor],
              num_steps: int, guidance_scale: float, frozen_rows: int = 0) -> Tuple[int, int]:
        """(keep_graph_steps, keep_attention_steps) to pass to ``fastfair.dft.sample`` with these arguments."""
        shapes = (tuple(z_T.shape), tuple(cond.shape), None if uncond is None else tuple(uncond.shape),
                  float(guidance_scale) != 1.0, frozen_rows, cond.requires_grad,
                  uncond is not None and uncond.requires_grad)
        if (shapes, num_steps) not in self._keep:
            reserved = reserved_now(z_T.device)  # read before the measuring forwards: their graphs are transient
            if shapes not in self._per_step:
                args = (unet, z_T, 0, cond, uncond, guidance_scale, frozen_rows)
                self._per_step[shapes] = (graph_bytes_per_step(*args, self.lean), attention_bytes_per_step(*args))
            self._keep[shapes, num_steps] = keeps_for_budget(max(self.budget_bytes - reserved, 0),
                                                             *self._per_step[shapes], num_steps)
        return self._keep[shapes, num_steps]
