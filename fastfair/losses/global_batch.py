"""Alignment targets over the global batch (all `torch.distributed` ranks together).

The expected-OT targets of one image depend on every other image in the batch, so with data
parallelism they are computed on the concatenation of all ranks' rows: gather the probabilities,
compute the targets once on one rank, broadcast them, and give each rank the rows of its images.
Ranks may hold different numbers of images.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from fastfair.process_group import OtherRankFailed

from .alignment import check_ot_inputs, expected_ot_targets


def global_expected_ot_targets(probs, target, valid=None, group=None, **ot_kwargs):
    """`expected_ot_targets` of this rank's rows, computed over all ranks' rows of `group`.

    probs: [N_rank, K]; valid: optional [N_rank] bool (rows excluded from the OT get q = 0);
    ot_kwargs: method, num_samples, generator (used on the computing rank only).
    Returns [N_rank, K], the same as the single-process result on the concatenated batch.
    Without an initialized process group (or with one rank) it is `expected_ot_targets`.
    """
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return expected_ot_targets(probs, target, valid=valid, **ot_kwargs)
    if valid is None:
        valid = torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    all_probs, sizes = gather_rows(probs.detach(), group)
    all_valid, _ = gather_rows(valid.to(probs.device, torch.uint8), group)  # gloo has no bool
    # the whole batch, on every rank, in the rows' own dtype: every rank refuses the same inputs (one rank's
    # refusal of its own rows left the others waiting in their next collective)
    check_ot_inputs(all_probs, target, ot_kwargs.get("method", "auto"), ot_kwargs.get("num_samples", 1024),
                    all_valid.bool())
    src = dist.get_process_group_ranks(group)[0] if group is not None else 0
    failure = None
    if dist.get_rank() == src:
        try:  # in probs' dtype, as a single process computes (its row sums are held to that dtype's rounding)
            q = expected_ot_targets(all_probs, target, valid=all_valid.bool(), **ot_kwargs).double()
        except (ValueError, RuntimeError) as error:  # e.g. method='exact' over too large a global batch
            failure, q = error, torch.full(all_probs.shape, float("nan"), dtype=torch.float64, device=probs.device)
    else:
        q = torch.empty(all_probs.shape, dtype=torch.float64, device=probs.device)
    dist.broadcast(q, src=src, group=group)  # NaN (targets are finite otherwise): the source failed
    if failure is not None:
        raise failure
    if torch.isnan(q).any():
        raise OtherRankFailed(f"global_expected_ot_targets: rank {src} could not compute the targets of the "
                              "global batch, so no rank goes on (its error is in its output)")
    start = sum(sizes[: dist.get_rank(group)])
    return q[start:start + probs.shape[0]].to(probs.dtype)


def gather_rows(x, group=None):
    """All-gather [n_rank, ...] tensors of different lengths: ([sum n_rank, ...], [n_rank per rank])."""
    world = dist.get_world_size(group)
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    padded = x.new_zeros((max(sizes),) + tuple(x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)]), sizes
