"""fastfair.schedule against diffusers' DPMSolverMultistepScheduler and against autograd."""
import itertools

import numpy as np
import pytest
import torch

from fastfair.schedule import solver_schedule
from fastfair.testing import tiny_scheduler


def toy_model(z, t):
    # A smooth, nonlinear stand-in for a U-Net (depends on the latent and the timestep).
    return torch.tanh(0.7 * z + 0.001 * t) + 0.1 * torch.sin(3 * z)


def run_fastfair(ss, z_T):
    z, m_prev = z_T.double(), None
    for i in range(ss.num_steps):
        m = ss.cz[i] * z + ss.ce[i] * toy_model(z, int(ss.timesteps[i]))
        z_next = ss.a[i] * z + ss.b0[i] * m
        if ss.b1[i] != 0:
            z_next = z_next + ss.b1[i] * m_prev
        z, m_prev = z_next, m
    return z


OPTIONS = list(itertools.product(
    ["linspace", "leading", "trailing"], ["zero", "sigma_min"], [True, False], [False, True], [0, 1],
))


@pytest.mark.parametrize("spacing,final,lower_final,karras,offset", OPTIONS)
@pytest.mark.parametrize("steps", [1, 2, 5, 20])
def test_trajectory_matches_diffusers(spacing, final, lower_final, karras, offset, steps):
    sch = tiny_scheduler(timestep_spacing=spacing, final_sigmas_type=final, lower_order_final=lower_final,
                         use_karras_sigmas=karras, steps_offset=offset)
    sch.set_timesteps(steps)
    z_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    z = z_T.clone()
    for t in sch.timesteps:
        z = sch.step(toy_model(z, t), t, z).prev_sample
    ss = solver_schedule(sch, steps)
    assert np.array_equal(ss.timesteps, sch.timesteps.numpy())
    ours = run_fastfair(ss, z_T)
    assert ((ours - z.double()).norm() / z.double().norm()).item() <= 1e-5


@pytest.mark.parametrize("config", [
    dict(prediction_type="v_prediction"), dict(solver_type="heun"), dict(solver_order=1),
    dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02), dict(beta_schedule="squaredcos_cap_v2"),
    dict(euler_at_final=True, final_sigmas_type="sigma_min"), dict(prediction_type="sample"),
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"),
    dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
])
def test_other_supported_options_match_diffusers(config):
    sch = tiny_scheduler(**config)
    for steps in (3, 20):
        sch.set_timesteps(steps)
        z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        z = z_T.clone()
        for t in sch.timesteps:
            z = sch.step(toy_model(z, t), t, z).prev_sample
        ours = run_fastfair(solver_schedule(sch.config, steps), z_T)
        assert ((ours - z.double()).norm() / z.double().norm()).item() <= 1e-5


def _trajectory_of(sch, steps):
    """diffusers' own step loop on the toy model from a fixed z_T: (z_T, z_0)."""
    sch.set_timesteps(steps)
    z_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    z = z_T.clone()
    for t in sch.timesteps:
        z = sch.step(toy_model(z, t), t, z).prev_sample
    return z_T, z.double()


def test_karras_sigmas_between_the_configs_own_bounds_match_diffusers():
    """A config with sigma_min / sigma_max (kept by from_config, e.g. from an EDM config): diffusers' Karras ramp
    runs between them, not the training schedule's extremes."""
    sch = tiny_scheduler(use_karras_sigmas=True)
    sch.register_to_config(sigma_min=0.1, sigma_max=10.0)
    z_T, z = _trajectory_of(sch, 20)
    ss = solver_schedule(sch, 20)
    assert np.array_equal(ss.timesteps, sch.timesteps.numpy())
    assert ((run_fastfair(ss, z_T) - z).norm() / z.norm()).item() <= 1e-5


@pytest.mark.parametrize("change", [dict(use_karras_sigmas=True), dict(timestep_spacing="trailing")])
def test_a_scheduler_changed_after_conversion_is_followed(change):
    """from_config resets the keys listed in a config's _use_default_values: an option set afterwards (on the
    object, or in its config mapping) must still decide the timesteps fastfair samples at."""
    from diffusers import DPMSolverMultistepScheduler, PNDMScheduler

    pndm = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                         skip_prk_steps=True, set_alpha_to_one=False)
    sch = DPMSolverMultistepScheduler.from_config(pndm.config)
    assert set(change) <= set(sch.config["_use_default_values"])
    sch.register_to_config(**change)
    z_T, z = _trajectory_of(sch, 20)
    for source in (sch, dict(sch.config)):
        ss = solver_schedule(source, 20)
        assert np.array_equal(ss.timesteps, sch.timesteps.numpy())
        assert ((run_fastfair(ss, z_T) - z).norm() / z.norm()).item() <= 1e-5


def test_noise_levels_diffusers_would_not_sample_are_refused(monkeypatch):
    """The safety net for an option diffusers reads and solver_schedule does not model: fastfair's float64 noise
    levels are compared with the scheduler's own."""
    import fastfair.schedule as schedule

    real = schedule._diffusers_timesteps

    def other_sigmas(config, num_steps):
        timesteps, sigmas = real(config, num_steps)
        return timesteps, sigmas * np.where(np.arange(len(sigmas)) == 3, 1.01, 1.0)

    monkeypatch.setattr(schedule, "_diffusers_timesteps", other_sigmas)
    with pytest.raises(ValueError, match="noise level at step 3 .* differs from diffusers'"):
        solver_schedule(tiny_scheduler(), 20)


def test_zero_terminal_snr_betas_are_diffusers_rescale_in_float64():
    """rescale_betas_zero_snr: betas are diffusers' own rescale run in float64, and the last abar is diffusers'
    2^-24 (the first noise level finite)."""
    from diffusers.schedulers.scheduling_dpmsolver_multistep import rescale_zero_terminal_snr

    from fastfair.schedule import alphas_cumprod_float64, betas_float64

    config = dict(tiny_scheduler(rescale_betas_zero_snr=True).config)
    plain = betas_float64({**config, "rescale_betas_zero_snr": False})
    expected = rescale_zero_terminal_snr(torch.from_numpy(plain)).numpy()
    np.testing.assert_allclose(betas_float64(config), expected, rtol=1e-12, atol=1e-15)
    abar = alphas_cumprod_float64(config)
    assert abar[-1] == 2.0**-24
    np.testing.assert_allclose(abar[:-1], np.cumprod(1 - expected)[:-1], rtol=1e-12)


def test_a_first_timestep_repeated_is_refused():
    """The cosine schedule's largest noise levels with Karras sigmas round to one training timestep twice: diffusers'
    sampler then starts at its second step and fails at its last, so fastfair samples no such trajectory either."""
    sch = tiny_scheduler(beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True)
    for steps in range(2, 30):
        sch.set_timesteps(steps)
        if sch.timesteps[0] == sch.timesteps[1]:
            break
    else:  # diffusers 0.36 (constraints-torch2.4.txt) rounds the first level to 999 and the second to 998
        pytest.skip("this diffusers repeats no first timestep for these noise levels")
    z = torch.zeros(1, 4, 2, 2)
    with pytest.raises(IndexError):  # diffusers' own loop
        for t in sch.timesteps:
            z = sch.step(toy_model(z, t), t, z).prev_sample
    with pytest.raises(ValueError, match=rf"num_steps={steps}: the scheduler's first two timesteps are both \d+"):
        solver_schedule(sch, steps)


@pytest.mark.parametrize("key,value", [
    ("algorithm_type", "sde-dpmsolver++"), ("solver_order", 3), ("thresholding", True),
    ("use_lu_lambdas", True), ("use_exponential_sigmas", True), ("use_beta_sigmas", True),
    ("prediction_type", "flow_prediction"),
])
def test_unsupported_options_raise_naming_them(key, value):
    config = dict(tiny_scheduler().config)
    config[key] = value
    with pytest.raises(ValueError, match=key):
        solver_schedule(config, 10)


def test_bad_step_count_and_scheduler_type():
    with pytest.raises(ValueError, match="num_steps"):
        solver_schedule(tiny_scheduler(), 0)
    with pytest.raises(TypeError, match="scheduler"):
        solver_schedule(42, 10)


@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_chain_weights_are_the_autograd_derivatives(steps):
    """k_i = dz_S/d eps_i and K_T = dz_S/dz_T for the linear solver chain, found by autograd."""
    ss = solver_schedule(tiny_scheduler(), steps)
    z_T = torch.ones(1, dtype=torch.float64, requires_grad=True)
    eps = torch.zeros(steps, dtype=torch.float64, requires_grad=True)
    z, m_prev = z_T, None
    for i in range(steps):
        m = ss.cz[i] * z + ss.ce[i] * eps[i]
        z_next = ss.a[i] * z + ss.b0[i] * m
        z = z_next + ss.b1[i] * m_prev if ss.b1[i] != 0 else z_next
        m_prev = m
    d_zT, d_eps = torch.autograd.grad(z.sum(), [z_T, eps])
    np.testing.assert_allclose(d_eps.numpy(), ss.chain_weights, rtol=1e-12, atol=1e-14)
    assert d_zT.item() == pytest.approx(ss.chain_weight_zT, rel=1e-12, abs=1e-14)


def test_adjustment_modes():
    ss = solver_schedule(tiny_scheduler(), 20)
    abar, beta = ss.alphas_cumprod_t, ss.betas_t
    paper_raw = np.sqrt(abar) * np.sqrt(1 - abar) / beta  # 1 / A_t, Eq. 9 with abar (DESIGN.md)
    paper = ss.adjustment("paper")
    np.testing.assert_allclose(paper, paper_raw / np.exp(np.log(paper_raw).mean()), rtol=1e-12)
    assert np.exp(np.log(paper).mean()) == pytest.approx(1.0)
    effective = ss.grad_scales("exact")
    np.testing.assert_allclose(effective, effective[0], rtol=1e-12)  # every step weighs the same
    assert np.all(np.sign(effective) == np.sign(ss.chain_weights))  # the descent direction is kept
    np.testing.assert_array_equal(ss.adjustment("none"), np.ones(20))
    with pytest.raises(ValueError, match="coefficients"):
        ss.adjustment("bogus")


@pytest.mark.parametrize("config", [dict(), dict(beta_schedule="linear"), dict(beta_schedule="squaredcos_cap_v2"),
                                    dict(timestep_spacing="trailing", steps_offset=1),
                                    dict(timestep_spacing="trailing", rescale_betas_zero_snr=True)])
def test_paper_inputs_are_diffusers_schedule_at_the_step_timesteps(config):
    """abar_t and beta_t fed to the `paper` coefficient come from an independent source (diffusers' own float32
    tables indexed by its own timesteps), not from the object under test."""
    sch = tiny_scheduler(**config)
    sch.set_timesteps(20)
    t = sch.timesteps.numpy()
    ss = solver_schedule(sch, 20)
    np.testing.assert_allclose(ss.alphas_cumprod_t, sch.alphas_cumprod[t].double().numpy(), rtol=1e-5)
    # rescaled to zero terminal SNR, diffusers' float32 betas are 1 - abar_t / abar_{t-1}: ratios near 1, ~1e-4 off
    np.testing.assert_allclose(ss.betas_t, sch.betas[t].double().numpy(),
                               rtol=2e-4 if config.get("rescale_betas_zero_snr") else 1e-5)
    A = ss.betas_t / np.sqrt(ss.alphas_cumprod_t * (1 - ss.alphas_cumprod_t))
    C = (1 / A) / np.exp(np.mean(np.log(1 / A)))
    np.testing.assert_allclose(ss.adjustment("paper"), C, rtol=1e-5)


@pytest.mark.parametrize("steps", [10, 14, 15, 16])
def test_lower_order_final_boundary_matches_diffusers(steps):
    """diffusers drops to first order on the last step below 15 steps (lower_order_final) when the final sigma is
    not zero: the boundary 14/15 must be in the tested step counts."""
    sch = tiny_scheduler(final_sigmas_type="sigma_min", lower_order_final=True)
    z_T, z = _trajectory_of(sch, steps)
    ss = solver_schedule(sch, steps)
    assert ((run_fastfair(ss, z_T) - z).norm() / z.norm()).item() <= 1e-5
    assert ss.order[-1] == (1 if steps < 15 else 2)
