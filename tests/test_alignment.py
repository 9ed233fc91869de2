"""Expected-OT targets against brute force, the alignment loss, and the global-batch helper."""
import itertools
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from fastfair.losses import alignment_loss, expected_ot_targets, global_expected_ot_targets
from fastfair.losses.alignment import (_assignment_for, _average_assignments, _count_vectors,
                                       _solve_transport)

TARGETS = {
    2: [[0.5, 0.5], [0.75, 0.25], [0.1, 0.9]],
    3: [[1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1], [0.2, 0.0, 0.8], [0.0, 1.0, 0.0]],
}


def brute_force_q(probs, target):
    """Eq. 5 literally: every labeling u (with its probability) x every permutation; ties averaged."""
    n, k = probs.shape
    cost = np.linalg.norm(probs[:, None, :] - np.eye(k)[None], axis=-1)
    perms = np.array(list(itertools.permutations(range(n))))
    q = np.zeros((n, k))
    for labels in itertools.product(range(k), repeat=n):
        labels = np.array(labels)
        weight = np.prod(np.asarray(target)[labels])
        if weight == 0:
            continue
        assigned = labels[perms]  # [P, N]: class given to image i by permutation p
        total = cost[np.arange(n), assigned].sum(1)
        best = assigned[total <= total.min() + 1e-12]
        q += weight * np.eye(k)[best].mean(0)
    return q


def random_probs(rng, n, k, duplicate=False):
    probs = rng.dirichlet(np.full(k, 0.7), size=n)
    if duplicate:
        probs[-1] = probs[0]
    return probs


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("n", [1, 4, 6])
def test_exact_matches_brute_force(n, k):
    rng = np.random.default_rng(n * 10 + k)
    for target in TARGETS[k]:
        probs = random_probs(rng, n, k, duplicate=n == 6)
        reference = brute_force_q(probs, target)
        q = expected_ot_targets(torch.tensor(probs), target, method="exact")
        assert q.dtype == torch.float64
        assert np.abs(q.numpy() - reference).max() <= 1e-9
        auto = expected_ot_targets(torch.tensor(probs), target)
        assert np.abs(auto.numpy() - reference).max() <= 1e-9


@pytest.mark.parametrize("k", [2, 3])
def test_monte_carlo_matches_brute_force(k):
    rng = np.random.default_rng(7)
    num_samples = 2000
    for target in TARGETS[k]:
        probs = random_probs(rng, 6, k)
        q = expected_ot_targets(torch.tensor(probs), target, method="monte_carlo",
                                num_samples=num_samples, generator=torch.Generator().manual_seed(0))
        assert np.abs(q.numpy() - brute_force_q(probs, target)).max() <= 3 / math.sqrt(num_samples)


def test_two_class_closed_form_matches_enumeration():
    """K = 2 closed form against the general enumeration + transport solver, for N beyond brute force."""
    rng = np.random.default_rng(3)
    probs = torch.tensor(random_probs(rng, 30, 2))
    target = torch.tensor([0.7, 0.3], dtype=torch.float64)
    closed = expected_ot_targets(probs, target, method="exact")
    cost = (probs[:, None, :] - torch.eye(2, dtype=torch.float64)).norm(dim=-1)
    counts, weights = _count_vectors(30, target, "exact", 1, None)
    enumerated = _average_assignments(cost, counts, weights)
    assert (closed - enumerated).abs().max() <= 1e-9


def test_transport_solver_is_optimal():
    """Every batched successive-shortest-path assignment has the counts asked and the Hungarian cost."""
    rng = np.random.default_rng(1)
    n, k = 40, 5
    probs = torch.tensor(random_probs(rng, n, k))
    cost = (probs[:, None, :] - torch.eye(k, dtype=torch.float64)).norm(dim=-1)
    counts, _ = _count_vectors(n, torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1], dtype=torch.float64),
                               "monte_carlo", 60, torch.Generator().manual_seed(0))
    start_counts = torch.tensor([8, 8, 8, 8, 8])
    assign = _solve_transport(cost, counts, _assignment_for(cost, start_counts), start_counts)
    for s in range(len(counts)):
        assert torch.equal(torch.bincount(assign[s], minlength=k), counts[s])
        columns = torch.arange(k).repeat_interleave(counts[s])
        rows, cols = linear_sum_assignment(cost[:, columns].numpy())
        optimal = cost[:, columns].numpy()[rows, cols].sum()
        assert abs(cost[torch.arange(n), assign[s]].sum().item() - optimal) <= 1e-9


@pytest.mark.parametrize("method", ["exact", "monte_carlo"])
def test_rows_sum_to_one_and_permutation_equivariance(method):
    rng = np.random.default_rng(5)
    probs = torch.tensor(random_probs(rng, 7, 3, duplicate=True))
    target = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)

    def run(p):
        return expected_ot_targets(p, target, method=method, num_samples=500,
                                   generator=torch.Generator().manual_seed(4))

    q = run(probs)
    assert torch.allclose(q.sum(1), torch.ones(7, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q[0], q[-1])  # identical images, identical targets
    perm = torch.from_numpy(rng.permutation(7))
    assert torch.allclose(run(probs[perm]), q[perm], atol=1e-12)


def test_valid_mask_excludes_rows():
    rng = np.random.default_rng(2)
    probs = torch.tensor(random_probs(rng, 6, 3))
    target = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    valid = torch.tensor([True, False, True, True, False, True])
    q = expected_ot_targets(probs, target, valid=valid)
    assert torch.equal(q[~valid], torch.zeros(2, 3, dtype=torch.float64))
    assert torch.allclose(q[valid], expected_ot_targets(probs[valid], target), atol=1e-12)
    # rows without a face may hold fill values: only the included rows must be probabilities
    assert torch.equal(expected_ot_targets(probs.masked_fill(~valid[:, None], -1), target, valid=valid), q)


def test_large_batch_keeps_dtype_and_device_of_probs():
    probs = torch.softmax(torch.randn(256, 8, generator=torch.Generator().manual_seed(0)) * 2, dim=-1)
    probs.requires_grad_(True)
    q = expected_ot_targets(probs, torch.full((8,), 1 / 8), num_samples=64,
                            generator=torch.Generator().manual_seed(0))
    assert q.dtype == torch.float32 and not q.requires_grad
    assert torch.allclose(q.sum(1), torch.ones(256), atol=1e-5)
    # each sampled count vector is met exactly, so the expected counts are the sampled ones: the same draws as
    # expected_ot_targets makes from that generator (its _count_vectors)
    draws = torch.multinomial(torch.full((64, 8), 1 / 8), 256, replacement=True,
                              generator=torch.Generator().manual_seed(0))
    sampled = torch.nn.functional.one_hot(draws, 8).sum(1).double().mean(0)
    torch.testing.assert_close(q.sum(0).double(), sampled, rtol=0, atol=1e-3)


def test_alignment_threshold_is_inclusive():
    """Eq. 6 selects images with c_i >= C: a row whose confidence equals the threshold takes part."""
    logits = torch.tensor([[0.3, -0.2], [1.0, 0.0]])
    q = torch.tensor([[0.75, 0.25], [0.625, 0.375]], dtype=torch.float32)
    per_image = alignment_loss(logits, q, threshold=0.75, reduction="none")
    assert per_image[0] > 0 and per_image[1] == 0
    assert alignment_loss(logits, q, threshold=0.625, reduction="none").gt(0).all()


@pytest.mark.parametrize("q_row", [[0.5, 0.5], [0.4, 0.4, 0.2]])
def test_a_tied_row_has_no_class_to_align_to(q_row):
    """Images scored alike (bf16 rounding made them equal) get q = [0.5, 0.5]: at a threshold <= 1/K argmax sent
    every one of them to class 0, pushing the batch to one class against a uniform target."""
    q = torch.tensor([q_row] * 3 + [[0.9] + [0.1 / (len(q_row) - 1)] * (len(q_row) - 1)])
    logits = torch.zeros_like(q)
    per_image = alignment_loss(logits, q, threshold=0.0, reduction="none")
    assert per_image[:3].eq(0).all() and per_image[3] > 0


def test_target_cells_prefer_the_original_among_tied_maxima():
    """argmax q where the maximum is one class (below the threshold too); a tied row takes the preferred class
    (the original's) where it is among the maxima, else -1; an all-zero row (no face) -1."""
    from fastfair.losses.alignment import target_cells

    q = torch.tensor([[0.2, 0.8, 0.0], [0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.0, 0.0, 0.0],
                      [0.3, 0.3, 0.4]], dtype=torch.float64)
    preferred = torch.tensor([0, 1, 2, -1, 1, 0])
    assert target_cells(q, preferred).tolist() == [1, 1, -1, -1, -1, 2]
    with pytest.raises(ValueError, match=r"q \[N, K\] and preferred \[N\]"):
        target_cells(q, preferred[:3])


@pytest.mark.parametrize("target", [0.5, 0.75])
def test_toy_optimization_reaches_target(target):
    """Free logits of 64 images start 90/10; gradient descent on the DAL alone reaches the target."""
    gen = torch.Generator().manual_seed(0)
    class0 = torch.arange(64) < 58
    logits = torch.where(class0[:, None], torch.tensor([2.0, -2.0]), torch.tensor([-2.0, 2.0]))
    logits = (logits + 0.5 * torch.randn(64, 2, generator=gen)).requires_grad_(True)
    distribution = torch.tensor([target, 1 - target], dtype=torch.float64)
    for _ in range(25):
        q = expected_ot_targets(logits.softmax(-1), distribution)
        (grad,) = torch.autograd.grad(alignment_loss(logits, q, threshold=0.6), logits)
        with torch.no_grad():
            logits -= 20.0 * grad
    frequency = (logits.argmax(-1) == 0).float().mean().item()
    assert abs(frequency - target) <= 0.05


def test_alignment_loss_matches_manual_cross_entropy():
    logits = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    q = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0], [0.1, 0.85, 0.05]],
                     dtype=torch.float64)
    mask = torch.tensor([True, True, True, False])
    loss = alignment_loss(logits, q, threshold=0.8, mask=mask)
    manual = (F.cross_entropy(logits[0:1], torch.tensor([0])) + F.cross_entropy(logits[2:3], torch.tensor([2]))) / 4
    assert torch.allclose(loss, manual)
    per_image = alignment_loss(logits, q, threshold=0.8, mask=mask, reduction="none")
    assert per_image[1] == 0 and per_image[3] == 0 and per_image[0] > 0
    assert torch.allclose(alignment_loss(logits, q, 0.8, mask, reduction="sum"), manual * 4)
    # rows with q = 0 (excluded from the OT) never count, even at threshold 0
    assert alignment_loss(logits, torch.zeros_like(q), threshold=0.0) == 0


def test_left_out_rows_do_not_poison_the_loss():
    """A masked-out or below-threshold row whose argmax-q class has a -inf log-probability (or NaN logits) adds
    nothing: 0 * inf was NaN for the whole batch."""
    logits = torch.tensor([[0.0, -1.0], [-math.inf, 0.0], [math.nan, math.nan]], dtype=torch.float64,
                          requires_grad=True)
    q = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.95, 0.05]], dtype=torch.float64)
    mask = torch.tensor([True, True, False])
    loss = alignment_loss(logits, q, threshold=0.8, mask=mask)  # row 1 below threshold, row 2 masked
    assert torch.allclose(loss, F.cross_entropy(logits[:1], torch.tensor([0])) / 3)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(grad).all() and (grad[1:] == 0).all()


def test_low_precision_and_integer_probabilities():
    """A bfloat16 softmax (rows sum to 1 within ~2^-8) is accepted and gives float32's targets to bfloat16
    rounding; integer one-hot rows are refused (q cast back to them was all zeros)."""
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    target = [0.1, 0.2, 0.3, 0.4]
    q16 = expected_ot_targets(logits.bfloat16().softmax(-1), target, method="exact")
    q32 = expected_ot_targets(logits.bfloat16().float().softmax(-1), target, method="exact")
    assert q16.dtype == torch.bfloat16 and torch.allclose(q16.float(), q32, atol=2e-2)
    with pytest.raises(TypeError, match="probs must be floating point"):
        expected_ot_targets(torch.tensor([[1, 0], [0, 1]]), [0.5, 0.5])


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="hungarian"), "method must be one of"),
    (dict(num_samples=0), "num_samples"),
    (dict(target=[0.5, 0.5]), "target must be a \\[K\\] vector with K = 3"),
    (dict(target=[0.5, 0.6, -0.1]), "target must be a probability vector"),
    (dict(probs=torch.randn(4, 3)), "row of probs must be a probability vector"),
    (dict(probs=torch.rand(4)), "probs must be a \\[N, K\\] tensor"),
    (dict(valid=torch.ones(3, dtype=torch.bool)), "valid must be a \\[N\\] = \\[4\\] bool tensor"),
])
def test_expected_ot_targets_rejects_bad_input(kwargs, message):
    args = {"probs": torch.full((4, 3), 1 / 3), "target": [0.2, 0.3, 0.5], **kwargs}
    with pytest.raises(ValueError, match=message):
        expected_ot_targets(**args)


def test_exact_refuses_huge_enumeration():
    with pytest.raises(ValueError, match="use method='monte_carlo'"):
        expected_ot_targets(torch.full((256, 8), 1 / 8), torch.full((8,), 1 / 8), method="exact")


def test_alignment_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        alignment_loss(torch.randn(4, 3), torch.rand(4, 2), 0.5)
    with pytest.raises(ValueError, match="threshold is a confidence"):
        alignment_loss(torch.randn(4, 3), torch.rand(4, 3), 1.5)
    with pytest.raises(ValueError, match="reduction"):
        alignment_loss(torch.randn(4, 3), torch.rand(4, 3), 0.5, reduction="max")


# --- global batch: two CPU processes (gloo) against the single-process result -------------------

GLOBAL_SIZES = (5, 3)  # ranks hold different numbers of images


def global_batch_inputs():
    gen = torch.Generator().manual_seed(11)
    probs = torch.softmax(torch.randn(sum(GLOBAL_SIZES), 3, generator=gen, dtype=torch.float64), -1)
    valid = torch.tensor([True, True, False, True, True, True, False, True])
    return probs, valid, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def bfloat16_probs():
    """A bfloat16 softmax: rows sum to 1 only within bf16's rounding (here off by more than float64's 1e-3)."""
    probs = torch.softmax(torch.randn(sum(GLOBAL_SIZES), 3, generator=torch.Generator().manual_seed(5)).bfloat16(), -1)
    assert (probs.double().sum(-1) - 1).abs().max() > 1e-3
    return probs


def _global_batch_worker(rank, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        probs, valid, target = global_batch_inputs()
        start = sum(GLOBAL_SIZES[:rank])
        mine = slice(start, start + GLOBAL_SIZES[rank])
        exact = global_expected_ot_targets(probs[mine], target, valid=valid[mine], method="exact")
        sampled = global_expected_ot_targets(probs[mine], target, valid=valid[mine], method="monte_carlo",
                                             num_samples=300, generator=torch.Generator().manual_seed(3))
        half = global_expected_ot_targets(bfloat16_probs()[mine], target, valid=valid[mine], method="exact")
        refused = {}  # inputs one rank alone could refuse: every rank raises (the others waited, forever)
        bad = probs[mine].clone()
        if rank == 1:
            bad[0] = torch.tensor([0.9, 0.9, 0.9])  # not a probability vector, in rank 1's rows only
        many = torch.full((1499 if rank == 0 else 1, 3), 1 / 3, dtype=torch.float64)  # 'exact': too many vectors
        for name, rows in (("rank 1's bad row", bad), ("exact over 1500 images", many)):
            try:
                global_expected_ot_targets(rows, target, method="exact", valid=None if name[0] == "e" else valid[mine])
                refused[name] = "computed"
            except (ValueError, RuntimeError) as error:
                refused[name] = f"{type(error).__name__}: {error}"
        torch.save({"exact": exact, "sampled": sampled, "bf16": half, "refused": refused},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_batch_equals_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_global_batch_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    probs, valid, target = global_batch_inputs()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    exact = torch.cat([r["exact"] for r in results])
    sampled = torch.cat([r["sampled"] for r in results])
    assert torch.allclose(exact, expected_ot_targets(probs, target, method="exact", valid=valid), atol=1e-12)
    reference = expected_ot_targets(probs, target, method="monte_carlo", valid=valid, num_samples=300,
                                    generator=torch.Generator().manual_seed(3))
    assert torch.allclose(sampled, reference, atol=1e-12)
    # bf16 rows are held to bf16's rounding on every rank, as in one process (float64's 1e-3 refused them)
    half = torch.cat([r["bf16"] for r in results])
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, expected_ot_targets(bfloat16_probs(), target, method="exact", valid=valid))
    for rank, result in enumerate(results):
        assert result["refused"]["rank 1's bad row"].startswith("ValueError: expected_ot_targets: each row of probs "
                                                                "must be a probability vector")
        assert result["refused"]["exact over 1500 images"] == (
            "ValueError: expected_ot_targets: method='exact' needs 1127251 count vectors for N=1500, K=3; use "
            "method='monte_carlo' (or 'auto')" if rank == 0 else
            "OtherRankFailed: global_expected_ot_targets: rank 0 could not compute the targets of the global batch, so "
            "no rank goes on (its error is in its output)")
    # and without a process group it is the plain function
    assert torch.equal(global_expected_ot_targets(probs, target, valid=valid, method="exact"),
                       expected_ot_targets(probs, target, valid=valid, method="exact"))
