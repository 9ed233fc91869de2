"""fastfair.keep_attention and sample(keep_attention_steps=...): the sampling call records the attention kernels'
outputs at the differentiated rows, the backward's recompute replays them instead of running those kernels, the
trajectory is the lean run's bit for bit and the gradient equals it to rounding."""
import itertools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastfair.dft import sample
from fastfair.keep_attention import (ATTENTION_OPS, AttentionRecorder, AttentionReplay, _log_sumexp_argument,
                                     in_attention_layers)
from fastfair.memory_budget import GIB, MemoryBudget, attention_bytes_per_step, graph_bytes_per_step
from fastfair.reference import reference_sample

sys.path.insert(0, str(Path(__file__).parent))
from test_dft import SCHED, grads_of, make_problem, max_rel  # noqa: E402


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    def attention_kernels(self):
        return sum(func in ATTENTION_OPS for func in self.ops)


@pytest.mark.parametrize("kw,lora,cfg", list(itertools.product(
    [dict(keep_attention_steps=3), dict(keep_graph_steps=1, keep_attention_steps=2),
     dict(keep_attention_steps=5, recompute_chunk=2), dict(keep_attention_steps=2, recompute_chunk=3),
     dict(keep_attention_steps=2, lean_graph=False), dict(keep_attention_steps=3, recompute_images=1),
     dict(keep_graph_steps=1, keep_attention_steps=2, recompute_chunk=2, recompute_images=1)],
    [False, True], [True, False])))
def test_gradient_equals_the_lean_run_and_the_reference(kw, lora, cfg):
    problem = make_problem(lora=lora, diffusers=True)
    z_lean, g_lean = grads_of(sample, problem, cfg, num_steps=5)
    z_kept, g_kept = grads_of(sample, problem, cfg, num_steps=5, **kw)
    if "keep_graph_steps" not in kw:  # the sampling calls are the lean run's
        assert torch.equal(z_kept, z_lean)
    assert max_rel(g_kept, g_lean) <= 1e-12
    _, g_ref = grads_of(reference_sample, problem, cfg, num_steps=5)
    assert max_rel(g_kept, g_ref) <= 1e-8


@pytest.mark.parametrize("frozen_rows,train", [(1, "text"), (0, "text"), (1, "unet")])
def test_frozen_rows_and_text_only_training(frozen_rows, train):
    """Only the differentiated rows are recorded: frozen images and an uncond branch nothing trainable feeds are
    left out, in the batched call's layout; a recompute image by image replays each image's rows."""
    unet, _, z_T, cond, uncond, _ = make_problem(diffusers=True, batch=3,
                                                 train_names=() if train == "text" else ("to_k",))
    inputs = [cond, uncond] + [p for p in unet.parameters() if p.requires_grad]
    grads = {}
    for name, kw in (("lean", {}), ("attention", dict(keep_attention_steps=3)),
                     ("per image", dict(keep_attention_steps=3, recompute_images=1))):
        z0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=3, frozen_rows=frozen_rows, **kw)
        grads[name] = torch.autograd.grad(z0.sin().sum(), inputs)
    assert max_rel(grads["attention"], grads["lean"]) <= 1e-12
    assert max_rel(grads["per image"], grads["lean"]) <= 1e-12


def test_backward_runs_no_attention_kernel_for_attention_kept_steps():
    problem = make_problem(lora=True)
    unet, train, z_T, cond, uncond, _ = problem
    counts = {}
    for name, keep, images in (("lean", 0, None), ("half", 2, None), ("all", 4, None), ("all, per image", 4, 1)):
        z0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=4, keep_attention_steps=keep, recompute_images=images)
        with OpCounter() as backward:
            torch.autograd.grad(z0.sum(), [cond, *train])
        counts[name] = backward.attention_kernels()
    assert counts["lean"] > 0 and counts["all"] == 0 and counts["half"] == counts["lean"] // 2
    assert counts["all, per image"] == 0


def test_recorder_holds_the_outputs_at_the_rows_and_replay_joins_them():
    """A hand-sized case: one attention call on a batch of 4, rows [1, 3] recorded; replay of two recordings hands
    the kernel's outputs at those rows, joined along the batch, instead of running it."""
    torch.manual_seed(0)
    q = torch.randn(4, 2, 5, 3)

    def attend(x):
        return F.scaled_dot_product_attention(x, x, x)

    with OpCounter() as ops:
        attend(q)
    (kernel,) = [func for func in ops.ops if func in ATTENTION_OPS]
    direct = kernel(q, q, q)[:2]  # output, log-sum-exp
    first, second = AttentionRecorder([1, 3], batch=4), AttentionRecorder([0], batch=4)
    for recorder in (first, second):
        with recorder:
            attend(q)
    assert len(first.calls) == 1
    assert first.nbytes() == sum(t[[1, 3]].numel() * t.element_size() for t in direct)
    with OpCounter() as ops, AttentionReplay([first, second]):
        replayed = attend(torch.zeros(3, 2, 5, 3))  # the inputs are ignored: the recorded outputs come back
    assert torch.equal(replayed, direct[0][[1, 3, 0]])
    with pytest.raises(RuntimeError, match="batch of 2, the U-Net call's is 4"):
        with AttentionRecorder([0], batch=4):
            attend(q[:2])
    with pytest.raises(RuntimeError, match="more attention kernels"):
        with AttentionReplay([first]):
            attend(torch.zeros(2, 2, 5, 3))
            attend(torch.zeros(2, 2, 5, 3))


@pytest.mark.parametrize("name", ["_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"])
def test_kernels_that_skip_the_log_sum_exp_without_grad_record_it(name):
    """CUDA's SDPA asks the efficient and cuDNN kernels for the log-sum-exp only when grad is enabled: the no-grad
    sampling call would record an empty one for the recompute's attention backward. The recorder asks for it (shapes
    on the meta device, which runs these CUDA kernels' shape functions on CPU)."""
    kernel = getattr(torch.ops.aten, name).default
    if _log_sumexp_argument(kernel) is None:  # torch 2.4's cuDNN kernel: no such flag, nothing to ask for
        pytest.skip(f"{name} takes no compute_log_sumexp in torch {torch.__version__}")
    q = torch.empty(3, 2, 10, 8, device="meta", dtype=torch.float16)
    try:
        skipped = kernel(q, q, q, None, False)
    except NotImplementedError:  # torch 2.4 has no meta kernel for the efficient attention
        pytest.skip(f"torch {torch.__version__} has no meta kernel for {name}: its shapes need CUDA")
    assert skipped[1].numel() == 0 or name.endswith("cudnn_attention")  # what SDPA gets
    recorder = AttentionRecorder([0, 2], batch=3)
    with recorder:
        out = kernel(q, q, q, None, False)
    (call,) = recorder.calls
    expected = kernel(q, q, q, None, True)
    assert call[1].shape == (2, *expected[1].shape[1:]) and call[1].numel() > 0
    assert out[0].shape == expected[0].shape
    # a recompute whose SDPA picked another kernel (grad enabled changes the choice on some GPUs): that kernel's
    # outputs have another layout, so it runs for real instead of getting the recorded ones
    q = torch.randn(2, 2, 10, 8)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    with pytest.warns(UserWarning, match="recompute's attention kernel .* is not the sampling call's"):
        with AttentionReplay([recorder]):
            replayed = flash(q, q, q)
    assert all(torch.equal(a, b) for a, b in zip(replayed, flash(q, q, q)))


def test_recorded_rows_keep_the_kernels_memory_layout():
    from fastfair.keep_attention import _join_rows, _select_rows

    stored = torch.randn(4, 100, 8, 40)  # [B, L, H, d] in memory, handed out as [B, H, L, d]
    handed = stored.transpose(1, 2)
    picked = _select_rows(handed, torch.tensor([3, 1]))
    assert torch.equal(picked, handed[[3, 1]])
    assert sorted(range(4), key=lambda d: -picked.stride(d)) == [0, 2, 1, 3]
    assert picked.is_contiguous() is False and picked.transpose(1, 2).is_contiguous()
    joined = _join_rows([picked, _select_rows(handed, torch.tensor([0]))])
    assert torch.equal(joined, handed[[3, 1, 0]]) and joined.transpose(1, 2).is_contiguous()


def test_the_mode_is_active_inside_the_attention_layers_only():
    unet, _, z_T, cond, uncond, _ = make_problem(diffusers=True)
    x, t, emb = torch.cat([z_T, z_T]), torch.full((4,), 500), torch.cat([uncond.expand(2, -1, -1), cond])
    with torch.no_grad():
        with OpCounter() as everything:
            unet(x, t, encoder_hidden_states=emb)
        scoped, unscoped = OpCounter(), OpCounter()
        with in_attention_layers(scoped, unet):
            unet(x, t, encoder_hidden_states=emb)
        with in_attention_layers(unscoped, None):
            unet(x, t, encoder_hidden_states=emb)
    assert len(unscoped.ops) == len(everything.ops)
    assert 0 < len(scoped.ops) < len(everything.ops) / 2
    assert scoped.attention_kernels() == everything.attention_kernels() > 0
    assert not any("forward" in m.__dict__ for m in unet.modules())  # the layers got their forward back


def test_attention_keeps_hold_a_fraction_of_a_graph():
    unet, _, z_T, cond, uncond, _ = make_problem(torch.float32, lora=True)
    whole = graph_bytes_per_step(unet, z_T, 0, cond, uncond, 7.5)
    attention = attention_bytes_per_step(unet, z_T, 0, cond, uncond, 7.5)
    assert 0 < attention < 0.3 * whole


def test_no_fused_attention_kernel_means_no_attention_keeps():
    """Classic attention (explicit matmuls) runs no fused kernel: G_att is None and the budget keeps whole graphs."""
    from diffusers.models.attention_processor import AttnProcessor

    unet, _, z_T, cond, uncond, _ = make_problem(torch.float32, lora=True)
    unet.set_attn_processor(AttnProcessor())
    assert attention_bytes_per_step(unet, z_T, 0, cond, uncond, 7.5) is None
    per_step = graph_bytes_per_step(unet, z_T, 0, cond, uncond, 7.5)
    assert MemoryBudget(2.5 * per_step / GIB).keeps(unet, z_T, cond, uncond, 4, 7.5) == (2, 0)


def test_input_errors():
    unet, _, z_T, cond, uncond, _ = make_problem(diffusers=True)
    with pytest.raises(ValueError, match="keep_attention_steps"):
        sample(unet, SCHED, z_T, cond, uncond, num_steps=3, keep_attention_steps=-1)


def test_graph_and_attention_keeps_are_disjoint_steps():
    """keep_graph_steps=1 + keep_attention_steps=2 of 4 steps leaves exactly one step whose attention kernels
    run in the backward (a quarter of the lean run's)."""
    unet, train, z_T, cond, uncond, _ = make_problem(lora=True)
    counts = {}
    for name, kw in (("lean", {}), ("mixed", dict(keep_graph_steps=1, keep_attention_steps=2))):
        z0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=4, **kw)
        with OpCounter() as backward:
            torch.autograd.grad(z0.sum(), [cond, *train])
        counts[name] = backward.attention_kernels()
    assert counts["lean"] > 0 and counts["mixed"] == counts["lean"] // 4
