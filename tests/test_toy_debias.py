"""The toy world end to end: a short debiasing run moves the gender frequency toward the uniform target, the
shipped toy configs are valid, and the demo writes its table, pictures and metrics.json."""
import json
from pathlib import Path

import pytest
import torch

from fastfair.config import check_files, load_config, validate
from fastfair.evaluate import evaluate
from fastfair.toy import detect_faces
from fastfair.toy.captions import concepts
from fastfair.trainer import Trainer, process_group

CONFIGS = ("gender", "gender_race", "age")


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_toy_configs_are_valid_and_train(name, tmp_path):
    """Each toy config as shipped passes the checks, and one shortened iteration of it trains on the toy model."""
    cfg = load_config(f"pkg://fastfair.toy/configs/{name}.yaml", [f"output_dir={tmp_path}"])
    validate(cfg)
    check_files(cfg)
    short = load_config(f"pkg://fastfair.toy/configs/{name}.yaml", [
        f"output_dir={tmp_path}", "batch.images_per_prompt=4", "sampler.num_steps=4", "sampler.grad_steps=2"])
    with process_group("cpu"):
        trainer = Trainer(short, "cpu")
        parts = trainer.iteration(0)
    assert trainer.skipped == 0 and all(torch.isfinite(torch.tensor(v)) for v in parts.values())
    assert {f"bias/{a}" for a in ("gender", "race", "age")[:len(trainer.targets.attributes)]} <= set(parts)


def _most_skewed_training_prompt():
    return max(concepts("train", "occupation"), key=lambda c: abs(c.probabilities["gender"][0] - 0.5)).prompt


def test_short_debiasing_run_moves_the_gender_frequency_toward_uniform(tmp_path):
    """~25 iterations on one strongly skewed training prompt; judged by the independent eval classifier on
    fresh noise. The untrained model fails the bar (its bias is checked first)."""
    prompt = _most_skewed_training_prompt()
    (tmp_path / "prompt.txt").write_text(prompt + "\n")
    run = tmp_path / "run"
    cfg = load_config("pkg://fastfair.toy/configs/gender.yaml", [
        f"output_dir={run}", "max_steps=24", "checkpoint_every=24", "logging.image_every=0",
        "optim.ema_decay=0.9",  # the evaluated EMA must not lag 24 iterations behind
        f"data.sets={{one: {{file: {tmp_path / 'prompt.txt'}}}}}"])
    with process_group("cpu"):
        Trainer(cfg, "cpu").train()
    results = evaluate("toy", ["fastfair.toy:eval_classifier"], [prompt], tmp_path / "eval",
                       finetuned=str(run / "checkpoints" / "step_00000024"), attributes=["gender"],
                       images_per_prompt=48, guidance_scales=(cfg.sampler.guidance_scale,), seed=7,
                       batch_size=48, detector=detect_faces, margin=0.5, progress=False)
    models = results["guidance"][f"{cfg.sampler.guidance_scale:g}"]
    before = models["base"]["summary"]["gender.bias"]["mean"]
    after = models["finetuned"]["summary"]["gender.bias"]["mean"]
    assert before >= 0.7, f"the untrained model should be strongly biased on {prompt!r}, got {before:.2f}"
    assert after <= before - 0.35, f"bias {before:.2f} -> {after:.2f}: the run did not debias"


def test_demo_writes_table_pictures_and_metrics(tmp_path, capsys):
    from fastfair import demo

    metrics = demo.main(["--out", str(tmp_path), "--iters", "2", "--images-per-prompt", "3",
                         "checkpoint_every=2", "logging.image_every=1"])
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["before"].keys() == saved["after"].keys() >= {"gender_bias", "gender_total_variation"}
    assert 0 <= saved["before"]["gender_bias"] <= 1 and saved["iterations"] == 2
    assert {"sim_latent", "sim_layout", "diversity_before", "diversity_after"} <= saved["semantics"].keys()
    assert len(saved["prompts"]) == len(concepts("heldout", "occupation"))
    for name in ("before_after.png", "frequencies_gender.png", "eval/report.html", "train/images/step_00000001.png"):
        assert (tmp_path / name).is_file(), name
    assert "gender_bias" in capsys.readouterr().out and metrics["before"] == saved["before"]
    # another config into the same folder resumed the gender run and evaluated it as that config's result
    with pytest.raises(ValueError, match=r"holds a run trained with other settings: .*targets.*give another --out"):
        demo.main(["--out", str(tmp_path), "--config", "age", "--iters", "2", "checkpoint_every=2"])
    assert [demo.default_out(name) for name in ("gender", "age", "runs/mine.yaml")] == [
        Path("out/demo"), Path("out/demo_age"), Path("out/demo_mine")]
