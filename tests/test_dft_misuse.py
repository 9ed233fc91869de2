"""fastfair.dft.sample used as a library: misuses that autograd would catch (or that it should refuse) are
refused; plain networks and numpy integers are taken."""
import numpy as np
import pytest
import torch

from fastfair.dft import sample
from fastfair.testing import TinyCondNet, tiny_scheduler

SCHED = tiny_scheduler()


def _problem(seed=0):
    unet = TinyCondNet().double().requires_grad_(False)
    weight = unet.conv_in.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(seed)
    z_T = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    uncond = torch.randn(1, 5, 16, generator=g, dtype=torch.float64)
    return unet, weight, z_T, cond, uncond


def _loss(z0):
    return (z0 ** 2).sum() + z0.sin().sum()


def test_a_dropout_in_training_mode_inside_an_eval_unet_is_refused():
    """An adapter added after unet.eval() (peft's LoRA dropout) is in training mode: the recompute would draw
    other masks than the forward (the check looked at the top-level module only)."""
    unet, _, z_T, cond, uncond = _problem()
    unet.eval()
    unet.drop = torch.nn.Dropout(0.5)  # in training mode, as a module added after eval() is
    with pytest.raises(ValueError, match="dropout drop .*is active"):
        sample(unet, SCHED, z_T, cond, uncond, num_steps=2)
    unet.drop.eval()
    sample(unet, SCHED, z_T, cond, uncond, num_steps=2)


def test_a_backward_inside_autocast_recomputes_as_the_forward_sampled():
    """Sampled without autocast, backpropagated inside the caller's bf16 autocast: the recompute must stay in the
    forward's precision (it ran under the caller's bf16: a 7 % different gradient, or a crash with attention
    keeps)."""
    unet, weight, z_T, cond, uncond = _problem()
    unet.float()
    z_T = z_T.float()
    cond, uncond = cond.float(), uncond.float()
    grads = []
    for inside in (False, True):
        z0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            grads.append(torch.autograd.grad(_loss(z0), [weight])[0])
    assert torch.equal(grads[0], grads[1])


def test_weights_changed_in_place_before_the_backward_are_refused():
    unet, weight, z_T, cond, uncond = _problem()
    z0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=2)
    with torch.no_grad():
        weight.add_(0.1)  # an optimizer step before the backward
    with pytest.raises(RuntimeError, match=r"trainable weight\(s\) .*modified in place after sampling"):
        _loss(z0).backward()


def test_a_weight_frozen_before_the_backward_gets_no_gradient_as_autograd_does():
    """Frozen between sample and backward (a staged unfreeze schedule): plain autograd leaves its .grad None and
    fills the others; the recompute raised autograd's 'does not require grad' without naming the cause."""
    unet, weight, z_T, cond, uncond = _problem()
    other = unet.conv_out.weight.requires_grad_(True)
    grad_other = torch.autograd.grad(_loss(sample(unet, SCHED, z_T, cond, uncond, num_steps=2)), [other])[0]
    z0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=2)
    weight.requires_grad_(False)
    _loss(z0).backward()
    assert weight.grad is None and torch.equal(other.grad, grad_other)


def test_a_double_backward_is_refused_not_zeroed():
    """create_graph=True: the recompute's gradients carry no graph, so second-order terms were silently 0."""
    unet, weight, z_T, cond, uncond = _problem()
    cond.requires_grad_(True)
    z0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=2)
    (grad_cond,) = torch.autograd.grad(_loss(z0), [cond], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        (grad_cond ** 2).sum().backward()


def test_a_network_returning_a_bare_tensor_and_numpy_integers():
    unet, weight, z_T, cond, uncond = _problem()

    class Bare(torch.nn.Module):  # eps as a plain tensor, not an object with .sample
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, t, encoder_hidden_states):
            return self.inner(x, t, encoder_hidden_states=encoder_hidden_states).sample

    options = dict(num_steps=np.int64(3), keep_graph_steps=np.int64(1), grad_steps=np.int64(2),
                   recompute_chunk=np.int64(1), generator=torch.Generator().manual_seed(0))
    plain = torch.autograd.grad(_loss(sample(unet, SCHED, z_T, cond, uncond, **options)), [weight])[0]
    options["generator"] = torch.Generator().manual_seed(0)
    bare = torch.autograd.grad(_loss(sample(Bare(unet), SCHED, z_T, cond, uncond, **options)), [weight])[0]
    assert torch.equal(plain, bare)


def test_an_adjustment_the_schedule_cannot_take_is_refused_before_sampling():
    """prediction_type='sample' with a zero final sigma: z_0 is the last step's prediction alone, so the earlier
    steps' chain weights are 0 and `exact` (C_i = 1/|k_i|) has no value; refused before the first U-Net call (it
    came only at backward, after the whole forward)."""
    unet, _, z_T, cond, uncond = _problem()
    calls = []
    unet.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match="coefficients='exact': a step has chain weight 0"):
        sample(unet, tiny_scheduler(prediction_type="sample"), z_T, cond, uncond, num_steps=3, coefficients="exact")
    assert not calls


class _Additive(torch.nn.Module):
    """eps = tanh(x) / 2 + offset(p1, p2): autograd hands an added parameter the incoming gradient itself, one
    tensor for both operands of p1 + p2, or a broadcast view (p.sum())."""

    def __init__(self, shape, offset):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.p1 = torch.nn.Parameter(0.1 * torch.randn(shape, generator=g, dtype=torch.float64))
        self.p2 = torch.nn.Parameter(0.1 * torch.randn(shape, generator=g, dtype=torch.float64))
        self.offset = offset

    def forward(self, x, t, encoder_hidden_states):
        return torch.tanh(x) / 2 + self.offset(self.p1, self.p2)


@pytest.mark.parametrize("num_steps", [1, 3])
def test_gradients_autograd_shares_between_inputs_are_summed_once(num_steps):
    """The per-step gradients were summed in place into the first step's tensors, which autograd may share
    between inputs or with the upstream gradient: at 3 steps p1's and p2's gradients were off by 67 %, and a
    broadcast one raised. Each must equal that of one parameter holding their sum."""
    _, _, z_T, cond, _ = _problem()
    shape = (2, 4, 8, 8)

    def gradients(offset, params):
        net = _Additive(shape, offset)
        z0 = sample(net, SCHED, z_T, cond, None, num_steps=num_steps, coefficients="exact")
        return torch.autograd.grad(_loss(z0), [getattr(net, p) for p in params])

    g1, g2 = gradients(lambda p1, p2: p1 + p2, ["p1", "p2"])
    alone, = gradients(lambda p1, p2: p1 + p2.detach(), ["p1"])  # the same eps, p2 held fixed
    torch.testing.assert_close(g1, alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g2, alone, rtol=1e-12, atol=1e-12)
    broadcast, = gradients(lambda p1, p2: p1.sum(), ["p1"])
    dense, = gradients(lambda p1, p2: p1.mean() * p1.numel(), ["p1"])
    torch.testing.assert_close(broadcast, dense, rtol=1e-12, atol=1e-12)
