"""Data parallel: `torchrun --nproc_per_node=2 fastfair/train.py` (gloo, 2 images per rank) trains the same
weights as one process with the whole batch of 4 (global-batch alignment targets, averaged gradients)."""
import socket
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from fastfair.config import load_config
from fastfair.trainer import Trainer, process_group
from child_env import child_env
from test_trainer_world import make_world, write_config

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path, config, ds_json, processes, max_steps, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
           f"--master_port={free_port()}", str(REPO / "fastfair" / "train.py"), "--config", str(config),
           "--deepspeed_config", str(ds_json), f"max_steps={max_steps}", "resume=auto", *overrides]
    run = subprocess.run(cmd, env=child_env(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1"), capture_output=True,
                         text=True, timeout=400, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_two_processes_equal_one(tmp_path):
    world = make_world(tmp_path / "world")
    config = write_config(tmp_path / "two", world, "text_unet_lora")
    env = child_env(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "fastfair" / "train.py"), "--config", str(config)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    with process_group():
        Trainer(load_config(write_config(tmp_path / "one", world, "text_unet_lora"))).train()
    start = {}
    for name in ("weights.safetensors", "ema.safetensors"):
        one = load_file(str(tmp_path / "one" / "run" / "checkpoints" / "step_00000002" / name))
        two = load_file(str(tmp_path / "two" / "run" / "checkpoints" / "step_00000002" / name))
        assert set(one) == set(two) and one
        for key in one:  # Adam moves each weight by ~lr = 1e-2 per step; summation order changes ~1e-6 of it
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=5e-5)
        start = one
    first = load_file(str(tmp_path / "one" / "run" / "checkpoints" / "step_00000001" / "weights.safetensors"))
    assert any(not torch.equal(first[k], start[k]) for k in first)  # training moved the weights
    logged = {}  # the logged loss parts are the global batch's, not rank 0's half
    for run_name in ("one", "two"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / run_name / "run" / "tensorboard"))
        events.Reload()
        tags = ("loss", "align", "img") + tuple(t for t in events.Tags()["scalars"] if t.startswith("img/"))
        logged[run_name] = {tag: [e.value for e in events.Scalars(tag)] for tag in tags}
    assert any(tag.startswith("img/") for tag in logged["one"])  # the per-encoder parts: rank 0's half before
    for tag, values in logged["one"].items():
        assert len(values) == 2 and max(values) > 0
        torch.testing.assert_close(torch.tensor(logged["two"][tag]), torch.tensor(values), rtol=1e-4, atol=1e-6)


def test_deepspeed_zero2_with_resume_equals_plain_run(tmp_path):
    """`fastfair/train.py --deepspeed_config` (ZeRO-2, fp32, 2 processes): 1 iteration, then a resume from its
    checkpoint (optimizer shards included) to 2, trains the same weights as one plain process for 2. A --check
    first (its collectives on both ranks: the iteration, the shards gathered, the peak memory) saves nothing and
    leaves the run unchanged."""
    world = make_world(tmp_path / "world")
    ds_json = tmp_path / "zero2_fp32.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}, "steps_per_print": 10**9}))
    config = write_config(tmp_path / "ds", world, "text_unet_lora")
    ckpt = tmp_path / "ds" / "run" / "checkpoints"
    for max_steps, check in ((2, ["--check", "--check-iterations", "1"]), (1, []), (2, [])):
        stdout = _launch(tmp_path, config, ds_json, 2, max_steps, *check)
        if check:
            assert "(2 on each of 2 processes)" in stdout and "iterations   1 checked" in stdout, stdout
            assert stdout.count("nothing was saved") == 1  # rank 0 reports
            assert not any(ckpt.iterdir())
    state = torch.load(ckpt / "step_00000002" / "state.pt", weights_only=False)
    assert len(state["zero_shards"]) == 2 and state["optimizer"] is None

    with process_group():
        Trainer(load_config(write_config(tmp_path / "one", world, "text_unet_lora"))).train()
    for name in ("weights.safetensors", "ema.safetensors"):
        one = load_file(str(tmp_path / "one" / "run" / "checkpoints" / "step_00000002" / name))
        ds = load_file(str(ckpt / "step_00000002" / name))
        assert set(one) == set(ds) and one
        for key in one:
            torch.testing.assert_close(ds[key], one[key], rtol=1e-4, atol=5e-5)


def test_deepspeed_bf16_resume_keeps_the_fp32_master_weights(tmp_path):
    """ZeRO-2 bf16 (2 processes): the model holds bf16 copies, the optimizer shards the fp32 master weights. A run
    resumed at iteration 1 trains to the same weights as one that ran 2 iterations at once: the resume takes the
    masters from the shards, not from the rounded bf16 copies."""
    pytest.importorskip("deepspeed")
    world = make_world(tmp_path / "world")
    ds_json = tmp_path / "zero2_bf16.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True},
                                   "steps_per_print": 10**9}))
    finals = {}
    for name, steps in (("resumed", (1, 2)), ("straight", (2,))):
        config = write_config(tmp_path / name, world, "text_unet_lora")
        for max_steps in steps:
            _launch(tmp_path, config, ds_json, 2, max_steps, "precision.mixed=bf16")
        finals[name] = load_file(str(tmp_path / name / "run" / "checkpoints" / "step_00000002" / "weights.safetensors"))
    assert set(finals["resumed"]) == set(finals["straight"]) and finals["straight"]
    for key, value in finals["straight"].items():
        assert torch.equal(finals["resumed"][key], value), key


def test_deepspeed_state_without_zero_loads_on_any_number_of_ranks(monkeypatch):
    """Without ZeRO (stage 0: DeepSpeed's FP16_Optimizer and the like) every rank saved the whole optimizer state:
    on another number of ranks each loads the first; on as many, its own. (ZeRO shards are re-partitioned: below.)"""
    from types import SimpleNamespace

    import fastfair.zero as zero

    class FP16_Optimizer:
        def __init__(self):
            self.loaded = []

        def load_state_dict(self, state):
            self.loaded.append(state)

    for rank, world, shards, expected in ((0, 1, [{"rank": 0}, {"rank": 1}], {"rank": 0}),
                                          (2, 3, [{"rank": 0}, {"rank": 1}], {"rank": 0}),
                                          (1, 2, [{"rank": 0}, {"rank": 1}], {"rank": 1})):
        engine = SimpleNamespace(optimizer=FP16_Optimizer())
        monkeypatch.setattr(zero.dist, "get_rank", lambda: rank)
        monkeypatch.setattr(zero.dist, "get_world_size", lambda: world)
        zero.load_optimizer_shard(engine, shards)
        assert engine.optimizer.loaded == [expected]


def test_shards_reassemble_parameters_cut_by_partition_boundaries():
    """Three ranks' partitions of one group holding a [5] and a [3, 2] parameter (11 elements, partitions of 4, the
    last padded): each parameter's master weights and Adam moments are its fragments in rank order."""
    from collections import namedtuple

    import fastfair.zero as zero

    address = namedtuple("fragment_address", "numel start")
    flat = torch.arange(12, dtype=torch.float32)  # 11 values and a pad
    layout = [{"a": address(4, 0)}, {"a": address(1, 0), "b": address(3, 1)}, {"b": address(3, 0)}]
    shards = []
    for rank, mapping in enumerate(layout):
        part = flat[4 * rank:4 * rank + 4]
        state = {"step": torch.tensor(7.0), "exp_avg": part + 100, "exp_avg_sq": part + 200}
        shards.append({"param_slice_mappings": [mapping], "single_partition_of_fp32_groups": [part],
                       "base_optimizer_state": {"state": {0: state}, "param_groups": [{"params": [0]}]}})
    whole = zero.reassembled(shards)
    assert set(whole) == {"a", "b"} and set(whole["a"]) == {"fp32", "exp_avg", "exp_avg_sq"}
    assert whole["a"]["fp32"].tolist() == [0, 1, 2, 3, 4] and whole["b"]["fp32"].tolist() == [5, 6, 7, 8, 9, 10]
    assert whole["b"]["exp_avg_sq"].tolist() == [205, 206, 207, 208, 209, 210]
    adam = shards[0]["base_optimizer_state"]["state"][0]
    quantized = dict(adam, state1=torch.zeros(4, dtype=torch.uint8))
    shards[0]["base_optimizer_state"]["state"][0] = quantized  # bitsandbytes' 8-bit AdamW: blocks of codes
    with pytest.raises(ValueError, match=r"optimizer state 'state1' \(torch.uint8, 4 values for a partition of 4\) "
                                         r"is not one float per weight"):
        zero.reassembled(shards)
    quantized.update(state1=torch.zeros(4), absmax1=torch.ones(1))
    with pytest.raises(ValueError, match=r"'absmax1' \(torch.float32, 1 values for a partition of 4\)"):
        zero.reassembled(shards)
    shards[0]["base_optimizer_state"]["state"][0] = adam
    shards[1]["base_optimizer_state"] = [{"exp_avg": flat}]  # DeepSpeed's elastic layout
    with pytest.raises(ValueError, match="elastic layout .* does not re-partition: resume with as many processes"):
        zero.reassembled(shards)


def _cut_in_two(shard):
    """A 1-rank ZeRO shard as two ranks would have saved it: each group's flat partition (master weights and the
    1-dim Adam state) cut in the middle, each parameter's (start, numel) split at the cut."""
    halves = []
    for half in range(2):
        mappings, fp32s, state = [], [], {}
        for g, mapping in enumerate(shard["param_slice_mappings"]):
            fp32 = shard["single_partition_of_fp32_groups"][g]
            cut = fp32.numel() // 2
            low, high = (0, cut) if half == 0 else (cut, None)
            fp32s.append(fp32[low:high].clone())
            cuts = {}
            for name, a in mapping.items():
                begin, end = max(a.start, low), min(a.start + a.numel, cut if half == 0 else fp32.numel())
                if begin < end:
                    cuts[name] = type(a)(numel=end - begin, start=begin - low)
            mappings.append(cuts)
            index = shard["base_optimizer_state"]["param_groups"][g]["params"][0]
            state[index] = {k: v[low:high].clone() if torch.is_tensor(v) and v.dim() == 1 else v
                            for k, v in shard["base_optimizer_state"]["state"][index].items()}
        halves.append({**shard, "param_slice_mappings": mappings, "single_partition_of_fp32_groups": fp32s,
                       "base_optimizer_state": {**shard["base_optimizer_state"], "state": state}})
    return halves


def test_shards_of_two_parameter_groups_are_repartitioned_group_by_group():
    """ZeRO-2 over two parameter groups (with and without weight decay): the state of a stepped engine, as 2 ranks
    would have saved it, loads into a fresh 1-process engine as each parameter's own master weights and moments."""
    from deepspeed.utils import safe_get_full_fp32_param

    import fastfair.zero as zero
    from fastfair.process_group import process_group

    def engine(seed):
        torch.manual_seed(seed)
        params = {f"p{i}": torch.nn.Parameter(torch.randn(n)) for i, n in enumerate((5, 3, 7))}
        groups = [{"params": [params["p0"], params["p1"]]}, {"params": [params["p2"]], "weight_decay": 0.0}]
        return params, zero.deepspeed_engine({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 1,
                                              "train_batch_size": 1}, params, torch.optim.AdamW(groups, lr=0.1), None)

    with process_group():
        params, stepped = engine(0)
        stepped.backward(sum((p * p * (i + 1)).sum() for i, p in enumerate(params.values())))
        stepped.step()
        saved = stepped.optimizer.state_dict()
        expected = zero.reassembled([saved])  # one rank's partition: each parameter's own slice of it
        assert len(saved["param_slice_mappings"]) == 2 and set(expected["params.2"]) == {"fp32", "exp_avg",
                                                                                          "exp_avg_sq"}
        fresh_params, fresh = engine(1)
        zero.load_optimizer_shard(fresh, _cut_in_two(saved))
        loaded = zero.reassembled([fresh.optimizer.state_dict()])
        for i, p in enumerate(fresh_params.values()):
            name = f"params.{i}"
            assert torch.equal(safe_get_full_fp32_param(p), dict(params)[f"p{i}"].detach()), name
            for key, value in expected[name].items():
                assert torch.equal(loaded[name][key], value), (name, key)


def test_deepspeed_resumes_on_another_number_of_processes(tmp_path):
    """ZeRO-2, fp32: 2 processes train step 1, 1 process resumes to step 2, 2 processes again to step 3: the same
    weights at steps 2 and 3 as one plain process (the Adam moments and masters re-partitioned, not restarted:
    without the moments step 2 is off by about 1e-2)."""
    world = make_world(tmp_path / "world")
    ds_json = tmp_path / "zero2_fp32.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"stage": 2}, "steps_per_print": 10**9}))
    config = write_config(tmp_path / "ds", world, "text_unet_lora", keep_last=3)
    _launch(tmp_path, config, ds_json, 2, 1)
    out = _launch(tmp_path, config, ds_json, 1, 2)
    assert "re-partitioning the optimizer state that 2 rank(s) saved over this run's 1" in out
    assert "re-partitioning the optimizer state that 1 rank(s) saved over this run's 2" in _launch(
        tmp_path, config, ds_json, 2, 3)
    with process_group():
        Trainer(load_config(write_config(tmp_path / "one", world, "text_unet_lora", max_steps=3, keep_last=3))).train()
    for step in (2, 3):
        for name in ("weights.safetensors", "ema.safetensors"):
            one = load_file(str(tmp_path / "one" / "run" / "checkpoints" / f"step_0000000{step}" / name))
            ds = load_file(str(tmp_path / "ds" / "run" / "checkpoints" / f"step_0000000{step}" / name))
            assert set(one) == set(ds) and one
            for key in one:
                torch.testing.assert_close(ds[key], one[key], rtol=1e-4, atol=5e-5)
    state = torch.load(tmp_path / "ds" / "run" / "checkpoints" / "step_00000001" / "state.pt", weights_only=False)
    loaded_exactly(state["zero_shards"], {"zero_optimization": {"stage": 2}}, "DeepSpeedZeroOptimizer")


# DeepSpeed's BF16_Optimizer step fails with 2 CPU processes on torch 2.4.1 (gloo's all_gather_into_tensor modifies
# a view made in no_grad mode under grad mode), before any checkpoint: DeepSpeed's and torch's, not the resume's
@pytest.mark.skipif(tuple(int(part) for part in torch.__version__.split(".")[:2]) < (2, 5),
                    reason="DeepSpeed's BF16_Optimizer cannot step on 2 CPU processes with torch 2.4")
def test_deepspeed_bf16_resumes_on_another_number_of_processes(tmp_path):
    """ZeRO-1 bf16 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer, whose Adam state exists only after
    a step; ZeRO-2 bf16 runs the fp32 test's DeepSpeedZeroOptimizer): 2 processes train step 1, 1 process resumes
    to step 2. In bf16 the number of processes changes the gradient's rounding (5 % here) and
    Adam's step amplifies that, so the weights are compared at lr 1e-9, where steps barely move them: the fp32
    master weights are the saved ones (not their bf16 copies, 1e-4 away), and the Adam moments continue the
    saved ones (restarted, exp_avg would be 10 % of a straight run's)."""
    import fastfair.zero as zero

    world = make_world(tmp_path / "world")
    ds_json = tmp_path / "zero2_bf16.json"
    bf16 = {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    ds_json.write_text(json.dumps({**bf16, "steps_per_print": 10**9}))
    states = {}
    for name, runs in (("moved", ((2, 1), (1, 2))), ("straight", ((2, 2),))):
        config = write_config(tmp_path / name, world, "text_unet_lora", optim={"lr": 1e-9, "ema_decay": 0.5})
        for processes, max_steps in runs:
            _launch(tmp_path, config, ds_json, processes, max_steps, "precision.mixed=bf16")
        state = torch.load(tmp_path / name / "run" / "checkpoints" / "step_00000002" / "state.pt", weights_only=False)
        assert len(state["zero_shards"]) == (1 if name == "moved" else 2)
        assert float(state["zero_shards"][0]["base_optimizer_state"]["state"][0]["step"]) == 2
        states[name] = zero.reassembled(state["zero_shards"])
    assert set(states["moved"]) == set(states["straight"]) and states["straight"]
    for key, parts in states["straight"].items():
        assert set(parts) == {"fp32", "exp_avg", "exp_avg_sq"}
        torch.testing.assert_close(states["moved"][key]["fp32"], parts["fp32"], rtol=0, atol=1e-6)
    for moment in ("exp_avg", "exp_avg_sq"):  # over all weights: single tiny gradients are rounding noise in bf16
        moved, straight = (torch.cat([state[key][moment] for key in sorted(state)]) for state in
                           (states["moved"], states["straight"]))
        assert float((moved - straight).norm()) < 0.1 * float(straight.norm()), moment
    # at lr 1e-9 a master weight and its bf16 copy agree: the step-1 shards go into a 1-process engine directly
    state = torch.load(tmp_path / "moved" / "run" / "checkpoints" / "step_00000001" / "state.pt", weights_only=False)
    loaded_exactly(state["zero_shards"], bf16, "BF16_Optimizer")


def loaded_exactly(shards, ds_config, optimizer_class):
    """Shards of 2 ranks into a 1-process DeepSpeed engine over parameters of their sizes (a flat partition's
    layout depends on the sizes and the order alone): its fp32 master weights and Adam state are then the saved
    ones, bit for bit, and Adam's step count is theirs."""
    from deepspeed.utils import safe_get_full_fp32_param

    import fastfair.zero as zero
    from fastfair.process_group import process_group

    whole = zero.reassembled(shards)
    if optimizer_class == "DeepSpeedZeroOptimizer":  # as an fp16 run's (fp16 needs CUDA): its scale carries over
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

        scaler = DynamicLossScaler(init_scale=128.0, scale_window=100, min_scale=1.0, delayed_shift=2,
                                   consecutive_hysteresis=False, raise_error_at_min_scale=False, dtype=torch.float16)
        shards = [{**shard, "loss_scaler": scaler, "dynamic_loss_scale": True} for shard in shards]
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32
    params = {f"params.{i}": torch.nn.Parameter(torch.zeros(whole[f"params.{i}"]["fp32"].numel(), dtype=dtype))
              for i in range(len(whole))}
    with process_group():
        engine = zero.deepspeed_engine({**ds_config, "train_micro_batch_size_per_gpu": 1, "train_batch_size": 1},
                                       params, torch.optim.AdamW(params.values(), lr=1e-3), None)
        assert type(engine.optimizer).__name__ == optimizer_class
        zero.load_optimizer_shard(engine, shards)
        for name, p in params.items():
            assert torch.equal(safe_get_full_fp32_param(p).flatten(), whole[name]["fp32"]), name
        (flat,) = [group["params"][0] for group in engine.optimizer.optimizer.param_groups]
        state = engine.optimizer.optimizer.state[flat]
        saved = shards[0]["base_optimizer_state"]["state"][0]
        assert float(state["step"]) == float(saved["step"])
        for moment in ("exp_avg", "exp_avg_sq"):
            expected = torch.cat([whole[f"params.{i}"][moment] for i in range(len(whole))])
            assert torch.equal(state[moment][:expected.numel()], expected), moment
        if optimizer_class == "DeepSpeedZeroOptimizer":
            assert engine.optimizer.loss_scaler.cur_scale == 128.0 and engine.optimizer.dynamic_loss_scale


def test_deepspeed_takes_the_client_optimizer_with_zero(monkeypatch):
    """DeepSpeed's ZeRO refuses a client optimizer outside its tested list (torch's AdamW is in it; bitsandbytes'
    AdamW8bit, optim.name=adamw8bit, is not) unless zero_allow_untested_optimizer is set: the engine sets it,
    leaving the run's JSON as it was."""
    deepspeed = pytest.importorskip("deepspeed")
    import fastfair.zero as zero

    seen = {}

    def initialize(model, optimizer, lr_scheduler, config, dist_init_required):
        seen.update(config)
        return engine, optimizer, None, lr_scheduler

    engine = types.SimpleNamespace(zero_optimization_stage=lambda: 2)
    monkeypatch.setattr(deepspeed, "initialize", initialize)
    ds = {"zero_optimization": {"stage": 2}}
    params = {"w": torch.nn.Parameter(torch.zeros(2))}
    assert zero.deepspeed_engine(ds, params, None, None) is engine
    assert seen == {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    assert ds == {"zero_optimization": {"stage": 2}}
    # the stage as DeepSpeed read it ("3" is stage 3 to it): refused, not left to fail at the first U-Net call
    engine = types.SimpleNamespace(zero_optimization_stage=lambda: 3)
    with pytest.raises(ValueError, match="sets ZeRO stage 3"):
        zero.deepspeed_engine({"zero_optimization": {"stage": "3"}}, params, None, None)


def test_a_fp16_deepspeed_state_loads_weights_only(tmp_path):
    """A DeepSpeed fp16 run's optimizer state holds a DynamicLossScaler (fp32/bf16: a LossScaler), ZeroStageEnum
    and fragment addresses: all read by torch.load(weights_only=True) once fastfair.zero allows them. The 2-process
    test resumes fp32 only (fp16 needs CUDA)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    import fastfair.zero as zero

    scaler = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=1000, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False)
    shard = {"loss_scaler": scaler, "static": LossScaler(scale=1), "zero_stage": ZeroStageEnum.gradients,
             "address": fragment_address(numel=4, start=0)}
    torch.save({"zero_shards": [shard]}, tmp_path / "state.pt")
    zero.allow_deepspeed_state_in_weights_only_load()
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)["zero_shards"][0]
    assert loaded["loss_scaler"].cur_scale == 2.0 ** 16 and loaded["zero_stage"] == ZeroStageEnum.gradients
    assert loaded["address"] == fragment_address(numel=4, start=0) and loaded["static"].cur_scale == 1


def test_ranks_that_resume_from_different_checkpoints_or_read_other_prompts_are_refused(monkeypatch):
    """On node-local disks each rank's resume=auto sees other checkpoints: the collectives still pair up and rank 0
    saved averages of other steps' gradients, unseen. Every rank compares what it resumed from at start, and the
    prompts it draws from (a factory returning a set's order, which Python's hash seed changes per process, trained
    each rank on other prompts)."""
    from types import SimpleNamespace

    import fastfair.trainer as trainer_module
    from fastfair.prompts import PromptMixture

    def gathered(views):
        def all_gather_object(out, mine):
            out[:] = views
        return all_gather_object

    def view(start, name, prompts=("a doctor", "a nurse"), sets=("jobs",)):
        mixture = PromptMixture({s: list(prompts) for s in sets}, {s: 1.0 for s in sets}).state_dict()
        return start, name, (tuple(mixture["order"]), tuple(sorted(mixture["prompts"].items())))

    mixture = PromptMixture({"jobs": ["a doctor", "a nurse"]}, {"jobs": 1.0})
    me = SimpleNamespace(world=2, start=2, cfg=SimpleNamespace(output_dir="/node-local/run"), mixture=mixture)
    monkeypatch.setattr(trainer_module.dist, "all_gather_object", gathered([view(2, "step_00000002"), view(0, "")]))
    with pytest.raises(ValueError, match="rank 0: step_00000002, rank 1: a fresh start.*storage every rank shares"):
        Trainer._check_ranks_agree(me, Path("/node-local/run/checkpoints/step_00000002"))
    monkeypatch.setattr(trainer_module.dist, "all_gather_object", gathered([view(2, "step_00000002")] * 2))
    Trainer._check_ranks_agree(me, Path("/shared/run/checkpoints/step_00000002"))  # the same: accepted
    other = view(2, "step_00000002", prompts=("a nurse", "a doctor"))  # the same prompts in another order
    monkeypatch.setattr(trainer_module.dist, "all_gather_object", gathered([view(2, "step_00000002"), other]))
    with pytest.raises(ValueError, match=r"rank 1 and rank 0 differ in data.sets.jobs's prompts: every rank must"):
        Trainer._check_ranks_agree(me, Path("/shared/run/checkpoints/step_00000002"))
    reordered = view(2, "step_00000002", sets=("b", "a"))
    monkeypatch.setattr(trainer_module.dist, "all_gather_object",
                        gathered([view(2, "step_00000002", sets=("a", "b")), reordered]))
    with pytest.raises(ValueError, match="differ in the order of data.sets"):
        Trainer._check_ranks_agree(me, Path("/shared/run/checkpoints/step_00000002"))


def test_a_step_that_fails_on_one_rank_stops_every_rank(monkeypatch):
    """A rank that raised alone (a node-local prompt file differing from the saved list on resume, a file or
    package its node lacks, another run's checkpoints on its disk, rank 0's full disk at a checkpoint) left the
    others waiting in their next collective, forever: every rank now raises, the failing one its own error."""
    from fastfair.process_group import OtherRankFailed, on_every_rank

    said = {}

    def gathered(others):  # what the other rank says; this one is rank 0
        def all_gather_object(out, mine):
            said["mine"] = mine
            out[:] = [mine, others]
        return all_gather_object

    def refused():
        raise ValueError("data.sets.jobs: 2 prompts then, 3 now")

    monkeypatch.setattr(dist, "all_gather_object", gathered("ValueError: data.sets.jobs: 2 prompts then, 3 now"))
    with pytest.raises(OtherRankFailed, match=r"^rank 1 could not resume, so no rank goes on: ValueError: data.sets"):
        on_every_rank(2, "could not resume", lambda: "step_2")  # rank 0 resumed, rank 1 did not
    assert said["mine"] is None
    with pytest.raises(ValueError, match=r"^data.sets.jobs: 2 prompts then, 3 now$"):
        on_every_rank(2, "could not resume", refused)  # its own error, after telling the others
    assert said["mine"] == "ValueError: data.sets.jobs: 2 prompts then, 3 now"
    monkeypatch.setattr(dist, "all_gather_object", gathered(None))
    assert on_every_rank(2, "could not resume", lambda: "step_2") == "step_2"  # both went on
    monkeypatch.setattr(dist, "all_gather_object", None)  # one process: no collective
    assert on_every_rank(1, "could not resume", lambda: "step_2") == "step_2"
    with pytest.raises(ValueError, match="2 prompts then"):
        on_every_rank(1, "could not resume", refused)


RANK_LOCAL_FAILURES = r"""
import datetime, json, os, sys, traceback
from pathlib import Path
import torch, torch.distributed as dist, torch.multiprocessing as mp
import yaml

def worker(rank, root, port):
    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # a rank left waiting: a timeout, not a hang
    import fastfair.trainer as T
    from fastfair.config import load_config
    config = yaml.safe_load(Path(root, "config.yaml").read_text())
    outcomes = {}
    for scenario in ("file missing on rank 1", "rank 1's output_dir in use", "rank 0's lock fails",
                     "rank 0's disk full"):
        cfg = dict(config, output_dir=str(Path(root, scenario.replace(" ", "_"), "run")))
        if scenario == "file missing on rank 1" and rank == 1:
            cfg["classifiers"] = {"gender": {"path": "/node1/gender.safetensors"}}
        if scenario == "rank 1's output_dir in use":  # a node-local output_dir: another run's step on rank 1's
            cfg["output_dir"] += f"_node{rank}"
            if rank == 1:
                Path(cfg["output_dir"], "checkpoints", "step_00000005").mkdir(parents=True)
        real_lock = T.checkpoint.output_dir_lock
        if scenario == "rank 0's lock fails" and rank == 0:  # not a refusal: an error of another kind
            def broken(out):
                raise RuntimeError(f"{out}: the lock file's filesystem is broken")
            T.checkpoint.output_dir_lock = broken
        if scenario == "rank 0's disk full" and rank == 0:
            def full(pixels, path):
                raise OSError(f"{path}: No space left on device")
            T.save_png = full
        path = Path(root, f"{rank}.yaml")
        path.write_text(yaml.safe_dump(cfg))
        try:
            T.Trainer(load_config(path)).train()
            outcomes[scenario] = "trained"
        except Exception as error:
            outcomes[scenario] = f"{type(error).__name__}: {error}"
        T.checkpoint.output_dir_lock = real_lock
    Path(root, f"rank{rank}.json").write_text(json.dumps(outcomes))

if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1], int(sys.argv[2])), nprocs=2, join=True)
"""


def test_a_failure_on_one_rank_of_two_processes_stops_both(tmp_path):
    """Two gloo processes, each failing alone where it reads its own disk: a file the config names missing on one
    node (the other rank waited in _claim_output_dir's broadcast), another run's checkpoints in a node-local
    output_dir (the other started training), rank 0's lock failing with an error other than a refusal (the other
    waited in _claim_output_dir's broadcast), rank 0's disk full when it saves an image grid (the other waited at
    the next collective). Each rank now stops: the failing one with its own error, the other naming it."""
    world = make_world(tmp_path / "world")
    write_config(tmp_path, world, "text_lora", max_steps=1)
    (tmp_path / "failures.py").write_text(RANK_LOCAL_FAILURES)
    run = subprocess.run([sys.executable, str(tmp_path / "failures.py"), str(tmp_path), str(free_port())],
                         env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank1["file missing on rank 1"].startswith("ConfigError: missing or malformed files:")
    assert "classifiers.gender.path=/node1/gender.safetensors does not exist" in rank1["file missing on rank 1"]
    assert rank0["file missing on rank 1"].startswith("OtherRankFailed: rank 1 could not start, so no rank goes on: "
                                                      "ConfigError: missing or malformed files:")
    assert "holds checkpoints of another run (steps 5 (incomplete))" in rank1["rank 1's output_dir in use"]
    assert rank0["rank 1's output_dir in use"].startswith("OtherRankFailed: rank 1 found output_dir in use, so no rank "
                                                          "goes on: ValueError: output_dir=")
    assert rank0["rank 0's lock fails"].startswith("RuntimeError: ") and "filesystem is broken" in \
        rank0["rank 0's lock fails"]  # rank 1 waited in _claim_output_dir's broadcast, which took refusals only
    assert rank1["rank 0's lock fails"].startswith("OtherRankFailed: rank 0 could not claim output_dir, so no rank "
                                                   "goes on: RuntimeError: ")
    assert rank0["rank 0's disk full"].startswith("OSError: ") and "No space left on device" in \
        rank0["rank 0's disk full"]
    assert rank1["rank 0's disk full"] == ("OtherRankFailed: rank 0 could not write the run's progress, log or images "
                                           "at step 1, so no rank goes on (its error is in its output)")


def test_overrides_on_both_sides_of_the_deepspeed_flag():
    from fastfair.trainer import parse_args

    args = parse_args(["--config", "c.yaml", "max_steps=1", "--deepspeed_config", "ds.json", "output_dir=o"])
    assert args.overrides == ["max_steps=1", "output_dir=o"] and args.deepspeed_config == "ds.json"


def test_the_deepspeed_flag_and_key_together_are_refused(capsys):
    from fastfair.trainer import parse_args

    with pytest.raises(SystemExit):  # the flag won without a word
        parse_args(["--config", "c.yaml", "--deepspeed_config", "a.json", "deepspeed.config=b.json"])
    assert "--deepspeed_config a.json and deepspeed.config=b.json both name the DeepSpeed JSON" in \
        capsys.readouterr().err
