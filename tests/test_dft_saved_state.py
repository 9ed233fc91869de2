"""What fastfair.dft.sample's backward reads from its forward: the latents it saved, the embeddings it was given,
the schedule of the scheduler's config. A second backward and embeddings changed in place are refused (as autograd
refuses a freed or stale graph) instead of giving silently wrong gradients; a noise buffer refilled in place before
the backward changes nothing; schedulers with array-valued configs sample."""
import numpy as np
import pytest
import torch

from fastfair.dft import sample, schedule_for
from fastfair.reference import reference_sample
from fastfair.testing import TinyCondNet, tiny_scheduler

SCHED = tiny_scheduler()


def problem(dtype=torch.float64):
    torch.manual_seed(0)
    unet = TinyCondNet().to(dtype)
    g = torch.Generator().manual_seed(1)
    z_T = torch.randn(2, 4, 8, 8, generator=g, dtype=dtype)
    cond = torch.randn(2, 5, 16, generator=g, dtype=dtype, requires_grad=True)
    uncond = torch.randn(1, 5, 16, generator=g, dtype=dtype)
    return unet, z_T, cond, uncond


def grads(unet, cond):
    return [p.grad.clone() for p in unet.parameters()] + [cond.grad.clone()]


@pytest.mark.parametrize("keep_graph_steps", [0, 1])
def test_a_second_backward_is_refused_not_silently_zero(keep_graph_steps):
    unet, z_T, cond, uncond = problem()
    z_0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=3, keep_graph_steps=keep_graph_steps)
    first, second = z_0.square().mean(), z_0.mean()
    first.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second backward through the same z_0; .*sum the losses"):
        second.backward()


def test_a_noise_buffer_refilled_in_place_before_the_backward_changes_nothing():
    """Gradient accumulation that redraws one noise buffer (z_T.normal_()) before backward: step 0's latent is the
    forward's, not the new noise (it aliased z_T, and the backward recomputed step 0 at the new noise)."""
    unet, z_T, cond, uncond = problem()
    sample(unet, SCHED, z_T.clone(), cond, uncond, num_steps=3).square().mean().backward()
    expected = grads(unet, cond)
    unet.zero_grad()
    cond.grad = None
    z_0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=3)
    z_T.normal_()
    z_0.square().mean().backward()
    for got, want in zip(grads(unet, cond), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_embeddings_changed_in_place_before_the_backward_are_refused():
    unet, z_T, cond, uncond = problem()
    z_0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=3)
    with torch.no_grad():
        uncond.mul_(2)
    with pytest.raises(RuntimeError, match="uncond was modified in place after sampling"):
        z_0.sum().backward()
    z_0 = sample(unet, SCHED, z_T, cond, uncond, num_steps=3)
    with torch.no_grad():
        cond.add_(1)
    with pytest.raises(RuntimeError, match="cond was modified in place after sampling"):
        z_0.sum().backward()


@pytest.mark.parametrize("as_array", [np.asarray, torch.tensor], ids=["numpy", "torch"])
def test_a_scheduler_with_array_trained_betas_samples_as_with_a_list(as_array):
    """diffusers documents trained_betas as an array: the schedule cache's JSON key printed it as text."""
    from diffusers import DPMSolverMultistepScheduler

    betas = np.linspace(1e-4, 2e-2, 1000)
    listed = DPMSolverMultistepScheduler(trained_betas=betas.tolist())
    arrayed = DPMSolverMultistepScheduler(trained_betas=as_array(betas))
    for field in ("timesteps", "a", "b0", "b1", "cz", "ce"):
        assert np.array_equal(getattr(schedule_for(arrayed, 4), field), getattr(schedule_for(listed, 4), field))
    unet, z_T, cond, uncond = problem()
    with torch.no_grad():
        got = sample(unet, arrayed, z_T, cond, uncond, num_steps=4)
        torch.testing.assert_close(got, reference_sample(unet, listed, z_T, cond, uncond, num_steps=4))
