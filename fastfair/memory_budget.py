"""Pick the engine's kept steps from a memory budget (``sampler.memory_budget_gb``).

The finetuned sampling's memory is modelled as linear in the numbers k of steps whose whole graph is kept and a
of steps that keep their attention outputs only (``fastfair.keep_attention``):

    P(k, a) = R + k G + a G_att,    (k, a) = keeps_for_budget(budget - R, G, G_att, S, attention_share=r)

- G: the bytes one kept step holds until the backward, measured, not guessed: the storages autograd saves during
  the graph-building U-Net call made as the engine makes it (the rows it differentiates: frozen rows and an
  uncond branch nothing trainable feeds are left out; the run's dtype, autocast and ``lean_graph``), plus the kept
  eps (`graph_bytes_per_step`). Weights, buffers and the text embeddings exist anyway and are not counted.
- G_att: the same for a step that keeps its attention outputs only (`attention_keep_costs`): the attention
  kernels' outputs at the differentiated rows, recorded in the sampling call.
- r: the attention kernels' share of that U-Net call's FLOPs (`attention_keep_costs`), i.e. of the recompute an
  attention keep saves; a whole graph saves all of it.
- R, "reserved": what the lean run (k = a = 0) holds anyway besides kept graphs: on CUDA,
  ``torch.cuda.memory_allocated()`` when the decision is taken (weights, ...), plus what the run will hold later
  (``pending_bytes``: the trainer's optimizer state, made at its first step, after the first decision); on CPU
  only the optimizer state (always pending: nothing counts what is allocated there), so there the budget covers
  the kept graphs and it.

The plan maximizes the recompute saved, k + a r step recomputes, within the budget (``keeps_for_budget``).
Counted in FLOPs, and in time too where a U-Net call of b rows takes t(b) = c + beta b (c: the weights' streaming
and launch overhead, which dominates small latents; beta: the per-row compute, attention's share r of it): with
the default one-step recompute, a whole graph saves its step's recompute call c + beta b_g but splits that step's
sampling call in two (the differentiated rows apart from the frozen ones and the no-grad uncond branch): one c
more, so beta b_g net; an attention keep saves r beta b_g and splits nothing. The densities and so the plan are
then the same for every c and beta: the FLOP-optimal plan is the time-optimal one, though on a weight-bound
device (large c) every keep saves little time. Where the engine does not split (nothing frozen sampled alongside,
both branches differentiated) a whole graph saves c more than this counts; with recompute_chunk q > 1, c / q less.
Which keep wins per byte depends on the resolution: in SD 1.5's U-Net attention is 1.5% of the FLOPs at 16x16
latents and 15.7% at 64x64 (counted); G_att is 8.1% of G at 16x16 and 8.9% at 64x64 (measured:
bench/graph_bytes.py), so whole graphs come first at 16x16 and attention keeps at 64x64.

Not in the model: the VAE decode and loss graphs, which live beside the kept graphs until the backward, and one
recompute chunk's graph in the backward (the kept graphs are freed before it): leave headroom for them
(``loss.judge_images`` and ``sampler.recompute_images`` bound each by a slice of the images instead of the batch).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch

from fastfair.autocast_cache import no_stale_casts
from fastfair.dft import (_autocast_state, _embeddings, _unet_eps, graph_branches, graph_inputs, graph_rows,
                          sampling_call_inputs, unet_input_dtype)
from fastfair.keep_attention import ATTENTION_OPS, AttentionRecorder, in_attention_layers
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
    with no_stale_casts():  # as the engine's kept steps run: each holds its own weight casts where this is on
        if autocast_on and torch.is_autocast_cache_enabled():
            return saved_tensor_bytes(one_step, held, lambda tensor: _is_cached_weight_cast(tensor, trainable))
        return saved_tensor_bytes(one_step, held)


def attention_keep_costs(unet: torch.nn.Module, latents: torch.Tensor, t: int, cond: torch.Tensor,
                         uncond: Optional[torch.Tensor], guidance_scale: float,
                         frozen_rows: int = 0) -> Optional[Tuple[int, float]]:
    """(G_att, r) of a step that keeps its attention outputs only (``sample``'s keep_attention_steps), or None
    when the U-Net runs no fused attention kernel (such keeps would save nothing). Arguments as
    ``graph_bytes_per_step``'s.

    G_att: the bytes it holds until the backward: its attention kernels' outputs at the rows the backward
    differentiates, recorded in the batched no-grad sampling call as the engine records them
    (``fastfair.keep_attention.AttentionRecorder``); its latent is held as a lean step's is.
    r: the attention kernels' share of the call's FLOPs, F_att / (F_att + F_rest), with F_att counted from the
    kernels' q, k, v shapes (``attention_flops``) and F_rest by torch's FlopCounterMode (convolutions and
    matmuls; its own count of fused attention, where it has one, left out). Both scale with the batch, so the
    share of the whole call is the share of the differentiated rows' recompute.
    """
    from torch.utils.flop_counter import FlopCounterMode

    _check_latents(latents, frozen_rows)
    use_cfg, need_uncond = _need_uncond(unet, uncond, guidance_scale)
    batch, branches = latents.shape[0], 2 if use_cfg else 1
    x, timesteps = sampling_call_inputs(latents.detach(), t, branches, unet_input_dtype(unet))
    emb = _embeddings(cond.detach(), uncond.detach() if use_cfg else None, batch, branches)
    recorder = AttentionRecorder(graph_rows(batch, frozen_rows, use_cfg, graph_branches(use_cfg, need_uncond)),
                                 x.shape[0])
    with torch.no_grad(), no_stale_casts(), FlopCounterMode(display=False) as counter:
        with in_attention_layers(recorder, unet):
            _unet_eps(unet, x, timesteps, emb)
    if not recorder.calls:
        return None
    fused = {op.overloadpacket for op in ATTENTION_OPS}
    rest = sum(flops for op, flops in counter.get_flop_counts()["Global"].items() if op not in fused)
    return recorder.nbytes(), recorder.flops / (recorder.flops + rest)


def attention_bytes_per_step(unet: torch.nn.Module, latents: torch.Tensor, t: int, cond: torch.Tensor,
                             uncond: Optional[torch.Tensor], guidance_scale: float,
                             frozen_rows: int = 0) -> Optional[int]:
    """G_att alone (``attention_keep_costs``); None when the U-Net runs no fused attention kernel."""
    costs = attention_keep_costs(unet, latents, t, cond, uncond, guidance_scale, frozen_rows)
    return None if costs is None else costs[0]


def _check_bytes(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r}: expected a finite number of bytes >= 0")


def keep_graph_steps_for_budget(budget_bytes: float, per_step_bytes: int, num_steps: int,
                                reserved_bytes: float = 0) -> int:
    """clamp(floor((budget - reserved) / per_step), 0, num_steps): the kept graphs that fit (module docstring).

    A budget below ``reserved_bytes`` gives 0 (the lean run is the least memory there is); a step whose graph
    holds nothing (per_step_bytes 0) always fits.
    """
    _check_bytes("budget_bytes", budget_bytes)
    _check_bytes("reserved_bytes", reserved_bytes)
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
                     start: Tuple[int, int] = (0, 0), attention_share: Optional[float] = None) -> Tuple[int, int]:
    """(keep_graph_steps, keep_attention_steps) that fit ``available_bytes`` more than ``start`` (such a pair)
    holds, each step kept at most once, saving as much recompute as it can: k + a r step recomputes.

    Three moves, each with a fixed saving per byte: keep a free step's attention (r per G_att), keep a free step's
    whole graph (1 per G), upgrade an attention keep to a whole graph (1 - r per G - G_att). Greedy: the densest
    move that fits, as often as it fits, then again from the densest. The densities order themselves one of two
    ways: r / G_att > 1 / G (attention share above G_att / G) gives attention keeps first, then upgrades;
    otherwise upgrades beat new graphs, which beat attention keeps, and attention keeps only fill what graphs
    leave. Within one step recompute (the densest move's integrality) of the best plan.
    attention_bytes None (no fused attention), at least graph_bytes, or r = 0: whole graphs only.
    attention_share: r in [0, 1] (``attention_keep_costs``); required with attention_bytes.
    """
    keep_graph, keep_attention = start
    for name, value in (("graph_bytes", graph_bytes), ("num_steps", num_steps), ("keep_graph_steps", keep_graph),
                        ("keep_attention_steps", keep_attention)) + ((("attention_bytes", attention_bytes),)
                                                                     if attention_bytes is not None else ()):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}: expected an integer >= 0")
    if keep_graph + keep_attention > num_steps:
        raise ValueError(f"start={start!r}: keeps more than num_steps={num_steps} steps")
    if attention_bytes is not None and (isinstance(attention_share, bool)
                                        or not isinstance(attention_share, (int, float))
                                        or not 0 <= attention_share <= 1):
        raise ValueError(f"attention_share={attention_share!r}: expected the attention's share of a step's FLOPs "
                         "in [0, 1] (fastfair.memory_budget.attention_keep_costs)")
    _check_bytes("available_bytes", available_bytes)
    if attention_bytes is None or attention_bytes >= graph_bytes or attention_share == 0:  # whole graphs only
        return keep_graph + keep_graph_steps_for_budget(available_bytes, graph_bytes,
                                                        num_steps - keep_graph - keep_attention), keep_attention
    r = float(attention_share)
    moves = [("attention", attention_bytes, r), ("graph", graph_bytes, 1.0),
             ("upgrade", graph_bytes - attention_bytes, 1.0 - r)]
    moves.sort(key=lambda move: (move[2] / move[1] if move[1] else math.inf), reverse=True)
    left = float(available_bytes)
    while True:
        for kind, cost, saving in moves:
            room = keep_attention if kind == "upgrade" else num_steps - keep_graph - keep_attention
            count = room if cost == 0 else min(room, int(left // cost))
            if saving > 0 and count > 0:
                break
        else:
            return keep_graph, keep_attention
        left -= count * cost
        keep_graph += count if kind != "attention" else 0
        keep_attention += count if kind == "attention" else -count if kind == "upgrade" else 0


class MemoryBudget:
    """``sampler.memory_budget_gb`` -> (keep_graph_steps, keep_attention_steps); measures G, G_att and r once per
    input shape and decides once per (shape, step count, differentiated step count), so repeated iterations cost a
    dictionary look-up."""

    def __init__(self, budget_gb: float, lean: bool = True):
        if isinstance(budget_gb, bool) or not isinstance(budget_gb, (int, float)) or not 0 < budget_gb < math.inf:
            raise ValueError(f"sampler.memory_budget_gb={budget_gb!r}: expected a positive number of GiB")
        self.budget_bytes = float(budget_gb) * GIB
        self.lean = bool(lean)  # the engine's lean_graph setting: G is measured as the engine builds graphs
        self._per_step: Dict[Tuple, Tuple[int, Optional[Tuple[int, float]]]] = {}  # G, (G_att, r) or None
        self._keep: Dict[Tuple, Tuple[int, int]] = {}

    def keeps(self, unet: torch.nn.Module, z_T: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor],
              num_steps: int, guidance_scale: float, frozen_rows: int = 0, pending_bytes: int = 0,
              grad_steps: Optional[int] = None) -> Tuple[int, int]:
        """(keep_graph_steps, keep_attention_steps) to pass to ``fastfair.dft.sample`` with these arguments, planned
        among the steps gradients pass through (grad_steps of the num_steps; None: all). pending_bytes: memory the
        run holds besides kept graphs that ``reserved_now`` does not see, counted in R: the optimizer's state,
        which it makes at its first step (on CUDA counted as allocated from then on; on the CPU never). Decided
        once per batch shape and step count."""
        _check_bytes("pending_bytes", pending_bytes)
        differentiated = num_steps if grad_steps is None else min(num_steps, grad_steps)
        shapes = (tuple(z_T.shape), tuple(cond.shape), None if uncond is None else tuple(uncond.shape),
                  float(guidance_scale) != 1.0, frozen_rows, cond.requires_grad,
                  uncond is not None and uncond.requires_grad)
        # the plan spreads the budget over the differentiated steps: a call with another grad_steps plans anew
        key = (shapes, num_steps, differentiated)
        if key not in self._keep and (shapes, num_steps) in self._keep:
            # a plan restored from a state saved before the key held the differentiated count: a trainer's, whose
            # count stays the run's
            self._keep[key] = self._keep.pop((shapes, num_steps))
        if key not in self._keep:
            # read before the measuring forwards: their graphs are transient
            reserved = reserved_now(z_T.device) + pending_bytes
            if shapes not in self._per_step:
                args = (unet, z_T, 0, cond, uncond, guidance_scale, frozen_rows)
                self._per_step[shapes] = (graph_bytes_per_step(*args, self.lean), attention_keep_costs(*args))
            per_step, attention = self._per_step[shapes]
            attention_bytes, share = attention or (None, None)
            self._keep[key] = keeps_for_budget(max(self.budget_bytes - reserved, 0), per_step, attention_bytes,
                                               differentiated, attention_share=share)
        return self._keep[key]

    def state_dict(self) -> dict:
        """The plans decided so far. A plan depends on the memory in use when it was made (the optimizer state a
        resumed process already holds, another process's allocations), so a resume restores them to continue
        exactly as an uninterrupted run: keeping a step's graph and recomputing it differ in the last bits."""
        return {"budget_bytes": self.budget_bytes, "lean": self.lean, "plans": dict(self._keep)}

    def load_state_dict(self, state: Optional[dict]) -> None:
        """Restore state_dict()'s plans; ignored for another budget or lean setting (the run plans afresh)."""
        if state and state.get("budget_bytes") == self.budget_bytes and state.get("lean") == self.lean:
            self._keep.update(state["plans"])
