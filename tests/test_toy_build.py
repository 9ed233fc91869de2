"""`python -m fastfair.toy.build --quick`: runs, is deterministic, and its output loads like the shipped weights."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastfair.toy import load_toy_classifier, load_toy_detector, load_toy_face_bank, toy_pipeline_path
from fastfair.toy.files import BUILD_RECORD, combined_checksum, weight_checksums

EXPECTED_FILES = {
    "classifier_eval.safetensors", "classifier_train.safetensors", "detector.safetensors",
    "face_bank.safetensors", "pipeline/text_encoder/model.safetensors",
    "pipeline/unet/diffusion_pytorch_model.safetensors", "pipeline/vae/diffusion_pytorch_model.safetensors",
}


def quick_builds(*outs) -> list:
    """Run the CLI into each folder, in parallel fresh processes (the build switches torch to deterministic
    mode); return the printed checksums."""
    command = [sys.executable, "-m", "fastfair.toy.build", "--quick", "--out"]
    runs = [subprocess.Popen(command + [str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for out in outs]
    checksums = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-3000:]
        checksums.append([line for line in stdout.splitlines() if line.startswith("checksum: ")][-1].split()[-1])
    return checksums


def test_quick_build_is_deterministic_and_its_output_loads(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    # the user's files in an --out folder: neither in the checksum nor given other permissions
    (second / "tools").mkdir(parents=True)
    (second / "private.txt").write_text("mine")
    (second / "private.txt").chmod(0o600)
    (second / "tools" / "run.sh").write_text("#!/bin/sh\n")
    (second / "tools" / "run.sh").chmod(0o755)
    (second / "old_backup.safetensors").write_bytes(b"not a build's")
    checksum, again = quick_builds(first, second)
    assert again == checksum
    assert [(second / name).stat().st_mode & 0o777 for name in ("private.txt", "tools/run.sh")] == [0o600, 0o755]
    assert "old_backup.safetensors" not in json.loads((second / BUILD_RECORD).read_text())["files"]
    # a finished build leaves neither its marker nor its partial pipeline
    assert not [path.name for path in first.iterdir() if path.name.startswith(".")]

    record = json.loads((first / BUILD_RECORD).read_text())
    sums = weight_checksums(str(first))
    assert set(sums) == EXPECTED_FILES
    assert record["files"] == sums and record["checksum"] == combined_checksum(sums) == checksum

    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(toy_pipeline_path(str(first)), safety_checker=None,
                                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline("a photo of the face of a judge, a person", num_inference_steps=2, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images * 2 - 1
    assert images.shape == (1, 3, 32, 32)
    assert load_toy_classifier("eval", weights_dir=str(first))(images).shape == (1, 8)
    assert len(load_toy_detector(weights_dir=str(first))(images)) == 1
    assert len(load_toy_face_bank(weights_dir=str(first))) == record["settings"]["bank_size"]


def test_quick_build_never_replaces_the_shipped_weights(tmp_path, capsys):
    from fastfair.toy.build import parse_args
    from fastfair.toy.files import WEIGHTS_DIR

    for argv in (["--quick"], ["--quick", "--out", str(WEIGHTS_DIR)]):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert "--quick" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        parse_args(["--quick", "--out", str(tmp_path / "file")])
    assert "a file; give a folder for the toy world's files" in capsys.readouterr().err
    assert parse_args([]).out == str(WEIGHTS_DIR) and parse_args(["--quick", "--out", "x"]).out == "x"
    with pytest.raises(SystemExit):  # an empty shell variable: it rebuilt the shipped weights for 16 minutes
        parse_args(["--out", ""])
    assert "--out '': empty" in capsys.readouterr().err


def test_a_build_never_replaces_files_it_did_not_write(tmp_path, capsys):
    """A user's own pipeline/ (a real model kept as ~/models/pipeline) was deleted, their build.json overwritten."""
    from fastfair.toy.build import UNFINISHED_MARKER, build, parse_args

    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "NOTES.txt").write_text("mine")
    (tmp_path / "build.json").write_text("mine")
    with pytest.raises(SystemExit):
        parse_args(["--quick", "--out", str(tmp_path)])
    assert "holds pipeline, build.json, which no toy build wrote" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds pipeline, build.json, which no toy build wrote"):
        build(str(tmp_path), quick=True)
    assert (tmp_path / "pipeline" / "NOTES.txt").read_text() == "mine"
    # a build's folder: its record, or the marker of a build stopped halfway
    (tmp_path / "build.json").write_text(json.dumps({"checksum": "x", "files": {}}))
    assert parse_args(["--quick", "--out", str(tmp_path)]).out == str(tmp_path)
    (tmp_path / "build.json").unlink()
    (tmp_path / UNFINISHED_MARKER).touch()
    assert parse_args(["--quick", "--out", str(tmp_path)]).out == str(tmp_path)


def test_skew_summary_leaves_prompts_without_faces_out_of_both_means():
    from fastfair.toy.build import summarize_skew
    from fastfair.toy.captions import concepts

    first, second = concepts("heldout", "occupation")[:2]
    report = {first.prompt: {"faces_found": 4, "gender": {"frequencies": [0.25, 0.75], "bias": 0.5}},
              second.prompt: {"faces_found": 0, "gender": {"frequencies": [0.0, 0.0], "bias": None}}}
    skew = summarize_skew(report)
    assert skew["per_prompt"][second.prompt]["generated_female"] is None  # not a 0 % female share
    assert skew["prompts_with_faces"] == 1 and skew["mean_gender_bias_generated"] == 0.5
    assert skew["mean_gender_bias_data"] == round(abs(2 * first.probabilities["gender"][0] - 1), 3)
    nothing = summarize_skew({second.prompt: report[second.prompt]})
    assert nothing["mean_gender_bias_generated"] is None and nothing["mean_gender_bias_data"] is None


def test_skew_summary_reports_the_generated_female_share():
    from fastfair.toy.build import summarize_skew
    from fastfair.toy.captions import concepts

    first = concepts("heldout", "occupation")[0]
    skew = summarize_skew({first.prompt: {"faces_found": 4, "gender": {"frequencies": [0.25, 0.75], "bias": 0.5}}})
    assert skew["per_prompt"][first.prompt] == {"data_female": round(first.probabilities["gender"][0], 3),
                                                "generated_female": 0.25, "faces_found": 4}


def test_quick_build_refuses_the_shipped_weights_however_the_path_is_spelled(capsys):
    from fastfair.toy.build import parse_args
    from fastfair.toy.files import WEIGHTS_DIR

    for spelled in (f"{WEIGHTS_DIR}{os.sep}", f"{WEIGHTS_DIR}{os.sep}.", os.path.relpath(WEIGHTS_DIR)):
        with pytest.raises(SystemExit):
            parse_args(["--quick", "--out", spelled])
        assert "--quick writes barely trained models" in capsys.readouterr().err


def test_learning_rate_warms_up_to_its_peak_then_decays_to_five_percent():
    from fastfair.toy.training import learning_rate

    assert [learning_rate(step, 100, 2.0, 4) for step in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert learning_rate(4, 100, 2.0, 4) == pytest.approx(2.0)  # the cosine starts at the peak
    assert learning_rate(52, 100, 2.0, 4) == pytest.approx(2.0 * (0.05 + 0.95 * 0.5))  # half way
    assert learning_rate(100, 100, 2.0, 4) == pytest.approx(0.1)  # 5 % of the peak at the end, not 0


def test_fit_ends_with_the_parameters_ema_of_its_steps():
    """With ema_decay the parameters end as the EMA of each step's weights (warm-up decay min(d, (1+t)/(10+t)))."""
    from fastfair.toy.training import EMA, fit

    def run(ema_decay):
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.zeros(3))
        seen = []

        def loss_at(step):
            seen.append(weight.detach().clone())  # the weights after steps 0 .. step - 1
            return ((weight - torch.tensor([1.0, -2.0, 3.0])) ** 2).sum()
        losses = fit([weight], loss_at, steps=30, lr=0.1, description="test", warmup=2, ema_decay=ema_decay)
        return weight.detach(), seen, losses

    raw, seen, losses = run(None)
    averaged, seen_again, losses_again = run(0.8)
    assert losses_again == losses  # the EMA leaves the optimization alone
    after_each = seen[1:] + [raw]
    expected = seen[0].clone()
    for step, weights in enumerate(after_each):
        expected = expected.lerp(weights, 1 - min(0.8, (1 + step) / (10 + step)))
    torch.testing.assert_close(averaged, expected)
    assert not torch.allclose(averaged, raw)
    weight = torch.nn.Parameter(torch.zeros(1))
    ema = EMA([weight], 0.9)
    with torch.no_grad():
        weight.fill_(1.0)
    ema.update(0)  # decay min(0.9, 1/10): mostly the new weight
    ema.copy_to_parameters()
    assert weight.item() == pytest.approx(0.9)


def test_a_build_record_of_another_tool_does_not_make_a_folder_a_builds(tmp_path, capsys):
    """Only a toy build's record (checksum and files) marks the folder's pipeline/ as a build's to replace."""
    from fastfair.toy.build import parse_args

    (tmp_path / "pipeline").mkdir()
    (tmp_path / "build.json").write_text(json.dumps({"checksum": "x", "tool": "someone else's"}))
    with pytest.raises(SystemExit):
        parse_args(["--quick", "--out", str(tmp_path)])
    assert "holds pipeline, build.json, which no toy build wrote" in capsys.readouterr().err
