"""Two iterations of the trainer for every finetuning target on tiny random models loaded from disk."""
import math
from types import SimpleNamespace

import pytest
import torch

from fastfair.config import FINETUNE_TARGETS, load_config
from fastfair.optimizer import lr_lambda
from fastfair.trainer import Trainer
from test_trainer_world import world, write_config  # noqa: F401 (world: a fixture)


def _snapshot(trainer):
    modules = {"text_encoder": trainer.model.text_encoder, "unet": trainer.model.unet, "vae": trainer.vae}
    return {f"{part}.{name}": p.detach().clone() for part, module in modules.items()
            for name, p in module.named_parameters()}


@pytest.mark.parametrize("target", FINETUNE_TARGETS)
def test_two_iterations_train_only_the_target(tmp_path, world, target):
    cfg = load_config(write_config(tmp_path, world, target, face_loss=target == "text_lora"))
    trainer = Trainer(cfg)
    before = _snapshot(trainer)
    parts = [trainer.iteration(it) for it in range(2)]
    after = _snapshot(trainer)
    for part in parts:
        assert all(torch.isfinite(torch.tensor(v)) for v in part.values()), part
        assert part["loss"] > 0
    assert parts[1]["img"] > 1e-6  # LoRA starts as the identity (img = 0); after one step the images differ
    if target == "text_lora":
        assert parts[0]["face"] > 0
    assert trainer.skipped == 0
    trainable = set(trainer.model.trainable)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == trainable  # every trainable weight moved, nothing else did
    ema = trainer.ema.shadow  # d_2 = 2/11 (the warm-up) at the second step: strictly between start and weights
    name = next(iter(trainable))
    assert not torch.equal(ema[name], after[name]) and not torch.equal(ema[name], before[name])


def test_train_writes_checkpoints_config_and_grids(tmp_path, world):
    from safetensors.torch import load_file

    path = write_config(tmp_path, world, "prefix", optim={"lr": 0.01, "ema_decay": 0.5, "warmup_steps": 1})
    Trainer(load_config(path)).train()
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    assert sorted(p.name for p in (run / "images").iterdir()) == ["step_00000001.png", "step_00000002.png"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Images("originals_over_finetuned")] == [1, 2]
    assert {"loss", "align", "images_per_s", "peak_memory_gb", "skipped_steps"} <= set(events.Tags()["scalars"])
    import json

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and lines[1]["loss"] == events.Scalars("loss")[1].value
    # the rate each step applied: half of optim.lr in the one warm-up step, then optim.lr
    assert [line["lr"] for line in lines] == pytest.approx([0.005, 0.01])
    ckpt = run / "checkpoints" / "step_00000002"
    names = set(load_file(str(ckpt / "weights.safetensors")))
    assert len(names) == 1 and names == set(load_file(str(ckpt / "ema.safetensors")))
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["iteration"] == 2 and state["mixture"]["draws"] == 2
    assert {"optimizer", "lr_scheduler", "rng", "skipped"} <= set(state)
    Trainer(load_config(path, ["resume=auto"])).train()  # run again: nothing to do; nothing logged twice
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_nonfinite_gradient_skips_the_step(tmp_path, world):
    cfg = load_config(write_config(tmp_path, world, "prefix"))
    trainer = Trainer(cfg)
    prefix = trainer.model.prefix.prefix
    prefix.register_hook(lambda grad: grad * float("nan"))
    before = prefix.detach().clone()
    trainer.iteration(0)
    assert trainer.skipped == 1 and torch.equal(prefix.detach(), before)


def test_a_diverged_step_is_skipped_also_where_a_whole_image_detector_finds_a_face_in_it(tmp_path, world):
    """faces.detector=none takes every image as a face, NaN ones too: their probabilities reached the alignment
    targets, which raised (the run died) instead of the step being skipped."""
    cfg = load_config(write_config(tmp_path, world, "unet_lora"), ["faces.detector=none"])
    trainer = Trainer(cfg)
    calls = []

    def diverge(module, args, out):  # the 2nd step of the finetuned (graph-building) sampling pass
        calls.append(torch.is_grad_enabled())
        if len(calls) == 5:
            out.sample[:] = float("nan")
        return out
    trainer.model.unet.register_forward_hook(diverge)
    before = {name: p.detach().clone() for name, p in trainer.model.trainable.items()}
    trainer.iteration(0)
    assert trainer.skipped == 1
    assert all(torch.equal(p.detach(), before[name]) for name, p in trainer.model.trainable.items())


def _deepspeed_json(tmp_path, **settings):
    import json

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"steps_per_print": 10**9, **settings}))
    return path


def test_deepspeed_without_a_gradient_check_of_its_own_skips_a_nonfinite_gradient(tmp_path, world):
    """ZeRO stage 0 in fp32 hands the torch optimizer the gradients unchecked: a NaN made the weights and the EMA
    NaN; the step is skipped, as everywhere else."""
    pytest.importorskip("deepspeed")
    from fastfair.trainer import process_group

    ds_json = _deepspeed_json(tmp_path, zero_optimization={"stage": 0})
    with process_group():
        trainer = Trainer(load_config(write_config(tmp_path, world, "prefix"), [f"deepspeed.config={ds_json}"]))
        prefix = trainer.model.prefix.prefix
        prefix.register_hook(lambda grad: grad * float("nan"))
        before = prefix.detach().clone()
        trainer.iteration(0)
    assert trainer.skipped == 1 and trainer.steps_taken == 0 and torch.equal(prefix.detach(), before)
    assert all(bool(torch.isfinite(value).all()) for value in trainer.ema.shadow.values())


def test_deepspeed_bf16_with_fp32_gradient_accumulation_resumes_as_a_straight_run(tmp_path, world):
    """JSON data_types.grad_accum_dtype=fp32 makes DeepSpeed's BF16_Optimizer, which takes every rank's shard
    (given its own, a resume raised KeyError 0); a changed optim.grad_clip takes effect on the resume."""
    pytest.importorskip("deepspeed")
    from fastfair import checkpoint
    from fastfair.trainer import process_group
    from fastfair.zero import allow_deepspeed_state_in_weights_only_load

    ds_json = _deepspeed_json(tmp_path, zero_optimization={"stage": 1}, bf16={"enabled": True},
                              data_types={"grad_accum_dtype": "fp32"})
    common = [f"deepspeed.config={ds_json}", "precision.mixed=bf16", "logging.image_every=0"]
    with process_group():
        for name, runs in (("resumed", ([], ["resume=auto"])), ("straight", ([],))):
            for index, extra in enumerate(runs):
                steps = 2 if len(runs) == 1 or index == 1 else 1
                trainer = Trainer(load_config(write_config(tmp_path / name, world, "unet_lora"),
                                              common + [f"max_steps={steps}", *extra]))
                assert type(trainer.engine.optimizer).__name__ == "BF16_Optimizer"
                trainer.train()
        resumed = Trainer(load_config(write_config(tmp_path / "resumed", world, "unet_lora"),
                                      common + ["max_steps=3", "resume=auto", "optim.grad_clip=0.5"]))
        resumed.resume(checkpoint.checkpoint_dir(resumed.cfg.output_dir) / "step_00000002")
        assert resumed.engine.optimizer.clip_grad == 0.5
    allow_deepspeed_state_in_weights_only_load()
    finals = [checkpoint.load_weights(tmp_path / name / "run" / "checkpoints" / "step_00000002")[0]
              for name in ("resumed", "straight")]
    assert finals[0].keys() == finals[1].keys() and all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


@pytest.mark.parametrize("saved, resumed", [("null", 0.5), (0.5, "null")])
def test_deepspeed_zero_resume_takes_the_grad_clip_it_is_given(tmp_path, world, saved, resumed):
    """ZeRO-1/2's optimizer keeps its clip_grad in its state and took the saving run's back on a resume: a changed
    optim.grad_clip was ignored in both directions (lr and weight decay did change)."""
    pytest.importorskip("deepspeed")
    from fastfair import checkpoint
    from fastfair.trainer import process_group

    ds_json = _deepspeed_json(tmp_path, zero_optimization={"stage": 1})
    common = [f"deepspeed.config={ds_json}", "logging.image_every=0"]
    path = write_config(tmp_path, world, "prefix")
    with process_group():
        first = Trainer(load_config(path, common + ["max_steps=1", f"optim.grad_clip={saved}"]))
        assert type(first.engine.optimizer).__name__ == "DeepSpeedZeroOptimizer"
        first.train()
        again = Trainer(load_config(path, common + ["max_steps=2", "resume=auto", f"optim.grad_clip={resumed}"]))
        again.resume(checkpoint.checkpoint_dir(again.cfg.output_dir) / "step_00000001")
        assert again.engine.optimizer.clip_grad == (0.0 if resumed == "null" else resumed)


def test_the_prefix_starts_as_configured_from_the_runs_seed(tmp_path, world):
    path = write_config(tmp_path, world, "prefix")

    def start(init):  # (the vocabulary's rows [V, D], the prefix's start [N, D])
        model = Trainer(load_config(path, [f"finetune.prefix_init={init}", "seed=3"])).model
        return model.prefix.base.weight.detach().float(), model.prefix.prefix.detach()

    vocabulary, mean = start("mean")
    torch.testing.assert_close(mean, vocabulary.mean(0, keepdim=True).expand_as(mean))
    _, drawn = start("random_tokens")  # distinct vocabulary rows, the same ones in every run of the seed
    assert len({int(torch.nonzero((vocabulary == row).all(1))[0]) for row in drawn}) == len(drawn)
    assert torch.equal(start("random_tokens")[1], drawn)


def test_batch_not_divisible_by_ranks_is_refused(tmp_path, world):
    from fastfair.config import ConfigError, validate

    cfg = load_config(write_config(tmp_path, world), ["batch.images_per_prompt=3"])
    with pytest.raises(ConfigError, match="not divisible by the world size 2"):
        validate(cfg, world_size=2)


def test_classifier_too_small_for_the_targets_fails_at_start(tmp_path, world):
    from fastfair.trainer import process_group

    cfg = load_config(write_config(tmp_path, world), ["targets.attributes=[{name: gender, classes: {female: 0, "
                                                      "male: 7}, probabilities: uniform}]"])
    with process_group(), pytest.raises(ValueError, match="classifiers: .*index 7"):
        Trainer(cfg)


def test_iteration_reports_batch_class_frequencies_and_bias(tmp_path, world):
    from fastfair.trainer import process_group

    with process_group():
        parts = Trainer(load_config(write_config(tmp_path, world))).iteration(0)
    female, male = parts["freq/gender/female"], parts["freq/gender/male"]
    assert female + male == pytest.approx(1.0)
    assert parts["bias/gender"] == pytest.approx(abs(female - male))
    assert {female * 4, male * 4} <= set(range(5))  # frequencies of a batch of 4 images


def test_batch_statistics_count_the_images_with_a_face_only():
    """The logged frequencies and bias are of the faces found: an image without one is no vote for a class."""
    from fastfair.targets import load_targets

    targets = load_targets({"attributes": [{"name": "gender", "classes": {"female": 0, "male": 1},
                                            "probabilities": "uniform"}]})
    logits = {"gender": torch.tensor([[9.0, 0.0], [0.0, 9.0], [9.0, 0.0], [9.0, 0.0]])}
    stats = Trainer._batch_statistics(SimpleNamespace(targets=targets, world=1), logits,
                                      torch.tensor([True, True, False, False]))
    assert (stats["freq/gender/female"], stats["freq/gender/male"], stats["bias/gender"]) == (0.5, 0.5, 0.0)


def test_adamw8bit_keeps_8bit_state_and_resumes_exactly(tmp_path, world, monkeypatch):
    """optim.name=adamw8bit (bitsandbytes, CPU-capable since 0.48): uint8 moments, and a 2 + 2 run with a resume
    equals 4 straight (the quantized state round-trips through the checkpoint)."""
    import functools

    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    # bitsandbytes keeps tensors under 4096 elements in 32 bits; the tiny model's are all smaller
    monkeypatch.setattr(bnb.optim, "AdamW8bit", functools.partial(bnb.optim.AdamW8bit, min_8bit_size=16))

    runs = {}
    for name, steps in (("straight", [4]), ("resumed", [2, 4])):
        for max_steps in steps:
            cfg = load_config(write_config(tmp_path / name, world, "unet_full"),
                              ["optim.name=adamw8bit", "optim.lr=1e-3", f"max_steps={max_steps}", "resume=auto",
                               "logging.image_every=0"])
            trainer = Trainer(cfg)
            trainer.train()
        runs[name] = load_file(str(tmp_path / name / "run" / "checkpoints" / "step_00000004" / "weights.safetensors"))
        state = trainer.optimizer.state.values()
        assert any(v.dtype == torch.uint8 for s in state for v in s.values() if torch.is_tensor(v))
    assert runs["straight"].keys() == runs["resumed"].keys()
    for key, value in runs["straight"].items():
        assert torch.equal(value, runs["resumed"][key]), key


@pytest.mark.parametrize("budget_gb, kept", [(1.0, "all"), (1e-9, "none")])
def test_memory_budget_picks_the_kept_graphs(tmp_path, world, budget_gb, kept):
    """sampler.memory_budget_gb decides keep_graph_steps for the finetuned (graph-building) pass only."""
    cfg = load_config(write_config(tmp_path, world, "unet_lora"), [f"sampler.memory_budget_gb={budget_gb}"])
    trainer = Trainer(cfg)
    trainer.iteration(0)
    decisions = list(trainer.memory_budget._keep.items())
    assert len(decisions) == 1  # one shape: the frozen pass (no grad) asked nothing
    (_, steps, _), keep = decisions[0]  # (shapes, step count, differentiated steps)
    assert keep == ((steps, 0) if kept == "all" else (0, 0))  # (whole graphs, attention-only keeps)


def test_a_resume_keeps_the_memory_plans_it_was_trained_with(tmp_path, world):
    """A plan depends on the memory in use when it was made (a resumed process already holds the optimizer state):
    the checkpoint carries the plans, so a resume keeps and recomputes the same steps as an uninterrupted run
    (they differ in the last bits otherwise); another budget plans afresh."""
    from fastfair import checkpoint
    from fastfair.trainer import process_group

    with process_group():
        trainer = Trainer(load_config(write_config(tmp_path, world, "unet_lora"), ["sampler.memory_budget_gb=1"]))
        trainer.iteration(0)
        trainer.save(1)
        plans = dict(trainer.memory_budget._keep)
        step = checkpoint.checkpoint_dir(trainer.cfg.output_dir) / "step_00000001"
        for budget, expected in (("1", plans), ("2", {})):
            resumed = Trainer(load_config(write_config(tmp_path, world, "unet_lora"),
                                          [f"sampler.memory_budget_gb={budget}", "resume_allow=[sampler]"]))
            resumed.resume(step)
            assert len(plans) == 1 and resumed.memory_budget._keep == expected


@pytest.mark.parametrize("lean_graph", [True, False])
def test_sampler_keeps_and_lean_graph_reach_the_engine(tmp_path, world, monkeypatch, lean_graph):
    """sampler.keep_graph_steps, keep_attention_steps, recompute_images and lean_graph are what the
    graph-building pass's sample gets, and the iteration's loss does not depend on them (the engine's options
    are exact)."""
    import fastfair.trainer as trainer_module

    seen, real = [], trainer_module.sample

    def spy(*args, **kwargs):
        if torch.is_grad_enabled():
            seen.append({k: kwargs[k] for k in ("keep_graph_steps", "keep_attention_steps", "recompute_images",
                                                "lean_graph")})
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "sample", spy)
    losses = []
    for overrides in ([], ["sampler.keep_graph_steps=1", "sampler.keep_attention_steps=2",
                           "sampler.recompute_images=1", f"sampler.lean_graph={str(lean_graph).lower()}"]):
        cfg = load_config(write_config(tmp_path, world, "unet_lora"), overrides)
        losses.append(Trainer(cfg).iteration(0)["loss"])
    assert seen[0]["recompute_images"] is None
    assert seen[-1] == dict(keep_graph_steps=1, keep_attention_steps=2, recompute_images=1, lean_graph=lean_graph)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def recorder(seen: dict):
    """spy(name, function): ``function`` wrapped to record its last call's (args, kwargs) in ``seen[name]``."""
    def spy(name, function):
        def wrapper(*args, **kwargs):
            seen[name] = (args, kwargs)
            return function(*args, **kwargs)
        return wrapper
    return spy


def quarter_box_detector(rgb):
    """One face per image: the square [W/4, W/2) x [H/4, H/2) (faces.detector=callable)."""
    height, width = rgb.shape[:2]
    return [(width / 4, height / 4, width / 2, height / 2)]


@pytest.mark.parametrize("keep_confidence", [None, 0.0])
def test_face_region_and_face_target_settings_reach_the_losses(tmp_path, world, monkeypatch, keep_confidence):
    """lambda_img_3's region is the classifier's crop box (the detector box grown by faces.margin);
    loss.original_face_confidence null gives every face the nearest bank face as target (Eq. 8), 0 the original's
    face wherever the original shows the target class; loss.lambda_img_no_face and loss.ot_samples reach the
    weights and the transport."""
    import fastfair.losses
    import fastfair.losses.face
    from fastfair.faces.regions import square_boxes
    from fastfair.losses import face_box_mask
    from fastfair.trainer import process_group

    seen = {}
    spy = recorder(seen)

    monkeypatch.setattr(fastfair.losses, "semantic_weights", spy("weights", fastfair.losses.semantic_weights))
    monkeypatch.setattr(fastfair.losses, "global_expected_ot_targets",
                        spy("targets", fastfair.losses.global_expected_ot_targets))
    monkeypatch.setattr(fastfair.losses.face, "face_realism_loss",
                        spy("face", fastfair.losses.face.face_realism_loss))
    overrides = ["faces.detector=callable", "faces.detector_fn=test_trainer:quarter_box_detector",
                 "faces.margin=0.5", f"loss.original_face_confidence={'null' if keep_confidence is None else 0}",
                 "loss.lambda_img_no_face=0.7", "loss.ot_samples=77"]
    with process_group():
        trainer = Trainer(load_config(write_config(tmp_path, world, face_loss=True), overrides))
        assert trainer.loss_weights.lambda_img_no_face == 0.7
        g = torch.Generator().manual_seed(3)
        originals, images = (torch.rand(4, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2))
        trainer.losses(originals, images.requires_grad_())
    assert seen["targets"][1]["num_samples"] == 77
    face_mask = seen["weights"][0][2]
    expected = face_box_mask(square_boxes(torch.tensor([[4.0, 4.0, 8.0, 8.0]] * 4), 0.5), 16, 16)
    assert face_mask.sum() == 4 * 6 * 6 and torch.equal(face_mask, expected)  # not the bare 4 x 4 box
    use_original = seen["face"][0][3]
    if keep_confidence is None:
        assert not use_original.any()
    else:
        assert use_original.any()


def test_decoded_images_are_judged_as_saved(tmp_path, world, monkeypatch):
    """The losses see the decoder's output clamped to [-1, 1], as saved and evaluated images are (the public code
    clamps too): a decoder overshoot is no channel for the classifier, and saturated pixels get no gradient."""
    from fastfair.trainer import process_group

    with process_group():
        trainer = Trainer(load_config(write_config(tmp_path, world)))
        decode = trainer.vae.decode

        def overshooting(latents, *args, **kwargs):
            out = decode(latents, *args, **kwargs)
            out.sample = out.sample * 40 + 0.5  # a tiny random decoder stays near 0: make it leave the range
            return out

        monkeypatch.setattr(trainer.vae, "decode", overshooting)
        z = torch.randn(2, *trainer.latent_shape, requires_grad=True)
        images = trainer._decode(z)
        assert images.min() == -1 and images.max() == 1 and ((images > -1) & (images < 1)).any()
        images.sum().backward()
        raw = overshooting((z / trainer.vae.config.scaling_factor).detach()).sample
        assert raw.abs().max() > 1.5  # the overshoot the clamp removed


def test_a_loss_scaler_steps_as_the_unscaled_loss_and_skips_overflows(tmp_path, world):
    """precision.mixed=fp16 (CUDA) scales the loss: fp16 gradients below 2^-24 are zero. The scaled run takes the
    unscaled run's steps (a power of two scales exactly), an overflow skips the step and backs the scale off, and
    the scale is saved and resumed. Here on CPU in fp32, with the scaler the trainer makes for fp16."""
    from fastfair import checkpoint
    from fastfair.trainer import process_group

    def trained(root, scale, steps=2):
        cfg = load_config(write_config(root, world), [f"max_steps={max(steps, 1)}"])
        with process_group():
            trainer = Trainer(cfg)
            assert trainer.scaler is None  # fp32: nothing to scale
            if scale is not None:
                trainer.scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1)
            for it in range(steps):
                trainer.iteration(it)
        return trainer

    plain, scaled = trained(tmp_path / "plain", None), trained(tmp_path / "scaled", 2.0 ** 10)
    for name, p in plain.model.trainable.items():
        torch.testing.assert_close(scaled.model.trainable[name], p, rtol=1e-6, atol=0)
    assert scaled.skipped == 0 and scaled.scaler.get_scale() == 2.0 ** 12  # grew after each finite step
    overflow = trained(tmp_path / "overflow", 3e38, steps=1)  # the scaled gradients overflow to inf
    assert overflow.skipped == 1 and overflow.scaler.get_scale() == pytest.approx(1.5e38, rel=1e-6)  # backed off
    start = {name: p.detach().clone() for name, p in trained(tmp_path / "start", None, steps=0).model.trainable.items()}
    for name, p in overflow.model.trainable.items():
        assert torch.equal(p, start[name]), name  # the step was not taken
    scaled.save(2)
    state = checkpoint.load_checkpoint(checkpoint.checkpoint_dir(scaled.cfg.output_dir) / "step_00000002")[2]
    assert state["loss_scaler"]["scale"] == 2.0 ** 12
    with process_group():
        resumed = Trainer(load_config(write_config(tmp_path / "scaled", world), ["max_steps=3", "resume=auto"]))
        resumed.scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        resumed.resume(checkpoint.checkpoint_dir(scaled.cfg.output_dir) / "step_00000002")
    assert resumed.scaler.get_scale() == 2.0 ** 12 and resumed.start == 2


def _pending_bytes_seen(monkeypatch) -> list:
    """The pending_bytes of each MemoryBudget.keeps call from now on (the optimizer state the plan reserves)."""
    from fastfair.memory_budget import MemoryBudget

    seen = []
    keeps = MemoryBudget.keeps

    def spy(self, *args, **kwargs):
        seen.append(kwargs["pending_bytes"])
        return keeps(self, *args, **kwargs)

    monkeypatch.setattr(MemoryBudget, "keeps", spy)
    return seen


def test_adamw8bit_state_bytes_at_bitsandbytes_8bit_threshold():
    """bitsandbytes keeps 32-bit moments for tensors under min_8bit_size=4096 elements and 8-bit ones (plus a float32
    absmax per 256 elements) from 4096 on: a tensor of exactly 4096 is 8-bit."""
    from fastfair.optimizer import optimizer_state_bytes

    assert optimizer_state_bytes("adamw8bit", [torch.zeros(4096)]) == 2 * (4096 + 4 * 16)
    assert optimizer_state_bytes("adamw8bit", [torch.zeros(4095)]) == 2 * 4095 * 4
    assert optimizer_state_bytes("adamw8bit", [torch.zeros(4096, dtype=torch.bfloat16)]) == 2 * (4096 + 4 * 16)


def test_adamw8bit_state_bytes_under_zero_are_those_of_one_flat_partition(tmp_path, world):
    """ZeRO stage >= 1 hands the optimizer one flat partition of the weights: bitsandbytes makes 8-bit moments of
    it, although each LoRA weight alone is under its 4096-element threshold (the estimate was 3-4x too large)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("bitsandbytes")
    from fastfair.optimizer import optimizer_state_bytes
    from fastfair.trainer import process_group

    ds_json = _deepspeed_json(tmp_path, zero_optimization={"stage": 1})
    with process_group():
        trainer = Trainer(load_config(write_config(tmp_path, world, "unet_lora"), [
            f"deepspeed.config={ds_json}", "optim.name=adamw8bit", "finetune.lora.rank=8", "logging.image_every=0"]))
        params = trainer.model.parameters()
        assert max(p.numel() for p in params) < 4096 <= sum(p.numel() for p in params)
        trainer.iteration(0)
    state = trainer.engine.optimizer.optimizer.state
    # the moments and their absmax blocks; the quantization maps (2 KiB) are shared by every tensor
    measured = sum(v.numel() * v.element_size() for s in state.values() for k, v in s.items()
                   if torch.is_tensor(v) and k not in ("step", "qmap1", "qmap2"))
    assert measured == optimizer_state_bytes("adamw8bit", params, deepspeed=True, zero_ranks=1)
    assert measured < optimizer_state_bytes("adamw8bit", params, deepspeed=True) / 3  # weight by weight: 32-bit


def test_the_memory_budget_counts_the_optimizer_state_made_at_the_first_step(tmp_path, world, monkeypatch):
    """The plan is decided at iteration 0, before AdamW makes its two moments (at its first step): they are counted
    from the parameters then, and afterwards measured (memory_allocated) on CUDA; on the CPU, where nothing measures
    them, counted in every later plan too."""
    from fastfair.optimizer import optimizer_state_bytes
    from fastfair.trainer import process_group

    seen = _pending_bytes_seen(monkeypatch)
    with process_group():
        trainer = Trainer(load_config(write_config(tmp_path, world, "unet_lora"), ["sampler.memory_budget_gb=1"]))
        for it in range(2):
            trainer.iteration(it)
    moments = sum(2 * p.numel() * 4 for p in trainer.model.parameters())
    later = 0 if trainer.device.type == "cuda" else moments
    assert seen == [moments, later] and optimizer_state_bytes("adamw", trainer.model.parameters()) == moments
    measured = sum(v.numel() * v.element_size() for s in trainer.optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0)
    assert measured == moments  # what AdamW made at its first step


def test_bf16_keeps_the_judges_in_bf16_and_the_trainable_weights_in_fp32(tmp_path, world):
    """Mixed precision: the frozen judges (classifier, semantics encoders, face embedder) are stored in the autocast
    dtype, as the frozen model parts are (they compute in it anyway); what trains stays fp32; an iteration runs."""
    from fastfair.trainer import process_group

    with process_group():
        trainer = Trainer(load_config(write_config(tmp_path, world, "unet_lora", face_loss=True),
                                      ["model.dtype=bf16", "precision.mixed=bf16"]))
        judges = trainer.judges
        assert judges.face_embedder is not None
        for module in [*judges.classifiers.values(), judges.semantics, judges.face_embedder]:
            assert {p.dtype for p in module.parameters()} == {torch.bfloat16}, type(module).__name__
        assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
        parts = trainer.iteration(0)
    assert all(torch.isfinite(torch.tensor(value)) for value in parts.values())


def test_the_memory_budget_counts_deepspeeds_float32_moments(tmp_path, world, monkeypatch):
    """Under DeepSpeed bf16 the model's trainable copies are bf16, but the moments DeepSpeed's optimizer makes at
    its first step are fp32: the plan counts what it then holds (half of it was counted)."""
    pytest.importorskip("deepspeed")
    import json

    from fastfair.trainer import process_group

    seen = _pending_bytes_seen(monkeypatch)
    ds_json = tmp_path / "zero2_bf16.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                                   "steps_per_print": 10**9}))
    with process_group():
        trainer = Trainer(load_config(write_config(tmp_path, world, "unet_lora"), [
            "sampler.memory_budget_gb=1", f"deepspeed.config={ds_json}", "model.dtype=bf16", "precision.mixed=bf16"]))
        assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
        trainer.iteration(0)
    measured = sum(v.numel() * v.element_size() for s in trainer.optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v) and v.dim() > 0)
    assert seen[0] == measured > 0


@pytest.mark.parametrize("dtype,mixed,scaled", [("fp16", "fp32", True), ("fp16", "fp16", True), ("fp32", "fp32", False)])
def test_fp16_frozen_weights_get_a_loss_scaler_whatever_the_autocast(tmp_path, world, monkeypatch, dtype, mixed,
                                                                       scaled):
    """fp16 frozen weights without fp16 autocast (the shipped model.dtype with precision.mixed=fp32): the gradient
    flows back through fp16 activations, which underflow unscaled (gradient cosine 0.23 against fp32 in the
    review's run). fp16 needs CUDA: the device check is lifted here, the trainer is only built."""
    import fastfair.config
    from fastfair.trainer import process_group

    monkeypatch.setattr(fastfair.config, "_device_problems", lambda *args: [])
    with process_group():
        trainer = Trainer(load_config(write_config(tmp_path, world), [f"model.dtype={dtype}",
                                                                      f"precision.mixed={mixed}"]))
    assert (trainer.scaler is not None) == scaled


def _schedule_cfg(kind, warmup=4, total=20):
    return SimpleNamespace(max_steps=total, optim=SimpleNamespace(warmup_steps=warmup, scheduler=kind))


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_warmup_ramps_linearly_to_the_base_rate(kind):
    f = lr_lambda(_schedule_cfg(kind))
    assert [f(s) for s in range(4)] == pytest.approx([1 / 5, 2 / 5, 3 / 5, 4 / 5])
    assert f(4) == pytest.approx(1.0)


def test_decay_shapes_after_warmup():
    lin, cos, const = (lr_lambda(_schedule_cfg(k)) for k in ("linear", "cosine", "constant"))
    # halfway through the 16 post-warm-up steps
    assert lin(12) == pytest.approx(0.5) and cos(12) == pytest.approx(0.5)
    assert cos(8) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))  # 0.854, linear gives 0.75
    assert lin(8) == pytest.approx(0.75)
    assert lin(20) == 0.0 and cos(20) == pytest.approx(0.0) and const(20) == 1.0


def test_grad_clip_bounds_the_norm_the_optimizer_sees(tmp_path, world):
    """With optim.grad_clip set, the global gradient norm at optimizer.step is at most grad_clip."""
    clip = 1e-4
    trainer = Trainer(load_config(write_config(tmp_path, world, "prefix"), [f"optim.grad_clip={clip}"]))
    seen = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    trainer.optimizer.register_step_pre_hook(record)
    trainer.iteration(0)
    assert seen and seen[0] <= clip * (1 + 1e-5), seen


def test_resume_restores_the_skipped_step_count(tmp_path, world):
    """The skipped-step count (logged as skipped_steps) continues across a resume."""
    cfg = load_config(write_config(tmp_path, world, "prefix"))
    trainer = Trainer(cfg)
    trainer.model.prefix.prefix.register_hook(lambda grad: grad * float("nan"))
    trainer.iteration(0)
    assert trainer.skipped == 1
    trainer.save(1)
    resumed = Trainer(cfg)
    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    resumed.resume(folder)
    assert resumed.start == 1 and resumed.skipped == 1 and resumed.steps_taken == 0
    # a checkpoint from before steps_taken was saved: the iterations not skipped (the EMA's step count)
    state = torch.load(folder / "state.pt", weights_only=True)
    del state["steps_taken"]
    state["iteration"] = 3
    torch.save(state, folder / "state.pt")
    resumed = Trainer(cfg)
    resumed.resume(folder)
    assert (resumed.start, resumed.skipped, resumed.steps_taken) == (3, 1, 2)


def test_the_optimizer_of_a_checkpoint_saved_without_its_name_is_told_by_its_state():
    """Checkpoints from before optimizer_name was saved: bitsandbytes' 8-bit AdamW keeps state1/state2, torch's
    AdamW exp_avg/exp_avg_sq; nothing stepped yet, nothing to tell."""
    from fastfair.optimizer import saved_optimizer_name

    moments = torch.zeros(3)
    assert saved_optimizer_name({"state": {0: {"step": 1, "state1": moments, "state2": moments}}}) == "adamw8bit"
    assert saved_optimizer_name({"state": {0: {"step": 1, "exp_avg": moments, "exp_avg_sq": moments}}}) == "adamw"
    assert saved_optimizer_name({"state": {}, "param_groups": []}) is None and saved_optimizer_name(None) is None


HOOKS = '''
import torch
from fastfair.classifiers import load_classifier


class Probabilities(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.input_size, self.head = inner, inner.input_size, inner.head

    def forward(self, images):
        return self.inner(images).softmax(-1)


def plain(spec):
    return torch.nn.Linear(3, 2)


def probabilities(spec):
    return Probabilities(load_classifier(CLASSIFIER))


def identity(settings):
    return torch.nn.Identity()


def detector(images, threshold):
    return [[] for _ in images]
'''


@pytest.mark.parametrize("overrides, message", [
    (["classifiers={gender: {factory: 'run_hooks:plain'}}"],
     r"classifiers\.gender\.factory='run_hooks:plain' returned a Linear, which lacks input_size \(its image side\); "
     r"head, or classifiers.<n>.attributes set: a classifier factory returns"),
    # the losses softmax again: 0.99 read as 0.61, no image above the confidence threshold, no error
    (["classifiers={gender: {factory: 'run_hooks:probabilities'}}"],
     r"the outputs for gender are probabilities \(in \[0, 1\], summing to 1 on random images\)"),
    (["semantics.factory=run_hooks:identity"],
     r"semantics\.factory='run_hooks:identity' returned a Identity: expected an nn.Module with embed_originals"),
    (["faces.detector=callable", "faces.detector_fn=run_hooks:detector"],
     r"faces\.detector_fn='run_hooks:detector' cannot be called as detector\(rgb uint8 \[H, W, 3\]\) -> faces"),
])
def test_a_hook_that_breaks_its_contract_is_refused_at_start_naming_its_key(tmp_path, world, monkeypatch, overrides,
                                                                           message):
    """A plain module lacked .head (AttributeError mid-start), a detector of two arguments or a semantics module
    without embed_originals failed at the first iteration with a bare TypeError or AttributeError, and a classifier
    returning probabilities trained silently on flattened confidences."""
    from fastfair.trainer import process_group

    (tmp_path / "run_hooks.py").write_text(HOOKS.replace("CLASSIFIER", repr(str(world["classifier"]))))
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(write_config(tmp_path, world), overrides)
    with process_group(), pytest.raises(ValueError, match=message):
        Trainer(cfg)


def test_a_tied_target_keeps_the_original_class(tmp_path, world, monkeypatch):
    """A tied OT row (q = [0.5, 0.5]: nothing steers the image to either class) takes the original image's class as
    its target: the image-preservation weight keeps it close (lambda_img_1) and its face loss may target the
    original's own face. argmax sent every such row to class 0, judging originals of class 1 as to be changed."""
    import fastfair.losses
    import fastfair.losses.face
    from fastfair.trainer import process_group

    seen = {}
    spy = recorder(seen)

    def tied_targets(probs, target, **kwargs):
        return torch.full_like(probs, 1.0 / probs.shape[-1])

    monkeypatch.setattr(fastfair.losses, "semantic_weights", spy("weights", fastfair.losses.semantic_weights))
    monkeypatch.setattr(fastfair.losses, "global_expected_ot_targets", tied_targets)
    monkeypatch.setattr(fastfair.losses.face, "original_shows_targets",
                        spy("shows", fastfair.losses.face.original_shows_targets))
    overrides = ["faces.detector=none", "loss.original_face_confidence=0"]
    with process_group():
        trainer = Trainer(load_config(write_config(tmp_path, world, face_loss=True), overrides))
        g = torch.Generator().manual_seed(3)
        originals, images = (torch.rand(8, 3, 16, 16, generator=g) * 2 - 1 for _ in range(2))
        with torch.no_grad():
            regions = fastfair.faces.locate_faces(originals, trainer.judges.detector, trainer.cfg.faces.margin)
            original_classes = {name: logit.argmax(-1) for name, logit in
                                trainer._attribute_logits(originals, regions).items()}
        assert any(c.ne(0).any() for c in original_classes.values())  # the case argmax judged wrongly
        trainer.losses(originals, images.requires_grad_())
    differs = seen["weights"][0][0]
    assert not any(d.any() for d in differs.values())
    shown_targets = seen["shows"][0][1]
    assert {name: c.tolist() for name, c in shown_targets.items()} == {
        name: c.tolist() for name, c in original_classes.items()}


def test_every_target_group_is_aligned(tmp_path, world):
    """Independent attributes are separate transport groups: the alignment loss of an image is the sum of each
    group's cross-entropy (one group's alone would leave the other attributes unsteered)."""
    from fastfair.losses import alignment_loss, expected_ot_targets
    from fastfair.targets import load_targets

    trainer = Trainer(load_config(write_config(tmp_path, world)))
    trainer.targets = load_targets({"form": "independent", "attributes": [
        {"name": "gender", "classes": {"female": 0, "male": 1}, "probabilities": "uniform"},
        {"name": "age", "classes": {"young": 0, "old": 1}, "probabilities": {"young": 0.75, "old": 0.25}}]})
    trainer.groups = trainer.targets.groups()
    assert len(trainer.groups) == 2
    g = torch.Generator().manual_seed(0)
    logits = {name: torch.randn(6, 2, generator=g, dtype=torch.float64) for name in ("gender", "age")}
    found = torch.tensor([True, True, True, True, True, False])
    align, _, _ = trainer._alignment(logits, found, logits, found)
    parts = []
    for group in trainer.groups:
        log_p = group.log_probs(logits)
        q = expected_ot_targets(log_p.exp(), group.target, valid=found)
        parts.append(alignment_loss(log_p, q, trainer.cfg.loss.confidence_threshold, mask=found, reduction="none"))
    assert all(part.sum() > 0 for part in parts)
    assert torch.allclose(align.double(), parts[0] + parts[1])


def test_the_step_count_range_is_drawn_whole():
    """sampler.num_steps_range [low, high] draws every count from low to high, both included."""
    cfg = SimpleNamespace(seed=0, sampler=SimpleNamespace(num_steps_range=[18, 21], num_steps=20))
    assert {Trainer._steps(SimpleNamespace(cfg=cfg), it) for it in range(200)} == {18, 19, 20, 21}


def face_when_bright(rgb):
    """A detector that sees a face (the whole image) in bright images only."""
    height, width = rgb.shape[:2]
    return [(0, 0, width, height)] if rgb.mean() > 127 else []


def test_images_or_originals_without_a_face_get_no_face_loss_and_no_original_target(tmp_path, world, monkeypatch):
    """The face loss counts the finetuned images with a face only, and targets the original's face only where the
    original has one (loss.original_face_confidence)."""
    import fastfair.losses.face
    from fastfair.losses.face import original_shows_targets
    from fastfair.trainer import process_group

    seen = {}
    spy = recorder(seen)
    original = fastfair.losses.face.face_realism_loss
    monkeypatch.setattr(fastfair.losses.face, "face_realism_loss", spy("face", original))
    monkeypatch.setattr(fastfair.losses.face, "original_shows_targets", spy("shows", original_shows_targets))
    overrides = ["faces.detector=callable", "faces.detector_fn=test_trainer:face_when_bright",
                 "loss.original_face_confidence=0"]
    bright = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)  # originals
    shown = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0], dtype=torch.bool)  # finetuned images
    with process_group():
        trainer = Trainer(load_config(write_config(tmp_path, world, face_loss=True,
                                                   batch={"images_per_prompt": 8}), overrides))
        g = torch.Generator().manual_seed(0)
        noise = [torch.rand(8, 3, 16, 16, generator=g) * 0.2 for _ in range(2)]
        originals = torch.where(bright[:, None, None, None], 0.7 + noise[0], -0.9 + noise[0])
        images = torch.where(shown[:, None, None, None], 0.7 + noise[1], -0.9 + noise[1]).requires_grad_()
        parts = trainer.losses(originals, images)
    args, kwargs = seen["face"]
    per_image = original(*args, **kwargs)
    assert per_image[~shown].ne(0).all()  # what the masking removes
    assert torch.allclose(parts["face"], (per_image * shown).mean())
    use_original = args[3]
    shows = original_shows_targets(*seen["shows"][0])
    assert (shows & shown & ~bright).any()  # an original without a face whose classifier output shows the target
    assert torch.equal(use_original, shows & shown & bright)


def test_logging_and_images_come_every_n_steps(tmp_path, world):
    """logging.log_every / image_every N: the scalars and grids of steps N, 2N, ... (not 1, N + 1, ...)."""
    import json

    path = write_config(tmp_path, world, max_steps=3, logging={"log_every": 2, "image_every": 3})
    Trainer(load_config(path)).train()
    run = tmp_path / "run"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [2]
    assert sorted(p.name for p in (run / "images").iterdir()) == ["step_00000003.png"]
