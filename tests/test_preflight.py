"""`python fastfair/train.py ... --check`: the run's start and timed iterations, nothing saved, and a report whose
checkpoint size, retention and disk figures match what the run then really writes; and `--print-config`, the other
look before a run."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastfair import checkpoint, preflight
from fastfair.config import load_config
from fastfair.preflight import Preflight, retention, saved_steps
from fastfair.trainer import Trainer, main
from child_env import child_env
from test_trainer_world import world, write_config  # noqa: F401 (world: a fixture)


def _safetensors_data_bytes(path) -> int:
    """A safetensors file's tensor data: the file less its 8-byte header length and the header."""
    with open(path, "rb") as file:
        header = int.from_bytes(file.read(8), "little")
    return path.stat().st_size - 8 - header


def _outputs(run) -> set:
    return {p.relative_to(run).as_posix() for p in run.rglob("*")} if run.exists() else set()


def test_check_saves_nothing_and_its_checkpoint_size_is_what_the_run_writes(tmp_path, world):
    cfg = load_config(write_config(tmp_path, world, "text_lora", max_steps=3, checkpoint_every=2))
    report = Trainer(cfg).check(2)
    run = tmp_path / "run"
    # the folders the run makes (and its lock file): no checkpoint, config.yaml, metrics, tensorboard or image
    assert _outputs(run) <= {".lock", "checkpoints", "tensorboard"}, _outputs(run)
    assert report.resumes_from is None and report.start == 0 and report.max_steps == 3
    assert len(report.iteration_seconds) == 2 and all(s > 0 for s in report.iteration_seconds)
    assert report.peak_memory > 0 and report.optimizer_state_measured
    assert report.saves == [2, 3] and report.kept == [2, 3] and report.existing_checkpoints == []
    assert report.most_held == 2 and report.disk_needed == 2 * report.checkpoint_bytes and not report.problems()

    Trainer(load_config(write_config(tmp_path, world, "text_lora", max_steps=3, checkpoint_every=2))).train()
    saved = checkpoint.list_checkpoints(run)
    assert list(saved) == [2, 3]  # the check left nothing a fresh run refuses
    # the tensors a checkpoint's files hold (their names, shapes and pickled plain values aside)
    written = (sum(_safetensors_data_bytes(saved[3] / name) for name in ("weights.safetensors", "ema.safetensors"))
               + preflight.tensor_bytes(torch.load(saved[3] / "state.pt", weights_only=True)))
    assert report.checkpoint_bytes == written


def test_without_iterations_the_optimizer_state_is_estimated_as_it_will_be(tmp_path, world):
    path = write_config(tmp_path, world, "unet_lora")
    estimated = Trainer(load_config(path)).check(0)
    measured = Trainer(load_config(path)).check(1)
    assert estimated.iteration_seconds == [] and not estimated.optimizer_state_measured
    assert measured.optimizer_state_measured
    # Adam's two moments: the estimate misses only the step counters
    assert 0 <= measured.checkpoint_bytes - estimated.checkpoint_bytes <= 16 * len(Trainer(load_config(path))
                                                                                      .model.trainable)


def test_check_reports_the_memory_budgets_plan(tmp_path, world):
    cfg = load_config(write_config(tmp_path, world, "unet_lora"), ["sampler.memory_budget_gb=1.0"])
    report = Trainer(cfg).check(1)
    assert report.memory_plans == {3: (3, 0)}  # 1 GiB holds every graph of the 3 steps of this tiny model
    assert "keeps        (sampler.memory_budget_gb) 3 steps: 3 graphs, 0 attention outputs" in report.summary()
    assert Trainer(load_config(write_config(tmp_path, world, "unet_lora"))).check(0).memory_plans is None



def test_the_memory_budget_plans_among_the_steps_gradients_pass_through(tmp_path, world):
    """sampler.grad_steps=2 of 3 steps: at most 2 graphs kept (the engine keeps among the differentiated steps)."""
    cfg = load_config(write_config(tmp_path, world, "unet_lora"), ["sampler.memory_budget_gb=1.0",
                                                                    "sampler.grad_steps=2"])
    report = Trainer(cfg).check(1)
    assert report.memory_plans == {3: (2, 0)}
    assert "(sampler.memory_budget_gb) 3 steps (2 with gradients): 2 graphs, 0 attention outputs" in report.summary()


def test_check_resumes_as_the_run_would(tmp_path, world):
    Trainer(load_config(write_config(tmp_path, world, "prefix", max_steps=2))).train()
    trainer = Trainer(load_config(write_config(tmp_path, world, "prefix", max_steps=5, resume="auto")))
    report = trainer.check(1)
    assert report.resumes_from.endswith("step_00000002") and report.start == 2
    assert report.existing_checkpoints == [1, 2] and report.saves == [3, 4, 5] and report.kept == [4, 5]
    assert report.most_held == 3  # a save writes beside the two kept before retention prunes one
    assert list(checkpoint.list_checkpoints(tmp_path / "run")) == [1, 2]  # nothing new saved
    finished = Trainer(load_config(write_config(tmp_path, world, "prefix", max_steps=2, resume="auto"))).check(2)
    assert finished.iteration_seconds == [] and finished.saves == [] and finished.disk_needed == 0


def test_check_refuses_what_the_run_refuses(tmp_path, world):
    Trainer(load_config(write_config(tmp_path, world, "prefix", max_steps=1))).train()
    fresh = Trainer(load_config(write_config(tmp_path, world, "prefix", max_steps=2, resume="")))
    with pytest.raises(ValueError, match="holds checkpoints of another run"):
        fresh.check(0)
    trainer = Trainer(load_config(write_config(tmp_path, world, "prefix", max_steps=2, resume="auto")))
    with checkpoint.output_dir_lock(tmp_path / "run"):  # a run in progress there
        with pytest.raises(ValueError, match="in use by another run"):
            trainer.check(0)


@pytest.mark.parametrize("checkpoint_every,keep_last,keep_every,existing_to",
                         list(itertools.product([1, 3], [1, 2], [0, 1, 3, 6], [0, 4])))
def test_retention_is_what_pruning_leaves(tmp_path, checkpoint_every, keep_last, keep_every, existing_to):
    """The simulated retention against fastfair.checkpoint's own saves and prunes, counting the folders after
    every save."""
    if keep_every % checkpoint_every and checkpoint_every % keep_every:
        pytest.skip("validate refuses keep_every that is neither a multiple nor a divisor of checkpoint_every")
    one = {"w": torch.zeros(1)}
    existing = []
    for step in range(1, existing_to + 1):
        checkpoint.save_checkpoint(tmp_path, step, one, one, {}, keep_last, keep_every)
    existing = list(checkpoint.list_checkpoints(tmp_path))
    saves = saved_steps(existing_to, 11, checkpoint_every)
    kept, most = retention(existing, saves, keep_last, keep_every)
    counts = [len(existing)]
    for step in saves:
        counts.append(len(checkpoint.list_checkpoints(tmp_path)) + 1)  # the new one beside them, before pruning
        checkpoint.save_checkpoint(tmp_path, step, one, one, {}, keep_last, keep_every)
    assert kept == list(checkpoint.list_checkpoints(tmp_path))
    assert most == max(counts)


def test_saved_steps_are_every_checkpoint_every_th_and_the_last():
    assert saved_steps(0, 10, 4) == [4, 8, 10]
    assert saved_steps(8, 10, 4) == [10] and saved_steps(10, 10, 4) == []
    assert saved_steps(3, 8, 4) == [4, 8]


def _report(**changes) -> Preflight:
    fields = dict(output_dir="runs/x", resumes_from=None, start=0, max_steps=100, world=1, images_per_iteration=8,
                  steps_range=(20, 20), trainable_parameters=10, iteration_seconds=[9.0, 2.0, 4.0, 3.0],
                  peak_memory=3 * 2**30, device_memory=80 * 2**30, checkpoint_bytes=2**20,
                  optimizer_state_measured=True, existing_checkpoints=[], saves=[50, 100], kept=[50, 100],
                  most_held=2, free_disk=2**30)
    fields.update(changes)
    return Preflight(**fields)


def test_the_estimate_leaves_the_first_iteration_out():
    report = _report()
    assert report.seconds_per_iteration == 3.0  # the median of 2, 4, 3: the first paid the warm-ups
    assert "100 x 3.00 s = 5 min 00 s" in report.summary()
    assert _report(iteration_seconds=[7.0]).seconds_per_iteration == 7.0
    assert "peak 3.00 GiB of 80.00 GiB" in report.summary()
    assert "peak 3.00 GiB (3.50 GiB reserved) of 80.00 GiB" in _report(peak_reserved=3.5 * 2**30).summary()
    # images_per_prompt is the global batch: under torchrun each process runs its share (it read "8 images each on
    # 2 processes")
    assert "8 images each on 1 process," in report.summary()
    assert "8 images each (4 on each of 2 processes)," in _report(world=2).summary()


def test_the_estimate_scales_each_iteration_to_the_mean_step_count_of_the_range():
    report = _report(steps_range=(10, 30), steps_drawn=[20, 10, 30, 20], iteration_seconds=[9.0, 2.0, 6.0, 5.0])
    assert report.seconds_per_iteration == 4.0  # 2 s at 10 steps, 6 at 30, 5 at 20: 4, 4 and 5 s at the mean, 20
    summary = report.summary()
    assert "10-30 sampling steps" in summary and "at 20, 10, 30, 20 steps" in summary
    assert "100 x 4.00 s (scaled to 20 steps)" in summary


def test_deepspeed_check_without_iterations_estimates_the_moments(tmp_path, world):
    """ZeRO's gathered shards hold the weights' partitions before the first step, the moments only after it: the
    estimate is what the run then writes, to the step counters."""
    pytest.importorskip("deepspeed")
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "steps_per_print": 10**9}))
    path = write_config(tmp_path, world, "text_unet_lora", max_steps=1)
    report = Trainer(load_config(path, [f"deepspeed.config={ds}"])).check(0)
    assert not report.optimizer_state_measured
    Trainer(load_config(path, [f"deepspeed.config={ds}"])).train()
    saved = checkpoint.list_checkpoints(tmp_path / "run")[1]
    written = (sum(_safetensors_data_bytes(saved / name) for name in ("weights.safetensors", "ema.safetensors"))
               + preflight.tensor_bytes(torch.load(saved / "state.pt", weights_only=False)))
    assert 0 <= written - report.checkpoint_bytes <= 64, (written, report.checkpoint_bytes)


def test_ctrl_c_during_a_check_says_nothing_was_saved(tmp_path, world, capsys, monkeypatch):
    def interrupted(self, iterations):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "check", interrupted)
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(write_config(tmp_path, world, "prefix")), "--check"])
    assert stop.value.code == 130 and "check interrupted; nothing was saved" in capsys.readouterr().err


def test_a_disk_too_small_for_the_checkpoints_is_a_problem():
    assert not _report().problems()
    small = _report(free_disk=2**20)
    assert small.disk_needed == 2 * 2**20
    assert "keep_last" in small.problems()[0] and "PROBLEM" in small.summary()


def test_cli_prints_the_report_and_exits_1_on_a_problem(tmp_path, world, capsys, monkeypatch):
    path = str(write_config(tmp_path, world, "prefix"))
    main(["--config", path, "--check", "--check-iterations", "1"])
    out = capsys.readouterr().out
    assert "iterations   1 checked" in out and "nothing was saved" in out
    monkeypatch.setattr(preflight, "free_bytes", lambda folder: 0)
    monkeypatch.setattr("fastfair.trainer.free_bytes", lambda folder: 0)
    with pytest.raises(SystemExit) as stop:
        main(["--config", path, "--check", "--check-iterations", "0"])
    assert stop.value.code == 1 and "PROBLEM" in capsys.readouterr().out
    for argv, message in ((["--check-iterations", "1"], "goes with --check"),
                          (["--check", "--check-iterations", "-1"], "whole number"),
                          (["--check", "--check-iterations", "\u0663"], "whole number")):  # an Arabic-Indic 3
        with pytest.raises(SystemExit) as stop:
            main(["--config", path, *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_print_config_prints_the_resolved_settings_and_touches_nothing(tmp_path, world, capsys, monkeypatch):
    import yaml

    from fastfair.config import config_to_dict

    monkeypatch.chdir(tmp_path)
    path = str(write_config(tmp_path, world, "prefix"))
    main(["--config", path, "--print-config", "max_steps=7", "sampler.grad_steps=2"])
    captured = capsys.readouterr()
    printed = yaml.safe_load(captured.out)
    assert "refused" not in captured.err
    assert printed == config_to_dict(load_config(path, ["max_steps=7", "sampler.grad_steps=2"]))
    assert printed["max_steps"] == 7 and printed["sampler"]["grad_steps"] == 2
    assert not (tmp_path / "run").exists()
    main(["--config", path, "--print-config", "sampler.grad_steps=50"])  # printed, and what a run would say
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["sampler"]["grad_steps"] == 50
    assert "note: a run of these settings on this machine would be refused:" in captured.err
    assert "sampler.grad_steps" in captured.err
    with pytest.raises(SystemExit) as stop:
        main(["--config", path, "--print-config", "--check"])
    assert stop.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_the_script_imports_a_hook_module_from_the_current_folder(tmp_path):
    """`python fastfair/train.py` (and torchrun's ranks) had no current folder on sys.path, which `python -m` has:
    a hook module beside the run was 'No module named' there only."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "cwd_hooks.py").write_text("from fastfair.toy import detect_faces as detect\n")
    run = subprocess.run([sys.executable, str(repo / "fastfair" / "train.py"), "--config", str(repo / "configs" /
                          "toy.yaml"), "--check", "--check-iterations", "1", f"output_dir={tmp_path / 'run'}",
                          "faces.detector=callable", "faces.detector_fn=cwd_hooks:detect"],
                         env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and "nothing was saved" in run.stdout, run.stderr[-3000:]
