"""fastfair.memory_budget: the saved-tensor count is exact, G is what one more kept step makes the engine hold, the
budget arithmetic, and sampler.memory_budget_gb's choice reaching fastfair.dft.sample."""
import contextlib

import pytest
import torch

from fastfair.dft import sample
from fastfair.memory_budget import (GIB, MemoryBudget, attention_bytes_per_step, attention_keep_costs,
                                    graph_bytes_per_step, keep_graph_steps_for_budget, keeps_for_budget,
                                    saved_tensor_bytes)
from fastfair.testing import tiny_scheduler, tiny_unet

SCHED = tiny_scheduler()
F64 = 8  # bytes per float64 element


def test_saved_bytes_of_a_hand_listed_graph():
    torch.manual_seed(0)
    lin1, lin2 = torch.nn.Linear(4, 8).double(), torch.nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)

    def forward():
        h = torch.tanh(lin1(x))   # lin1 saves x (for its weight's grad); tanh saves its result h [5, 8]
        a, b = h.chunk(2, dim=1)  # mul saves a and b: two views of h's storage, counted once
        return lin2(a * b)        # lin2 saves a * b [5, 4] and its weight (a parameter: held); output y [5, 3]

    weights = [*lin1.parameters(), *lin2.parameters()]
    by_hand = (5 * 4 + 5 * 8 + 5 * 4 + 5 * 3) * F64
    assert saved_tensor_bytes(forward, held=weights) == by_hand
    assert saved_tensor_bytes(forward) == by_hand + 4 * 3 * F64  # lin2.weight when it is not declared held


def _problem(train: str, dtype=torch.float32):
    unet = tiny_unet(dtype=dtype).requires_grad_(train == "unet")
    g = torch.Generator().manual_seed(0)
    z_T = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)
    cond = torch.randn(2, 5, 16, generator=g, dtype=dtype).requires_grad_(train == "cond")
    uncond = torch.randn(1, 5, 16, generator=g, dtype=dtype)
    return unet, z_T, cond, uncond


@pytest.mark.parametrize("train,autocast,frozen_rows,stale_casts", [
    ("unet", None, 0, False), ("unet", torch.bfloat16, 0, False), ("unet", torch.bfloat16, 0, True),
    ("cond", None, 0, False), ("unet", None, 1, False), ("cond", None, 1, False)])
def test_step_bytes_equal_what_one_more_kept_step_holds_in_the_engine(train, autocast, frozen_rows, stale_casts,
                                                                     monkeypatch):
    if stale_casts:  # as on a torch whose autocast cache serves no-grad casts: the engine turns the cache off
        monkeypatch.setattr("fastfair.autocast_cache.caches_no_grad_casts", lambda: True)
    unet, z_T, cond, uncond = _problem(train)
    region = (lambda: torch.autocast("cpu", dtype=autocast)) if autocast else contextlib.nullcontext

    def engine_holds(keep):  # the engine's forward keeping `keep` graphs; autocast's weight casts counted once
        with region():
            return saved_tensor_bytes(lambda: sample(unet, SCHED, z_T, cond, uncond, num_steps=3, guidance_scale=3.0,
                                                     keep_graph_steps=keep, frozen_rows=frozen_rows),
                                      held=[*unet.parameters(), cond, uncond])

    # the kept eps (not saved by the graph): the differentiated rows only; with a frozen U-Net and uncond nothing
    # trainable feeds the uncond branch, so its rows run without a graph
    graph_branches = 2 if train == "unet" else 1
    kept_eps = graph_branches * z_T[frozen_rows:].numel() * (autocast or torch.float32).itemsize
    with region():
        measured = graph_bytes_per_step(unet, z_T, 500, cond, uncond, 3.0, frozen_rows=frozen_rows)
    assert measured == engine_holds(2) - engine_holds(1) + kept_eps
    assert measured > kept_eps
    if frozen_rows or train == "cond":  # the rows left out of the graph make it smaller than the whole call's
        with region():
            whole = graph_bytes_per_step(unet, z_T, 500, cond, uncond.detach().requires_grad_(), 3.0)
        assert measured < 0.75 * whole


def test_keep_graph_steps_for_budget():
    assert keep_graph_steps_for_budget(99, 100, 20) == 0  # below one step
    assert keep_graph_steps_for_budget(300, 100, 20) == 3
    assert keep_graph_steps_for_budget(350, 100, 20, reserved_bytes=100) == 2
    assert keep_graph_steps_for_budget(10 ** 15, 100, 20) == 20
    assert keep_graph_steps_for_budget(50, 100, 20, reserved_bytes=80) == 0  # the lean run is over budget already
    assert keep_graph_steps_for_budget(1, 0, 20) == 20  # nothing saved per step: every step fits
    assert keep_graph_steps_for_budget(250.5, 100, 20) == 2


def test_keeps_for_budget_attention_first_then_whole_graphs():
    """An attention share r above G_att / G: attention keeps save more per byte than whole graphs."""
    G, A = 100, 10
    plan = lambda budget, **kw: keeps_for_budget(budget, G, A, 20, attention_share=0.3, **kw)  # noqa: E731
    assert plan(35) == (0, 3)  # not every step's attention fits
    assert plan(200) == (0, 20)  # every step's attention, nothing left to upgrade with
    assert plan(200 + 2 * 90 + 89) == (2, 18)  # then upgrades at G - A each
    assert plan(10 ** 9) == (20, 0)
    assert keeps_for_budget(35, G, None, 20) == (0, 0) and keeps_for_budget(250, G, None, 20) == (2, 0)
    assert keeps_for_budget(250, G, G, 20, attention_share=0.3) == (2, 0)  # attention keeps as large as graphs
    assert keeps_for_budget(250, G, A, 20, attention_share=0) == (2, 0)  # attention saves nothing
    # from a plan already in place: more attention keeps for the steps not kept, then upgrades
    assert plan(25, start=(1, 3)) == (1, 5)
    assert plan(160 + 90, start=(1, 3)) == (2, 18)
    with pytest.raises(ValueError, match="start"):
        keeps_for_budget(10, G, A, 4, start=(3, 2), attention_share=0.3)
    with pytest.raises(ValueError, match="attention_bytes"):
        keeps_for_budget(10, G, -1, 4, attention_share=0.3)
    for share in (None, -0.1, 1.5, True, "0.3"):
        with pytest.raises(ValueError, match="attention_share"):
            keeps_for_budget(10, G, A, 4, attention_share=share)
    with pytest.raises(ValueError, match="available_bytes"):
        plan(-1.0)


def test_keeps_for_budget_whole_graphs_first_when_attention_is_a_small_share():
    """r below G_att / G (small latents: SD 1.5 at 16x16 has r = 1.5%, G_att / G = 8%): whole graphs first,
    attention keeps with what is left, and an attention keep in place is upgraded before a new graph is kept."""
    G, A = 100, 10
    plan = lambda budget, **kw: keeps_for_budget(budget, G, A, 20, attention_share=0.05, **kw)  # noqa: E731
    assert plan(35) == (0, 3)  # no graph fits: the attention keeps still save something
    assert plan(250) == (2, 5)  # two graphs, the rest in attention keeps
    assert plan(10 ** 9) == (20, 0)
    assert plan(95, start=(0, 5)) == (1, 4)  # upgrade (90 for 0.95) rather than a new graph (100 for 1)
    assert plan(1990) == (19, 1)  # 19 graphs; the last step keeps its attention, and 80 left upgrade nothing


@pytest.mark.parametrize("seed", range(40))
def test_keeps_for_budget_is_within_one_recompute_of_the_best_plan(seed):
    """Against every (k, a) by brute force: the plan fits, and saves at most one step recompute less than the
    best (the greedy's integrality gap)."""
    rng = torch.Generator().manual_seed(seed)
    steps = int(torch.randint(1, 12, (1,), generator=rng))
    G = int(torch.randint(20, 200, (1,), generator=rng))
    A = int(torch.randint(0, G, (1,), generator=rng))
    share = float(torch.rand(1, generator=rng))
    budget = float(torch.rand(1, generator=rng)) * 1.2 * steps * G
    k, a = keeps_for_budget(budget, G, A, steps, attention_share=share)
    assert k + a <= steps and k * G + a * A <= budget
    best = max(kk + aa * share for kk in range(steps + 1) for aa in range(steps + 1 - kk)
               if kk * G + aa * A <= budget)
    assert k + a * share >= best - 1 - 1e-9


def test_attention_share_matches_a_count_by_hand_of_the_attention_layers():
    """r from the fused kernels' q, k, v shapes and FlopCounterMode's count of the rest, against a second count:
    the whole call with attention in its math form (FlopCounterMode sees its matmuls) and the attention layers'
    FLOPs from their inputs' shapes (2 B Lq Lk (inner_q + inner_v)), counted by forward hooks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from fastfair.dft import _embeddings, _unet_eps, sampling_call_inputs

    unet, z_T, cond, uncond = _problem("unet")
    attention_bytes, share = attention_keep_costs(unet, z_T, 0, cond, uncond, 3.0)
    assert attention_bytes == attention_bytes_per_step(unet, z_T, 0, cond, uncond, 3.0)
    by_hand = []

    def count(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        keys = (hidden if context is None else context).shape[1]
        by_hand.append(2 * hidden.shape[0] * hidden.shape[1] * keys
                       * (module.to_q.out_features + module.to_v.out_features))

    hooks = [m.register_forward_pre_hook(count, with_kwargs=True) for m in unet.modules()
             if type(m).__name__ == "Attention"]
    x, t = sampling_call_inputs(z_T, 0, 2, torch.float32)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _unet_eps(unet, x, t, _embeddings(cond.detach(), uncond, z_T.shape[0], 2))
    for hook in hooks:
        hook.remove()
    assert len(by_hand) > 0
    assert share == pytest.approx(sum(by_hand) / counter.get_total_flops(), rel=1e-12)
    assert 0 < share < 1


@pytest.mark.parametrize("kwargs,name", [
    (dict(budget_bytes=-1), "budget_bytes"), (dict(budget_bytes=float("nan")), "budget_bytes"),
    (dict(budget_bytes="1GB"), "budget_bytes"), (dict(per_step_bytes=1.5), "per_step_bytes"),
    (dict(per_step_bytes=-1), "per_step_bytes"), (dict(num_steps=True), "num_steps"),
    (dict(reserved_bytes=-5), "reserved_bytes"),
])
def test_keep_graph_steps_for_budget_rejects_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        keep_graph_steps_for_budget(**{**dict(budget_bytes=100, per_step_bytes=10, num_steps=4), **kwargs})


@pytest.mark.parametrize("budget", [0, -1.0, "2", True, float("inf")])
def test_memory_budget_rejects_bad_budget(budget):
    with pytest.raises(ValueError, match="memory_budget_gb"):
        MemoryBudget(budget)


def test_budget_of_two_and_a_half_steps_keeps_two_graphs_and_the_gradient_is_unchanged():
    """4 steps, a budget of 2.5 G: every step keeps its attention (4 G_att), and what is left upgrades two of them
    to whole graphs; only the two attention-only steps run the U-Net again in the backward."""
    unet, z_T, cond, uncond = _problem("unet", torch.float64)
    cond.requires_grad_()
    per_step = graph_bytes_per_step(unet, z_T, 0, cond, uncond, 3.0)
    per_attention, share = attention_keep_costs(unet, z_T, 0, cond, uncond, 3.0)
    assert 0 < per_attention < per_step / 4
    assert share > per_attention / per_step  # attention keeps save more per byte than whole graphs here
    budget = MemoryBudget(2.5 * per_step / GIB)
    calls = []
    unet.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    keep = budget.keeps(unet, z_T, cond, uncond, 4, 3.0)
    assert keep == (2, 2)
    calls.clear()
    assert budget.keeps(unet, z_T, cond, uncond, 4, 3.0) == (2, 2) and not calls  # cached: no U-Net call
    # a plan is made for the steps gradients pass through: 2 of 4 fit whole (it reused the 4-step plan); the
    # plan for all four is still there
    assert budget.keeps(unet, z_T, cond, uncond, 4, 3.0, grad_steps=2) == (2, 0)
    assert budget.keeps(unet, z_T, cond, uncond, 4, 3.0) == (2, 2)
    legacy = MemoryBudget(2.5 * per_step / GIB)  # a state saved when plans were keyed by shapes and step count
    legacy.load_state_dict({**budget.state_dict(), "plans": {key[:2]: (1, 1) for key in budget.state_dict()["plans"]}})
    assert legacy.keeps(unet, z_T, cond, uncond, 4, 3.0, grad_steps=2) == (1, 1)  # restored, not planned anew
    # memory the run holds later (the optimizer's state) comes off the budget: 1.5 G left keeps one graph less
    assert MemoryBudget(2.5 * per_step / GIB).keeps(unet, z_T, cond, uncond, 4, 3.0, pending_bytes=per_step) == (1, 3)
    with pytest.raises(ValueError, match="pending_bytes=-1"):
        MemoryBudget(1.0).keeps(unet, z_T, cond, uncond, 4, 3.0, pending_bytes=-1)

    def grads(keeps):
        z0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=4, guidance_scale=3.0, keep_graph_steps=keeps[0],
                    keep_attention_steps=keeps[1])
        calls.clear()
        result = torch.autograd.grad((z0 ** 2).sum(), [cond, *unet.parameters()])
        return result, len(calls)

    (kept, recomputed_kept), (lean, recomputed_lean) = grads(keep), grads((0, 0))
    assert (recomputed_kept, recomputed_lean) == (2, 4)  # whole kept graphs are not recomputed
    for a, b in zip(kept, lean):  # attention-kept steps: equal to rounding (fastfair.keep_attention)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_budget_edges_start_at_every_step_equal_shares_and_a_whole_attention_share():
    """A budget equal to the reserved bytes still fits steps that hold nothing; a plan that already keeps every
    step is a valid start (it can only upgrade); attention keeps as large as graphs give whole graphs even at
    r = 1; and at r = 1 an upgrade saves nothing, so no byte is spent on one."""
    assert keep_graph_steps_for_budget(100, 0, 20, reserved_bytes=100) == 20
    assert keep_graph_steps_for_budget(0, 0, 20) == 20
    G, A = 100, 10
    assert keeps_for_budget(10 ** 9, G, A, 4, start=(2, 2), attention_share=0.3) == (4, 0)
    assert keeps_for_budget(0, G, A, 4, start=(4, 0), attention_share=0.3) == (4, 0)
    assert keeps_for_budget(250, G, G, 20, attention_share=1.0) == (2, 0)
    assert keeps_for_budget(10 ** 9, G, A, 4, attention_share=1.0) == (0, 4)


def test_step_bytes_leave_out_the_text_embeddings_without_cfg():
    """No CFG (guidance 1): the U-Net reads cond itself (a view of its storage), which its cross-attention
    projections save for their weights' gradients; the embeddings exist anyway and are not a step's memory."""
    unet, z_T, cond, _ = _problem("unet")
    held = [*unet.parameters(), cond]

    def engine_holds(keep):
        return saved_tensor_bytes(lambda: sample(unet, SCHED, z_T, cond, None, num_steps=2, guidance_scale=1.0,
                                                 keep_graph_steps=keep), held=held)

    measured = graph_bytes_per_step(unet, z_T, 500, cond, None, 1.0)
    assert measured == engine_holds(2) - engine_holds(1) + z_T.numel() * 4  # + the kept eps (float32)


def test_step_bytes_refuse_a_frozen_row_count_that_leaves_no_image():
    unet, z_T, cond, uncond = _problem("unet")
    for frozen_rows in (2, -1, 1.0):
        for measure in (graph_bytes_per_step, attention_keep_costs):
            with pytest.raises(ValueError, match=rf"frozen_rows={frozen_rows!r}: expected an integer in \[0, batch=2"):
                measure(unet, z_T, 0, cond, uncond, 3.0, frozen_rows=frozen_rows)


def test_reserved_now_is_the_memory_allocated_on_a_cuda_device_only(monkeypatch):
    from fastfair.memory_budget import reserved_now

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 12345)
    assert reserved_now(torch.device("cuda", 0)) == 12345
    assert reserved_now(torch.device("cpu")) == 0


def test_a_plan_counts_allocated_memory_and_is_made_per_frozen_rows_steps_and_lean_setting(monkeypatch):
    """R includes what reserved_now sees (CUDA's allocated memory), a budget already spent keeps nothing (not an
    error), grad_steps above the step count plan only the steps there are, plans for other frozen_rows are made
    anew, and the lean_graph setting is the one G is measured with."""
    unet, z_T, cond, uncond = _problem("unet", torch.float64)
    per_step = graph_bytes_per_step(unet, z_T, 0, cond, uncond, 3.0)
    gb = 2.5 * per_step / GIB
    assert MemoryBudget(gb).keeps(unet, z_T, cond, uncond, 4, 3.0) == (2, 2)
    assert MemoryBudget(1.0).keeps(unet, z_T, cond, uncond, 4, 3.0, grad_steps=10) == (4, 0)
    budget = MemoryBudget(gb)
    budget.keeps(unet, z_T, cond, uncond, 4, 3.0)
    frozen = MemoryBudget(gb).keeps(unet, z_T, cond, uncond, 4, 3.0, frozen_rows=1)
    assert frozen != (2, 2) and budget.keeps(unet, z_T, cond, uncond, 4, 3.0, frozen_rows=1) == frozen
    assert MemoryBudget(gb).keeps(unet, z_T, cond, uncond, 4, 3.0, pending_bytes=10 * per_step) == (0, 0)
    # lean_graph off holds more per kept step: 4 G of the lean G upgrades only three attention keeps
    assert graph_bytes_per_step(unet, z_T, 0, cond, uncond, 3.0, lean=False) > per_step
    assert MemoryBudget(4 * per_step / GIB).keeps(unet, z_T, cond, uncond, 4, 3.0) == (4, 0)
    assert MemoryBudget(4 * per_step / GIB, lean=False).keeps(unet, z_T, cond, uncond, 4, 3.0) == (3, 1)
    monkeypatch.setattr("fastfair.memory_budget.reserved_now", lambda device: per_step)
    assert MemoryBudget(gb).keeps(unet, z_T, cond, uncond, 4, 3.0) == (1, 3)  # as with pending_bytes=per_step
    assert MemoryBudget(gb).keeps(unet, z_T, cond, uncond, 4, 3.0, pending_bytes=per_step) == (0, 4)
