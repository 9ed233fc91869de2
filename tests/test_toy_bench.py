"""The toy-world ablation benches: the per-step gradient-scale measurement of bench/toy_gradients.py against the
closed form, and both scripts end to end at the tiniest settings (files and fields; their workers run in this
process: tests/conftest.py's bench_workers_in_process)."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import _toy  # noqa: E402
import toy_components  # noqa: E402
import toy_gradients  # noqa: E402
from fastfair.schedule import solver_schedule  # noqa: E402
from fastfair.testing import TinyCondNet, tiny_scheduler  # noqa: E402

STEPS, GUIDANCE = 20, 3.0
SCHED = tiny_scheduler()


class BlindNet(torch.nn.Module):
    """TinyCondNet that cannot see its input latent: eps_i = f(t_i, text), so eps_i reaches z_0 only directly."""

    def __init__(self):
        super().__init__()
        self.net = TinyCondNet().double()
        self.dtype = torch.float64

    def forward(self, x, t, encoder_hidden_states):
        return self.net(torch.zeros_like(x), t, encoder_hidden_states)


def measured_scales(unet, variant):
    """(autograd ||dL/d eps_i|| [S], closed form [S]) of one float64 reference unroll with CFG."""
    g = torch.Generator().manual_seed(0)
    z_T = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    uncond = torch.randn(1, 5, 16, generator=g, dtype=torch.float64)
    target = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    recorder = toy_gradients.EpsGradients()
    z0 = toy_gradients.reference_unroll(unet, SCHED, z_T, cond, uncond, num_steps=STEPS, guidance_scale=GUIDANCE,
                                        variant=variant, recorder=recorder)
    (((z0 - target) ** 2).sum() + z0.sin().sum()).backward()
    closed = toy_gradients.closed_form_scales(solver_schedule(SCHED, STEPS), variant, recorder.z0_grad_norm)
    return recorder.norms(), closed


@pytest.mark.parametrize("variant", ["paper", "exact", "none"])
def test_adjusted_scales_equal_closed_form(variant):
    measured, closed = measured_scales(TinyCondNet().double(), variant)
    assert len(measured) == STEPS and closed.min() > 0
    np.testing.assert_allclose(measured, closed, rtol=1e-10)


def test_unadjusted_scales_include_the_later_steps():
    # eps_i blind to z: the only path is the direct one, |k_i| ||g||
    measured, direct = measured_scales(BlindNet(), "unadjusted")
    np.testing.assert_allclose(measured, direct, rtol=1e-10)
    # eps_i seen by later U-Net calls through z: only the last step is direct-only
    measured, direct = measured_scales(TinyCondNet().double(), "unadjusted")
    np.testing.assert_allclose(measured[-1], direct[-1], rtol=1e-10)
    assert np.max(np.abs(measured[:-1] / direct[:-1] - 1)) > 1e-2


def test_bad_variants_and_counts_are_refused():
    args = SimpleNamespace(variants="paper,adam", iters=1, eval_images=1, images_per_prompt=None)
    with pytest.raises(ValueError, match="--variants"):
        _toy.check_args(args, toy_gradients.VARIANTS)
    with pytest.raises(ValueError, match="--iters"):
        _toy.check_args(SimpleNamespace(**{**vars(args), "variants": "paper", "iters": 0}), toy_gradients.VARIANTS)
    for flag, value in (("images_per_prompt", 0), ("threads", 0)):  # 0 was read as the default, unsaid
        bad = SimpleNamespace(**{**vars(args), "variants": "paper", flag: value})
        with pytest.raises(ValueError, match=f"--{flag.replace('_', '-')} 0: expected at least 1"):
            _toy.check_args(bad, toy_gradients.VARIANTS)
    with pytest.raises(ValueError, match="paper named twice"):
        _toy.check_args(SimpleNamespace(**{**vars(args), "variants": "paper,paper"}), toy_gradients.VARIANTS)
    with pytest.raises(ValueError, match=r"--seed -1: expected 0 to 2\*\*32 - 1"):
        _toy.check_args(SimpleNamespace(**{**vars(args), "variants": "paper", "seed": -1}), toy_gradients.VARIANTS)
    with pytest.raises(ValueError, match="variant="):
        toy_gradients.reference_unroll(None, SCHED, None, None, None, num_steps=1, guidance_scale=1.0, variant="x")


TINY = ["--iters", "2", "--eval-images", "1", "--images-per-prompt", "2", "--threads", "1"]


def check_variant(row: dict, name: str, iters: int = 2):
    assert row["name"] == name and len(row["history"]) == iters
    assert {"loss", "align", "img", "face", "bias/gender"} <= set(row["history"][0])
    assert row["trainable_parameters"] > 0 and row["seconds_per_iteration"] > 0
    for key in ("final_loss", "bias_before", "bias_after", "sim_latent", "sim_layout"):
        assert np.isfinite(row[key]), key
    assert 0 <= row["bias_after"] <= 1 and -1 <= row["sim_latent"] <= 1


def check_png(path: Path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_toy_gradients_end_to_end(tmp_path, bench_workers_in_process):
    toy_gradients.main(TINY + ["--variants", "unadjusted", "--scale-batches", "1", "--out-dir", str(tmp_path),
                               "--work-dir", str(tmp_path / "runs")])
    assert bench_workers_in_process == ["unadjusted", "scales"]
    result = json.loads((tmp_path / "toy_gradients.json").read_text())
    check_variant(result["variants"][0], "unadjusted")
    assert result["variants"][0]["coefficients"] == "unadjusted" and result["meta"]["batch"] == 2
    scales = result["scales"]
    assert len(scales["timesteps"]) == STEPS and len(scales["batches"]) == 1
    batch = scales["batches"][0]
    for variant in toy_gradients.VARIANTS:
        assert len(batch["measured"][variant]) == STEPS and min(batch["measured"][variant]) > 0
    assert max(scales["closed_form_max_rel_error"].values()) < 1e-4  # fp32 toy model, autograd vs closed form
    last = batch["measured"]["unadjusted"][-1], batch["closed_form"]["unadjusted"][-1]
    assert last[0] == pytest.approx(last[1], rel=1e-4)
    table = (tmp_path / "toy_gradients.md").read_text()
    assert table.startswith("Command: `python bench/toy_gradients.py") and "| unadjusted | " in table
    for name in ("toy_gradients_loss.png", "toy_gradients_scales.png"):
        check_png(tmp_path / name)


def test_toy_components_end_to_end(tmp_path, bench_workers_in_process):
    toy_components.main(TINY + ["--variants", "unet_lora", "--out-dir", str(tmp_path),
                                "--work-dir", str(tmp_path / "runs"), "--seed", "3"])
    assert bench_workers_in_process == ["unet_lora"]
    result = json.loads((tmp_path / "toy_components.json").read_text())
    row, = result["variants"]
    check_variant(row, "unet_lora")
    assert row["target"] == "unet_lora" and result["meta"]["seed"] == 3
    table = (tmp_path / "toy_components.md").read_text()
    assert "from seed 3:" in table
    # the toy config differentiates 5 of its 20 steps (toy_gradients' variants all of them): the table says so
    assert row["grad_steps"] == 5 and "20-step DPM-Solver++ with the gradient through a random 5 of them" in table
    assert "\nseed: 3\n" in (tmp_path / "runs" / "unet_lora" / "train" / "config.yaml").read_text()
    assert "| original | — |" in table and f"| unet_lora | {row['trainable_parameters']:,} |" in table


def test_final_loss_is_the_mean_of_the_last_window():
    history = [{"loss": float(i)} for i in range(30)]
    assert _toy.final_mean(history) == sum(range(10, 30)) / 20
    assert _toy.final_mean(history[:4]) == 1.5  # fewer than the window: all of them


def _heldout(before, after):
    return {"before": {"gender_bias": before, "gender_bias_std": 0.01},
            "after": {"gender_bias": after, "gender_bias_std": 0.02},
            "semantics": {"sim_latent": 0.9, "sim_layout": 0.8, "diversity_before": 0.3, "diversity_after": 0.25}}


META = {"iters": 2, "eval_images": 1, "threads": 1, "seed": 0, "batch": 2, "steps": 20, "grad_steps": None,
        "guidance": 3.0, "lr": 5e-5}


def test_the_tables_show_the_bias_after_and_its_change():
    history = [{"loss": 1.0, "align": 0.5, "img": 0.25, "face": 0.125, "bias/gender": 0.5}] * 2
    result = {"name": "paper", "history": history, "heldout": _heldout(0.8, 0.2), "seconds_per_iteration": 1.5,
              "trainable_parameters": 1234, "coefficients": "paper"}
    row = toy_gradients.markdown([result], None, None, META).splitlines()[-1]
    assert row.startswith("| paper | 1.0000 | 0.5000 | 0.2500 | 0.1250 | 0.500 | 0.800 ± 0.010 | 0.200 ± 0.020 "
                          "| -75% | 0.900 | 0.800 | 0.250 (0.300) | 1.50 |")
    lines = toy_components.markdown([result], META).splitlines()
    assert lines[-2].startswith("| original | — | 0.800 ± 0.010 |")
    assert lines[-1] == "| paper | 1,234 | 0.200 ± 0.020 | 0.900 | 0.800 | 0.250 | 1.0000 | 1.50 |"


def test_the_closed_form_error_is_the_largest_over_steps_and_batches():
    batch = {"measured": {v: [1.0, 1.0] for v in toy_gradients.VARIANTS},
             "closed_form": {v: [1.0, 1.0] for v in toy_gradients.VARIANTS}}
    other = {"measured": {**batch["measured"], "paper": [1.0, 1.3]}, "closed_form": batch["closed_form"]}
    summary = toy_gradients.summarize_scales({"batches": [batch, other]})
    assert summary["closed_form_max_rel_error"]["paper"] == pytest.approx(0.3)
    assert summary["closed_form_max_rel_error"]["exact"] == 0.0
    assert summary["mean"]["measured"]["paper"] == pytest.approx([1.0, 1.15])
