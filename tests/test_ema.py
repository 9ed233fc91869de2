"""The trainer's EMA: diffusers' EMAModel (the public code's EMA) step for step, its count of steps taken across
skipped steps and resumes, and the warning on resuming a run trained before the warm-up."""
import re
import warnings

import pytest
import torch
import yaml
from diffusers.training_utils import EMAModel

from fastfair.config import load_config
from fastfair.ema import EMA
from fastfair.trainer import Trainer
from test_trainer_world import world, write_config  # noqa: F401


def _trajectory(steps=300, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weights = torch.zeros(7, 5)
    for _ in range(steps):  # a drift (LoRA B leaving 0) with noise
        weights = weights + 0.01 + 0.05 * torch.randn(weights.shape, generator=generator)
        yield weights


@pytest.mark.parametrize("decay", [0.996, 0.9, 0.5, 0.0])
def test_the_ema_is_diffusers_emamodel_step_for_step(decay):
    param = torch.nn.Parameter(torch.zeros(7, 5))
    ours, theirs = EMA({"w": param}, decay), EMAModel([param], decay=decay)
    for t, weights in enumerate(_trajectory(), start=1):
        with torch.no_grad():
            param.copy_(weights)
        ours.update({"w": param}, t)
        theirs.step([param])
        assert ours.decay_at(t) == pytest.approx(theirs.get_decay(t), abs=1e-15)
        torch.testing.assert_close(ours.shadow["w"], theirs.shadow_params[0], rtol=1e-5, atol=1e-5)


def test_without_warmup_the_decay_is_constant_and_the_start_fades_as_decay_to_the_t():
    param = torch.nn.Parameter(torch.zeros(3))
    ema = EMA({"w": param}, 0.999, warmup=False)
    with torch.no_grad():
        param.fill_(1.0)
    for t in range(1, 201):
        assert ema.decay_at(t) == 0.999
        ema.update({"w": param}, t)
    # the lag the warm-up removes: 82 % of the average at step 200 is the start (0 here)
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 1 - 0.999 ** 200))
    warm = EMA({"w": torch.nn.Parameter(torch.zeros(3))}, 0.999)
    warm.update({"w": param}, 1)  # d_1 = 0: the first step's weights
    torch.testing.assert_close(warm.shadow["w"], torch.ones(3))


def test_skipped_steps_do_not_count_and_a_resume_continues_the_count(tmp_path, world, monkeypatch):  # noqa: F811
    cfg = load_config(write_config(tmp_path, world, "prefix"), ["optim.ema_decay=0.99"])
    taken = []
    update = EMA.update
    monkeypatch.setattr(EMA, "update", lambda self, params, t: (taken.append(t), update(self, params, t)))
    trainer = Trainer(cfg)
    hook = trainer.model.prefix.prefix.register_hook(lambda grad: grad * float("nan"))
    trainer.iteration(0)  # skipped: no EMA update
    hook.remove()
    trainer.iteration(1)
    trainer.save(2)
    resumed = Trainer(cfg)
    resumed.resume(tmp_path / "run" / "checkpoints" / "step_00000002")
    resumed.iteration(2)
    assert taken == [1, 2]  # the first step taken, then the second (after the resume)
    direct = Trainer(cfg)
    direct.iteration(7)  # a library user's direct call: its noise is iteration 7's, its step the first
    direct.save(8)
    again = Trainer(cfg)
    again.resume(tmp_path / "run" / "checkpoints" / "step_00000008")
    again.iteration(8)  # the count the checkpoint saved, not iterations - skipped
    assert taken == [1, 2, 1, 2]


def test_resuming_a_run_trained_before_the_warmup_warns_how_to_keep_its_ema(tmp_path, world):  # noqa: F811
    Trainer(load_config(write_config(tmp_path, world, "prefix"), ["max_steps=2"])).train()
    step = tmp_path / "run" / "checkpoints" / "step_00000002"

    def ema_warnings(*overrides):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(load_config(write_config(tmp_path, world, "prefix"), list(overrides))).resume(step)
        return [str(w.message) for w in caught if "warm-up" in str(w.message)]

    assert ema_warnings("max_steps=3") == []  # a run of this version
    saved = yaml.safe_load((step / "config.yaml").read_text())
    del saved["optim"]["ema_warmup"]  # as a run saved before 2026-11-30
    (step / "config.yaml").write_text(yaml.safe_dump(saved))
    (warned,) = ema_warnings("max_steps=3")
    assert re.search(r"EMA had no warm-up \(before 2026-11-30, optim.ema_decay=0.5\).*optim.ema_warmup=false and its "
                     "ema_decay", warned)
    assert ema_warnings("max_steps=3", "optim.ema_warmup=false") == []  # kept as it was
    assert ema_warnings("max_steps=3", "optim.ema_decay=0") == []  # no average: nothing changes
    assert ema_warnings("max_steps=2") == []  # finished: nothing to train
