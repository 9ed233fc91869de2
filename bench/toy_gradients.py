"""The seed's Fig. 6 in miniature on the toy world: which gradient trains, and what scale each step receives.

    python bench/toy_gradients.py [--iters 120] [--eval-images 20] [--scale-batches 5] [--out-dir bench/results]
                                  [--variants unadjusted,paper,exact,none] [--images-per-prompt N] [--threads T]

Gradients (DESIGN.md, "Adjustment coefficients"), each trained in its own subprocess on the toy gender config
(text-encoder LoRA, 20-step DPM-Solver++, guidance 3) from the same seed, prompts and noise:
- ``unadjusted``: the exact gradient through the whole chain (`fastfair.reference.reference_sample` with
  ``adjusted=False``; the trainer's sampler is replaced in this bench only);
- ``paper`` | ``exact`` | ``none``: the adjusted gradient (U-Net input detached) with those coefficients C_i,
  through the trainer's own engine (`fastfair.dft.sample`); all steps backpropagated (``sampler.grad_steps=null``).

(a) Per iteration: the loss parts and the batch gender bias; after training, the held-out gender bias and the
semantics of the demo's evaluation (bench/_toy.py). (b) For ``--scale-batches`` batches (the first iterations'
prompts and noise, at the initial weights): ||dL/d eps_i|| per step i, eps_i the CFG-combined U-Net output,
measured by autograd hooks in a reference unroll, beside the closed form of the adjusted gradient,
|C_i k_i| ||g|| (g = dL/dz_0, k_i the chain weight of ``fastfair.schedule``). For the unadjusted gradient the
closed form |k_i| ||g|| is only the direct path: eps_i also reaches z_0 through z_{i+1} and every later U-Net
call, which autograd includes; both are reported.

Writes OUT_DIR/toy_gradients.json, toy_gradients.md, toy_gradients_loss.png, toy_gradients_scales.png. The
defaults are sized for <= 30 min on the 2-core CPU machine: per variant about 2-2.5 s per iteration (16 images)
plus about 1 min of start-up and evaluation, and under a minute for the scales (estimated from 2-iteration runs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Optional

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _toy import (CONFIG, FINAL_WINDOW, add_common_args, base_spec, check_args, final_mean,  # noqa: E402
                  heldout_row, run_meta, run_worker, settings_line, train_and_evaluate,
                  variant_rows, write_outputs)
from _workers import worker_or_none  # noqa: E402

VARIANTS = ("unadjusted", "paper", "exact", "none")
SMOOTH = 10  # moving-average window of the loss plot


# ----------------------------------------------------------------------------- per-step gradient scales

class EpsGradients:
    """Autograd hooks on a reference unroll: after the backward, ``norms()`` [S] holds ||dL/d eps_i|| of the
    CFG-combined eps of each graph-building U-Net call (call order = step order) and ``z0_grad_norm`` ||dL/dz_0||.

    With CFG the U-Net output is [eps_u; eps_c] and eps = eps_u + w (eps_c - eps_u), so dL/d eps_u = (1 - w) G,
    dL/d eps_c = w G and their sum is G = dL/d eps: no hook on the combined tensor is needed.
    """

    def __init__(self):
        self.guided = False
        self.step_norms: Dict[int, float] = {}
        self.calls = 0
        self.z0_grad_norm: Optional[float] = None

    def wrap(self, unet, guided: bool):
        """A U-Net stand-in that records every output which carries a graph."""
        self.guided = guided
        return _Recording(unet, self)

    def watch_eps(self, eps: torch.Tensor) -> None:
        if eps.requires_grad:
            eps.register_hook(lambda grad, i=self.calls: self._store(i, grad))
            self.calls += 1

    def _store(self, i: int, grad: torch.Tensor) -> None:
        g = grad.detach().double()
        if self.guided:
            g = g[:g.shape[0] // 2] + g[g.shape[0] // 2:]
        self.step_norms[i] = float(g.norm())

    def watch_z0(self, z0: torch.Tensor) -> None:
        if z0.requires_grad:
            z0.register_hook(lambda grad: setattr(self, "z0_grad_norm", float(grad.detach().double().norm())))

    def norms(self) -> np.ndarray:
        missing = [i for i in range(self.calls) if i not in self.step_norms]
        if missing or self.z0_grad_norm is None:
            raise RuntimeError(f"no gradient recorded for steps {missing} or z_0: run the backward first")
        return np.array([self.step_norms[i] for i in range(self.calls)])


class _Recording:
    """Calls the U-Net and hands its output to the recorder; ``dtype`` as ``fastfair.dft.unet_input_dtype``."""

    def __init__(self, unet, recorder: EpsGradients):
        from fastfair.dft import unet_input_dtype

        self.unet, self.recorder, self.dtype = unet, recorder, unet_input_dtype(unet)

    def __call__(self, x, t, encoder_hidden_states):
        out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states)
        eps = out.sample if hasattr(out, "sample") else out[0]
        self.recorder.watch_eps(eps)
        return SimpleNamespace(sample=eps)


def reference_unroll(unet, scheduler, z_T, cond, uncond, *, num_steps: int, guidance_scale: float, variant: str,
                     recorder: Optional[EpsGradients] = None) -> torch.Tensor:
    """z_0 with the full graph of `fastfair.reference.reference_sample`: ``unadjusted`` (nothing detached, the
    exact gradient) or adjusted with coefficients ``variant``; hooks of ``recorder`` when given."""
    from fastfair.reference import reference_sample

    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: expected one of {VARIANTS}")
    adjusted = variant != "unadjusted"
    if recorder is not None:
        unet = recorder.wrap(unet, guided=uncond is not None and guidance_scale != 1.0)
    z0 = reference_sample(unet, scheduler, z_T, cond, uncond, num_steps=num_steps, guidance_scale=guidance_scale,
                          coefficients=variant if adjusted else "none", adjusted=adjusted)
    if recorder is not None:
        recorder.watch_z0(z0)
    return z0


def closed_form_scales(schedule, variant: str, g_norm: float) -> np.ndarray:
    """[S] |C_i k_i| ||g||; for ``unadjusted`` |k_i| ||g||, the direct path only (module docstring)."""
    scales = schedule.chain_weights if variant == "unadjusted" else schedule.grad_scales(variant)
    return np.abs(scales) * g_norm


def use_reference_sampler(trainer, variant: str, recorder: Optional[EpsGradients] = None) -> None:
    """Replace this trainer's sampler by `reference_unroll` (the bench's patch; fastfair itself is untouched)."""
    sampler = trainer.cfg.sampler

    def _sample(unet, z_T, cond, uncond, steps, generator, frozen_rows=0):
        def unroll(rows: slice, hooks):
            return reference_unroll(unet, trainer.scheduler, z_T[rows], cond[rows],
                                    None if uncond is None else uncond[rows], num_steps=steps,
                                    guidance_scale=sampler.guidance_scale, variant=variant, recorder=hooks)

        # the first frozen_rows rows (the original model's images, sampled along in the same calls by the engine)
        # take no part in the gradient: unrolled without a graph, as the engine does, not differentiated for nothing
        z0 = unroll(slice(frozen_rows, None), recorder)
        if not frozen_rows:
            return z0
        with torch.no_grad():
            z0_frozen = unroll(slice(0, frozen_rows), None)
        return torch.cat([z0_frozen, z0])

    trainer._sample = _sample


def measure_scales(spec: dict) -> dict:
    """Worker: per batch and variant, the autograd ||dL/d eps_i|| and the closed form (module docstring)."""
    from fastfair.config import load_config
    from fastfair.dft import schedule_for
    from fastfair.trainer import Trainer, process_group

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    cfg = load_config(CONFIG, list(spec["overrides"]) + [f"output_dir={spec['out']}", "resume="])
    batches = []
    with process_group("cpu"):
        trainer = Trainer(cfg, "cpu")
        for it in range(spec["batches"]):
            _, prompt = trainer.mixture.draw()
            z_T, steps, generator = trainer._noise_and_steps(it)
            schedule = schedule_for(trainer.scheduler, steps)
            batch = {"prompt": prompt, "measured": {}, "closed_form": {}, "g_norm": {}}
            for variant in VARIANTS:
                recorder = EpsGradients()
                use_reference_sampler(trainer, variant, recorder)
                trainer.optimizer.zero_grad(set_to_none=True)
                trainer.losses(*trainer.generate_pair(prompt, z_T, steps, generator))["loss"].backward()
                batch["measured"][variant] = recorder.norms().tolist()
                batch["closed_form"][variant] = closed_form_scales(schedule, variant, recorder.z0_grad_norm).tolist()
                batch["g_norm"][variant] = recorder.z0_grad_norm
            batches.append(batch)
    return {"name": "scales", "timesteps": schedule.timesteps.tolist(),
            "chain_weights": schedule.chain_weights.tolist(),
            "coefficients": {v: schedule.adjustment(v).tolist() for v in VARIANTS[1:]}, "batches": batches}


def summarize_scales(scales: dict) -> dict:
    """Means over batches and, for the adjusted variants, the largest |autograd / closed form - 1|."""
    mean = {kind: {v: np.mean([b[kind][v] for b in scales["batches"]], axis=0).tolist() for v in VARIANTS}
            for kind in ("measured", "closed_form")}
    error = {}
    for v in VARIANTS[1:]:
        measured = np.array([b["measured"][v] for b in scales["batches"]])
        closed = np.array([b["closed_form"][v] for b in scales["batches"]])
        ok = closed > 0
        error[v] = float(np.max(np.abs(measured[ok] / closed[ok] - 1))) if ok.any() else float("nan")
    return {"mean": mean, "closed_form_max_rel_error": error}


# ----------------------------------------------------------------------------- the run

def worker(spec: dict) -> dict:
    if spec["kind"] == "scales":
        return measure_scales(spec)
    variant = spec["name"]
    # every variant backpropagates all steps (the toy config's grad_steps=5 subsampling would only add noise)
    spec = {**spec, "overrides": spec["overrides"] + ["sampler.grad_steps=null"]}
    if variant == "unadjusted":
        result = train_and_evaluate(spec, prepare=lambda trainer: use_reference_sampler(trainer, "unadjusted"))
    else:
        result = train_and_evaluate({**spec, "overrides": spec["overrides"] + [f"sampler.coefficients={variant}"]})
    return {**result, "coefficients": variant}  # the config's coefficients do not apply to the unadjusted run


def _smooth(values, window: int = SMOOTH) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.arange(1, len(values) + 1) - counts]) / counts


def plot_losses(results: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "loss", "training loss"), (axes[1], "bias/gender", "batch gender bias")):
        for r in results:
            values = [row[key] for row in r["history"]]
            iterations = np.arange(1, len(values) + 1)
            line, = ax.plot(iterations, _smooth(values), label=r["name"])
            ax.plot(iterations, values, color=line.get_color(), alpha=0.2, linewidth=0.8)
        ax.set_xlabel("iteration")
        ax.set_ylabel(f"{label} (moving average of {SMOOTH})")
        ax.grid(alpha=0.3)
    axes[0].legend(title="gradient")
    fig.suptitle("Toy world, gender: training with each gradient (seed Fig. 6a)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scales(scales: dict, summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(scales["timesteps"]) + 1)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant in VARIANTS:
        measured = np.array([b["measured"][variant] for b in scales["batches"]])
        line, = ax.plot(steps, summary["mean"]["measured"][variant], marker="o", markersize=3,
                        label=f"{variant} (autograd)")
        ax.fill_between(steps, measured.min(0), measured.max(0), color=line.get_color(), alpha=0.15)
        if variant != "unadjusted":  # its direct path |k_i| ||g|| is none's closed form
            note = " (= unadjusted's direct path)" if variant == "none" else ""
            ax.plot(steps, summary["mean"]["closed_form"][variant], "--", color=line.get_color(),
                    label=f"{variant}: |C_i k_i| ||g||{note}")
    ax.set_yscale("log")
    ax.set_xticks(steps[::max(1, len(steps) // 10)])
    ax.set_xlabel("sampling step i (1 = first, t = %d; %d = last, t = %d)"
                  % (scales["timesteps"][0], len(steps), scales["timesteps"][-1]))
    ax.set_ylabel("||dL/d eps_i||")
    ax.set_title(f"Per-step gradient scale, mean (band: min-max) over {len(scales['batches'])} batches")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: list, scales: Optional[dict], summary: Optional[dict], meta: dict) -> str:
    lines = [settings_line(meta, "text-encoder LoRA", "gradient") + " Bias before: the original model.", "",
             f"| gradient | final train loss (mean of last {FINAL_WINDOW}) | align | img | face | batch gender bias "
             f"(last {FINAL_WINDOW}) | held-out gender bias before | after | change | sim_latent | sim_layout | "
             "diversity after (before) | s/iter |", "|---|" + "---:|" * 12]
    for r in results:
        h = heldout_row(r)
        final = {k: final_mean(r["history"], k) for k in ("loss", "align", "img", "face", "bias/gender")}
        lines.append(f"| {r['name']} | {final['loss']:.4f} | {final['align']:.4f} | {final['img']:.4f} | "
                     f"{final['face']:.4f} | {final['bias/gender']:.3f} | {h['bias_before']:.3f} ± "
                     f"{h['bias_before_std']:.3f} | {h['bias_after']:.3f} ± {h['bias_after_std']:.3f} | "
                     f"{100 * (h['bias_after'] / h['bias_before'] - 1):+.0f}% | {h['sim_latent']:.3f} | "
                     f"{h['sim_layout']:.3f} | {h['diversity_after']:.3f} ({h['diversity_before']:.3f}) | "
                     f"{r['seconds_per_iteration']:.2f} |")
    if scales is None:
        return "\n".join(lines) + "\n"
    lines += ["", f"Per-step gradient scale ||dL/d eps_i|| (CFG-combined eps), mean over {len(scales['batches'])} "
              "batches at the initial weights. unadjusted: autograd through the whole chain, and |k_i| ||g|| (the "
              "direct path only); adjusted: autograd on the detached reference unroll (the closed form |C_i k_i| "
              "||g|| agrees to the relative error below).", "",
              "| step | t | k_i | unadjusted (autograd) | unadjusted, direct path \\|k_i\\| ‖g‖ | paper | exact "
              "| none |",
              "|" + "---:|" * 8]
    mean = summary["mean"]
    for i, t in enumerate(scales["timesteps"]):
        lines.append(f"| {i + 1} | {t} | {scales['chain_weights'][i]:.4g} | {mean['measured']['unadjusted'][i]:.4g} | "
                     f"{mean['closed_form']['unadjusted'][i]:.4g} | " +
                     " | ".join(f"{mean['measured'][v][i]:.4g}" for v in VARIANTS[1:]) + " |")
    lines += ["", "Closed form vs autograd, largest relative difference: " + ", ".join(
        f"{v} {e:.1e}" for v, e in summary["closed_form_max_rel_error"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> Optional[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, iters=120, eval_images=20, variants=VARIANTS)
    parser.add_argument("--scale-batches", type=int, default=5, help="batches for the per-step scales (0: skip)")
    args = parser.parse_args(argv)
    if worker_or_none(args, worker):
        return None
    variants = check_args(args, VARIANTS)
    if args.scale_batches < 0:
        raise ValueError(f"--scale-batches {args.scale_batches}: expected 0 or more")
    work = Path(args.work_dir or "runs/toy_gradients")
    results = [run_worker(__file__, {**base_spec(args, v, work), "kind": "train"}) for v in variants]
    scales = summary = None
    if args.scale_batches:
        scales = run_worker(__file__, {**base_spec(args, "scales", work), "kind": "scales",
                                       "batches": args.scale_batches})
        summary = summarize_scales(scales)
    meta = run_meta(args, results[0])
    out = Path(args.out_dir)
    payload = {"meta": meta, "variants": variant_rows(results),
               "scales": None if scales is None else {**scales, **summary}}
    table = markdown(results, scales, summary, meta)
    write_outputs(out, "toy_gradients", payload, table, argv)
    plot_losses(results, out / "toy_gradients_loss.png")
    if scales is not None:
        plot_scales(scales, summary, out / "toy_gradients_scales.png")
    print(table)
    return payload


if __name__ == "__main__":
    main()
