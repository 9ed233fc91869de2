"""What a run does with what is already on disk and with settings that change between runs: nothing saved is lost,
a resume applies the new optimizer settings, and every refusal names the setting and the fix."""
import errno
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastfair import checkpoint
from fastfair.config import ConfigError, load_config, resume_changes, save_config, validate
from fastfair.trainer import Trainer
from child_env import child_env
from test_trainer_world import world, write_config  # noqa: F401 (world: a fixture)

REPO = Path(__file__).resolve().parents[1]


def _trained(root, world, *overrides):
    cfg = load_config(write_config(root, world), list(overrides))
    trainer = Trainer(cfg)
    trainer.train()
    return cfg, trainer


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(tmp_path, world):
    cfg, _ = _trained(tmp_path, world)  # steps 1, 2 (keep_last 2)
    saved = {p.name: p.stat().st_mtime_ns for p in checkpoint.checkpoint_dir(cfg.output_dir).iterdir()}
    config_before = (Path(cfg.output_dir) / "config.yaml").read_text()
    again = load_config(write_config(tmp_path, world), ["max_steps=1", "finetune.lora.rank=2"])
    with pytest.raises(ValueError, match=r"holds checkpoints of another run \(steps 1, 2\), which a fresh run "
                                         r"\(resume=''\) would overwrite and mix with its own: continue it with "
                                         r"resume=auto"):
        Trainer(again).train()
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.checkpoint_dir(cfg.output_dir).iterdir()} == saved
    assert (Path(cfg.output_dir) / "config.yaml").read_text() == config_before
    earlier = load_config(write_config(tmp_path, world),  # a resume from step 1 would bury step 2 likewise
                          ["max_steps=3", f"resume={checkpoint.checkpoint_dir(cfg.output_dir) / 'step_00000001'}"])
    with pytest.raises(ValueError, match=r"newer than the step 1 this run resumes from \(steps 2\), which it would "
                                         "overwrite: resume=auto continues from the newest"):
        Trainer(earlier).train()
    # checkpoints whose state.pt was deleted to save space (their weights still export) are kept safe too
    for folder in checkpoint.checkpoint_dir(cfg.output_dir).iterdir():
        (folder / "state.pt").unlink()
    weights = {p.name: p.read_bytes() for p in checkpoint.checkpoint_dir(cfg.output_dir).glob("*/*.safetensors")}
    for resume in ("", "auto"):  # auto finds nothing to resume: a fresh start
        fresh = load_config(write_config(tmp_path, world), ["max_steps=1", f"resume={resume}"])
        with pytest.raises(ValueError, match=r"of another run \(steps 1, 2\).*none of its checkpoints can be resumed "
                                             r"\(each lacks state.pt or a weight file\): use another output_dir"):
            Trainer(fresh).train()
    assert {p.name: p.read_bytes() for p in checkpoint.checkpoint_dir(cfg.output_dir).glob("*/*.safetensors")} == \
        weights
    # a checkpoint that lost a weight file keeps the other (the EMA export reads) and is kept safe too
    (checkpoint.checkpoint_dir(cfg.output_dir) / "step_00000002" / "weights.safetensors").unlink()
    with pytest.raises(ValueError, match=r"of another run \(steps 1, 2 \(incomplete\)\)"):
        Trainer(load_config(write_config(tmp_path, world), ["max_steps=1", "resume="])).train()


def test_a_resume_from_another_folder_or_a_fresh_start_keeps_another_runs_checkpoints_and_log(tmp_path, world):
    """A run resuming a checkpoint of another folder into an output_dir holding a run's checkpoints or log mixed the
    two (the log ran on from the other's lines) and its retention deleted those checkpoints; a fresh run replaced
    the log and image grids of a run whose checkpoints were moved away. Both refused, nothing touched; a rerun of a
    run that stopped before its first checkpoint still starts afresh."""
    source, _ = _trained(tmp_path / "a", world, "max_steps=2")  # checkpoints 1, 2 elsewhere
    resume = f"resume={checkpoint.checkpoint_dir(source.output_dir) / 'step_00000002'}"
    other, _ = _trained(tmp_path / "x", world, "max_steps=1", "seed=1")  # another run: step 1
    def files(run):  # its checkpoints, log, config and image grids (the lock file records each run's start)
        return {path: path.read_bytes() for path in Path(run).rglob("*") if path.is_file() and path.name != ".lock"}

    before = files(other.output_dir)
    with pytest.raises(ValueError, match=r"holds checkpoints \(steps 1\), and this run resumes from resume=.*a/run/"
                                         r"checkpoints/step_00000002, a checkpoint of another folder: it would mix"):
        Trainer(load_config(write_config(tmp_path / "x", world), ["max_steps=4", resume])).train()
    assert files(other.output_dir) == before
    shutil.rmtree(checkpoint.checkpoint_dir(other.output_dir))  # moved away (after an export, say)
    before = files(other.output_dir)
    with pytest.raises(ValueError, match=r"holds the log of a run \(metrics.jsonl, to step 1\), and this run resumes"):
        Trainer(load_config(write_config(tmp_path / "x", world), ["max_steps=4", resume])).train()
    shutil.rmtree(checkpoint.checkpoint_dir(source.output_dir))  # run a: logged to step 2, past its checkpoint 1
    log = (Path(source.output_dir) / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"holds the log of a run that reached step 2 \(metrics.jsonl\), past its "
                                         r"first checkpoint at step 1, but no checkpoint: they were moved or deleted"):
        Trainer(load_config(write_config(tmp_path / "a", world), ["max_steps=3"])).train()
    assert (Path(source.output_dir) / "metrics.jsonl").read_bytes() == log
    assert files(other.output_dir) == before
    # run x logged step 1 and its first checkpoint was at step 1: a run that could have stopped while saving it,
    # so a fresh rerun starts afresh there (as one that stopped before its first checkpoint)
    Trainer(load_config(write_config(tmp_path / "x", world), ["max_steps=1", "seed=2"])).train()
    assert checkpoint.list_checkpoints(other.output_dir).keys() == {1}


def test_resume_auto_refuses_to_overwrite_a_newest_checkpoint_it_cannot_resume(tmp_path, world, monkeypatch):
    """A newest checkpoint that lost a file (its state.pt deleted to save space, a weight file lost in a copy):
    resume=auto passes over it to the newest complete one, but training on would overwrite it, so the run refuses,
    naming what it lacks and the way on (it said 'resuming from step_1', then refused without saying why); an
    explicit resume of it names the missing file; a cut-off state.pt is named, not a torch traceback."""
    import warnings

    cfg, _ = _trained(tmp_path, world)  # steps 1, 2
    root = checkpoint.checkpoint_dir(cfg.output_dir)
    (root / "step_00000002" / "state.pt").unlink()
    assert checkpoint.resolve_resume("auto", cfg.output_dir) == root / "step_00000001"
    resumed = load_config(write_config(tmp_path, world), ["max_steps=3", "resume=auto"])
    with warnings.catch_warnings(record=True) as caught, pytest.raises(
            ValueError, match=r"holds checkpoints newer than the step 1 this run resumes from that cannot be resumed "
                              r"\(step_00000002 lacks state.pt\), and training on would overwrite them: move them out "
                              r"of .*checkpoints \(its weights still export: python -m fastfair.export "
                              r".*step_00000002 --out DIR\) or delete them, then the run continues from step 1"):
        warnings.simplefilter("always")
        Trainer(resumed).train()
    assert not [w for w in caught if "resuming from" in str(w.message)]  # no word of a resume that does not happen
    assert sorted(p.name for p in (root / "step_00000002").iterdir()) == ["config.yaml", "ema.safetensors",
                                                                         "weights.safetensors"]
    (root / "step_00000002" / "weights.safetensors").unlink()
    with pytest.raises(ValueError, match=r"\(step_00000002 lacks state.pt, weights.safetensors\), .*move them out of "
                                         r"\S*checkpoints or delete them"):
        Trainer(resumed).train()
    with pytest.raises(ValueError, match=r"resume=.*step_00000002: not a checkpoint folder: it lacks "
                                         "state.pt, weights.safetensors"):
        checkpoint.resolve_resume(str(root / "step_00000002"), cfg.output_dir)
    shutil.move(str(root / "step_00000002"), str(tmp_path / "kept"))  # as the message says
    on = Trainer(resumed)
    on.train()
    assert on.start == 1 and list(checkpoint.list_checkpoints(cfg.output_dir)) == [2, 3]
    state = root / "step_00000003" / "state.pt"
    intact = state.read_bytes()
    # bytes changed inside a tensor's data: torch.load reads them without a word (an optimizer moment silently
    # wrong); the archive's checksum of that member tells
    with zipfile.ZipFile(state) as archive:
        member = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    names, extra = struct.unpack("<HH", intact[member.header_offset + 26:member.header_offset + 30])
    middle = member.header_offset + 30 + names + extra + member.file_size // 2
    changed = bytearray(intact)
    changed[middle:middle + 4] = b"\xff\xff\xff\x7f"
    assert bytes(changed) != intact and torch.load(io.BytesIO(bytes(changed)), weights_only=True)["iteration"] == 3
    for damage, why in ((intact[:1000], ""), (os.urandom(5000), ""), (b"hello world, not a checkpoint\n", ""),
                        (bytes(changed), "the checksum of .* inside it fails")):
        state.write_bytes(damage)
        with pytest.raises(ValueError, match=rf"state.pt: cannot be read \({why}.*damaged or was cut off in a copy: "
                                             r"copy it again, or move this checkpoint away"):
            checkpoint.load_checkpoint(root / "step_00000003")
    state.write_bytes(intact)
    saved = checkpoint.load_checkpoint(root / "step_00000003")[2]
    assert saved["iteration"] == 3
    torch.save(saved, state, _use_new_zipfile_serialization=False)  # no archive, no checksums: as torch < 1.6 wrote
    assert checkpoint.load_checkpoint(root / "step_00000003")[2]["iteration"] == 3
    with monkeypatch.context() as patch:  # a file that cannot be read now is not a damaged one
        patch.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
        with pytest.raises(PermissionError):
            checkpoint.load_checkpoint(root / "step_00000003")


def test_a_resume_that_moves_the_schedules_horizon_warns(tmp_path, world):
    """max_steps is the horizon of a linear/cosine learning-rate schedule: a resume that changes it is allowed but
    said (the run differs from one started with the new max_steps); a constant schedule has none to move."""
    _trained(tmp_path, world, "max_steps=1", "optim.scheduler=linear")
    longer = Trainer(load_config(write_config(tmp_path, world), ["max_steps=2", "optim.scheduler=linear",
                                                                 "resume=auto"]))
    with pytest.warns(UserWarning, match="trained toward max_steps=1: the linear learning-rate schedule now decays "
                                         "toward step 2"):
        longer.train()


def test_resume_checks_max_steps_and_shapes(tmp_path, world):
    cfg, _ = _trained(tmp_path, world, "max_steps=2")
    config_before = (Path(cfg.output_dir) / "config.yaml").read_text()
    shorter = load_config(write_config(tmp_path, world), ["max_steps=1", "resume=auto"])
    with pytest.raises(ValueError, match="max_steps=1, but the run resumed from step 2: raise max_steps"):
        Trainer(shorter).train()
    assert (Path(cfg.output_dir) / "config.yaml").read_text() == config_before
    other_rank = load_config(write_config(tmp_path, world), ["max_steps=3", "resume=auto", "finetune.lora.rank=2"])
    with pytest.raises(ValueError, match=r"other shapes than this model's .*\[4, .*here \[2, .*finetune.lora.rank"):
        Trainer(other_rank).train()


def test_resume_applies_the_new_optimizer_settings(tmp_path, world):
    """Unchanged settings: the optimizer's param groups are the saved ones exactly; changed: the new values, and
    the learning rate follows the schedule from the new base (config.yaml records what ran)."""
    cfg, first = _trained(tmp_path, world, "max_steps=2", "optim.scheduler=linear", "optim.warmup_steps=1")
    saved = checkpoint.load_checkpoint(checkpoint.checkpoint_dir(cfg.output_dir) / "step_00000002")[2]
    same = Trainer(load_config(write_config(tmp_path, world),
                               ["max_steps=2", "optim.scheduler=linear", "optim.warmup_steps=1", "resume=auto"]))
    same.resume(checkpoint.checkpoint_dir(cfg.output_dir) / "step_00000002")
    keys = ("lr", "initial_lr", "betas", "weight_decay", "eps")
    assert [{k: g[k] for k in keys} for g in same.optimizer.param_groups] == \
        [{k: (tuple(g[k]) if k == "betas" else g[k]) for k in keys} for g in saved["optimizer"]["param_groups"]]
    assert same.lr_scheduler.get_last_lr() == saved["lr_scheduler"]["_last_lr"]
    changed = Trainer(load_config(write_config(tmp_path, world),
                                  ["max_steps=4", "optim.scheduler=linear", "optim.warmup_steps=1", "resume=auto",
                                   "optim.lr=0.5", "optim.weight_decay=0.1", "optim.betas=[0.8,0.9]"]))
    changed.resume(checkpoint.checkpoint_dir(cfg.output_dir) / "step_00000002")
    factor = changed.lr_scheduler.lr_lambdas[0](2)  # linear decay over 4 steps after 1 of warm-up, at step 2
    assert 0 < factor < 1
    for group in changed.optimizer.param_groups:
        assert group["lr"] == 0.5 * factor and group["initial_lr"] == 0.5
        assert group["weight_decay"] == 0.1 and group["betas"] == (0.8, 0.9)
    changed.train()  # steps 3 and 4 at the new settings
    assert changed.lr_scheduler.base_lrs == [0.5]
    state = checkpoint.load_checkpoint(checkpoint.checkpoint_dir(cfg.output_dir) / "step_00000004")[2]
    assert state["optimizer"]["param_groups"][0]["weight_decay"] == 0.1


def test_resume_refuses_other_settings_unless_allowed(tmp_path, world):
    """A resume continues the same run: settings other than optim.*, max_steps, logging and the checkpoint cadence
    must be those the checkpoint was trained with (its state holds them), or be listed in resume_allow; a changed
    retention would have pruned the checkpoints the run kept."""
    import yaml

    cfg, _ = _trained(tmp_path, world, "max_steps=2", "keep_every=2")
    folder = checkpoint.checkpoint_dir(cfg.output_dir)
    saved = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    config_before = (Path(cfg.output_dir) / "config.yaml").read_text()
    changed = ["max_steps=3", "resume=auto", "sampler.num_steps=4", "keep_every=0", "optim.lr=0.02",
               "logging.log_every=2"]
    message = (r"this run changes settings the checkpoint was trained with: keep_every=0 \(trained with 2\), "
               r"sampler.num_steps=4 \(trained with 3\)\. .*add resume_allow=\[keep_every,sampler.num_steps\]")
    with pytest.raises(ValueError, match=message):
        Trainer(load_config(write_config(tmp_path, world), changed)).train()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == saved
    assert (Path(cfg.output_dir) / "config.yaml").read_text() == config_before
    own = checkpoint.config_file(folder / "step_00000002")
    assert own == folder / "step_00000002" / "config.yaml" and yaml.safe_load(own.read_text())["keep_every"] == 2
    own.unlink()  # a checkpoint from before checkpoints held their settings: the run's config.yaml is read instead
    assert checkpoint.config_file(folder / "step_00000002") == Path(cfg.output_dir) / "config.yaml"
    with pytest.raises(ValueError, match=message):
        Trainer(load_config(write_config(tmp_path, world), changed)).train()
    allowed = Trainer(load_config(write_config(tmp_path, world), changed + ["resume_allow=[keep_every,sampler]"]))
    allowed.train()
    assert allowed.start == 2 and checkpoint.list_checkpoints(cfg.output_dir).keys() == {2, 3}
    with pytest.raises(ConfigError, match="resume_allow: unknown config key 'sampler.num_step'"):
        validate(load_config(write_config(tmp_path, world), ["resume_allow=[sampler.num_step]"]))


def test_a_resume_whose_recorded_settings_are_damaged_or_gone_is_refused(tmp_path, world):
    """An empty, non-YAML or non-mapping config.yaml in the checkpoint read as "nothing recorded": the resume then
    trained on with other settings unchecked; with both it and the run's config.yaml gone likewise."""
    cfg, _ = _trained(tmp_path, world, "max_steps=1")
    own = checkpoint.checkpoint_dir(cfg.output_dir) / "step_00000001" / "config.yaml"
    recorded = own.read_text()
    changed = ["max_steps=2", "resume=auto", "sampler.guidance_scale=1.5"]
    for text, why in (("", "empty"), ("max_steps: [oops\n", "not YAML: "), ("- a list\n", "a list, not the mapping")):
        own.write_text(text)
        with pytest.raises(ValueError, match=rf"step_00000001/config.yaml: the settings step_00000001 was trained "
                                             rf"with cannot be read \({re.escape(why)}.*the file is damaged"):
            Trainer(load_config(write_config(tmp_path, world), changed)).train()
    own.unlink()  # as a checkpoint written before they held their settings: the run's config.yaml is read
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "step_00000001").symlink_to(own.parent)  # named through a link: its own run's
    assert checkpoint.config_file(tmp_path / "links" / "step_00000001") == Path(cfg.output_dir).resolve() / "config.yaml"
    (Path(cfg.output_dir) / "config.yaml").unlink()
    with pytest.raises(ValueError, match=r"resume=.*step_00000001: no record of the settings it was trained with"):
        Trainer(load_config(write_config(tmp_path, world), changed)).train()
    assert list(checkpoint.list_checkpoints(cfg.output_dir)) == [1]
    own.write_text(recorded)  # restored: the change is named again, and without it the run goes on
    with pytest.raises(ValueError, match=r"sampler.guidance_scale=1.5 \(trained with"):
        Trainer(load_config(write_config(tmp_path, world), changed)).train()
    resumed = Trainer(load_config(write_config(tmp_path, world), changed[:2]))
    resumed.train()
    assert resumed.start == 1


def test_relative_paths_are_saved_absolute_so_a_run_continues_from_any_folder(tmp_path, world, monkeypatch):
    """Relative paths are read from the folder a run starts in; its saved settings name the same files absolutely,
    so a resume, export or evaluation started elsewhere reads them (it used the current folder), and settings
    saved relative by an older fastfair compare equal to the same files named absolutely."""
    import yaml

    monkeypatch.chdir(world["sd"].parent)
    relative = {"model.pretrained": os.path.relpath(world["sd"]), "classifiers.gender.path":
                os.path.relpath(world["classifier"]), "semantics.clip_path": os.path.relpath(world["clip"])}
    assert not any(Path(value).is_absolute() for value in relative.values())
    cfg, _ = _trained(tmp_path, world, "max_steps=1", *(f"{key}={value}" for key, value in relative.items()))
    run_config = Path(cfg.output_dir) / "config.yaml"
    own = checkpoint.config_file(checkpoint.checkpoint_dir(cfg.output_dir) / "step_00000001")
    for saved in (yaml.safe_load(run_config.read_text()), yaml.safe_load(own.read_text())):
        assert saved["model"]["pretrained"] == str(world["sd"])
        assert saved["classifiers"]["gender"]["path"] == str(world["classifier"])
        assert saved["semantics"]["clip_path"] == str(world["clip"])
    monkeypatch.chdir(tmp_path)  # elsewhere: the relative paths name nothing here
    assert not Path(relative["model.pretrained"]).exists()
    resumed = Trainer(load_config(run_config, ["max_steps=2", "resume=auto"]))
    resumed.train()
    assert resumed.start == 1 and 2 in checkpoint.list_checkpoints(cfg.output_dir)
    monkeypatch.chdir(world["sd"].parent)  # settings an older fastfair saved as given, read from where it ran
    older = yaml.safe_load(own.read_text())
    older["model"]["pretrained"] = relative["model.pretrained"]
    assert resume_changes(older, load_config(run_config)) == {}
    older["model"]["pretrained"] = "elsewhere"
    assert resume_changes(older, load_config(run_config)) == {
        "model.pretrained": (str(world["sd"].parent / "elsewhere"), str(world["sd"]))}


def test_step_counts_and_prefix_lengths_that_cannot_run_are_refused_at_start(tmp_path, world):
    with pytest.raises(ValueError, match=r"sampler.num_steps_range: num_steps=999: the scheduler's noise levels "
                                         r"repeat"):
        Trainer(load_config(write_config(tmp_path, world), ["sampler.num_steps_range=[990, 999]",
                                                            "sampler.num_steps=990"]))
    with pytest.raises(ValueError, match=r"finetune.prefix_tokens=11: the text encoder reads 12 tokens, two of them "
                                         r"the start and end tokens: use at most 10"):
        Trainer(load_config(write_config(tmp_path, world, "prefix"), ["finetune.prefix_tokens=11"]))


@pytest.mark.parametrize("option,message", [
    ({"solver_order": 3}, r"model.pretrained=.*: its scheduler/scheduler_config.json, loaded as a "
                          r"DPMSolverMultistepScheduler: scheduler solver_order=3 is not supported"),
    ({"prediction_type": "sample"}, r"sampler.num_steps: coefficients='exact': a step has chain weight 0"),
])
def test_a_scheduler_the_run_cannot_use_is_refused_at_start_naming_its_source(tmp_path, world, option, message):
    """An option of the model folder's own scheduler is the folder's problem, not sampler.num_steps'; the exact
    adjustment of a schedule whose z_0 ignores every step's eps but the last is refused before any sampling."""
    model = tmp_path / "sd"
    shutil.copytree(world["sd"], model)
    settings_file = model / "scheduler" / "scheduler_config.json"
    settings_file.write_text(json.dumps({**json.loads(settings_file.read_text()), **option}))
    with pytest.raises(ValueError, match=message):
        Trainer(load_config(write_config(tmp_path, world), [f"model.pretrained={model}", "sampler.num_steps_range=null",
                                                            "sampler.coefficients=exact"]))


def test_a_warmup_longer_than_the_run_warns(tmp_path, world):
    """Not refused (a run trained in stages may raise max_steps on a resume), but the learning rate never reaches
    optim.lr: said as the resume's horizon warning is."""
    cfg = load_config(write_config(tmp_path, world), ["optim.warmup_steps=5"])  # max_steps=2
    with pytest.warns(UserWarning, match=r"optim.warmup_steps=5 exceeds max_steps=2: the learning rate reaches only "
                                         r"33% of optim.lr=0.01 by the last iteration; lower optim.warmup_steps or "
                                         r"raise max_steps"):
        Trainer(cfg)


def test_targets_that_contradict_a_classifier_files_own_names_are_refused(tmp_path, world):
    """The world's classifier file names its outputs (gender: female 0, male 1): a swapped mapping would have
    steered toward the opposite of the target, silently."""
    swapped = ("targets.attributes=[{name: gender, classes: {female: 1, male: 0}, "
               "probabilities: {female: 0.9, male: 0.1}}]")
    with pytest.raises(ValueError, match=r"targets attribute 'gender': class 'female' reads output 1, but the file's "
                                         r"'female' is output 0 \(female: 0, male: 1\)"):
        Trainer(load_config(write_config(tmp_path, world), [swapped]))
    with pytest.raises(ValueError, match=r"class 'female' reads output 1, but the file's 'female' is output 0"):
        Trainer(load_config(write_config(tmp_path, world), [swapped, "classifiers.gender.attributes={gender: [0, 1]}"]))
    # names the file lacks (another spelling, e.g. 'Female'): refused too, or a swap under them would go unseen
    for classes in ("{Female: 1, Male: 0}", "{woman: 0, man: 1}"):
        other_names = f"targets.attributes=[{{name: gender, classes: {classes}, probabilities: uniform}}]"
        with pytest.raises(ValueError, match=r"targets attribute 'gender': classes \[.*\] are not the file's gender "
                                             r"classes \(female: 0, male: 1\): name each class as the file does"):
            Trainer(load_config(write_config(tmp_path, world), [other_names]))


def test_resume_refuses_another_optimizer(tmp_path, world):
    """adamw and adamw8bit states differ in layout: loading one into the other failed later with KeyError 'state1'.
    Checkpoints written before the name was saved are recognised by their moments' keys."""
    import torch

    pytest.importorskip("bitsandbytes")  # the other optimizer is built before the checkpoint is read

    cfg, _ = _trained(tmp_path, world, "max_steps=2")
    other = load_config(write_config(tmp_path, world), ["max_steps=3", "resume=auto", "optim.name=adamw8bit"])
    message = r"optim.name=adamw8bit, but resume=.* holds an adamw optimizer state: resume with optim.name=adamw"
    with pytest.raises(ValueError, match=message):
        Trainer(other).train()
    state_file = checkpoint.checkpoint_dir(cfg.output_dir) / "step_00000002" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    assert state.pop("optimizer_name") == "adamw"
    torch.save(state, state_file)
    with pytest.raises(ValueError, match=message):
        Trainer(other).train()


def test_adamw8bit_without_bitsandbytes_names_the_setting(tmp_path, world, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as where it is not installed
    with pytest.raises(ValueError, match="optim.name=adamw8bit needs the bitsandbytes package.*use optim.name=adamw"):
        Trainer(load_config(write_config(tmp_path, world), ["optim.name=adamw8bit"]))


def test_one_process_group_sets_local_rank_and_leaves_no_file(tmp_path):
    # a fresh process: this module's world fixture already holds a process group. Its store lives in memory: a
    # store file in the temp folder stayed behind whenever a run was killed
    code = """
import os
import torch.distributed as dist
import fastfair.process_group as t
with t.process_group():
    assert os.environ["LOCAL_RANK"] == "0" and dist.get_world_size() == 1
    probe = __import__("torch").ones(3)
    dist.all_reduce(probe)  # the group works
    assert probe.tolist() == [1.0, 1.0, 1.0]
    assert t.init_distributed() is False  # joined, not created again
assert "LOCAL_RANK" not in os.environ and not dist.is_initialized()
with t.process_group():
    print("ok", flush=True)
    os._exit(0)  # as a killed run ends: no clean-up runs
"""
    env = child_env(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path))
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def test_a_one_process_group_keeps_what_the_caller_set(tmp_path):
    """LOCAL_RANK set before the run (by a launcher or the user) is theirs: closing the group leaves it as it was;
    a process group made before the block is the caller's too: the block joins it and leaves it open."""
    code = """
import os
import fastfair.process_group as t
with t.process_group():
    assert os.environ["LOCAL_RANK"] == "0"
assert os.environ.get("LOCAL_RANK") == "0", os.environ.get("LOCAL_RANK")
import torch.distributed as dist
with t.process_group():  # the caller's group, made before: joined, and left to the caller at the end
    with t.process_group():
        pass
    assert dist.is_initialized()
assert not dist.is_initialized()
print("ok", flush=True)
"""
    env = child_env(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path), LOCAL_RANK="0")
    for name in ("RANK", "WORLD_SIZE"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_deepspeed_runs_one_after_another_in_one_process(tmp_path, world):
    """Each in its own process group (a fresh process: this module's world fixture holds one): the first group's
    end must also drop DeepSpeed's clones of it, or the second engine reaches them ("Group ... is not
    registered")."""
    pytest.importorskip("deepspeed")
    ds_json = tmp_path / "zero2_fp32.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}, "steps_per_print": 10**9}))
    configs = [write_config(tmp_path / name, world) for name in ("first", "second")]
    code = f"""
from fastfair.config import load_config
from fastfair.trainer import Trainer, process_group
for config in {[str(c) for c in configs]!r}:
    with process_group():
        Trainer(load_config(config, ["max_steps=1", "deepspeed.config={ds_json}"])).train()
print("ok")
"""
    env = child_env(OMP_NUM_THREADS="1")
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_deepspeed_settings_are_checked_before_anything_loads(tmp_path, world):
    cfg = load_config(write_config(tmp_path, world), ["deepspeed.zero_stage=2"])
    with pytest.raises(ConfigError, match="deepspeed.zero_stage=2 without deepspeed.config"):
        validate(cfg)
    ds_json = tmp_path / "zero3.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg = load_config(write_config(tmp_path, world), [f"deepspeed.config={ds_json}", "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match="deepspeed.zero_stage=3 partitions the parameters"):
        validate(cfg)
    from fastfair.config import check_files

    cfg = load_config(write_config(tmp_path, world), [f"deepspeed.config={ds_json}"])
    with pytest.raises(ConfigError, match="zero3.json sets ZeRO stage 3"):
        check_files(cfg)


def test_deepspeed_under_plain_python_then_export_and_a_clear_resume_error(tmp_path, world):
    """A DeepSpeed run started by plain `python` (its own 1-process group): its checkpoint (DeepSpeed objects in
    state.pt) exports and evaluates (weights only), and a resume without DeepSpeed says what to do."""
    pytest.importorskip("deepspeed")
    from fastfair.export import export

    ds_json = tmp_path / "zero2_fp32.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}, "steps_per_print": 10**9}))
    cfg, _ = _trained(tmp_path, world, "max_steps=1", f"deepspeed.config={ds_json}")
    step = checkpoint.checkpoint_dir(cfg.output_dir) / "step_00000001"
    weights, ema = checkpoint.load_weights(step)
    assert weights and set(weights) == set(ema)
    out = export(step, tmp_path / "export")
    assert load_file(str(out / "pytorch_lora_weights.safetensors"))
    from fastfair.evaluation.sources import load_sources

    assert "finetuned" in load_sources(str(world["sd"]), str(step))[2]
    plain = load_config(write_config(tmp_path, world), ["max_steps=2", "resume=auto"])
    # (worded in two places: where unpickling refuses DeepSpeed's classes, and where they were allowed before)
    with pytest.raises(ValueError, match="a checkpoint of a DeepSpeed run.*resume it with its deepspeed.config"):
        Trainer(plain).train()


def test_resolution_and_step_counts_are_refused_before_the_model_loads(tmp_path, world, monkeypatch):
    """Read from the scheduler's and the VAE's config files (fastfair.models.sampling_configs), not after the load."""
    import fastfair.trainer

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(fastfair.trainer, "load_stable_diffusion", no_load)
    for overrides, message in ((["model.resolution=31"], r"model.resolution=31 is not a multiple of the VAE's factor "
                                                         r"\d+: use e.g."),
                               (["sampler.num_steps=2000"], r"sampler.num_steps: .*2000")):
        cfg = load_config(write_config(tmp_path, world), overrides)
        with pytest.raises(ValueError, match=message):
            Trainer(cfg)


def test_saved_config_is_a_plain_readable_file(tmp_path, world):
    cfg = load_config(write_config(tmp_path, world))
    save_config(cfg, tmp_path / "out" / "config.yaml")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out" / "config.yaml").stat().st_mode) == 0o666 & ~umask


def test_cli_reports_bad_settings_without_a_traceback(tmp_path, world):
    config = write_config(tmp_path, world)
    env = child_env(OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(REPO / "fastfair" / "train.py"), "--config", str(config),
                          "sampler.guidance_scale=-1"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "fastfair/train.py: error:" in run.stderr and "sampler.guidance_scale=-1.0 must be >= 1" in run.stderr
    assert "Traceback" not in run.stderr
    env["FASTFAIR_TRACEBACK"] = "1"
    run = subprocess.run([sys.executable, str(REPO / "fastfair" / "train.py"), "--config", str(config),
                          "sampler.guidance_scale=-1"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "Traceback" in run.stderr


def test_a_run_reports_bad_settings_and_missing_files_together(tmp_path, world):
    cfg = load_config(write_config(tmp_path, world), ["sampler.guidance_scale=-1", "model.pretrained=/nope"])
    with pytest.raises(ConfigError) as error:
        Trainer(cfg)
    assert "sampler.guidance_scale=-1.0 must be >= 1" in str(error.value)
    assert "model.pretrained=/nope does not exist" in str(error.value)


def test_a_second_run_in_one_output_dir_is_refused_naming_the_holder(tmp_path, world, monkeypatch):
    """Two runs in one output_dir deleted each other's saves in progress and interleaved metrics.jsonl, silently:
    the run holds output_dir/.lock (host, pid, start) from its start to its end, and a second run is refused at
    start, before it writes anything, naming the holder and the way on."""
    cfg = load_config(write_config(tmp_path, world), ["max_steps=1"])
    out = Path(cfg.output_dir)
    with checkpoint.output_dir_lock(out):  # another run, started first
        holder = rf"host {re.escape(socket.gethostname())}, pid {os.getpid()}, since 20\d\d-\d\d-\d\dT"
        with pytest.raises(ValueError, match=rf"output_dir={re.escape(str(out))} is in use by another run \({holder}.*"
                                             r"Wait for it to finish \(or stop it\), or give this run another "
                                             "output_dir"):
            Trainer(cfg).train()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written: no config.yaml, metrics, checkpoints
    seen = []
    iteration = Trainer.iteration

    def checked(self, it):  # mid-run: the lock is this run's, and another taker is refused
        seen.append(checkpoint.holds_lock(out))
        with pytest.raises(ValueError, match="is in use by another run"):
            with checkpoint.output_dir_lock(out):
                pass
        return iteration(self, it)

    monkeypatch.setattr(Trainer, "iteration", checked)
    Trainer(cfg).train()
    assert seen == [True] and not checkpoint.holds_lock(out)
    assert (out / ".lock").read_text() == ""  # released: no holder named after the run
    with checkpoint.output_dir_lock(out):  # free again (the demo and the tests train twice in one process)
        pass


def test_a_stop_signal_saves_a_checkpoint_and_ctrl_c_says_where_the_run_stopped(tmp_path, world):
    """SIGTERM (a Slurm preemption) killed the run without a checkpoint, losing up to checkpoint_every iterations:
    it now ends the iteration in progress, saves, says so and exits 143, and resume=auto goes on to max_steps.
    Ctrl-C printed a long traceback: now where the run stopped and the checkpoint a resume continues from, status
    130. Both runs at once, each in its own output_dir."""
    runs = {}
    for name, every in (("TERM", 1000), ("INT", 1)):  # TERM: no checkpoint but the one the signal asks for
        config = write_config(tmp_path / name, world)
        command = [sys.executable, str(REPO / "fastfair" / "train.py"), "--config", str(config), "max_steps=50",
                   f"checkpoint_every={every}", "logging.image_every=0"]
        # SIGINT as in an interactive shell (a shell's background job starts with it ignored)
        runs[name] = (config, subprocess.Popen(command, env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)))
    waiting = set(runs)
    deadline = time.monotonic() + 240
    while waiting and time.monotonic() < deadline:
        for name in list(waiting):  # TERM: its first step logged; INT: its first checkpoint saved
            metrics = tmp_path / name / "run" / "metrics.jsonl"
            if (metrics.is_file() and metrics.read_text().count("\n") >= 1 if name == "TERM" else
                    checkpoint.list_checkpoints(tmp_path / name / "run")):
                runs[name][1].send_signal(getattr(signal, f"SIG{name}"))
                waiting.discard(name)
            elif runs[name][1].poll() is not None:
                waiting.discard(name)
        time.sleep(0.05)
    results = {name: (process.wait(timeout=240),) + process.communicate() for name, (_, process) in runs.items()}
    status, _, err = results["TERM"]
    assert status == 143, err[-3000:]
    stopped = re.search(r"stopped by SIGTERM at step (\d+): checkpoint step_(\d{8}) saved; resume=auto continues",
                        err)
    assert stopped and int(stopped.group(1)) == int(stopped.group(2)), err[-3000:]
    step = int(stopped.group(1))
    assert 1 <= step < 50 and list(checkpoint.list_checkpoints(tmp_path / "TERM" / "run")) == [step]
    resumed = Trainer(load_config(runs["TERM"][0], [f"max_steps={step + 1}", "checkpoint_every=1000",
                                                    "logging.image_every=0", "resume=auto"]))
    resumed.train()
    assert resumed.start == step and list(checkpoint.list_checkpoints(tmp_path / "TERM" / "run")) == [step, step + 1]
    status, _, err = results["INT"]
    assert status == 130, err[-3000:]
    interrupted = re.search(r"interrupted at step (\d+); last checkpoint step_(\d{8}); resume=auto continues", err)
    assert interrupted and "Traceback" not in err, err[-3000:]
    assert int(interrupted.group(2)) == max(checkpoint.list_checkpoints(tmp_path / "INT" / "run"))


def _signal_during_iteration_1(monkeypatch, signum, then=lambda: None):
    """Trainer.iteration sends this process `signum` (then calls `then`) as iteration 1 starts; returns the real
    iteration."""
    iteration = Trainer.iteration

    def signalled(self, it):
        if it == 1:
            os.kill(os.getpid(), signum)
            then()
        return iteration(self, it)

    monkeypatch.setattr(Trainer, "iteration", signalled)
    return iteration


def test_sigusr1_stops_after_the_iteration_in_progress_and_restores_the_handlers(tmp_path, world, monkeypatch):
    """Slurm's time-limit warning (--signal=USR1@SECONDS): in process, the run saves at the step it reached (not a
    checkpoint_every multiple) and raises SystemExit(138); the handlers in place before train() are back after."""
    fired = []
    previous = signal.signal(signal.SIGUSR1, lambda *args: fired.append(args[0]))  # not the default: it kills
    try:
        before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
        _signal_during_iteration_1(monkeypatch, signal.SIGUSR1)
        cfg = load_config(write_config(tmp_path, world), ["max_steps=5", "checkpoint_every=4", "logging.image_every=0"])
        with pytest.raises(SystemExit) as stopped:
            Trainer(cfg).train()
        assert stopped.value.code == 128 + signal.SIGUSR1 and not fired
        assert list(checkpoint.list_checkpoints(cfg.output_dir)) == [2]
        assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == before
        assert not checkpoint.holds_lock(cfg.output_dir)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_stop_keeps_its_exit_status_when_the_log_cannot_be_closed(tmp_path, world, monkeypatch, capsys):
    """A full disk at a SIGTERM stop: the metrics file's close failed and its OSError replaced the stop's
    SystemExit (status 2 instead of 143, which a scheduler's requeue logic reads). The stop's status stays, the
    failure is printed; at a normal end the failure is still raised."""
    from fastfair.run_log import RunLog

    def full_disk(self):
        raise OSError("metrics.jsonl could not be written (No space left on device)")

    monkeypatch.setattr(RunLog, "close", full_disk)
    iteration = _signal_during_iteration_1(monkeypatch, signal.SIGTERM)
    cfg = load_config(write_config(tmp_path / "stopped", world), ["max_steps=3", "logging.image_every=0"])
    with pytest.raises(SystemExit) as stopped:
        Trainer(cfg).train()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert max(checkpoint.list_checkpoints(cfg.output_dir)) == 2
    assert "while the run ended (SystemExit): OSError: metrics.jsonl could not be written" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "iteration", iteration)
    cfg = load_config(write_config(tmp_path / "finished", world), ["max_steps=1", "logging.image_every=0"])
    with pytest.raises(OSError, match="No space left on device"):
        Trainer(cfg).train()


def test_a_stop_keeps_its_exit_status_when_stderr_cannot_be_written(tmp_path, world, monkeypatch):
    """A Slurm --error file on a full disk: the progress bar's last line and the stop message fail to write after
    the checkpoint is saved; the stop still ends with 128 + SIGTERM, not the OSError's status."""
    class FullDisk:  # stderr, until the signal: then every write fails
        def __init__(self, real):
            self.real, self.full = real, False

        def write(self, text):
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.real.write(text)

        def flush(self):
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.real.flush()

        def isatty(self):
            return False

    stderr = FullDisk(sys.stderr)
    monkeypatch.setattr(sys, "stderr", stderr)
    _signal_during_iteration_1(monkeypatch, signal.SIGTERM, then=lambda: setattr(stderr, "full", True))
    cfg = load_config(write_config(tmp_path, world), ["max_steps=3", "checkpoint_every=3", "logging.image_every=0"])
    with pytest.raises(SystemExit) as stopped:
        Trainer(cfg).train()
    assert stopped.value.code == 128 + signal.SIGTERM
    assert max(checkpoint.list_checkpoints(cfg.output_dir)) == 2


def test_the_write_probe_leaves_nothing_behind(tmp_path):
    """cannot_write makes the folder and probes it with a temporary folder: removed again, so output_dir and its
    checkpoints/ hold only what the run writes."""
    from fastfair.run_control import cannot_write

    folder = tmp_path / "out" / "checkpoints"
    assert cannot_write(folder, "output_dir=out", "output_dir") is None
    assert folder.is_dir() and list(folder.iterdir()) == []
    assert cannot_write(folder, "output_dir=out", "output_dir") is None and list(folder.iterdir()) == []


def test_a_folder_the_run_cannot_write_in_is_named_at_start(tmp_path, world, monkeypatch):
    """A checkpoints/ the run cannot write in was found at the first save, checkpoint_every iterations in (a bare
    errno); an unwritable logging.tensorboard_dir likewise. Now at start, before any iteration, naming the
    setting, the folder, the reason and the fix."""
    def never(self, it):
        raise AssertionError("an iteration ran")

    monkeypatch.setattr(Trainer, "iteration", never)
    cfg = load_config(write_config(tmp_path, world), ["max_steps=3"])
    out = Path(cfg.output_dir)
    out.mkdir(parents=True)
    (out / "checkpoints").write_text("")  # a file where the folder goes
    with pytest.raises(OSError, match=rf"output_dir={re.escape(str(out))}: cannot write in {re.escape(str(out))}/"
                                      r"checkpoints \(a file, not a folder\): make it a folder this user can write "
                                      "in, or choose another output_dir"):
        Trainer(cfg).train()
    (out / "checkpoints").unlink()
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    board = load_config(write_config(tmp_path, world), ["max_steps=3", f"logging.tensorboard_dir={blocked / 'tb'}"])
    with pytest.raises(OSError, match=r"logging.tensorboard_dir=.*a_file/tb: cannot write in .*a_file/tb \(Not a "
                                      r"directory\): .*choose another logging.tensorboard_dir"):
        Trainer(board).train()
    assert not checkpoint.holds_lock(out)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in read-only folders")
def test_a_read_only_output_dir_is_named_at_start_and_a_finished_run_there_still_says_so(tmp_path, world,
                                                                                        monkeypatch):
    cfg, _ = _trained(tmp_path, world, "max_steps=1")
    out = Path(cfg.output_dir)
    mode = out.stat().st_mode
    os.chmod(out, 0o555)
    try:
        Trainer(load_config(write_config(tmp_path, world), ["max_steps=1", "resume=auto"])).train()  # nothing to do
        more = load_config(write_config(tmp_path, world), ["max_steps=2", "resume=auto"])
        with pytest.raises(OSError, match=rf"output_dir={re.escape(str(out))}: cannot write in {re.escape(str(out))} "
                                          r"\(Permission denied\): make it a folder this user can write in"):
            Trainer(more).train()
        os.chmod(out, mode)
        os.chmod(out / "checkpoints", 0o555)
        with pytest.raises(OSError, match=r"cannot write in \S*/checkpoints \(Permission denied\)"):
            Trainer(more).train()
    finally:
        os.chmod(out, mode)
        os.chmod(out / "checkpoints", mode)


def test_a_resume_under_other_library_versions_warns_naming_them(tmp_path, world, capsys):
    """Each state.pt records fastfair's and its libraries' versions; a resume under others goes on, with a warning
    naming those that differ. Outside a terminal the progress bar writes lines, not carriage-return redraws."""
    import torch

    cfg, _ = _trained(tmp_path, world, "max_steps=1")
    state_file = checkpoint.checkpoint_dir(cfg.output_dir) / "step_00000001" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    assert set(state["versions"]) == {"fastfair", "torch", "diffusers", "transformers", "peft"}
    assert state["versions"]["torch"] == torch.__version__
    state["versions"].update(torch="1.0.0", peft="0.1.0")
    torch.save(state, state_file)
    with pytest.warns(UserWarning, match=rf"resume=.*step_00000001 was saved under torch 1.0.0 \(now "
                                         rf"{re.escape(torch.__version__)}\), peft 0.1.0 \(now .*\): the run "
                                         "continues"):
        Trainer(load_config(write_config(tmp_path, world), ["max_steps=2", "resume=auto"])).train()
    bar = [line for line in capsys.readouterr().err.split("\n") if "/2 [" in line and "weights" not in line]
    assert bar and "2/2" in bar[-1] and not [line for line in bar if "\r" in line]  # the library's bars still redraw


def test_the_progress_bar_writes_lines_outside_a_terminal():
    """In a log file (Slurm's) tqdm's redraws were one line of megabytes: there, one line per redraw, at most every
    30 seconds; in a terminal, tqdm's own bar."""
    import io

    from tqdm import tqdm

    from fastfair.run_control import progress_options

    assert progress_options(True) == {}
    stream = io.StringIO()
    options = progress_options(False, stream)
    assert options["mininterval"] >= 30
    for _ in tqdm(range(3), **{**options, "mininterval": 0}):
        pass
    lines = stream.getvalue().split("\n")
    assert "\r" not in stream.getvalue() and lines[-1] == "" and len(lines) >= 4
    assert lines[-2].startswith("100%") and "3/3" in lines[-2]


def test_a_resume_across_a_changed_shipped_prompt_list_says_how_to_go_on(tmp_path, world):
    """A run on a shipped list saved before the list changed (2026-11-30: held-out items removed from training):
    the refusal names the set, its counts then and now, and the way on (the old list as a file)."""
    cfg, _ = _trained(tmp_path, world, "max_steps=1")
    state_file = checkpoint.checkpoint_dir(cfg.output_dir) / "step_00000001" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["mixture"]["sizes"]["occupations"] += 54
    state["mixture"]["prompts"]["occupations"] += 1
    torch.save(state, state_file)
    again = load_config(write_config(tmp_path, world), ["max_steps=2", "resume=auto"])
    with pytest.raises(ValueError, match=r"data.sets.occupations: 1062 prompts then, 1008 now.*a list shipped with "
                                         r"fastfair, which changed on 2026-11-30, 2026-12-02 and 2026-12-03"
                                         r".*data.sets.occupations.file"):
        Trainer(again).train()


def test_a_failing_close_never_replaces_the_exception_that_ends_the_run(capsys):
    """Whatever close() raises (not only an OSError: a writer thread's RuntimeError, ...) while a stop signal's
    SystemExit ends the run, the exit status stays the signal's and the failure is printed."""
    import contextlib

    from fastfair.run_control import closing

    def close():
        raise RuntimeError("writer thread died")

    with pytest.raises(SystemExit) as exit_:
        with contextlib.ExitStack() as stack:
            stack.push(closing(close))
            raise SystemExit(143)
    assert exit_.value.code == 143
    assert "while the run ended (SystemExit): RuntimeError: writer thread died" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="writer thread died"):  # a normal end: the failure is the error
        with contextlib.ExitStack() as stack:
            stack.push(closing(close))


def test_stop_signals_in_a_worker_thread_leave_the_process_s_handlers():
    """A run in another thread (a notebook's or a server's): signal.signal refuses there, so the block runs with
    the process's own handling, untouched."""
    import threading

    from fastfair.run_control import StopSignals, stop_signals

    before = signal.getsignal(signal.SIGTERM)
    seen = {}

    def run():
        try:
            with stop_signals() as stop:
                seen["stop"] = stop
        except Exception as error:  # noqa: BLE001 - the thread's failure is the test's
            seen["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert "error" not in seen and isinstance(seen["stop"], StopSignals)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_ctrl_c_a_library_turned_into_another_error_ends_the_run_as_interrupted(tmp_path, world, monkeypatch,
                                                                                  capsys):
    """numpy 1.x's np.unique(axis=0) (the alignment targets' rows) turns a Ctrl-C landing in its comparison into a
    TypeError: the run ended with that traceback and status 1 (seen on the torch 2.4 stack). It now says where it
    stopped, status 130, as for any Ctrl-C."""
    from fastfair import trainer as training
    from test_cli_eval_inputs import converted_ctrl_c

    monkeypatch.setattr(Trainer, "train", lambda self: converted_ctrl_c())
    config = write_config(tmp_path, world)
    with pytest.raises(SystemExit) as exit_:
        training.main(["--config", str(config), "logging.image_every=0"])
    assert exit_.value.code == 130
    assert "interrupted before training began; no checkpoint saved yet" in capsys.readouterr().err
    monkeypatch.setattr(Trainer, "train", lambda self: int("not a number"))  # no Ctrl-C: the error itself
    with pytest.raises(ValueError, match="invalid literal"):
        training.main(["--config", str(config), "logging.image_every=0"])


_STOPPED_WRITE = """
import os, signal, sys, time
from fastfair.files import atomic_path
from fastfair.run_control import sigterm_as_exit
guard = sigterm_as_exit() if sys.argv[2] == "guarded" else open(os.devnull)
with guard:
    with atomic_path(sys.argv[1]) as temporary:
        with open(temporary, "w") as handle:
            handle.write("half a report")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
"""


@pytest.mark.parametrize("guarded", [True, False])
def test_sigterm_as_exit_lets_a_stopped_atomic_write_remove_its_temporary_file(tmp_path, guarded):
    """`timeout` (bench/gpu_check.sh's limit on each step) sends SIGTERM; its default action ends the process at
    once, leaving a write's `.tmp-*` file beside the report. Under sigterm_as_exit it ends with status 143 and
    atomic_path's cleanup runs; the unguarded run shows what the guard is for."""
    target = tmp_path / "report.json"
    ended = subprocess.run([sys.executable, "-c", _STOPPED_WRITE, str(target), "guarded" if guarded else "bare"],
                           capture_output=True, text=True, timeout=60, env=child_env())
    left = sorted(path.name for path in tmp_path.iterdir())
    if guarded:
        assert ended.returncode == 128 + signal.SIGTERM and left == [], (ended.stderr, left)
    else:
        assert ended.returncode == -signal.SIGTERM and len(left) == 1 and left[0].startswith(".tmp-")


def test_sigterm_as_exit_restores_the_handler_it_replaced():
    from fastfair.run_control import sigterm_as_exit

    def mine(*args):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with sigterm_as_exit():
            assert signal.getsignal(signal.SIGTERM) is not mine
            with pytest.raises(SystemExit) as stopped:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler runs at the next bytecode; never reached
            assert stopped.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
