"""Distributional alignment loss (DAL, seed paragraphs 0105-0106, Eq. 4-6).

For N images with class probabilities p_i (a K-vector each) and a target distribution D over the K
classes, draw u_1..u_N i.i.d. from D (one-hot vectors), solve the assignment

    sigma* = argmin_sigma  sum_i || p_i - u_sigma(i) ||_2                                  (Eq. 4)

and average the assigned one-hot over the draws: q_i = E_u[ u_sigma*(i) ]                  (Eq. 5).
The cost depends on u only through its class, so a draw matters only through its count vector
n ~ Multinomial(N, D), and the assignment for n is a transportation problem (n_k images go to class k).

How q is computed:
- K = 2, any N (closed form): rank the images by how much they prefer class 0
  (||p - e_0|| - ||p - e_1||, ascending); the image at rank r gets class 0 iff n_0 > r, so
  q_i[0] = P(Binomial(N, D_0) > r).
- exact: every count vector, weighted by its multinomial probability, each solved exactly.
- monte_carlo: sampled count vectors, each solved exactly.
Each count vector is solved exactly by successive shortest paths, batched over all count vectors:
start from one optimal assignment (scipy's linear_sum_assignment for the expected counts), then move
one unit of demand at a time from an over-full to an under-full class along a shortest path of the
class graph (edge x -> y: re-route the cheapest image of x to y). Each move keeps the assignment
optimal, so the last one is optimal for the sampled counts.

Ties: rows are put in lexicographic order before solving and identical rows share their result
equally, so q is deterministic and permutation-equivariant in the images. With exactly tied costs
between different rows one optimal assignment is chosen deterministically (as the public code's
solver does) instead of averaging over all of them. Continuous probabilities almost never tie, but
saturated ones do: e.g. rows (1, 0, 0, 0) and (0, 1, 0, 0) are equally far from classes 2 and 3
(a float32 softmax gives exact 0 and 1 once logits differ by more than ~104).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from scipy.special import bdtrc, gammaln

METHODS = ("auto", "exact", "monte_carlo")
# "auto" enumerates exactly while (count vectors x images) stays below this; Monte Carlo beyond.
AUTO_EXACT_WORK = 1 << 16
# "exact" refuses more count vectors than this (it would take minutes).
MAX_EXACT_COUNT_VECTORS = 1 << 20
# Count vectors solved together; bounds the [S, N, K] work tensors.
_CHUNK_ELEMENTS = 1 << 22
_TIE_TOL = 1e-12


def expected_ot_targets(probs, target, method="auto", num_samples=1024, generator=None, valid=None):
    """Expected optimal-transport targets q (seed Eq. 5).

    probs: [N, K] class probabilities (rows sum to 1); target: [K] target distribution;
    valid: optional [N] bool, rows to include (e.g. images with a face); the others get q = 0.
    num_samples: Monte Carlo draws of the target sample (method "monte_carlo", or "auto" where exact enumeration
    is too large); generator: torch.Generator for them. Returns q [N, K] (rows of included images
    sum to 1), no grad, on probs' device in probs' dtype (float64 gives the exact results in float64).
    """
    target, valid, rows = check_ot_inputs(probs, target, method, num_samples, valid)
    q = torch.zeros(probs.shape, dtype=torch.float64)
    if rows.shape[0] > 0:
        with _one_thread():
            q[valid] = _expected_assignment(rows, target, method, num_samples, generator)
    return q.to(probs.device, probs.dtype)


def alignment_loss(logits, q, threshold, mask=None, reduction="mean"):
    """DAL (seed Eq. 6): cross-entropy to y_i = argmax q_i where c_i = max q_i >= threshold.

    A row whose maximum is tied (q_i = [0.5, 0.5]: images the classifier scores alike, as bf16 rounding can make
    them) has no class to align to and is left out, as a row below the threshold is (argmax would pick the first
    class for every such image, against a uniform target, wherever threshold <= 1/K).

    logits: [N, K] (unnormalized, or log-probabilities); q: [N, K] from expected_ot_targets;
    mask: optional [N] bool, images that take part (False: no face). reduction: "mean" (sum / N, all
    N images counted as in Eq. 6), "sum", or "none" ([N], zero where excluded).
    """
    for name, value in (("logits", logits), ("q", q)):
        if not torch.is_tensor(value):
            raise TypeError(f"alignment_loss: {name} must be a [N, K] tensor, got {type(value).__name__}")
    if logits.ndim != 2 or q.shape != logits.shape:
        raise ValueError(f"alignment_loss: logits [N, K] and q of the same shape expected, got "
                         f"{tuple(logits.shape)} and {tuple(q.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"alignment_loss: logits must be floating point (classifier outputs), got {logits.dtype}")
    if threshold is None or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"alignment_loss: threshold is a confidence in [0, 1], got {threshold}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"alignment_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    mask = _as_mask(mask, logits.shape[0], "mask", logits.device)
    if not ((q >= -1e-6) & (q <= 1 + 1e-6)).all():  # NaN fails too
        raise ValueError("alignment_loss: q must hold probabilities in [0, 1] (expected_ot_targets' output), got "
                         f"values in [{q.min().item():.4g}, {q.max().item():.4g}]; are logits and q swapped?")
    confidence, classes = q.detach().max(dim=-1)
    selected = mask & (confidence >= threshold) & (confidence > 0) & ~_tied_rows(q.detach(), confidence)
    # the left-out rows are not evaluated: 0 * their loss would be NaN for a -inf logit (a log-probability 0)
    chosen = F.cross_entropy(logits[selected], classes[selected], reduction="none")  # autocast: fp32
    per_image = chosen.new_zeros(logits.shape[0]).index_put((selected,), chosen)
    if reduction == "none":
        return per_image
    if reduction == "sum":
        return per_image.sum()
    return per_image.mean()


def target_cells(q: torch.Tensor, preferred: torch.Tensor) -> torch.Tensor:
    """[N] long: the class each image is steered to, y_i = argmax q_i (below the threshold too: the image-preservation
    weights and the face loss's target use it, as the public code does); -1 where there is none: an all-zero row
    (no face) or a tied row whose maxima do not include ``preferred``. A tied row takes ``preferred`` [N] long (the
    original image's class, -1: none) where it is among the maxima: nothing steers such an image away from it, so
    its original is kept close rather than judged by an arbitrary first class.

    q: [N, K] from expected_ot_targets.
    """
    if q.ndim != 2 or preferred.shape != q.shape[:1]:
        raise ValueError(f"target_cells: q [N, K] and preferred [N] expected, got {tuple(q.shape)} and "
                         f"{tuple(preferred.shape)}")
    q = q.detach()
    confidence, cells = q.max(dim=-1)
    tied = _tied_rows(q, confidence)
    preferred = preferred.to(q.device)
    among = (preferred >= 0) & (q.gather(1, preferred.clamp(min=0)[:, None])[:, 0] == confidence)
    none = torch.full_like(cells, -1)
    cells = torch.where(tied, torch.where(among, preferred, none), cells)
    return torch.where(confidence > 0, cells, none)


def _tied_rows(q: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """[N] bool: rows of q [N, K] whose maximum ``confidence`` [N] is shared by two classes or more."""
    return (q == confidence[:, None]).sum(dim=-1) > 1


@contextmanager
def _one_thread():
    """The solver's tensors are small: intra-op threads only add contention (20x slower or worse on
    a busy 2-core machine), so it runs on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_ot_inputs(probs, target, method="auto", num_samples=1024, valid=None):
    """What `expected_ot_targets` checks before computing (a ValueError or TypeError naming the input): returns
    (target [K] float64, valid [N] bool, the valid rows of probs [n, K] in float64). The rows' sums are held to
    their own dtype's rounding: a distributed caller checks the gathered rows, in their dtype, on every rank."""
    target, valid = _check_inputs(probs, target, method, num_samples, valid)
    rows = probs.detach().to("cpu", torch.float64)[valid]
    # a bfloat16 softmax sums to 1 only within its rounding (~2^-8 per row)
    tolerance = max(1e-3, 2 * torch.finfo(probs.dtype).eps)
    if not torch.isfinite(rows).all() or (rows < -1e-6).any() or ((rows.sum(-1) - 1).abs() > tolerance).any():
        raise ValueError(f"expected_ot_targets: each row of probs must be a probability vector, summing to 1 "
                         f"within {tolerance:.2g} for {probs.dtype} (apply softmax to logits first)")
    return target, valid, rows


def _check_inputs(probs, target, method, num_samples, valid):
    if method not in METHODS:
        raise ValueError(f"expected_ot_targets: method must be one of {METHODS}, got {method!r}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"expected_ot_targets: num_samples must be a positive int, got {num_samples!r}")
    if not torch.is_tensor(probs) or probs.ndim != 2:
        raise ValueError("expected_ot_targets: probs must be a [N, K] tensor of class probabilities")
    if not probs.is_floating_point():  # q would come back cast to it: an integer q is all zeros
        raise TypeError(f"expected_ot_targets: probs must be floating point (class probabilities), got {probs.dtype}")
    # a list stays float64 (torch.as_tensor would round it to float32 first)
    try:
        target = (target.detach() if torch.is_tensor(target) else torch.tensor(target, dtype=torch.float64))
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"expected_ot_targets: target must be a [K] vector of probabilities, got {target!r}") from None
    target = target.to("cpu", torch.float64)
    if target.ndim != 1 or target.shape[0] != probs.shape[1]:
        raise ValueError(f"expected_ot_targets: target must be a [K] vector with K = {probs.shape[1]} "
                         f"(probs' columns), got shape {tuple(target.shape)}")
    if not torch.isfinite(target).all() or (target < 0).any() or abs(float(target.sum()) - 1.0) > 1e-6:
        raise ValueError(f"expected_ot_targets: target must be a probability vector (>= 0, sum 1), "
                         f"got {target.tolist()}")
    return target, _as_mask(valid, probs.shape[0], "valid", "cpu")


def _as_mask(mask, n, name, device):
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask, device=device)
    if mask.shape != (n,):
        raise ValueError(f"{name} must be a [N] = [{n}] bool tensor, got shape {tuple(mask.shape)}")
    return mask.bool()


def _expected_assignment(probs, target, method, num_samples, generator):
    """q [N, K] for float64 CPU probs; see the module docstring."""
    n_images, k = probs.shape
    # Canonical (lexicographic) order: the result cannot depend on the order of the images.
    unique, inverse, multiplicity = np.unique(probs.numpy(), axis=0, return_inverse=True, return_counts=True)
    group = torch.from_numpy(np.repeat(np.arange(len(unique)), multiplicity))
    rows = torch.from_numpy(unique)[group]
    cost = (rows[:, None, :] - torch.eye(k, dtype=torch.float64)).norm(dim=-1)
    if k == 2:
        q_sorted = _two_class(cost, target)
    else:
        counts, weights = _count_vectors(n_images, target, method, num_samples, generator)
        q_sorted = _average_assignments(cost, counts, weights)
    # identical rows share their assignments equally
    q_unique = torch.zeros(len(unique), k, dtype=torch.float64).index_add_(0, group, q_sorted)
    q_unique /= torch.from_numpy(multiplicity).double()[:, None]
    return q_unique[torch.from_numpy(inverse.reshape(-1))]


def _two_class(cost, target):
    """Closed form for K = 2 (exact for any N); tied preferences share the mean of their ranks."""
    n = cost.shape[0]
    preference = (cost[:, 0] - cost[:, 1]).numpy()
    order = np.argsort(preference, kind="stable")
    p_rank = bdtrc(np.arange(n), n, float(target[0]))  # P(n_0 > r), n_0 ~ Binomial(n, target_0)
    _, tie_group = np.unique(preference[order], return_inverse=True)
    tie_mean = np.bincount(tie_group, p_rank) / np.bincount(tie_group)
    q0 = np.empty(n)
    q0[order] = tie_mean[tie_group]
    q0 = torch.from_numpy(q0)
    return torch.stack([q0, 1 - q0], dim=1)


def _count_vectors(n, target, method, num_samples, generator):
    """Count vectors [S, K] (long) and their weights [S] (float64, sum 1)."""
    support = (target > 0).nonzero().squeeze(1)
    n_exact = math.comb(n + len(support) - 1, len(support) - 1)
    if method == "exact" and n_exact > MAX_EXACT_COUNT_VECTORS:
        raise ValueError(f"expected_ot_targets: method='exact' needs {n_exact} count vectors for "
                         f"N={n}, K={len(support)}; use method='monte_carlo' (or 'auto')")
    if method == "exact" or (method == "auto" and n_exact * n <= AUTO_EXACT_WORK):
        counts = torch.zeros(n_exact, len(target), dtype=torch.long)
        counts[:, support] = _compositions(n, len(support))
        log_weight = (math.lgamma(n + 1) - torch.from_numpy(gammaln(counts[:, support].numpy() + 1)).sum(1)
                      + (counts[:, support] * target[support].log()).sum(1))
        return counts, log_weight.exp()
    draws = torch.multinomial(target.expand(num_samples, -1), n, replacement=True, generator=generator)
    counts = _class_counts(draws, len(target))
    counts, repeats = torch.unique(counts, dim=0, return_counts=True)
    return counts, repeats.double() / num_samples


def _compositions(n, k):
    """All [C(n+k-1, k-1), k] vectors of k non-negative ints summing to n (stars and bars)."""
    bars = torch.tensor(list(combinations(range(n + k - 1), k - 1)), dtype=torch.long)
    bars = bars.reshape(math.comb(n + k - 1, k - 1), k - 1)
    edges = torch.cat([torch.full((len(bars), 1), -1), bars, torch.full((len(bars), 1), n + k - 1)], 1)
    return edges.diff(dim=1) - 1


def _average_assignments(cost, counts, weights):
    """sum_s weights_s * onehot(optimal assignment for counts_s): [N, K]."""
    n, k = cost.shape
    start_counts = _expected_counts(n, weights @ counts.double())
    start = _assignment_for(cost, start_counts)
    q = torch.zeros(n * k, dtype=torch.float64)
    chunk = max(1, _CHUNK_ELEMENTS // (n * k * k))
    for lo in range(0, len(counts), chunk):
        assign = _solve_transport(cost, counts[lo:lo + chunk], start, start_counts)
        flat = (torch.arange(n) * k + assign).reshape(-1)
        q.index_add_(0, flat, weights[lo:lo + chunk].repeat_interleave(n))
    return q.reshape(n, k)


def _expected_counts(n, mean):
    """Integer counts summing to n closest to the mean counts (largest remainder)."""
    counts = mean.floor().long()
    remainder = mean - counts
    counts[remainder.argsort(descending=True, stable=True)[: n - int(counts.sum())]] += 1
    return counts


def _assignment_for(cost, counts):
    """One optimal assignment [N] of images to classes for counts [K] (scipy's Hungarian solver)."""
    columns = torch.arange(cost.shape[1]).repeat_interleave(counts)
    rows, cols = linear_sum_assignment(cost[:, columns].numpy())
    assign = torch.empty(cost.shape[0], dtype=torch.long)
    assign[torch.from_numpy(rows)] = columns[torch.from_numpy(cols)]
    return assign


def _solve_transport(cost, counts, start, start_counts):
    """Optimal assignments [S, N] for counts [S, K], from the optimal `start` for `start_counts`.

    Successive shortest paths, one unit of demand per iteration for every unfinished count vector.
    """
    s, (n, k) = counts.shape[0], cost.shape
    assign = start.expand(s, n).clone()
    held = start_counts.expand(s, k).clone()
    while True:
        excess = held - counts
        todo = (excess != 0).any(1).nonzero().squeeze(1)
        if todo.numel() == 0:
            return assign
        current = assign[todo]
        # reroute[t, i, y]: cost change of moving image i from its class to class y
        reroute = cost - cost.gather(1, current.T).T.unsqueeze(-1)
        edge = torch.full((len(todo), k, k), math.inf, dtype=torch.float64)
        edge.scatter_reduce_(1, current.unsqueeze(-1).expand(-1, -1, k), reroute, "amin")
        edge.diagonal(dim1=1, dim2=2).zero_()
        dist, next_hop = _shortest_paths(edge)
        surplus, deficit = excess[todo] > 0, excess[todo] < 0
        dist = dist.masked_fill(~(surplus[:, :, None] & deficit[:, None, :]), math.inf)
        best = dist.flatten(1).argmin(1)
        node, sink = best // k, best % k
        rows = torch.arange(len(todo))
        moved = current.clone()
        for _ in range(k - 1):
            going = node != sink
            if not going.any():
                break
            hop = next_hop[rows, node, sink]
            # the cheapest image of `node` (as it was before this path) moves to `hop`
            gain = reroute.gather(2, hop[:, None, None].expand(-1, n, 1)).squeeze(2)
            image = gain.masked_fill(current != node[:, None], math.inf).argmin(1)
            moved[rows[going], image[going]] = hop[going]
            node = torch.where(going, hop, node)
        if (node != sink).any():
            raise RuntimeError("expected_ot_targets: a shortest path did not reach its class (internal error)")
        assign[todo] = moved
        held[todo] = _class_counts(moved, k)


def _class_counts(classes, k):
    """[S, N] class indices -> [S, K] counts."""
    return torch.zeros(classes.shape[0], k, dtype=torch.long).scatter_add_(1, classes, torch.ones_like(classes))


def _shortest_paths(edge):
    """Batched Floyd-Warshall on [S, K, K] edge costs: distances and next hops [S, K, K]."""
    dist = edge.clone()
    k = edge.shape[-1]
    next_hop = torch.arange(k).expand_as(edge).clone()
    for via in range(k):
        through = dist[:, :, via, None] + dist[:, None, via, :]
        better = through < dist - _TIE_TOL
        dist = torch.where(better, through, dist)
        next_hop = torch.where(better, next_hop[:, :, via, None].expand(-1, -1, k), next_hop)
    return dist, next_hop
