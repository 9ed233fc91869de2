"""Bad inputs a library user plausibly gives to fastfair.dft.sample, fastfair.schedule.solver_schedule, the targets
and the alignment loss: each is refused early, naming the argument (instead of a wrong result or a deep crash)."""
import numpy as np
import pytest
import torch

from fastfair.dft import sample
from fastfair.losses import alignment_loss, expected_ot_targets
from fastfair.schedule import solver_schedule
from fastfair.targets import load_targets
from fastfair.testing import SD15_SCHEDULER, TinyCondNet, tiny_scheduler

SCHED = tiny_scheduler()


def problem(batch=2):
    g = torch.Generator().manual_seed(0)
    z_T = torch.randn(batch, 4, 8, 8, generator=g)
    cond = torch.randn(batch, 5, 16, generator=g)
    uncond = torch.randn(1, 5, 16, generator=g)
    return TinyCondNet(), z_T, cond, uncond


def run(scheduler=SCHED, grad=False, **kwargs):
    unet, z_T, cond, uncond = problem()
    args = dict(z_T=z_T, cond=cond, uncond=uncond, num_steps=3)
    args.update(kwargs)
    with torch.set_grad_enabled(grad):
        return sample(unet, scheduler, args.pop("z_T"), args.pop("cond"), args.pop("uncond"), **args)


# --- the scheduler ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "LMSDiscreteScheduler",
                                  "DPMSolverSinglestepScheduler", "EulerAncestralDiscreteScheduler"])
def test_other_scheduler_classes_are_refused_not_sampled_as_dpm_solver(name):
    """A directly constructed scheduler's config has no _class_name, and most hold only keys DPM-Solver++ also
    takes: the class must decide, or fastfair samples with DPM-Solver++ while the user asked for e.g. DDIM."""
    import diffusers

    cls = getattr(diffusers, name)
    keys = {"beta_start", "beta_end", "beta_schedule", "num_train_timesteps"}
    scheduler = cls(**{k: v for k, v in SD15_SCHEDULER.items() if k in keys})
    with pytest.raises(ValueError, match=f"scheduler: {name} is not supported"):
        run(scheduler)
    with pytest.raises(ValueError, match=f"scheduler: {name} is not supported"):
        solver_schedule(scheduler, 10)


@pytest.mark.parametrize("scheduler", [None, "dpmsolver++"])
def test_scheduler_of_the_wrong_type_names_the_argument(scheduler):
    with pytest.raises(TypeError, match="scheduler: expected a diffusers DPMSolverMultistepScheduler"):
        run(scheduler)


def test_a_dpm_scheduler_and_its_config_are_still_accepted():
    a = run(SCHED)
    b = run(dict(SCHED.config))
    c = run(SCHED, num_steps=np.int64(3))
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("steps", [1000, 1001, 5000])
def test_step_counts_whose_noise_levels_repeat_are_refused(steps):
    """At num_steps >= num_train_timesteps the timesteps repeat and the solver's coefficients are not finite
    (diffusers' own sampler returns NaN): refused, naming num_steps, instead of NaN latents."""
    with pytest.raises(ValueError, match=f"num_steps={steps}: the scheduler's noise levels repeat"):
        solver_schedule(SCHED, steps)
    with pytest.raises(ValueError, match=f"num_steps={steps}"):
        run(num_steps=steps)


def test_karras_step_counts_with_repeated_integer_timesteps_stay_accepted():
    ss = solver_schedule(tiny_scheduler(use_karras_sigmas=True), 200)  # distinct sigmas, repeated integer t
    assert len(np.unique(ss.timesteps)) < 200 and np.isfinite(ss.chain_weights).all()


# --- sample's other arguments -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_steps=2.5), ValueError, r"num_steps=2.5: expected a positive integer"),
    (dict(num_steps=True), ValueError, r"num_steps=True"),
    (dict(z_T=torch.randn(4, 8, 8)), ValueError, r"^z_T: expected a latent tensor \[B, C, H, W\], got \(4, 8, 8\)"),
    (dict(z_T=torch.randn(2, 4, 1, 8, 8)), ValueError, r"^z_T: expected a latent tensor"),
    (dict(z_T=torch.randn(0, 4, 8, 8)), ValueError, r"^z_T: an empty batch \(0, 4, 8, 8\)"),  # not frozen_rows'
    (dict(cond=None), TypeError, r"cond: expected a tensor"),
    (dict(cond=[[0.0]]), TypeError, r"cond: expected a tensor"),
    (dict(cond=torch.ones(2, 5, 16, dtype=torch.long)), TypeError, r"cond: expected floating-point"),
    (dict(uncond=torch.randn(1, 77, 16)), ValueError, r"uncond: shape \(1, 77, 16\) does not match cond's"),
    (dict(uncond=torch.randn(1, 5, 8)), ValueError, r"uncond: shape .* does not match cond's"),
    (dict(guidance_scale=float("inf")), ValueError, r"guidance_scale=inf: expected a finite number"),
    (dict(guidance_scale="7.5"), ValueError, r"guidance_scale='7.5': expected a number"),
    (dict(recompute_chunk=True), ValueError, r"recompute_chunk=True"),
    (dict(frozen_rows=True), ValueError, r"frozen_rows=True"),
    (dict(grad_steps=True, grad=True), ValueError, r"grad_steps=True"),
    (dict(grad_steps=1, generator=0, grad=True), TypeError, r"generator: expected a torch.Generator"),
    (dict(unet_dtype="float16"), TypeError, r"unet_dtype='float16': expected a torch.dtype"),
])
def test_sample_input_errors_name_the_argument(kwargs, error, message):
    with pytest.raises(error, match=message):
        run(**kwargs)


def test_uncond_shape_is_not_checked_without_guidance():
    """guidance_scale=1 never uses uncond (no CFG): a mismatched one is ignored as before."""
    run(uncond=torch.randn(1, 77, 16), guidance_scale=1.0)


# --- targets ----------------------------------------------------------------------------------------------------

GENDER = {"name": "gender", "classes": {"male": 0, "female": 1}, "probabilities": {"male": 0.3, "female": 0.7}}


@pytest.mark.parametrize("attributes, error, message", [
    ([{**GENDER, "classes": {"male": 0}, "probabilities": {"male": 1.0}}], ValueError,
     r"\(gender\).classes: only one class \['male'\]"),
    ([GENDER, {"name": "age", "classes": {"young": 2, "old": 3}, "given": ["age"], "probabilities": "uniform"}],
     ValueError, r"\(age\).given: an attribute cannot be conditioned on itself"),
    ([{**GENDER, "probabilities": {"male": float("nan"), "female": 1.0}}], TypeError,
     r"\(gender\).probabilities.male must be a finite number"),
    ([{**GENDER, "probabilities": "Uniform"}], ValueError, r"or 'uniform', got 'Uniform'"),
    ([{**GENDER, "probabilities": [0.3, 0.7]}], ValueError, r"or 'uniform', got \[0.3, 0.7\]"),
])
def test_target_errors_say_what_is_wrong(attributes, error, message):
    with pytest.raises(error, match=message):
        load_targets({"attributes": attributes})


def test_attribute_logits_checks_its_input():
    targets = load_targets({"attributes": [GENDER, {**GENDER, "name": "smile", "classes": {"no": 2, "yes": 3},
                                                    "probabilities": "uniform"}]})
    with pytest.raises(ValueError, match=r"attribute_logits: logits must be a \[N, C\] tensor.*got \(4,\)"):
        targets.attribute_logits(torch.randn(4))
    with pytest.raises(KeyError, match=r"no logits for attribute 'smile'"):
        targets.attribute_logits({"gender": torch.randn(3, 2)})
    assert set(targets.attribute_logits({"gender": torch.randn(3, 2), "smile": torch.randn(3, 4)})) == {
        "gender", "smile"}


# --- alignment loss ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(target=[float("nan"), 0.5, 0.5]), r"target must be a probability vector"),
    (dict(target="uniform"), r"target must be a \[K\] vector of probabilities, got 'uniform'"),
    (dict(probs=torch.full((4, 3), float("nan"))), r"each row of probs must be a probability vector"),
])
def test_expected_ot_targets_refuses_nan_and_non_vectors(kwargs, message):
    args = {"probs": torch.full((4, 3), 1 / 3), "target": [0.2, 0.3, 0.5], **kwargs}
    with pytest.raises(ValueError, match=message):
        expected_ot_targets(**args)


def test_alignment_loss_refuses_q_that_is_not_probabilities():
    logits = torch.randn(4, 3)
    q = expected_ot_targets(logits.softmax(-1), [0.2, 0.3, 0.5])
    alignment_loss(logits, q, 0.5)  # fine
    with pytest.raises(ValueError, match=r"q must hold probabilities in \[0, 1\].*swapped"):
        alignment_loss(q, logits, 0.5)  # arguments swapped
    with pytest.raises(ValueError, match=r"q must hold probabilities"):
        alignment_loss(logits, torch.full_like(q, float("nan")), 0.5)
    with pytest.raises(TypeError, match=r"alignment_loss: q must be a \[N, K\] tensor, got list"):
        alignment_loss(logits, q.tolist(), 0.5)
    with pytest.raises(TypeError, match=r"alignment_loss: logits must be floating point"):
        alignment_loss(logits.long(), q, 0.5)
    with pytest.raises(ValueError, match=r"threshold is a confidence in \[0, 1\], got None"):
        alignment_loss(logits, q, None)


def test_embeddings_of_another_width_than_the_unets_cross_attention_are_refused():
    from fastfair.testing import tiny_unet

    unet = tiny_unet(cross_attention_dim=16).requires_grad_(False)
    z_T = torch.randn(1, 4, 8, 8)
    with torch.no_grad(), pytest.raises(ValueError, match=r"cond: embeddings of width D=24, but the U-Net's "
                                                          r"cross_attention_dim is 16"):
        sample(unet, SCHED, z_T, torch.randn(1, 5, 24), torch.randn(1, 5, 24), num_steps=2)
    assert torch.isfinite(sample(unet, SCHED, z_T, torch.randn(1, 5, 16), torch.randn(1, 5, 16), num_steps=2)).all()


def test_float32_embeddings_beside_a_bfloat16_unet_are_cast_like_the_latents():
    """A float32 text encoder beside a half-precision U-Net (no autocast): the embeddings are cast to the U-Net's
    dtype as the latents are (it failed in the first cross-attention matmul), with the same z_0 and the same
    gradient, to bfloat16 rounding, as embeddings the caller cast."""
    from fastfair.testing import tiny_unet

    unet = tiny_unet(dtype=torch.bfloat16).requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    z_T, cond, uncond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 16, generator=g), torch.randn(1, 5, 16)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        leaf = cond.to(dtype).detach().requires_grad_()
        z_0 = sample(unet, SCHED, z_T, leaf, uncond.to(dtype), num_steps=3)
        (z_0 * torch.linspace(-1, 1, z_0.numel()).view_as(z_0)).sum().backward()
        results.append((z_0.detach(), leaf.grad.float()))
    assert torch.equal(results[0][0], results[1][0])
    # the float32 leaf sums its per-call bfloat16 gradients in float32, the bfloat16 leaf in bfloat16
    assert results[0][1].abs().sum() > 0
    torch.testing.assert_close(results[0][1], results[1][1], rtol=2e-2, atol=2e-2)
