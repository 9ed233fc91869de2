"""Adjusted direct finetuning (DFT) engine: differentiable DPM-Solver++ sampling at constant memory.

``sample`` runs the sampler with no graph, keeps only the latents z_i of the steps it will backpropagate (and,
when asked, some steps' graphs or attention outputs: ``keep_graph_steps``, ``keep_attention_steps``), and returns z_0 through a ``torch.autograd.Function`` whose backward gives exactly the adjusted gradient of the
seed's Algorithm A.1 (U-Net input detached, the CFG-combined eps's gradient scaled by C_i):

    dL/d eps_i = C_i k_i g,  g = dL/dz_0,  k_i the chain weight of eps_i in z_0 (``fastfair.schedule``)
    eps_i = eps_u + w (eps_c - eps_u)  =>  dL/d eps_c,i = w C_i k_i g,  dL/d eps_u,i = (1 - w) C_i k_i g

The steps are independent, so the backward recomputes the U-Net at (z_i, t_i) in chunks of steps batched into
one call and backpropagates those upstream gradients (DESIGN.md, "The one fact the speed rests on").
Parameter and embedding gradients are summed with ``torch.autograd.grad`` and returned once from the Function,
so each parameter's gradient is produced exactly once per backward (ZeRO-2 requires it).
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import kernels
from .autocast_cache import no_stale_casts
from .keep_attention import AttentionRecorder, AttentionReplay, in_attention_layers
from .lean_graph import lean_graph as _lean_graph
from .schedule import COEFFICIENT_MODES, SolverSchedule, scheduler_config, solver_schedule


@lru_cache(maxsize=64)
def _cached_schedule(config_json: str, num_steps: int) -> SolverSchedule:
    return solver_schedule(json.loads(config_json), num_steps)


def _plain(value):
    """A config value as JSON can hold it exactly: arrays and tensors (e.g. trained_betas) as lists of floats."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def schedule_for(scheduler: Any, num_steps: int) -> SolverSchedule:
    """``solver_schedule`` memoized on the scheduler's config (the trainer calls this every iteration)."""
    config = {key: _plain(value) for key, value in dict(scheduler_config(scheduler)).items()}
    return _cached_schedule(json.dumps(config, sort_keys=True, default=str), int(num_steps))


@dataclass
class _Plan:
    """Everything the forward decides and the backward needs, besides tensors."""

    unet: torch.nn.Module
    schedule: SolverSchedule
    guidance: float
    use_cfg: bool
    grad_steps: List[int]            # steps whose gradient is backpropagated (sorted)
    step_weight: float               # S/K for an unbiased subsample, else 1
    keep_graph: set                  # steps whose graph is kept from the forward
    keep_attention: set              # steps that keep their attention outputs only (fastfair.keep_attention)
    recompute_chunk: int
    coefficients: str
    unet_dtype: torch.dtype
    frozen_rows: int = 0             # leading batch rows sampled along without gradient
    recompute_images: Optional[int] = None  # images per graph-building recompute call (None: all of them)
    need_uncond: bool = True         # the backward uses the uncond branch (something trainable is upstream of it)
    lean_graph: bool = True          # graph-building calls run inside fastfair.lean_graph.lean_graph
    saved_z: Dict[int, torch.Tensor] = field(default_factory=dict)
    kept_eps: Dict[int, torch.Tensor] = field(default_factory=dict)
    attention: Dict[int, AttentionRecorder] = field(default_factory=dict)  # recorded attention outputs per step
    # (cond, uncond) as the U-Net sees them in graph-building calls: a fresh leaf where the caller's tensor
    # requires grad (its gradient is summed over steps and returned once), else the detached tensor.
    sources: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
    leaves: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)
    autocast: Optional[Tuple[str, bool, Optional[torch.dtype]]] = None
    source_versions: Tuple[Optional[int], Optional[int]] = (None, None)  # of sources at the forward
    backward_done: bool = False      # the saved latents, kept graphs and recordings are freed by the first backward


def unet_input_dtype(unet: torch.nn.Module) -> torch.dtype:
    """The dtype the U-Net's input is cast to: its ``dtype`` attribute (diffusers models) or its first parameter's."""
    return getattr(unet, "dtype", None) or next(unet.parameters()).dtype


def _unet_eps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """eps of one U-Net call; x is already in the U-Net's input dtype. The text embeddings are cast to it as well
    (as diffusers' pipelines do): a float32 text encoder beside a half-precision U-Net otherwise fails in the first
    cross-attention matmul without autocast, and under autocast the cast is the one each projection would make."""
    out = unet(x, t, encoder_hidden_states=emb.to(x.dtype))
    if isinstance(out, torch.Tensor):  # a plain network's eps ([0] would take its first row)
        return out
    return out.sample if hasattr(out, "sample") else out[0]


def _rows(emb: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """Rows start .. start + count - 1 of per-image embeddings [B, L, D]; a shared [1, L, D] embedding as is."""
    return emb if emb.shape[0] == 1 or (start == 0 and count == emb.shape[0]) else emb[start:start + count]


def _embeddings(cond: torch.Tensor, uncond: Optional[torch.Tensor], batch: int, branches: int,
                start: int = 0) -> torch.Tensor:
    """[branches*b, L, D] in the U-Net batch layout, [uncond; cond] with CFG, [cond] without, for the b = batch
    images from row ``start`` on."""
    parts = [_rows(cond, start, batch).expand(batch, *cond.shape[1:])]
    if branches == 2:
        parts.insert(0, _rows(uncond, start, batch).expand(batch, *uncond.shape[1:]))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _check_inputs(z_T, cond, uncond, num_steps, guidance_scale, coefficients, recompute_chunk, keep_graph_steps,
                  grad_steps, frozen_rows, keep_attention_steps=0, generator=None, unet_dtype=None,
                  recompute_images=None):
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}: expected a positive integer")
    if not isinstance(z_T, torch.Tensor) or z_T.dim() != 4:
        got = tuple(z_T.shape) if isinstance(z_T, torch.Tensor) else type(z_T).__name__
        raise ValueError(f"z_T: expected a latent tensor [B, C, H, W], got {got}")
    if z_T.shape[0] == 0:  # found here, not as a frozen_rows range the caller never set
        raise ValueError(f"z_T: an empty batch {tuple(z_T.shape)}; give at least one latent")
    for name, emb in (("cond", cond), ("uncond", uncond)):
        if emb is None and name == "uncond":
            continue
        if not isinstance(emb, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor of text embeddings [B, L, D] or [1, L, D], "
                            f"got {type(emb).__name__}")
        if emb.dim() != 3 or emb.shape[0] not in (1, z_T.shape[0]):
            raise ValueError(
                f"{name}: expected text embeddings [B, L, D] or [1, L, D] with B = z_T.shape[0] = {z_T.shape[0]}, "
                f"got {tuple(emb.shape)}"
            )
        if not emb.is_floating_point():
            raise TypeError(f"{name}: expected floating-point text embeddings, got dtype {emb.dtype}")
    if isinstance(guidance_scale, (str, bytes)):
        raise ValueError(f"guidance_scale={guidance_scale!r}: expected a number")
    try:
        guidance = float(guidance_scale)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"guidance_scale={guidance_scale!r}: expected a number") from None
    if not math.isfinite(guidance):
        raise ValueError(f"guidance_scale={guidance_scale!r}: expected a finite number")
    if uncond is not None and guidance != 1.0 and uncond.shape[1:] != cond.shape[1:]:
        raise ValueError(
            f"uncond: shape {tuple(uncond.shape)} does not match cond's {tuple(cond.shape)} in [L, D]; classifier-free "
            "guidance batches them into one U-Net call, so encode both prompts with the same tokenizer padding "
            "(max_length) and text encoder"
        )
    if coefficients not in COEFFICIENT_MODES:
        raise ValueError(f"coefficients={coefficients!r}: expected one of {COEFFICIENT_MODES}")
    if recompute_chunk is not None and not (_is_integer(recompute_chunk) and recompute_chunk >= 1):
        raise ValueError(f"recompute_chunk={recompute_chunk!r}: expected a positive integer or None (= 1 step)")
    if recompute_images is not None and not (_is_integer(recompute_images) and recompute_images >= 1):
        raise ValueError(f"recompute_images={recompute_images!r}: expected a positive integer or None (= all images)")
    for name, value in (("keep_graph_steps", keep_graph_steps), ("keep_attention_steps", keep_attention_steps)):
        if not (_is_integer(value) and value >= 0):
            raise ValueError(f"{name}={value!r}: expected an integer >= 0")
    if not (_is_integer(frozen_rows) and 0 <= frozen_rows < z_T.shape[0]):
        raise ValueError(f"frozen_rows={frozen_rows!r}: expected an integer in [0, batch={z_T.shape[0]})")
    if grad_steps is not None and not (_is_integer(grad_steps) and 1 <= grad_steps <= num_steps):
        raise ValueError(f"grad_steps={grad_steps!r}: expected None or an integer in [1, num_steps={num_steps}]")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    if unet_dtype is not None and not isinstance(unet_dtype, torch.dtype):
        raise TypeError(f"unet_dtype={unet_dtype!r}: expected a torch.dtype (e.g. torch.float16) or None")


def _is_integer(value) -> bool:
    """A Python or numpy integer, not a bool (True would pass for 1)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_deterministic(unet: torch.nn.Module) -> None:
    # The backward recomputes the U-Net; active dropout would make it differ from the forward's sample. Each
    # module's own mode counts: an adapter added after unet.eval() (peft's LoRA dropout) is in training mode.
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0 and module.training:
            raise ValueError(
                f"unet: dropout {name or type(module).__name__} (p={module.p}) is active; the recompute would not "
                "match the forward. Call unet.eval() (LoRA dropout included) or set its p to 0."
            )


def _select_grad_steps(num_steps: int, grad_steps: Optional[int], generator) -> Tuple[List[int], float]:
    if grad_steps is None or grad_steps == num_steps:
        return list(range(num_steps)), 1.0
    device = generator.device if generator is not None else "cpu"
    chosen = torch.randperm(num_steps, generator=generator, device=device)[:grad_steps]
    return sorted(int(i) for i in chosen.tolist()), num_steps / grad_steps


def _autocast_state(device_type: str):
    """(device_type, whether autocast is on for it, its dtype or None): what ``_autocast`` restores."""
    enabled = torch.is_autocast_enabled(device_type)
    return (device_type, enabled, torch.get_autocast_dtype(device_type) if enabled else None)


def _autocast(state):
    """The forward's autocast state for the backward's recompute: on with its dtype, or off explicitly (a backward
    called inside the caller's autocast must not recompute in another precision than the forward sampled)."""
    if state is None:
        return contextlib.nullcontext()
    if not state[1]:
        return torch.autocast(device_type=state[0], enabled=False)
    return torch.autocast(device_type=state[0], dtype=state[2])


def graph_branches(use_cfg: bool, need_uncond: bool) -> int:
    """CFG branches a graph-building U-Net call covers: the uncond one only when something trainable feeds it."""
    return 2 if use_cfg and need_uncond else 1


def graph_inputs(z_rows: torch.Tensor, timestep: int, sources: Tuple[torch.Tensor, Optional[torch.Tensor]],
                 branches: int, frozen_rows: int, unet_dtype: torch.dtype):
    """(x, t, emb) of a graph-building U-Net call for the b images z_rows [b, C, H, W] (the batch's rows from
    ``frozen_rows`` on) at one timestep: x [branches*b, C, H, W] in ``unet_dtype``, t [branches*b], emb
    [branches*b, L, D] laid out [uncond; cond] (or [cond]) from sources = (cond, uncond) as the sampler got them."""
    b = z_rows.shape[0]
    x = z_rows.to(unet_dtype).repeat(branches, *([1] * (z_rows.dim() - 1)))
    t = torch.full((branches * b,), int(timestep), dtype=torch.long, device=z_rows.device)
    return x, t, _embeddings(sources[0], sources[1] if branches == 2 else None, b, branches, frozen_rows)


def sampling_call_inputs(z: torch.Tensor, timestep: int, branches: int, unet_dtype: torch.dtype):
    """(x, t) of the batched sampling call at one timestep for the whole batch z [B, C, H, W]: x [branches*B, C, H,
    W] in ``unet_dtype`` (the latents repeated per CFG branch, laid out like ``_embeddings``), t [branches*B]."""
    x = z.to(unet_dtype).repeat(branches, *([1] * (z.dim() - 1)))
    return x, torch.full((x.shape[0],), int(timestep), device=z.device, dtype=torch.long)


def graph_rows(batch: int, frozen_rows: int, use_cfg: bool, branches: int) -> List[int]:
    """Indices, in the sampling call's batch of branches*B rows laid out [uncond; cond] (or [cond]), of the rows
    a graph-building call covers, in its order: the images from ``frozen_rows`` on, of the cond branch (and of the
    uncond one when ``branches`` is 2)."""
    first_branch = 2 - branches if use_cfg else 0  # the cond branch sits second in [uncond; cond]
    return [k * batch + r for k in range(first_branch, first_branch + branches) for r in range(frozen_rows, batch)]


def _kept_step_eps(plan: _Plan, i: int, z: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                   emb_nograd: torch.Tensor) -> torch.Tensor:
    """eps [branches*B, ...] of step i (z [B, C, H, W]; x, t, emb_nograd: the whole batch's call) with its graph
    kept in ``plan.kept_eps[i]`` for the rows the backward uses only, laid out like a one-step recompute; the other
    rows (frozen images, an uncond branch nothing trainable feeds) run in a no-grad call, so a kept graph costs
    what a recompute of one step costs, not what the whole batch would."""
    batch, f = z.shape[0], plan.frozen_rows
    nb = graph_branches(plan.use_cfg, plan.need_uncond)
    with torch.enable_grad(), _lean_graph(plan.unet, plan.lean_graph):
        eps_graph = _unet_eps(plan.unet, *graph_inputs(z[f:], int(plan.schedule.timesteps[i]), plan.sources, nb, f,
                                                       plan.unet_dtype))
    plan.kept_eps[i] = eps_graph
    if eps_graph.shape[0] == x.shape[0]:
        return eps_graph.detach()
    rows = graph_rows(batch, f, plan.use_cfg, nb)
    rest = sorted(set(range(x.shape[0])) - set(rows))
    eps = torch.empty((x.shape[0], *eps_graph.shape[1:]), dtype=eps_graph.dtype, device=eps_graph.device)
    eps[rows] = eps_graph.detach()
    eps[rest] = _unet_eps(plan.unet, x[rest], t[rest], emb_nograd[rest])
    return eps


def _run_sampler(plan: _Plan, z_T: torch.Tensor, cond: torch.Tensor, uncond: Optional[torch.Tensor],
                 record: bool) -> torch.Tensor:
    """The S solver steps with no graph; when ``record``, keep z_i of the grad steps, the kept graphs and the
    attention-kept steps' recorded attention outputs."""
    sched, unet = plan.schedule, plan.unet
    traj_dtype = torch.float64 if z_T.dtype == torch.float64 else torch.float32
    z = z_T.detach().to(traj_dtype, copy=record)  # saved for the backward: the caller may refill z_T in place
    batch = z.shape[0]
    branches = 2 if plan.use_cfg else 1
    emb_nograd = _embeddings(cond.detach(), None if uncond is None else uncond.detach(), batch, branches)
    grad_set = set(plan.grad_steps) if record else set()
    attention_rows = graph_rows(batch, plan.frozen_rows, plan.use_cfg, graph_branches(plan.use_cfg, plan.need_uncond))
    m_prev = None
    with no_stale_casts():  # no-grad casts must not reach the kept steps' graphs (fastfair.autocast_cache)
        for i in range(sched.num_steps):
            x, t = sampling_call_inputs(z, int(sched.timesteps[i]), branches, plan.unet_dtype)
            if i in plan.keep_graph and record:
                eps = _kept_step_eps(plan, i, z, x, t, emb_nograd)
            else:
                if i in grad_set:
                    plan.saved_z[i] = z[plan.frozen_rows:]
                recording = contextlib.nullcontext()
                if i in grad_set and i in plan.keep_attention:
                    plan.attention[i] = AttentionRecorder(attention_rows, x.shape[0])
                    recording = in_attention_layers(plan.attention[i], unet)
                with recording:
                    eps = _unet_eps(unet, x, t, emb_nograd)
            eps_u, eps_c = (eps[:batch], eps[batch:]) if branches == 2 else (None, eps)
            z, m_prev = kernels.solver_step(
                z, eps_c, eps_u, m_prev, guidance=plan.guidance,
                cz=float(sched.cz[i]), ce=float(sched.ce[i]), a=float(sched.a[i]),
                b0=float(sched.b0[i]), b1=float(sched.b1[i]),
            )
    return z


def _shared_storages(tensors) -> set:
    """The storages (data pointers) more than one of ``tensors`` lies in. autograd may return one tensor for two
    inputs (eps = f(x) + p1 + p2: an add hands both operands its incoming gradient) or the upstream gradient itself
    (eps = f(x) + p), and a running sum added into in place would then count later steps twice or change the
    upstream."""
    seen, shared = set(), set()
    for tensor in tensors:
        if tensor is not None:
            pointer = tensor.untyped_storage().data_ptr()
            (shared if pointer in seen else seen).add(pointer)
    return shared


def _is_dense(tensor: torch.Tensor) -> bool:
    """No element stored twice: a broadcast gradient (stride 0, eps = f(x) + p.sum()) cannot be added into."""
    return all(stride > 0 or size == 1 for size, stride in zip(tensor.shape, tensor.stride()))


def _check_backward_state(plan: _Plan, recomputes: bool, params=(), param_versions=()) -> None:
    """The backward recomputes from state the forward saved: refuse, as autograd refuses a freed or stale graph,
    a second backward (the first freed that state: its U-Net and embedding gradients would be silently zero) and
    embeddings or trainable weights changed in place since the forward (the recompute would differentiate other
    values than those sampled with: an optimizer step, EMA or a LoRA merge before the backward)."""
    if not recomputes:  # only dL/dz_T = K_T g: nothing saved is read
        return
    if plan.backward_done:
        raise RuntimeError("fastfair.dft.sample: a second backward through the same z_0; the first freed the saved "
                           "latents (like autograd's retain_graph=False, which sample does not support): sum the "
                           "losses and backpropagate once, or sample again")
    for name, source, version in zip(("cond", "uncond"), plan.sources, plan.source_versions):
        if source is not None and source._version != version:
            raise RuntimeError(f"fastfair.dft.sample: {name} was modified in place after sampling; the backward "
                               "recomputes the U-Net with it: pass a copy, or change it after the backward")
    changed = [tuple(p.shape) for p, version in zip(params, param_versions) if p._version != version]
    if changed:
        raise RuntimeError(f"fastfair.dft.sample: {len(changed)} trainable weight(s) (e.g. of shape {changed[0]}) "
                           "were modified in place after sampling (an optimizer step, EMA or merge before the "
                           "backward); the backward recomputes the U-Net with them: backpropagate first")


class _AdjustedDFT(torch.autograd.Function):
    """z_0 = Sampler(z_T, cond, uncond; theta) with the adjusted backward.

    Forward: the S-step sampler (no graph), saving z_i for the steps to backpropagate (and, for kept steps, their
    graph or their attention kernels' outputs: ``fastfair.keep_attention``).
    Backward (g = dL/dz_0; s_i = C_i k_i, times S/K for a K-step subsample; w the guidance scale):
        dL/dtheta = sum_i [ w s_i g . d eps_c(z_i, t_i)/dtheta + (1 - w) s_i g . d eps_u(z_i, t_i)/dtheta ]
        dL/dcond  = sum_i w s_i g . d eps_c/dcond,   dL/duncond = sum_i (1 - w) s_i g . d eps_u/duncond
        dL/dz_T   = K_T g   (the chain weight of z_T; the U-Net input is detached, B_t = I)
    Without CFG the single branch has weight 1. The upstream gradients of a chunk of steps are written by
    ``fastfair.kernels.grad_fanout`` straight into the batched recompute's grad_output.
    """

    @staticmethod
    def forward(ctx, plan: _Plan, z_T, cond, uncond, *params):
        ctx.plan = plan
        ctx.params = params
        ctx.param_versions = [p._version for p in params]
        ctx.z_T_meta = (z_T.dtype, z_T.requires_grad)
        return _run_sampler(plan, z_T, cond, uncond, record=True)

    @staticmethod
    @once_differentiable  # the recompute's gradients carry no graph: a double backward is refused, not zeroed
    def backward(ctx, g):
        plan: _Plan = ctx.plan
        params = ctx.params
        sched, w = plan.schedule, plan.guidance
        scales = sched.grad_scales(plan.coefficients) * plan.step_weight
        nb = graph_branches(plan.use_cfg, plan.need_uncond)
        branch_weights = [1.0 - w, w] if nb == 2 else [w if plan.use_cfg else 1.0]
        cond_leaf, uncond_leaf = plan.leaves
        # a weight frozen since the forward gets no gradient, as autograd leaves it None (autograd.grad refused it)
        inputs = [x for x in (cond_leaf, uncond_leaf) if x is not None] + [p for p in params if p.requires_grad]
        _check_backward_state(plan, bool(inputs), params, ctx.param_versions)
        sums: List[Optional[torch.Tensor]] = [None] * len(inputs)

        def accumulate(eps: torch.Tensor, upstream: torch.Tensor) -> None:
            grads = torch.autograd.grad(eps, inputs, upstream, allow_unused=True)
            # only the first gradient of each input becomes a running sum: later ones are added, never kept
            shared = _shared_storages([upstream, *grads]) if any(s is None for s in sums) else set()
            for k, gk in enumerate(grads):
                if gk is None:
                    continue
                if sums[k] is None:  # the running sum is added into in place: it must own its memory
                    own = _is_dense(gk) and gk.untyped_storage().data_ptr() not in shared
                    sums[k] = gk if own else gk.clone(memory_format=torch.contiguous_format)
                else:
                    sums[k].add_(gk)

        if plan.frozen_rows:  # rows sampled along without gradient: their dL/dz_0 is ignored
            g = g.clone()
            g[:plan.frozen_rows] = 0
        g = g.contiguous()
        g_rows = g[plan.frozen_rows:]
        if inputs:
            with _autocast(plan.autocast), no_stale_casts(), _lean_graph(plan.unet, plan.lean_graph):
                for i, eps in plan.kept_eps.items():  # laid out like a one-step recompute chunk
                    upstream = kernels.grad_fanout(g_rows, [float(scales[i])], branch_weights, out_dtype=eps.dtype)
                    accumulate(eps, upstream.view_as(eps))
                plan.kept_eps.clear()
                todo = [i for i in plan.grad_steps if i in plan.saved_z]
                # recomputed in chunks of their own kind: attention-kept steps replay their attention outputs
                chunks = [group[start:start + plan.recompute_chunk]
                          for group in ([i for i in todo if i not in plan.attention],
                                        [i for i in todo if i in plan.attention])
                          for start in range(0, len(group), plan.recompute_chunk)]
                images = g_rows.shape[0]
                per_call = plan.recompute_images or images
                for chunk in chunks:
                    recordings = [plan.attention.pop(i) for i in chunk if i in plan.attention]
                    for first in range(0, images, per_call):  # the images in slices: each a call of its own
                        rows = slice(first, min(first + per_call, images))
                        replay = contextlib.nullcontext()
                        if recordings:  # the slice's rows of each recording, in its [branch][image] layout
                            picked = None if rows == slice(0, images) else [
                                k * images + r for k in range(nb) for r in range(rows.start, rows.stop)]
                            replay = in_attention_layers(AttentionReplay(recordings, picked), plan.unet)
                        with torch.enable_grad(), replay:
                            calls = [graph_inputs(plan.saved_z[i][rows], int(sched.timesteps[i]), plan.sources, nb,
                                                  plan.frozen_rows + rows.start, plan.unet_dtype) for i in chunk]
                            eps = _unet_eps(plan.unet, *(torch.cat(parts) if len(chunk) > 1 else parts[0]
                                                         for parts in zip(*calls)))
                        upstream = kernels.grad_fanout(g_rows[rows], [float(scales[i]) for i in chunk],
                                                       branch_weights, out_dtype=eps.dtype)
                        accumulate(eps, upstream.view_as(eps))
                        del eps, upstream
                    del recordings
        plan.saved_z.clear()
        plan.attention.clear()
        plan.kept_eps.clear()
        plan.backward_done = True

        grads = dict(zip([id(x) for x in inputs], sums))
        grad_cond = grads.get(id(cond_leaf)) if cond_leaf is not None else None
        grad_uncond = grads.get(id(uncond_leaf)) if uncond_leaf is not None else None
        zT_dtype, zT_requires_grad = ctx.z_T_meta
        grad_zT = (g * sched.chain_weight_zT).to(zT_dtype) if zT_requires_grad else None
        grad_params = [grads.get(id(p)) for p in params]
        return (None, grad_zT, grad_cond, grad_uncond, *grad_params)


def sample(
    unet: torch.nn.Module,
    scheduler: Any,
    z_T: torch.Tensor,
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor] = None,
    *,
    num_steps: int = 20,
    guidance_scale: float = 7.5,
    coefficients: str = "paper",
    recompute_chunk: Optional[int] = None,
    recompute_images: Optional[int] = None,
    keep_graph_steps: int = 0,
    keep_attention_steps: int = 0,
    grad_steps: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    unet_dtype: Optional[torch.dtype] = None,
    frozen_rows: int = 0,
    lean_graph: bool = True,
) -> torch.Tensor:
    """Sample z_0 with DPM-Solver++ so that z_0 carries the adjusted DFT gradient (seed Algorithm A.1).

    Args:
        unet: a module with diffusers' UNet2DConditionModel call signature
            (``unet(x, t, encoder_hidden_states=emb).sample``), LoRA-wrapped or not. Its parameters with
            ``requires_grad`` receive gradients. Must be deterministic (no active dropout).
        scheduler: a diffusers ``DPMSolverMultistepScheduler`` (or its config); only its config is read.
        z_T: initial noise [B, C, H, W]; the trajectory is kept in float32 (float64 if z_T is float64).
        cond, uncond: text embeddings [B or 1, L, D] of the prompt and of the empty prompt. ``uncond=None`` or
            ``guidance_scale=1`` disables classifier-free guidance. Each receives a gradient when it requires one.
        num_steps: S, the number of U-Net evaluations.
        guidance_scale: w in eps = eps_u + w (eps_c - eps_u).
        coefficients: ``paper`` | ``exact`` | ``none``: the adjustment C_i (``fastfair.schedule``).
        recompute_chunk: steps batched into one U-Net call in the backward (None = 1: least memory).
        recompute_images: images per U-Net call in the backward's recompute (None: all the batch's at once): the
            recompute's activations then scale with this, not with B (the gradient is the same, summed in another
            order). Kept graphs (keep_graph_steps) cover the whole batch as they are made in the forward.
        keep_graph_steps: keep this many steps' graphs from the forward instead of recomputing them (with the
            attention keeps, at most the steps backpropagated: a larger count keeps them all).
        keep_attention_steps: of the other steps, this many record their attention kernels' outputs in the
            sampling call and replay them in the backward's recompute (``fastfair.keep_attention``: about a tenth
            of a kept graph's bytes for the attention's share of the recompute; the gradient equals the lean
            run's to rounding).
        grad_steps: K, backpropagate K of the S steps drawn uniformly without replacement (with ``generator``),
            scaled by S/K: an unbiased estimate of the full adjusted gradient. None = all steps.
        unet_dtype: dtype of the U-Net's input, latents and text embeddings (default: the U-Net's ``dtype`` or its
            first parameter's).
        frozen_rows: the first ``frozen_rows`` images are sampled in the same U-Net calls but carry no gradient
            (their dL/dz_0 is ignored and the backward does not recompute them): the frozen model's images batched
            with the finetuned ones when only the text side differs. cond/uncond must then be per-image [B, L, D]
            or shared [1, L, D].
        lean_graph: make the graph-building U-Net calls (kept steps, the recompute) inside
            ``fastfair.lean_graph.lean_graph``: frozen convolutions and GEGLU gates save less, the gradients are
            bit-identical. False: plain autograd (to measure the difference).

    Returns:
        z_0 [B, C, H, W] in the trajectory dtype. Differentiable w.r.t. z_T, cond, uncond and the U-Net's
        trainable parameters when grad mode is on; works inside an outer ``loss.backward()``, DeepSpeed's
        ``engine.backward()`` and ``torch.autocast`` (the backward recompute runs under the forward's autocast).
    """
    _check_inputs(z_T, cond, uncond, num_steps, guidance_scale, coefficients, recompute_chunk, keep_graph_steps,
                  grad_steps, frozen_rows, keep_attention_steps, generator, unet_dtype, recompute_images)
    guidance = float(guidance_scale)
    use_cfg = uncond is not None and guidance != 1.0
    params = tuple(p for p in unet.parameters() if p.requires_grad)
    if unet_dtype is None:
        unet_dtype = unet_input_dtype(unet)
    config = getattr(unet, "config", None)  # encoder_hid_dim: a U-Net that projects its text embeddings first
    key = "encoder_hid_dim" if getattr(config, "encoder_hid_dim", None) else "cross_attention_dim"
    width = getattr(config, key, None)
    if isinstance(width, int) and cond.shape[-1] != width:  # else a matmul shape error deep in the first block
        raise ValueError(f"cond: embeddings of width D={cond.shape[-1]}, but the U-Net's {key} is {width}: encode "
                         "the prompts with the text encoder of this model")
    needs_grad = torch.is_grad_enabled() and (
        z_T.requires_grad or cond.requires_grad or (use_cfg and uncond.requires_grad) or len(params) > 0
    )
    steps, step_weight = _select_grad_steps(num_steps, grad_steps, generator) if needs_grad else ([], 1.0)
    plan = _Plan(
        unet=unet,
        schedule=schedule_for(scheduler, num_steps),
        guidance=guidance,
        use_cfg=use_cfg,
        grad_steps=steps,
        step_weight=step_weight,
        keep_graph=set(steps[:keep_graph_steps]),
        keep_attention=set(steps[keep_graph_steps:keep_graph_steps + keep_attention_steps]),
        recompute_chunk=recompute_chunk or 1,
        coefficients=coefficients,
        unet_dtype=unet_dtype,
        frozen_rows=frozen_rows,
        recompute_images=None if recompute_images is None else int(recompute_images),
        lean_graph=bool(lean_graph),
    )
    if not needs_grad:
        with torch.no_grad():
            return _run_sampler(plan, z_T, cond, uncond if use_cfg else None, record=False)

    _check_deterministic(unet)
    plan.schedule.adjustment(coefficients)  # refused now (e.g. exact with a chain weight 0), not after the forward
    cond_leaf = cond.detach().requires_grad_() if cond.requires_grad else None
    uncond_leaf = uncond.detach().requires_grad_() if use_cfg and uncond.requires_grad else None
    plan.leaves = (cond_leaf, uncond_leaf)
    plan.need_uncond = uncond_leaf is not None or len(params) > 0
    plan.sources = (
        cond_leaf if cond_leaf is not None else cond.detach(),
        uncond_leaf if uncond_leaf is not None else (uncond.detach() if use_cfg else None),
    )
    plan.source_versions = tuple(None if x is None else x._version for x in plan.sources)
    plan.autocast = _autocast_state(z_T.device.type)
    return _AdjustedDFT.apply(plan, z_T, cond, uncond if use_cfg else None, *params)
