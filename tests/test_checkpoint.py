"""Checkpoints: atomic folders, retention, and resume that continues bit for bit (fp32, CPU)."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastfair import checkpoint
from fastfair.config import load_config
from fastfair.trainer import Trainer, process_group
from child_env import child_env
from test_trainer_world import flatten_text_names, make_world, write_config

REPO = Path(__file__).resolve().parents[1]


def _save(root, iteration, **kwargs):
    weights = {"w": torch.full((2,), float(iteration))}
    return checkpoint.save_checkpoint(root, iteration, weights, weights, {"note": "x"}, **kwargs)


def test_retention_keeps_last_and_every(tmp_path):
    for iteration in range(1, 8):
        _save(tmp_path, iteration, keep_last=2, keep_every=3)
    assert list(checkpoint.list_checkpoints(tmp_path)) == [3, 6, 7]
    weights, ema, state = checkpoint.load_checkpoint(checkpoint.resolve_resume("auto", tmp_path))
    assert state["iteration"] == 7 and torch.equal(weights["w"], torch.full((2,), 7.0))


def test_the_weights_and_their_ema_are_kept_apart(tmp_path):
    folder = checkpoint.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"w": torch.zeros(2)}, {})
    weights, ema, _ = checkpoint.load_checkpoint(folder)
    assert torch.equal(weights["w"], torch.ones(2)) and torch.equal(ema["w"], torch.zeros(2))


def test_interrupted_save_leaves_last_good_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2)
    assert list(checkpoint.list_checkpoints(tmp_path)) == [1]
    assert checkpoint.resolve_resume("auto", tmp_path).name == "step_00000001"


def test_a_failed_save_names_the_folder_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1)
    (checkpoint.checkpoint_dir(tmp_path) / ".tmp-step_00000007").mkdir()  # an earlier save, interrupted
    with checkpoint.output_dir_lock(tmp_path):  # as in a run: no other process writes there
        def disk_full(*args, **kwargs):  # what torch.save raises on a full disk
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 40896 vs 40788")

        monkeypatch.setattr(checkpoint.torch, "save", disk_full)
        with pytest.raises(OSError, match=r"checkpoint 2 could not be written to .*checkpoints \(\[enforce fail.*MiB "
                                          r"free there .*resume=auto continues"):
            _save(tmp_path, 2)
        assert [p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()] == ["step_00000001"]
        from safetensors import SafetensorError

        # what safetensors raises on a full disk (neither OSError nor ValueError)
        def weights_disk_full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(checkpoint, "save_file", weights_disk_full)
        with pytest.raises(OSError, match=r"checkpoint 3 could not be written .*No space left on device"):
            _save(tmp_path, 3)
        assert [p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()] == ["step_00000001"]


def test_a_checkpoint_is_on_disk_before_its_rename_publishes_it(tmp_path, monkeypatch):
    """Each file and the temp folder are fsynced before the rename, the checkpoints folder after it: without, a
    power cut or node crash soon after a save could leave a step folder of empty or cut-off files (the page cache
    not yet written), which resume=auto would pick."""
    events = []
    fsync, rename = os.fsync, os.rename

    def recorded_fsync(handle):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{handle}"))))
        fsync(handle)

    def recorded_rename(source, target, *args, **kwargs):
        events.append(("rename", os.path.realpath(source), os.path.realpath(target)))
        rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "rename", recorded_rename)
    folder = _save(tmp_path, 1, config={"seed": 0})
    published = [i for i, event in enumerate(events) if event[0] == "rename" and event[2] == os.path.realpath(folder)]
    assert len(published) == 1, events
    temporary = events[published[0]][1]
    synced_before = {event[1] for event in events[:published[0]] if event[0] == "fsync"}
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["config.yaml", "ema.safetensors", "state.pt", "weights.safetensors"]
    assert synced_before >= {os.path.join(temporary, name) for name in names} | {temporary}
    assert ("fsync", os.path.realpath(folder.parent)) in events[published[0] + 1:]


def test_a_kill_during_pruning_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    """Pruning deleted a step folder in place: a kill mid-delete left one without some of its files, forever (it
    is no longer listed, so never pruned). Now it is renamed to a temp folder first, which the next save removes."""
    for iteration in (1, 2):
        _save(tmp_path, iteration, keep_last=2)
    rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):  # one file deleted, then the process is killed
        os.remove(os.path.join(path, "ema.safetensors"))
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 3, keep_last=2)  # saved, then prunes step 1
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    root = checkpoint.checkpoint_dir(tmp_path)
    assert list(checkpoint.step_folders(tmp_path)) == [2, 3]
    assert all(checkpoint.is_resumable(folder) for folder in checkpoint.step_folders(tmp_path).values())
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]  # what the kill left
    _save(tmp_path, 4, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]


def test_a_save_removes_only_temp_folders_no_other_run_can_be_writing(tmp_path, monkeypatch):
    """Every save deleted every .tmp-step_* folder, another process's save in progress included (two runs in one
    output_dir), and both used the same temp name. A save's temp folder is now named for its process; another's
    is removed only while this process holds output_dir's lock (then no other run writes there)."""
    root = checkpoint.checkpoint_dir(tmp_path)
    other = root / ".tmp-step_00000005.otherhost-4242"  # another process's save, perhaps in progress
    other.mkdir(parents=True)
    (other / "weights.safetensors").write_bytes(b"partial")
    folders = []
    save_file = checkpoint.save_file

    def recorded(tensors, path, *args, **kwargs):
        folders.append(os.path.basename(os.path.dirname(path)))
        return save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", recorded)
    _save(tmp_path, 1)
    assert folders[0] == f".tmp-step_00000001.{socket.gethostname()}-{os.getpid()}"
    assert (other / "weights.safetensors").read_bytes() == b"partial"
    with checkpoint.output_dir_lock(tmp_path):
        _save(tmp_path, 2)
    assert not other.exists()
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]
    # unlocked (a filesystem without flock), another process's temp folder untouched for an hour is no save in
    # progress: a run killed mid-save on such a filesystem leaves nothing for good
    other.mkdir()
    old = root / ".tmp-step_00000003"  # as the previous version named them
    old.mkdir()
    hour_ago = time.time() - checkpoint.STALE_TEMP_S - 60
    os.utime(old, (hour_ago, hour_ago))
    _save(tmp_path, 3)
    assert other.exists() and not old.exists()


def test_a_lock_file_this_user_cannot_open_is_named_with_the_fix(tmp_path, monkeypatch):
    real_open = os.open

    def denied(path, *args, **kwargs):
        if str(path).endswith(checkpoint.LOCK_FILE):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(OSError, match=r"output_dir=.*: cannot open its lock file .*\.lock \(Permission denied\): "
                                      r"give this user write access to it"):
        with checkpoint.output_dir_lock(tmp_path):
            pass


def test_a_damaged_weight_file_is_named(tmp_path):
    folder = _save(tmp_path, 1)
    ema = folder / "ema.safetensors"
    ema.write_bytes(ema.read_bytes()[:20])  # cut off in a copy
    with pytest.raises(ValueError, match=r"ema\.safetensors: cannot be read as safetensors .*copy it again"):
        checkpoint.load_weights(folder)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_bytes_changed_in_place_are_named_by_their_checksums(tmp_path, dtype):
    weights = {"a": torch.randn(3, 5).to(dtype), "b": torch.randn(7).to(dtype), "scalar": torch.tensor(2.0)}
    folder = checkpoint.save_checkpoint(tmp_path, 1, weights, weights, {})
    loaded, _ = checkpoint.load_weights(folder)
    assert all(torch.equal(loaded[name], weights[name]) for name in weights)
    file = folder / "weights.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor's data: the header (names, shapes, offsets) still reads
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"weights\.safetensors: the checksums of 1 tensor\(s\) fail \(e\.g\. "
                                         r"\w+\); the file is damaged"):
        checkpoint.load_weights(folder)


def test_weight_files_written_without_checksums_still_load(tmp_path):
    from safetensors.torch import save_file

    folder = _save(tmp_path, 1)
    save_file({"w": torch.ones(2)}, str(folder / "ema.safetensors"))  # as checkpoints were written before
    assert torch.equal(checkpoint.load_weights(folder)[1]["w"], torch.ones(2))

def test_resume_arguments(tmp_path):
    assert checkpoint.resolve_resume("", tmp_path) is None
    assert checkpoint.resolve_resume("auto", tmp_path) is None
    with pytest.raises(ValueError, match="resume=.*not a checkpoint folder"):
        checkpoint.resolve_resume(str(tmp_path), tmp_path)


def test_stable_names_are_one_layout_for_both_transformers_majors():
    tf5 = "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.default.weight"
    tf4 = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight"
    unet = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.default.weight"
    assert checkpoint.stable_name(tf5) == checkpoint.stable_name(tf4) == tf4
    assert checkpoint.stable_name("text_encoder.embeddings.token_embedding.prefix") == \
        "text_encoder.text_model.embeddings.token_embedding.prefix"
    assert checkpoint.stable_name("text_encoder.final_layer_norm.bias") == \
        "text_encoder.text_model.final_layer_norm.bias"
    assert checkpoint.stable_name(unet) == unet
    assert checkpoint.stable_name("unet.encoder.x") == "unet.encoder.x"  # only the text encoder's names move
    a, b = torch.zeros(1), torch.ones(1)
    for text_name in (tf5, tf4):  # a model under either major, a checkpoint in either layout
        model = {text_name: torch.empty(1), unet: torch.empty(1)}
        for stored in ({tf4: a, unet: b}, {tf5: a, unet: b}):
            mapped = checkpoint.for_model(stored, model, "resume=x")
            assert set(mapped) == set(model) and mapped[text_name] is a and mapped[unet] is b
    with pytest.raises(ValueError, match=r"resume=x: its weights are not this model's.*lora_B"):
        checkpoint.for_model({tf4: a, unet: b, tf4.replace("lora_A", "lora_B"): b}, model, "resume=x")


def test_rng_state_roundtrip(tmp_path):
    import random

    import numpy as np

    state = checkpoint.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_two_plus_two_equals_four_bitwise(tmp_path):
    """4 iterations straight (in process) == 2, then a resume to 4 by the script `python fastfair/train.py`; the
    checkpoint resumed from has its text-encoder names in the other transformers layout (stable_name)."""
    world = make_world(tmp_path / "world")
    straight = load_config(write_config(tmp_path / "a", world, "text_unet_lora"), ["max_steps=4"])
    with process_group():
        Trainer(straight).train()
        halves = load_config(write_config(tmp_path / "b", world, "text_unet_lora"), ["max_steps=2"])
        Trainer(halves).train()
    half = tmp_path / "b" / "run" / "checkpoints" / "step_00000002"
    text_names = [key for key in load_file(str(half / "weights.safetensors")) if key.startswith("text_encoder.")]
    assert text_names and all(key.startswith("text_encoder.text_model.encoder.") for key in text_names)
    flatten_text_names(half)
    env = child_env(OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(REPO / "fastfair" / "train.py"), "--config",
                          str(tmp_path / "b" / "config.yaml"), "max_steps=4", "resume=auto"],
                         env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("weights.safetensors", "ema.safetensors"):
        a = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "step_00000004" / name))
        b = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "step_00000004" / name))
        assert set(a) == set(b) and len(a) > 0
        for key in a:
            assert torch.equal(a[key], b[key]), key
    a_state = torch.load(tmp_path / "a" / "run" / "checkpoints" / "step_00000004" / "state.pt", weights_only=True)
    assert a_state["mixture"]["draws"] == 4


def test_resume_is_bitwise_with_monte_carlo_transport_targets(tmp_path):
    """Race (K = 4) at N = 24 draws its transport targets by Monte Carlo: 3 iterations in process == 1, then a
    resume by `python fastfair/train.py`, whose process makes its own first U-Net calls (and their one-time
    probes) only after the resume point. Two iterations after it: the draws' noise seldom moves argmax q in one."""
    from fastfair.autocast_cache import caches_no_grad_casts
    from fastfair.classifiers import AttributeClassifier, head_from_names, save_classifier

    caches_no_grad_casts()  # probed (once per process) before the in-process runs, as a resumed process is not
    world = make_world(tmp_path / "world")
    torch.manual_seed(0)
    save_classifier(AttributeClassifier(head_from_names(["gender", "race"]), "small_cnn", input_size=16, width=4),
                    str(tmp_path / "gender_race.safetensors"))
    race = [f"classifiers.gender.path={tmp_path / 'gender_race.safetensors'}",
            "targets.attributes=[{name: race, classes: {WMELH: 2, Black: 3, Indian: 4, Asian: 5}, "
            "probabilities: uniform}]",
            "batch.images_per_prompt=24", "loss.ot_samples=64"]
    with process_group():
        Trainer(load_config(write_config(tmp_path / "a", world), race + ["max_steps=3"])).train()
        Trainer(load_config(write_config(tmp_path / "b", world), race + ["max_steps=1"])).train()
    run = subprocess.run([sys.executable, str(REPO / "fastfair" / "train.py"), "--config",
                          str(tmp_path / "b" / "config.yaml"), *race, "max_steps=3", "resume=auto"],
                         env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    a = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "step_00000003" / "weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "step_00000003" / "weights.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[key], b[key]) for key in a)


def test_a_resumed_toy_run_saves_the_global_generators_of_an_uninterrupted_one(tmp_path):
    """The shipped toy config, 2 iterations in one go against 1 + a resume: the Python, NumPy and torch global
    generators a checkpoint saves agree. The toy face detector loads lazily at a process's first iteration (the
    cache is cleared here as a new process starts empty), and a run's global generators are seeded from `seed`
    (the other process's own draws are stood in for by draws between the runs)."""
    import random

    import numpy as np

    import fastfair.toy

    def run(folder, max_steps):
        fastfair.toy._shipped_detector.cache_clear()
        Trainer(load_config(str(REPO / "configs" / "toy.yaml"), [
            f"output_dir={folder}", f"max_steps={max_steps}", "checkpoint_every=1", "keep_last=2",
            "batch.images_per_prompt=2", "logging.image_every=0"])).train()

    with process_group():
        run(tmp_path / "a", 2)
        random.random(), np.random.rand(), torch.rand(1)
        run(tmp_path / "b", 1)
        run(tmp_path / "b", 2)
    a, b = (torch.load(tmp_path / run_dir / "checkpoints" / "step_00000002" / "state.pt", weights_only=True)["rng"]
            for run_dir in ("a", "b"))
    assert torch.equal(a["torch"], b["torch"])
    assert a["python"] == b["python"]
    assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(a["numpy"], b["numpy"]))
