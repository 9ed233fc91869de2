"""Noise schedule and DPM-Solver++ per-step coefficients, in float64.

For a diffusers ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``, orders 1 and 2, multistep)
and a step count S, every step i = 0..S-1 of the sampler is linear in the current latent z_i, the model output
eps_i (after classifier-free guidance) and the previous data prediction m_{i-1}:

    m_i     = cz_i * z_i + ce_i * eps_i                      (data / x0 prediction)
    z_{i+1} = a_i * z_i + b0_i * m_i + b1_i * m_{i-1}        (b1_i = 0 at order 1)

With alpha, sigma the VP-SDE coefficients of the step's noise level (diffusers: alpha = 1/sqrt(s^2+1),
sigma = s * alpha with s = sqrt((1-abar)/abar)), lambda = log(alpha/sigma), h = lambda_{i+1} - lambda_i,
c = alpha_{i+1} (1 - e^{-h}):

    order 1 (DDIM):        a = sigma_{i+1}/sigma_i,  b0 = c,                   b1 = 0
    order 2, midpoint:     a as above,               b0 = c + c/(2 r),         b1 = -c/(2 r)
    order 2, heun:         e = alpha_{i+1}((e^{-h}-1)/h + 1);  b0 = c + e/r,   b1 = -e/r
    with r = h_{i-1}/h_i.

Unrolled, z_S = K_T z_T + sum_i k_i eps_i with scalar chain weights (``chain_weights``). With the U-Net input
detached (the adjusted gradient's B_t = I), dL/d eps_i = C_i k_i dL/dz_S exactly; C_i are the adjustment
coefficients (``adjustment``):

- ``paper``: C_i = 1/A_{t_i}, A_t = beta_t / (sqrt(abar_t) sqrt(1-abar_t)) (seed Eq. 9), normalized by the
  geometric mean over the steps (Algorithm A.1);
- ``exact``: C_i = 1/|k_i|, geometric-mean normalized, so every step gets the same effective weight
  |C_i k_i| = geomean(|k|) with the chain's own sign (the descent direction is kept);
- ``none``: C_i = 1 (the plain detached gradient).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import numpy as np

COEFFICIENT_MODES = ("paper", "exact", "none")

# Options of DPMSolverMultistepScheduler whose non-default values change the sampler in ways fastfair does not
# model; each maps to the value fastfair supports.
_UNSUPPORTED_IF_SET = {
    "thresholding": False,
    "use_lu_lambdas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "variance_type": None,
}


@dataclass(frozen=True)
class SolverSchedule:
    """The per-step coefficients of one S-step DPM-Solver++ trajectory (all float64 numpy arrays of length S).

    timesteps: the integer U-Net timestep of each step (what diffusers' scheduler feeds the U-Net).
    order: solver order used at each step (1 or 2).
    cz, ce, a, b0, b1: the step coefficients (module docstring).
    alphas_cumprod_t, betas_t: abar and beta at each step's timestep (for the ``paper`` coefficients).
    chain_weights: k_i, the weight of eps_i in z_S; chain_weight_zT: K_T, the weight of z_T in z_S.
    """

    timesteps: np.ndarray
    order: np.ndarray
    cz: np.ndarray
    ce: np.ndarray
    a: np.ndarray
    b0: np.ndarray
    b1: np.ndarray
    alphas_cumprod_t: np.ndarray
    betas_t: np.ndarray
    chain_weights: np.ndarray
    chain_weight_zT: float

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def adjustment(self, mode: str) -> np.ndarray:
        """Adjustment coefficients C [S] for ``mode`` in ``paper`` | ``exact`` | ``none`` (module docstring)."""
        if mode == "none":
            return np.ones(self.num_steps)
        if mode == "paper":
            A = self.betas_t / (np.sqrt(self.alphas_cumprod_t) * np.sqrt(1.0 - self.alphas_cumprod_t))
            C = 1.0 / A
        elif mode == "exact":
            if np.any(self.chain_weights == 0):
                raise ValueError("coefficients='exact': a step has chain weight 0 (its eps does not reach z_0)")
            C = 1.0 / np.abs(self.chain_weights)
        else:
            raise ValueError(f"coefficients={mode!r}: expected one of {COEFFICIENT_MODES}")
        return C / math.exp(np.mean(np.log(C)))

    def grad_scales(self, mode: str) -> np.ndarray:
        """s_i = C_i k_i [S]: dL/d eps_i = s_i dL/dz_S under the adjusted gradient."""
        return self.adjustment(mode) * self.chain_weights


def _config_of(scheduler_or_config: Any) -> Mapping[str, Any]:
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not isinstance(config, Mapping):
        raise TypeError(
            "scheduler: expected a diffusers DPMSolverMultistepScheduler or its config mapping, "
            f"got {type(scheduler_or_config).__name__}"
        )
    if config is not scheduler_or_config:
        # A scheduler object: its class decides. A directly constructed scheduler's config has no _class_name,
        # and most schedulers' configs hold only keys DPMSolverMultistepScheduler also takes.
        from diffusers import DPMSolverMultistepScheduler

        if not isinstance(scheduler_or_config, DPMSolverMultistepScheduler):
            name = type(scheduler_or_config).__name__
            raise ValueError(
                f"scheduler: {name} is not supported (fastfair samples with DPM-Solver++ only); "
                "use DPMSolverMultistepScheduler.from_config(scheduler.config)"
            )
    return config


def scheduler_config(scheduler_or_config: Any) -> Mapping[str, Any]:
    """The config of a supported DPMSolverMultistepScheduler (object or config mapping); ValueError/TypeError
    naming what is wrong otherwise. Checked on the object: a plain dict of its config loses its class."""
    config = _config_of(scheduler_or_config)
    _check_supported(config)
    return config


def _check_supported(config: Mapping[str, Any]) -> None:
    cls = config.get("_class_name", "DPMSolverMultistepScheduler")
    if cls != "DPMSolverMultistepScheduler":
        raise ValueError(
            f"scheduler: {cls} is not supported; use DPMSolverMultistepScheduler.from_config(scheduler.config)"
        )
    algo = config.get("algorithm_type", "dpmsolver++")
    if algo != "dpmsolver++":
        raise ValueError(f"scheduler algorithm_type={algo!r} is not supported: only 'dpmsolver++' (no SDE variants)")
    order = config.get("solver_order", 2)
    if order not in (1, 2):
        raise ValueError(f"scheduler solver_order={order} is not supported: use 1 or 2")
    solver_type = config.get("solver_type", "midpoint")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"scheduler solver_type={solver_type!r} is not supported: use 'midpoint' or 'heun'")
    pred = config.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(
            f"scheduler prediction_type={pred!r} is not supported: use 'epsilon', 'v_prediction' or 'sample'"
        )
    for key, ok in _UNSUPPORTED_IF_SET.items():
        if config.get(key, ok) != ok:
            raise ValueError(f"scheduler option {key}={config.get(key)!r} is not supported (fastfair needs {ok!r})")
    if config.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        raise ValueError(f"scheduler final_sigmas_type={config.get('final_sigmas_type')!r}: use 'zero' or 'sigma_min'")


def betas_float64(config: Mapping[str, Any]) -> np.ndarray:
    """The training noise schedule beta_1..beta_T in float64 (diffusers builds it in float32), rescaled to zero
    terminal SNR when ``rescale_betas_zero_snr`` is set (as diffusers does)."""
    betas = _betas_before_rescale(config)
    if config.get("rescale_betas_zero_snr", False):
        # shift sqrt(abar) so that its last value is 0, scale it so that its first is kept (Lin et al. 2023)
        root = np.sqrt(np.cumprod(1.0 - betas))
        root = (root - root[-1]) * (root[0] / (root[0] - root[-1]))
        abar = root**2
        betas = 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return betas


def alphas_cumprod_float64(config: Mapping[str, Any], betas: Optional[np.ndarray] = None) -> np.ndarray:
    """abar_t = prod_{s <= t} (1 - beta_s) in float64 (betas: ``betas_float64(config)``, computed when not given);
    with ``rescale_betas_zero_snr`` its last value (0) is set to 2^-24, as diffusers does, so that the first noise
    level is finite."""
    abar = np.cumprod(1.0 - (betas_float64(config) if betas is None else betas))
    if config.get("rescale_betas_zero_snr", False):
        abar[-1] = 2.0**-24
    return abar


def _betas_before_rescale(config: Mapping[str, Any]) -> np.ndarray:
    T = int(config.get("num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    if trained is not None:
        return np.asarray(trained, dtype=np.float64)
    kind = config.get("beta_schedule", "linear")
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        return np.linspace(start, end, T, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2
    if kind == "squaredcos_cap_v2":
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=np.float64)
    raise ValueError(f"scheduler beta_schedule={kind!r} is not supported")


def diffusers_scheduler(scheduler_or_config: Any):
    """A fresh diffusers DPMSolverMultistepScheduler of this config. `_use_default_values` is dropped: from_config
    would otherwise reset every key it names to the default, although the mapping (or the object's config, after
    register_to_config) holds another value, the one the rest of solver_schedule reads."""
    from diffusers import DPMSolverMultistepScheduler

    config = _config_of(scheduler_or_config)
    return DPMSolverMultistepScheduler.from_config({k: v for k, v in config.items() if k != "_use_default_values"})


def _diffusers_timesteps(config: Mapping[str, Any], num_steps: int):
    """The exact integer timesteps (and float32 sigmas) diffusers' scheduler uses (spacing, offset, Karras,
    clipping: its own code)."""
    scheduler = diffusers_scheduler(config)
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.cpu().numpy().astype(np.int64), scheduler.sigmas.cpu().numpy().astype(np.float64)


def solver_schedule(scheduler_or_config: Union[Any, Mapping[str, Any]], num_steps: int) -> SolverSchedule:
    """Coefficients (float64) of the ``num_steps``-step trajectory of a DPMSolverMultistepScheduler.

    Reproduces diffusers' timesteps, sigmas, per-step orders and final step for the options Stable Diffusion
    pipelines use (timestep_spacing, steps_offset, use_karras_sigmas, final_sigmas_type, lower_order_final,
    euler_at_final, solver_type, prediction_type, rescale_betas_zero_snr); raises ValueError naming any other
    option that is set.
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r}: expected a positive integer")
    config = _config_of(scheduler_or_config)
    _check_supported(config)
    S = int(num_steps)

    betas = betas_float64(config)
    abar = alphas_cumprod_float64(config, betas)
    timesteps, sig = _noise_levels(config, S, abar)
    alpha = 1.0 / np.sqrt(sig**2 + 1.0)
    sigma = sig * alpha
    pred = config.get("prediction_type", "epsilon")
    if pred == "epsilon":
        cz, ce = 1.0 / alpha[:S], -sigma[:S] / alpha[:S]
    elif pred == "v_prediction":
        cz, ce = alpha[:S].copy(), -sigma[:S]
    else:  # sample
        cz, ce = np.zeros(S), np.ones(S)
    # repeated noise levels give inf/NaN here: checked below, with a message that says why
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        order, a, b0, b1 = _step_coefficients(config, alpha, sigma)
        z_coef = _unroll(cz, ce, a, b0, b1)
    if not all(np.isfinite(x).all() for x in (cz, ce, a, b0, b1, z_coef)):
        # equal noise levels: repeated timesteps, or timesteps past the training range, which the interpolation
        # clips to its last level
        repeated = sorted({int(t) for t in timesteps[np.nonzero(np.diff(sig[:S]) >= 0)[0]]})
        raise ValueError(
            f"num_steps={S}: the scheduler's noise levels repeat at this step count (repeated timesteps "
            f"{repeated[:8]}{' ...' if len(repeated) > 8 else ''}), so the solver's coefficients are not finite "
            f"(diffusers' own sampler gives NaN too); use fewer steps than num_train_timesteps="
            f"{len(betas)}"
        )

    t_idx = timesteps.clip(0, len(betas) - 1)
    return SolverSchedule(
        timesteps=timesteps,
        order=order,
        cz=np.asarray(cz, dtype=np.float64),
        ce=np.asarray(ce, dtype=np.float64),
        a=a,
        b0=b0,
        b1=b1,
        alphas_cumprod_t=abar[t_idx],
        betas_t=betas[t_idx],
        chain_weights=z_coef[1:].copy(),
        chain_weight_zT=float(z_coef[0]),
    )


def _noise_levels(config: Mapping[str, Any], S: int, abar: np.ndarray):
    """(timesteps [S], noise levels sigma_t / alpha_t [S + 1], the last one the final level) as diffusers sets
    them for S steps, checked against diffusers' own float32 levels (a safety net for an option not modelled)."""
    sigmas_train = np.sqrt((1.0 - abar) / abar)
    timesteps, diffusers_sigmas = _diffusers_timesteps(config, S)
    if len(timesteps) != S:
        raise ValueError(f"scheduler produced {len(timesteps)} timesteps for num_steps={S}")
    if config.get("use_karras_sigmas", False):
        rho = 7.0
        # diffusers' _convert_to_karras takes config sigma_min / sigma_max where the config has them
        s_min = config.get("sigma_min") if config.get("sigma_min") is not None else sigmas_train[0]
        s_max = config.get("sigma_max") if config.get("sigma_max") is not None else sigmas_train[-1]
        lo, hi = s_min ** (1 / rho), s_max ** (1 / rho)
        sig = (hi + np.linspace(0, 1, S) * (lo - hi)) ** rho
    else:
        sig = np.interp(timesteps.astype(np.float64), np.arange(len(sigmas_train)), sigmas_train)
    sigma_last = sigmas_train[0] if config.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
    sig = np.concatenate([sig, [sigma_last]])
    if S > 1 and timesteps[0] == timesteps[1] and sig[0] != sig[1]:  # equal levels: refused with the reason below
        # diffusers finds a sampling run's first step by its timestep and takes the second of two matches: its
        # sampler would start at step 1 and fail at its last (IndexError), so no diffusers pipeline samples it
        raise ValueError(f"num_steps={S}: the scheduler's first two timesteps are both {int(timesteps[0])} (noise "
                         "levels this close map to one training timestep), which diffusers' own sampler cannot "
                         "step through; use another step count, beta_schedule or use_karras_sigmas=False")
    if not np.allclose(sig, diffusers_sigmas, rtol=1e-3, atol=1e-6):
        i = int(np.argmax(np.abs(sig - diffusers_sigmas)))
        raise ValueError(f"scheduler: fastfair's noise level at step {i} ({sig[i]:.6g}) differs from diffusers' "
                         f"({diffusers_sigmas[i]:.6g}) for this config; an option it does not model is set")
    return timesteps, sig


def _step_coefficients(config: Mapping[str, Any], alpha: np.ndarray, sigma: np.ndarray):
    """Per step i of S (alpha, sigma [S + 1]): the order (1 or 2) and z_{i+1} = a z_i + b0 m_i + b1 m_{i-1}
    (data prediction m), with diffusers' first step, lower-order final step and midpoint/heun second order."""
    S = len(alpha) - 1
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at a zero final sigma
    solver_order = int(config.get("solver_order", 2))
    lower_order_final_cfg = bool(config.get("lower_order_final", True))
    euler_at_final = bool(config.get("euler_at_final", False))
    final_zero = config.get("final_sigmas_type", "zero") == "zero"
    heun = config.get("solver_type", "midpoint") == "heun"
    order = np.ones(S, dtype=np.int64)
    a, b0, b1 = np.zeros(S), np.zeros(S), np.zeros(S)
    for i in range(S):
        lower_order_final = i == S - 1 and (euler_at_final or (lower_order_final_cfg and S < 15) or final_zero)
        use_first = solver_order == 1 or i == 0 or lower_order_final
        h = lam[i + 1] - lam[i]
        a[i] = sigma[i + 1] / sigma[i]
        c = alpha[i + 1] * -math.expm1(-h)  # alpha_t (1 - e^{-h}); exact at h = inf
        if use_first:
            b0[i] = c
            continue
        order[i] = 2
        r = (lam[i] - lam[i - 1]) / h
        e = alpha[i + 1] * (math.expm1(-h) / h + 1.0) if heun else 0.5 * c
        b0[i], b1[i] = c + e / r, -e / r
    return order, a, b0, b1


def _unroll(cz, ce, a, b0, b1) -> np.ndarray:
    """z_0 as a coefficient vector [S + 1] over [z_T, eps_0, ..., eps_{S-1}] (m_i = cz_i z_i + ce_i eps_i): the
    chain weights."""
    S = len(a)
    z_coef = np.zeros(S + 1)
    z_coef[0] = 1.0
    m_prev = np.zeros(S + 1)
    for i in range(S):
        m = cz[i] * z_coef
        m[i + 1] += ce[i]
        z_coef = a[i] * z_coef + b0[i] * m + b1[i] * m_prev
        m_prev = m
    return z_coef
