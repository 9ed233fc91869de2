"""Inputs of the evaluation, demo and generation CLIs: stale caches are refused, bad flags are errors that name the
flag, and model paths resolve the same way everywhere. On the shipped toy model (32 px, fast on CPU)."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fastfair import checkpoint, demo
from fastfair.evaluate import evaluate
from fastfair.evaluate import main as evaluate_main
from fastfair.evaluation.cache import StaleCacheError, from_png
from fastfair.evaluation.sources import finetuned_kind, resolve_model
from fastfair.generate import main as generate_main

CLASSIFIER = "fastfair.toy:eval_classifier"
PROMPT = "a photo of the face of a nurse, a person"


def toy_pipeline() -> Path:
    return Path(resolve_model("toy"))


def run(out, model="toy", finetuned=None, **overrides):
    options = dict(classifiers=[CLASSIFIER], prompts=[PROMPT], out=out, finetuned=finetuned and str(finetuned),
                   attributes=["gender"], images_per_prompt=2, guidance_scales=(3.0,), num_steps=1, batch_size=2,
                   detector="none", device="cpu", progress=False)
    return evaluate(str(model), **{**options, **overrides})


def rewrite_safetensors(path: Path, scale: float) -> None:
    """Rewrite a weight file with scaled tensors: the same names and size, other weights."""
    from safetensors.torch import load_file, save_file

    save_file({name: t * scale for name, t in load_file(str(path)).items()}, str(path))


def test_cache_refuses_images_of_rewritten_finetuned_weights(tmp_path):
    """A new export written into the same --finetuned folder is not scored with the old export's images."""
    export = tmp_path / "export"
    shutil.copytree(toy_pipeline() / "unet", export / "unet")  # a full U-Net export
    out = tmp_path / "eval"
    first = run(out, finetuned=export)
    assert len(first["generated"]) == 4
    assert run(out, finetuned=export)["generated"] == []  # unchanged weights: the cache is reused

    rewrite_safetensors(export / "unet" / "diffusion_pytorch_model.safetensors", 0.5)
    with pytest.raises(StaleCacheError, match=r"other settings \(finetuned_files: "
                                              r"unet/diffusion_pytorch_model.safetensors changed\)") as error:
        run(out, finetuned=export)
    assert error.value.changed == ["finetuned_files"]
    fresh = run(tmp_path / "fresh", finetuned=export)  # the new weights make other images
    old, new = (json.loads((folder / "images" / "manifest.json").read_text()) for folder in (out, tmp_path / "fresh"))
    assert old["settings"]["finetuned"] == new["settings"]["finetuned"] == str(export)
    assert fresh["guidance"]["3"]["finetuned"]["images"] == first["guidance"]["3"]["finetuned"]["images"]
    path = fresh["guidance"]["3"]["finetuned"]["images"][PROMPT][0]
    assert not torch.equal(from_png([out / "images" / path]), from_png([tmp_path / "fresh" / "images" / path]))


def _toy_checkpoint(run_dir: Path, step: int = 1) -> Path:
    """A text-LoRA training checkpoint of the toy model, with its own config.yaml and state.pt."""
    from fastfair.checkpoint import save_checkpoint
    from fastfair.config import config_to_dict, load_config
    from fastfair.finetune import FinetunedModel
    from fastfair.models import load_stable_diffusion

    cfg = load_config("pkg://fastfair.toy/configs/gender.yaml", [f"output_dir={run_dir}"])
    parts = load_stable_diffusion(cfg.model.pretrained)
    model = FinetunedModel(parts.tokenizer, parts.text_encoder, parts.unet, cfg.finetune.target,
                           cfg.finetune.prefix_tokens, cfg.finetune.lora)
    weights = {name: p.detach().clone() + 0.01 for name, p in model.trainable.items()}
    return save_checkpoint(run_dir, step, weights, weights, {}, config=config_to_dict(cfg))


def test_a_checkpoints_images_stay_valid_when_files_evaluation_does_not_read_change(tmp_path):
    """Deleting a checkpoint's state.pt to save space (the README's advice), or reports written beside its
    weights, left every cached image refused; its weights and settings still key the cache."""
    checkpoint = _toy_checkpoint(tmp_path / "run")
    out = tmp_path / "eval"
    assert len(run(out, finetuned=checkpoint)["generated"]) == 4
    (checkpoint / "state.pt").unlink()
    (checkpoint / "notes.json").write_text("{}")
    assert run(out, finetuned=checkpoint)["generated"] == []
    rewrite_safetensors(checkpoint / "ema.safetensors", 0.5)
    with pytest.raises(StaleCacheError, match=r"finetuned_files: ema.safetensors changed"):
        run(out, finetuned=checkpoint)


def test_a_cache_keyed_by_every_file_of_a_checkpoint_folder_is_kept(tmp_path):
    """A cache written before the key was narrowed to the files evaluation reads (its state.pt included) stays
    valid while those files are unchanged, and its manifest records the key as it is now."""
    checkpoint = _toy_checkpoint(tmp_path / "run")
    out = tmp_path / "eval"
    run(out, finetuned=checkpoint)
    manifest = out / "images" / "manifest.json"
    stored = json.loads(manifest.read_text())
    state = os.stat(checkpoint / "state.pt")
    stored["settings"]["finetuned_files"]["state.pt"] = [state.st_size, state.st_mtime_ns]  # as recorded before
    manifest.write_text(json.dumps(stored))
    assert run(out, finetuned=checkpoint)["generated"] == []
    assert "state.pt" not in json.loads(manifest.read_text())["settings"]["finetuned_files"]
    stored["settings"]["finetuned_files"]["weights.safetensors"][0] += 1  # a read file that differs: refused
    manifest.write_text(json.dumps(stored))
    with pytest.raises(StaleCacheError, match=r"finetuned_files: state.pt, weights.safetensors changed"):
        run(out, finetuned=checkpoint)


def test_cache_refuses_images_of_a_rewritten_local_base_model(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(toy_pipeline(), model)
    out = tmp_path / "eval"
    run(out, model=model)
    rewrite_safetensors(model / "vae" / "diffusion_pytorch_model.safetensors", 1.0)
    with pytest.raises(ValueError, match=r"other settings \(model_files: vae/diffusion_pytorch_model"):
        run(out, model=model)


def test_cache_refuses_images_of_another_architecture_folder(tmp_path):
    """A single-file model's images depend on its --model-config folder too (its scheduler, its configs)."""
    from fastfair.testing import save_tiny_single_file

    single = save_tiny_single_file(toy_pipeline(), tmp_path / "model.safetensors")
    config = tmp_path / "config"
    shutil.copytree(toy_pipeline(), config)
    out = tmp_path / "eval"
    run(out, model=single, model_config=str(config))
    scheduler = config / "scheduler" / "scheduler_config.json"
    os.utime(scheduler, ns=(scheduler.stat().st_atime_ns, scheduler.stat().st_mtime_ns + 10**9))  # rewritten
    with pytest.raises(StaleCacheError, match=r"model_config_files: scheduler/scheduler_config.json changed"):
        run(out, model=single, model_config=str(config))


def test_cache_refuses_a_checkpoint_rewritten_by_a_rerun(tmp_path):
    """A rerun writing RUN/checkpoints/step_N again (same path, new weights) invalidates its images."""
    from fastfair.checkpoint import save_checkpoint
    from fastfair.config import load_config, save_config
    from fastfair.finetune import FinetunedModel
    from fastfair.models import load_stable_diffusion

    run_dir = tmp_path / "run"
    cfg = load_config("pkg://fastfair.toy/configs/gender.yaml", [f"output_dir={run_dir}"])
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")  # as the trainer records it
    parts = load_stable_diffusion(cfg.model.pretrained)
    model = FinetunedModel(parts.tokenizer, parts.text_encoder, parts.unet, cfg.finetune.target,
                           cfg.finetune.prefix_tokens, cfg.finetune.lora)
    weights = {name: p.detach().clone() for name, p in model.trainable.items()}
    ckpt = save_checkpoint(run_dir, 1, weights, weights, {})
    out = tmp_path / "eval"
    run(out, finetuned=ckpt)
    save_checkpoint(run_dir, 1, {n: t + 0.01 for n, t in weights.items()}, weights, {})  # the rerun's step 1
    with pytest.raises(ValueError, match=r"other settings \(finetuned_files: .*safetensors"):
        run(out, finetuned=ckpt)


def test_cache_refuses_an_older_checkpoints_rewritten_run_config(tmp_path):
    """A checkpoint without its own config.yaml reads LoRA alpha etc. from RUN/config.yaml, which a resume
    rewrites: other settings, other images, so the cache keys that file too."""
    from fastfair.checkpoint import save_checkpoint
    from fastfair.config import config_to_dict, load_config, save_config
    from fastfair.finetune import FinetunedModel
    from fastfair.models import load_stable_diffusion

    run_dir = tmp_path / "run"
    cfg = load_config("pkg://fastfair.toy/configs/gender.yaml", [f"output_dir={run_dir}"])
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    parts = load_stable_diffusion(cfg.model.pretrained)
    model = FinetunedModel(parts.tokenizer, parts.text_encoder, parts.unet, cfg.finetune.target,
                           cfg.finetune.prefix_tokens, cfg.finetune.lora)
    weights = {name: p.detach().clone() for name, p in model.trainable.items()}
    old = save_checkpoint(run_dir, 1, weights, weights, {})  # written before checkpoints held their config
    out = tmp_path / "eval"
    run(out, finetuned=old)
    assert run(out, finetuned=old)["generated"] == []
    save_config(load_config("pkg://fastfair.toy/configs/gender.yaml", [f"output_dir={run_dir}",
                                                                         "finetune.lora.alpha=64"]),
                run_dir / "config.yaml")
    with pytest.raises(StaleCacheError, match=r"finetuned_run_config: config.yaml changed") as error:
        run(out, finetuned=old)
    assert error.value.changed == ["finetuned_run_config"]
    own = save_checkpoint(run_dir, 2, weights, weights, {}, config=config_to_dict(cfg))  # its own settings
    run(tmp_path / "eval_own", finetuned=own)
    save_config(cfg, run_dir / "config.yaml")  # the run's file no longer matters to this checkpoint
    assert run(tmp_path / "eval_own", finetuned=own)["generated"] == []


def test_cache_refuses_images_of_a_rewritten_tokenizer(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(toy_pipeline(), model)
    out = tmp_path / "eval"
    run(out, model=model)
    with open(model / "tokenizer" / "merges.txt", "a", encoding="utf-8") as handle:  # BPE merges: other tokens
        handle.write("\n")
    with pytest.raises(StaleCacheError, match=r"model_files: tokenizer/merges.txt changed"):
        run(out, model=model)


def test_images_per_prompt_zero_is_an_error_not_the_default(tmp_path):
    for count in (0, -2):
        with pytest.raises(ValueError, match=f"--images-per-prompt {count}: expected at least 1"):
            run(tmp_path / "eval", images_per_prompt=count)
    assert not (tmp_path / "eval").exists()  # refused before anything was generated


@pytest.mark.parametrize("flag", ["--iters", "--images-per-prompt", "--threads"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_demo_refuses_non_positive_counts_before_training(flag, value, tmp_path, capsys, monkeypatch):
    def train(*args):
        raise AssertionError(f"{flag} {value} reached the training")  # --iters 0 ran the config's 200 iterations

    monkeypatch.setattr(demo, "train", train)
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--out", str(tmp_path), flag, value])
    assert exit_.value.code == 2 and f"{flag} {value}: expected at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("out", ["", "  "])
def test_demo_refuses_an_empty_out_before_training(out, capsys, monkeypatch):
    def train(*args):
        raise AssertionError(f"--out {out!r} reached the training")  # it trained into out/demo

    monkeypatch.setattr(demo, "train", train)
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--out", out])
    assert exit_.value.code == 2 and f"--out {out!r}: empty" in capsys.readouterr().err


def test_unknown_target_attribute_is_an_error_listing_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"--target sex: not among the evaluated attributes \['gender', 'race', "
                                         r"'age'\]"):
        evaluate_main(["--model", "toy", "--classifier", CLASSIFIER, "--prompts", "occupations:test",
                       "--max-prompts", "1", "--images-per-prompt", "1", "--steps", "1", "--detector", "none",
                       "--target", "sex=0.5,0.5", "--device", "cpu", "--out", str(tmp_path / "eval")])
    with pytest.raises(ValueError, match=r"--target age: not among the evaluated attributes \['gender'\]"):
        run(tmp_path / "eval", targets={"age": [0.75, 0.25]})  # left out by --attributes gender


def test_a_repeated_target_is_an_error_not_the_last_one(tmp_path):
    with pytest.raises(ValueError, match=r"--target age is given twice \(age=0.75,0.25 and age=0.5,0.5\)"):
        evaluate_main(["--model", "toy", "--classifier", CLASSIFIER, "--max-prompts", "1", "--target",
                       "age=0.75,0.25", "--target", "age=0.5,0.5", "--out", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("scales", ["", ",", " , ", "3,x"])
def test_guidance_scales_without_a_number_is_an_error(scales, tmp_path):
    with pytest.raises(ValueError, match=f"--guidance-scales {scales!r}: expected numbers like 3,5,7.5"):
        evaluate_main(["--model", "toy", "--classifier", CLASSIFIER, "--max-prompts", "1", "--guidance-scales",
                       scales, "--out", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()  # no models loaded, no empty report written


@pytest.mark.parametrize("device, message", [("gpu", "--device gpu: not a device torch knows; e.g. cpu, cuda"),
                                             ("cuda:99", "--device cuda:99: ")])
def test_a_device_that_cannot_run_here_is_refused_before_any_model_loads(device, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        evaluate_main(["--model", "toy", "--classifier", CLASSIFIER, "--max-prompts", "1", "--device", device,
                       "--out", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("scales", [(), (3.0, 3)])
def test_evaluate_refuses_no_or_repeated_guidance_scales(scales, tmp_path):
    with pytest.raises(ValueError, match="--guidance-scales .*: expected one or more distinct scales"):
        run(tmp_path / "eval", guidance_scales=scales)
    assert not (tmp_path / "eval").exists()


def no_face_anywhere(rgb):
    """A detector (one uint8 image [H, W, 3] -> its faces) that never finds one."""
    return []


def test_detector_list_falls_back_per_image(tmp_path):
    """--detector A,B: B looks at the images A found no face in (the public code's insightface, then another)."""
    from fastfair.faces.detect import detector_from_flags

    alone = run(tmp_path / "alone", detector=no_face_anywhere)
    assert alone["guidance"]["3"]["base"]["per_prompt"][PROMPT]["no_face"] == 2
    both = run(tmp_path / "both", detector=detector_from_flags(f"{__name__}:no_face_anywhere,none"))
    assert both["guidance"]["3"]["base"]["per_prompt"][PROMPT]["no_face"] == 0  # 'none' took every image
    assert both["settings"]["detector"] == "no_face_anywhere,none"


def detector_of_two_images(rgb, other):
    """Not a detector: it needs two images."""
    return []


def semantics_taking_nothing():
    """Not a --semantics factory: it takes no settings."""
    return None


def not_a_semantics_model(settings):
    return torch.nn.Flatten()


@pytest.mark.parametrize("flag", ["--detector", "--detector-list"])
def test_a_detector_hook_that_cannot_take_an_image_is_refused_before_any_image(flag, tmp_path):
    """A detector hook is called per image, after the images are made: its signature is checked first (alone and in
    a fallback list)."""
    spec = f"{__name__}:detector_of_two_images" + (",none" if flag == "--detector-list" else "")
    with pytest.raises(ValueError, match=r"--detector='.*:detector_of_two_images' cannot be called as "
                                         r"detector\(rgb uint8 \[H, W, 3\]\) -> faces"):
        evaluate_main(["--model", "toy", "--classifier", CLASSIFIER, "--max-prompts", "1", "--detector", spec,
                       "--out", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


def test_a_semantics_hook_returning_no_semantics_model_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"--semantics '.*:not_a_semantics_model' returned a Flatten: expected "
                                         r"factory\(settings\) -> a fastfair SemanticsLoss \(its .encoders"):
        run(tmp_path / "eval", semantics=f"{__name__}:not_a_semantics_model")


@pytest.mark.parametrize("spec", ["opencvv", "", "insightface,,x"])
def test_unknown_detector_is_an_error_before_any_image(spec, tmp_path):
    with pytest.raises(ValueError, match=f"--detector {spec!r}: expected opencv | insightface | mtcnn | none"):
        evaluate_main(["--model", "toy", "--classifier", CLASSIFIER, "--max-prompts", "1", "--detector", spec,
                       "--out", str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()


def test_detector_path_is_insightfaces_model_root(tmp_path):
    with pytest.raises(ValueError, match="--detector-path .*: the insightface model root, but --detector 'opencv'"):
        evaluate_main(["--model", "toy", "--classifier", CLASSIFIER, "--max-prompts", "1", "--detector-path",
                       str(tmp_path), "--out", str(tmp_path / "eval")])
    with pytest.raises(FileNotFoundError, match=f"insightface model pack not found at {tmp_path}/models/buffalo_l"):
        evaluate_main(["--model", "toy", "--classifier", CLASSIFIER, "--max-prompts", "1", "--detector",
                       "insightface,opencv", "--detector-path", str(tmp_path), "--out", str(tmp_path / "eval")])
    with pytest.raises(FileNotFoundError, match="insightface model pack not found"):  # checked before any image
        run(tmp_path / "eval", detector="insightface")
    assert not (tmp_path / "eval").exists()


def fake_run_folder(root: Path, steps=(1, 3)) -> Path:
    """A training run's output folder layout (config.yaml, checkpoints/step_N/ with state.pt and weight files
    holding no tensor)."""
    from safetensors.torch import save_file

    (root / "config.yaml").parent.mkdir(parents=True)
    (root / "config.yaml").write_text("max_steps: 3\n")
    for step in steps:
        folder = root / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        torch.save({"iteration": step}, folder / "state.pt")
        for name in ("weights.safetensors", "ema.safetensors"):
            save_file({}, str(folder / name))
    return root


def test_finetuned_run_folder_error_names_the_flag_and_the_expected_folders(tmp_path):
    run_dir = fake_run_folder(tmp_path / "run")
    with pytest.raises(ValueError) as error:
        evaluate_main(["--model", "toy", "--finetuned", str(run_dir), "--classifier", CLASSIFIER, "--max-prompts",
                       "1", "--images-per-prompt", "1", "--steps", "1", "--out", str(tmp_path / "eval")])
    message = str(error.value)
    assert message.startswith(f"--finetuned {run_dir}: a training run's folder") and "--lora" not in message
    assert "python -m fastfair.export" in message and f"--finetuned {run_dir}/checkpoints/step_00000003" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"--finetuned {empty}: no .*; expected an export folder .* or a training "
                                         "checkpoint folder"):
        run(tmp_path / "eval", finetuned=empty)

    generate = ["--model", "toy", "--prompt", PROMPT, "--out", str(tmp_path / "images"), "--lora"]
    with pytest.raises(ValueError, match=f"--lora {run_dir}: a training run's folder.*python -m fastfair.export "
                                         f"{run_dir}/checkpoints/step_00000003"):
        generate_main(generate + [str(run_dir)])
    with pytest.raises(ValueError, match="--lora .*step_00000001: a training checkpoint; export it first"):
        generate_main(generate + [str(run_dir / "checkpoints" / "step_00000001")])
    assert not (tmp_path / "images").exists()
    # a checkpoint whose optimizer state was deleted to save space is still one: its weights are all that is read
    (run_dir / "checkpoints" / "step_00000003" / "state.pt").unlink()
    assert finetuned_kind(run_dir / "checkpoints" / "step_00000003") == "checkpoint"
    with pytest.raises(ValueError, match=f"a training run's folder.* e.g. --finetuned {run_dir}/checkpoints/"
                                         "step_00000003"):  # still its newest checkpoint, not 'none yet'
        finetuned_kind(run_dir)


def test_generate_resolves_package_model_paths_like_evaluate(tmp_path):
    assert resolve_model("pkg://fastfair.toy/weights/pipeline") == str(toy_pipeline())
    generate_main(["--model", "pkg://fastfair.toy/weights/pipeline", "--prompt", PROMPT, "--num-images", "1",
                   "--steps", "1", "--out", str(tmp_path / "images")])
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["00000.png"]
    with pytest.raises(ValueError, match="--model pkg://fastfair.toy/no/such/model: no such file or folder"):
        generate_main(["--model", "pkg://fastfair.toy/no/such/model", "--prompt", PROMPT, "--out",
                       str(tmp_path / "more")])


def test_generate_several_prompts_loads_once_and_gives_each_its_own_images(tmp_path):
    """Several --prompt flags: a folder per prompt (prompts.txt says which), each prompt's images those a run with
    that prompt alone gives (its own noise); --prompts takes evaluate's prompt sets; a second run there is refused."""
    import numpy as np
    from PIL import Image

    from fastfair.evaluate import load_prompts

    other = "a photo of the face of a cook, a person"
    common = ["--model", "toy", "--num-images", "2", "--steps", "2"]
    generate_main([*common, "--prompt", PROMPT, "--prompt", other, "--out", str(tmp_path / "both")])
    generate_main([*common, "--prompt", other, "--out", str(tmp_path / "alone")])
    both = tmp_path / "both"
    assert (both / "prompts.txt").read_text() == f"{PROMPT}\n{other}\n"
    assert sorted(p.relative_to(both).as_posix() for p in both.rglob("*.png")) == [
        "prompt_000/00000.png", "prompt_000/00001.png", "prompt_001/00000.png", "prompt_001/00001.png"]
    for name in ("00000.png", "00001.png"):
        assert np.array_equal(np.asarray(Image.open(both / "prompt_001" / name)),
                              np.asarray(Image.open(tmp_path / "alone" / name)))
    assert not np.array_equal(np.asarray(Image.open(both / "prompt_000" / "00000.png")),
                              np.asarray(Image.open(both / "prompt_001" / "00000.png")))
    with pytest.raises(ValueError, match="--out .*both: holds images of an earlier run \\(prompt_000/00000.png"):
        generate_main([*common, "--prompt", PROMPT, "--prompt", other, "--out", str(both)])
    spec = "fastfair.toy:occupation_prompts"
    generate_main(["--model", "toy", "--num-images", "1", "--steps", "1", "--prompts", spec,
                   "--out", str(tmp_path / "set")])
    prompts = load_prompts(spec)
    assert (tmp_path / "set" / "prompts.txt").read_text().splitlines() == prompts and len(prompts) > 2
    assert len(list((tmp_path / "set").rglob("*.png"))) == len(prompts)
    with pytest.raises(SystemExit):  # one or the other
        generate_main(["--model", "toy", "--prompt", PROMPT, "--prompts", spec, "--out", str(tmp_path / "x")])
    # a set of one prompt keeps a set's layout; a one-prompt run's folder is not mixed with a set's
    (tmp_path / "one.txt").write_text(f"{other}\n")
    generate_main(["--model", "toy", "--num-images", "1", "--steps", "1", "--prompts", str(tmp_path / "one.txt"),
                   "--out", str(tmp_path / "one")])
    assert (tmp_path / "one" / "prompt_000" / "00000.png").is_file() and (tmp_path / "one" / "prompts.txt").is_file()
    with pytest.raises(ValueError, match="--out .*alone: holds images of an earlier run \\(00000.png"):
        generate_main([*common, "--prompt", PROMPT, "--prompt", other, "--out", str(tmp_path / "alone")])
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="--prompts .*empty.txt: holds no prompt"):
        generate_main(["--model", "toy", "--prompts", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "e")])
    with pytest.raises(ValueError, match="--prompts .*empty.txt: holds no prompt"):  # it said "no prompts to evaluate"
        evaluate_main(["--model", "toy", "--classifier", CLASSIFIER, "--prompts", str(tmp_path / "empty.txt"),
                       "--out", str(tmp_path / "e")])
    with pytest.warns(UserWarning, match="1 prompt\\(s\\) given more than once"):
        generate_main(["--model", "toy", "--num-images", "1", "--steps", "1", "--prompt", PROMPT, "--prompt", PROMPT,
                       "--out", str(tmp_path / "twice")])
    with pytest.raises(ValueError, match="a prompt with a line break"):
        generate_main(["--model", "toy", "--prompt", "a cook\nat work", "--prompt", PROMPT,
                       "--out", str(tmp_path / "broken")])
    assert not (tmp_path / "broken").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "--steps 0: expected at least 1"),
    ("--steps", "-3", "--steps -3: expected at least 1"),
    ("--num-images", "0", "--num-images 0: expected at least 1"),
    ("--guidance", "0.5", r"--guidance 0.5: expected a number >= 1"),
    ("--guidance", "nan", r"--guidance nan: expected a number >= 1"),
])
def test_generate_refuses_bad_numbers_before_writing(flag, value, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        generate_main(["--model", "toy", "--prompt", PROMPT, "--out", str(tmp_path / "images"), flag, value])
    assert not (tmp_path / "images").exists()


def test_generate_names_the_export_when_its_recorded_guidance_cannot_be_sampled(tmp_path):
    """An export of a run trained at a guidance below 1 (which fastfair accepted before): no --guidance was given."""
    from fastfair.export import EXPORT_INFO

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / EXPORT_INFO).write_text(json.dumps({"guidance_scale": 0.5, "num_steps": 20,
                                                                "target": "text_lora"}))
    with pytest.raises(ValueError, match=rf"export/{EXPORT_INFO} records guidance_scale 0.5, the run's, which "
                                         r"diffusers' pipeline cannot sample .*: give --guidance G \(>= 1"):
        generate_main(["--model", "toy", "--lora", str(tmp_path / "export"), "--prompt", PROMPT, "--out",
                       str(tmp_path / "images")])
    assert not (tmp_path / "images").exists()


def test_demo_refuses_iters_and_max_steps_together(tmp_path):
    with pytest.raises(ValueError, match=r"--iters 2 and max_steps=3 both set the training iterations: give one"):
        demo.main(["--out", str(tmp_path / "demo"), "--iters", "2", "max_steps=3"])
    assert not (tmp_path / "demo").exists()


DEMO_FAST = ["--images-per-prompt", "1", "checkpoint_every=1", "logging.image_every=0", "sampler.num_steps=2",
             "sampler.grad_steps=1", "batch.images_per_prompt=2"]
THREE_STEPS = [text.replace("num_steps=2", "num_steps=3") for text in DEMO_FAST]  # one setting changed


def test_demo_rerun_with_more_iterations_evaluates_the_final_checkpoint(tmp_path, capsys):
    """README: a rerun resumes the training; its evaluation then describes the new final checkpoint."""
    out = tmp_path / "demo"
    first = demo.main(["--out", str(out), "--iters", "1"] + DEMO_FAST)
    assert first["checkpoint"].endswith("step_00000001")
    again = demo.main(["--out", str(out), "--iters", "1"] + DEMO_FAST)  # nothing new: the images are reused
    assert "re-evaluating" not in capsys.readouterr().out and again["before"] == first["before"]
    # nothing trained: the training time is the first call's, not this one's loading time
    assert again["seconds"]["train"] == first["seconds"]["train"]
    (out / "eval" / "stale.txt").write_text("from the first run")

    second = demo.main(["--out", str(out), "--iters", "2"] + DEMO_FAST)
    assert "re-evaluating" in capsys.readouterr().out
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["iterations"] == 2 and saved["checkpoint"] == second["checkpoint"]
    assert second["checkpoint"].endswith("step_00000002")
    manifest = json.loads((out / "eval" / "images" / "manifest.json").read_text())
    assert manifest["settings"]["finetuned"] == second["checkpoint"]
    assert json.loads((out / "eval" / "metrics.json").read_text())["settings"]["finetuned"] == second["checkpoint"]
    assert not (out / "eval" / "stale.txt").exists()  # the demo's eval folder was started afresh
    with pytest.raises(ValueError, match=r"--iters 1: .* trained for 2 iterations already; give --iters 2 or more"):
        demo.main(["--out", str(out), "--iters", "1"] + DEMO_FAST)
    # a max_steps override below it, as --iters (it was taken as the config's and ignored)
    with pytest.raises(ValueError, match=r"max_steps=1: .* trained for 2 iterations already; give max_steps=2 or"):
        demo.main(["--out", str(out)] + DEMO_FAST + ["max_steps=1"])
    # without either, a run trained past its config's max_steps is evaluated as it is (the trainer's refusal
    # named max_steps, a setting the demo's user never gave)
    short = tmp_path / "short.yaml"
    short.write_text("base: pkg://fastfair.toy/configs/gender.yaml\nmax_steps: 1\n")
    third = demo.main(["--out", str(out), "--config", str(short)] + DEMO_FAST)
    assert "past the config's 1: evaluating it as it is" in capsys.readouterr().out
    assert third["checkpoint"] == second["checkpoint"]
    for override in ("output_dir=elsewhere", "resume="):  # the demo sets both: the user's were replaced silently
        with pytest.raises(ValueError, match=f"{override}: the demo trains into --out .*give --out DIR"):
            demo.main(["--out", str(out)] + DEMO_FAST + [override])
    # another run's settings: the demo's own advice (the trainer's "another output_dir" is --out here)
    with pytest.raises(ValueError, match=r"holds a run trained with other settings: sampler.num_steps=3 \(trained "
                                         r"with 2\); give another --out"):
        demo.main(["--out", str(out), "--iters", "2"] + THREE_STEPS)
    # a finished run: an optimizer setting given now changes nothing, and config.yaml keeps what ran
    demo.main(["--out", str(out), "--iters", "2"] + DEMO_FAST + ["optim.lr=0.5"])
    assert "lr: 0.5" not in (out / "train" / "config.yaml").read_text()
    # its final state.pt deleted to save space: still evaluated (it was an earlier checkpoint's resume, refused)
    (Path(second["checkpoint"]) / "state.pt").unlink()
    (out / "eval" / "images" / "manifest.json").write_text("")  # and an emptied manifest: evaluated afresh
    fourth = demo.main(["--out", str(out), "--iters", "2"] + DEMO_FAST)
    assert fourth["checkpoint"] == second["checkpoint"] and fourth["after"] == second["after"]
    assert "re-evaluating, the cached images are of other settings (manifest)" in capsys.readouterr().out
    # trained on from there, with no checkpoint left to resume: the demo's advice (the trainer's named
    # output_dir and resume='', which the demo sets itself)
    for folder in checkpoint.list_checkpoints(out / "train", resumable=False).values():
        (folder / "state.pt").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"holds checkpoints \(steps 1, 2\) of which none can be resumed .*so "
                                         r"training cannot go on to 3: give another --out, or move"):
        demo.main(["--out", str(out), "--iters", "3"] + DEMO_FAST)


def test_demo_deletes_only_an_evaluation_it_wrote(tmp_path, capsys, monkeypatch):
    """A stale evaluation under --out is remade only where the demo wrote it (its mark, or, from before the mark,
    images of its own run's checkpoint): another tool's report there was deleted whole; now refused before
    training."""
    out = tmp_path / "demo"
    first = demo.main(["--out", str(out), "--iters", "1"] + DEMO_FAST)
    assert (out / "eval" / demo.DEMO_MARKER).is_file() and first["checkpoint"].endswith("step_00000001")
    (out / "eval" / demo.DEMO_MARKER).unlink()  # as a demo before the mark left it
    demo.main(["--out", str(out), "--iters", "2"] + DEMO_FAST)  # trained on: its images are stale
    assert "re-evaluating" in capsys.readouterr().out and (out / "eval" / demo.DEMO_MARKER).is_file()
    foreign = tmp_path / "foreign"
    (foreign / "eval").mkdir(parents=True)
    (foreign / "eval" / "NOTES.txt").write_text("mine")
    monkeypatch.setattr(demo, "train", lambda *args: pytest.fail("trained before the folder was checked"))
    with pytest.raises(ValueError, match=rf"--out {foreign}: {foreign / 'eval'} holds files the demo did not write "
                                         r"\(its evaluation goes there, and a stale one is deleted\); give another"):
        demo.main(["--out", str(foreign)] + DEMO_FAST)
    assert (foreign / "eval" / "NOTES.txt").read_text() == "mine"


def test_demo_checks_every_path_it_writes_before_training(tmp_path, monkeypatch):
    """out/eval a file, out/metrics.json a folder: found after training (and evaluating), named --out's flag the
    user never gave or ended in a raw OSError."""
    monkeypatch.setattr(demo, "train", lambda *args: pytest.fail("trained before the paths were checked"))
    for name, make, message in (("eval", lambda p: p.write_text(""), "is a file, where the demo keeps its eval folder"),
                                ("metrics.json", lambda p: p.mkdir(), "is a folder, where the demo writes a file")):
        out = tmp_path / name.replace(".", "_")
        out.mkdir()
        make(out / name)
        with pytest.raises(ValueError, match=rf"--out {out}: {out / name} {message}; give another --out"):
            demo.main(["--out", str(out)])


def test_demo_names_other_settings_before_advice_on_the_iterations(tmp_path, monkeypatch, capsys):
    """--iters below a run of other settings was told to give more iterations, which then met the settings'
    refusal; a stop signal's message names the demo's way on, not resume=auto (an override it refuses)."""
    import signal

    from fastfair.trainer import Trainer

    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--iters", "2"] + DEMO_FAST)
    with pytest.raises(ValueError, match="holds a run trained with other settings: sampler.num_steps=3"):
        demo.main(["--out", str(out), "--iters", "1"] + THREE_STEPS)
    monkeypatch.setattr(Trainer, "_agreed_stop", lambda self, stop, failed=False: (signal.SIGTERM, failed))
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--out", str(out), "--iters", "4"] + DEMO_FAST)
    assert exit_.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 3: checkpoint step_00000003 saved; the same command continues" in \
        capsys.readouterr().err
    # Ctrl-C while the trainer is still being built: the same words
    monkeypatch.setattr(Trainer, "__init__", lambda self, *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit):
        demo.main(["--out", str(out), "--iters", "4"] + DEMO_FAST)
    assert "last checkpoint step_00000003; the same command continues from it" in capsys.readouterr().err


def test_demo_names_a_bad_out_and_max_steps_before_training_and_what_ctrl_c_leaves(tmp_path, capsys, monkeypatch):
    from fastfair.trainer import Trainer

    (tmp_path / "a_file").write_text("")
    for out, message in ((tmp_path / "a_file", "a file; give a folder for the demo's run and results"),
                         (tmp_path / "a_file" / "sub", f"{tmp_path / 'a_file'} is a file; give a folder")):
        with pytest.raises(ValueError, match=f"--out {out}: {message}"):
            demo.main(["--out", str(out)])
    with pytest.raises(ValueError, match="max_steps=0 must be >= 1"):  # a KeyError on a fresh --out
        demo.main(["--out", str(tmp_path / "demo")] + DEMO_FAST + ["max_steps=0"])

    def interrupted(trainer):
        trainer.step = 3
        raise KeyboardInterrupt
    monkeypatch.setattr(Trainer, "train", interrupted)
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--out", str(tmp_path / "demo"), "--iters", "5"] + DEMO_FAST)
    assert exit_.value.code == 130
    assert "interrupted at step 3; no checkpoint saved yet: a rerun starts afresh" in capsys.readouterr().err


def test_demo_refuses_to_train_on_its_held_out_split(tmp_path):
    """data.split=test trained on the very prompts the demo then reports as held out (never seen in training)."""
    for overrides in (["data.split=test"], ["data.split = test", "optim.lr=1e-3"]):
        with pytest.raises(ValueError, match=r"data.split=test: the demo evaluates on the held-out occupations .*"
                                             r"trains on data.split=train only"):
            demo.train("gender", tmp_path / "train", 1, overrides)
    assert not (tmp_path / "train").exists()  # refused before anything was trained


def test_demo_names_its_configs_for_an_unknown_one(tmp_path):
    with pytest.raises(ValueError, match=r"--config nope: neither a shipped config \(gender, .*\) nor a YAML file"):
        demo.train("nope", tmp_path / "train", 1, [])


def test_model_config_takes_a_package_path_as_model_config_does(tmp_path):
    """--model-config pkg://... names the architecture folder as a config's model.config does (it was refused)."""
    from fastfair.generate import generate
    from fastfair.testing import save_tiny_single_file

    single = save_tiny_single_file(toy_pipeline(), tmp_path / "model.safetensors")
    written = generate(str(single), None, "a cook", 1, tmp_path / "images", steps=2,
                       model_config="pkg://fastfair.toy/weights/pipeline")
    assert len(written) == 1 and Path(written[0]).is_file()


def test_each_joint_flag_is_its_own_intersection(tmp_path):
    """`--joint gender --joint race` is two one-attribute flags (refused), not one gender x race set."""
    with pytest.raises(ValueError, match="--joint gender: an intersection needs at least 2 attributes"):
        evaluate_main(["--model", "toy", "--classifier", CLASSIFIER, "--max-prompts", "1", "--joint", "gender",
                       "--joint", "race", "--out", str(tmp_path / "eval")])


def test_a_missing_optional_package_ends_the_cli_with_status_2(tmp_path, monkeypatch, capsys):
    """A detector whose package is not installed is a bad setting (one line naming the install, status 2); an
    ImportError of a broken installation keeps its traceback."""
    import sys

    from fastfair.cli import user_errors
    from fastfair.optional import MissingPackage

    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # its import raises ImportError
    with pytest.raises(MissingPackage, match="facenet-pytorch"):
        run(tmp_path / "eval", detector="mtcnn")
    with pytest.raises(SystemExit) as exit_, user_errors("prog"):
        run(tmp_path / "eval", detector="mtcnn")
    assert exit_.value.code == 2 and "prog: error: the 'mtcnn' detector needs" in capsys.readouterr().err
    with pytest.raises(ImportError, match="broken"), user_errors("prog"):
        raise ImportError("broken")


def test_a_batch_killed_mid_write_leaves_no_record_on_an_overwritten_image(tmp_path, monkeypatch):
    """The manifest drops the records of the files a batch overwrites before writing them: a run killed after a PNG
    was replaced must not leave the earlier prompt's record on it (a later run would score this image for it)."""
    from PIL import Image

    from fastfair.evaluation.cache import ImageCache, Job, image_path

    settings = {"seed": 0}
    path = image_path(3.0, "base", 0, 0)
    ImageCache(tmp_path, settings).store([Job(path, "base", 3.0, 0, "prompt A", 0)], torch.zeros(1, 3, 4, 4))
    real_save = Image.Image.save

    def save_then_die(image, target, *args, **kwargs):
        real_save(image, target, *args, **kwargs)
        raise KeyboardInterrupt  # killed right after the file was replaced

    monkeypatch.setattr(Image.Image, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        ImageCache(tmp_path, settings).store([Job(path, "base", 3.0, 0, "prompt X", 0)], torch.ones(1, 3, 4, 4))
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert not ImageCache(tmp_path, settings).has(Job(path, "base", 3.0, 0, "prompt A", 0))  # regenerated


def test_steps_past_the_noise_schedule_are_named_by_flag_before_any_image(tmp_path):
    with pytest.raises(ValueError, match=r"^--steps 2000: the scheduler's noise levels repeat at this step count"):
        run(tmp_path / "eval", num_steps=2000)
    assert not (tmp_path / "eval" / "images").exists()


def test_a_report_without_its_images_or_a_training_run_folder_is_not_written_over(tmp_path):
    """--out holding an earlier report whose images/ was deleted (to save space) had the report replaced by one of
    other settings, unsaid; a training run's folder got the evaluation's images beside its training samples."""
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text("{}")
    with pytest.raises(ValueError, match="holds the report of an earlier evaluation .* whose images are gone"):
        run(tmp_path / "eval")
    assert (tmp_path / "eval" / "metrics.json").read_text() == "{}"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"--out \S+run: a training run's folder .* e.g. \S+run/eval"):
        run(tmp_path / "run")
    assert not (tmp_path / "run" / "images").exists()
    # a base-only evaluation with --base-images keeps no images under --out: its rerun is no report without them
    for _ in range(2):
        run(tmp_path / "base_only", base_images=str(tmp_path / "shared"))
    assert (tmp_path / "base_only" / "metrics.json").is_file()


def test_semantics_model_folders_of_another_kind_are_named_before_any_image(tmp_path):
    """A DINOv2 folder as --clip, a vision-only CLIP or an empty folder as --dino: refused after every image was
    made (or in transformers' words, without the flag)."""
    from fastfair.testing import save_tiny_semantic_encoders

    clip_vision, dino = save_tiny_semantic_encoders(tmp_path / "encoders")
    (tmp_path / "empty").mkdir()
    for options, message in (
            (dict(clip=str(dino)), f"--clip {dino}: a 'dinov2' model; give a local transformers CLIPModel model "
                                   "folder"),
            (dict(clip=str(clip_vision)), "a 'clip_vision_model' model; give a local transformers CLIPModel"),
            (dict(dino=str(tmp_path / "empty")), "--dino .*empty: no model_type in a readable config.json and no "
                                                 "weight file; give a local transformers DINOv2 model folder"),
            (dict(dino=str(clip_vision)), "a 'clip_vision_model' model; give a local transformers DINOv2")):
        with pytest.raises(ValueError, match=message):
            run(tmp_path / "eval", **options)
    (dino / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="--dino .*: no weight file; give a local transformers DINOv2"):
        run(tmp_path / "eval", dino=str(dino))
    assert not (tmp_path / "eval" / "images").exists()


@pytest.mark.parametrize("options, message", [
    (dict(guidance_scales=(7.5, 7.5000001)), r"expected one or more distinct scales \(as printed"),
    (dict(guidance_scales=(float("inf"),)), "expected finite numbers"),
    (dict(grid_columns=0), "--grid-columns 0: expected at least 1"),
    (dict(margin=-1.0), "--margin -1.0: expected a finite fraction of the face box >= 0"),
    (dict(margin=float("inf")), "--margin inf: expected a finite fraction"),  # every crop box infinite
    (dict(classifiers=["missing.safetensors"]), "--classifier missing.safetensors does not exist"),
    (dict(seed=-1), r"--seed -1: expected an integer >= 0"),
    # the semantics and FID models load after the images: their inputs are checked first
    (dict(dino="/nonexistent/dinov2"), "--dino /nonexistent/dinov2: not a folder"),
    (dict(clip="/nonexistent/clip"), "--clip /nonexistent/clip: not a folder"),
    (dict(semantics="fastfair.toy:no_such_fn"), r"--semantics='fastfair.toy:no_such_fn': cannot import it"),
    (dict(semantics=f"{__name__}:semantics_taking_nothing"),
     r"--semantics='.*:semantics_taking_nothing' cannot be called as factory\(settings\) -> a fastfair SemanticsLoss"),
    (dict(fid_reference="/nonexistent/ref", fid_inception="x.pt"), "--fid-reference /nonexistent/ref: not a folder"),
    (dict(prompts=[PROMPT, PROMPT]), r"prompts: .* is given 2 times; give each prompt once"),
])
def test_evaluation_settings_are_checked_before_any_image(options, message, tmp_path):
    """Settings that would fail (or collide) only after every image is generated are refused first."""
    with pytest.raises(ValueError, match=message):
        run(tmp_path / "eval", **options)
    assert not (tmp_path / "eval" / "images").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--out .*file: a file; give a folder"):
        run(tmp_path / "file")


def test_fid_inputs_are_checked_before_any_image(tmp_path):
    """An extractor that is not there, and FID of one image per model (a covariance of one), were found after the
    images were made."""
    from PIL import Image

    reference = tmp_path / "ref"
    reference.mkdir()
    for k in range(2):
        Image.new("RGB", (8, 8), (k, k, k)).save(reference / f"{k}.png")
    with pytest.raises(ValueError, match="--fid-inception .*missing.pt: not a TorchScript file"):
        run(tmp_path / "eval", fid_reference=str(reference), fid_inception=str(tmp_path / "missing.pt"))
    (tmp_path / "feat.pt").write_bytes(b"not an archive")  # torch.jit.load's traceback came after the images
    with pytest.raises(ValueError, match=r"--fid-inception .*feat.pt: not a TorchScript file; give a local "
                                         r"TorchScript feature extractor \(torch.jit.save"):
        run(tmp_path / "eval", fid_reference=str(reference), fid_inception=str(tmp_path / "feat.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "state.pt")  # a zip too, but no module in it
    with pytest.raises(ValueError, match="state.pt: not a TorchScript file"):
        run(tmp_path / "eval", fid_reference=str(reference), fid_inception=str(tmp_path / "state.pt"))
    torch.jit.save(torch.jit.script(torch.nn.Flatten()), str(tmp_path / "feat.pt"))
    with pytest.raises(ValueError, match="FID compares two sets of at least 2 images, and this evaluation makes 1"):
        run(tmp_path / "eval", fid_reference=str(reference), fid_inception=str(tmp_path / "feat.pt"),
            images_per_prompt=1)
    assert not (tmp_path / "eval" / "images").exists()


def _demo_evaluation_arguments(cfg, tmp_path, monkeypatch) -> dict:
    """The keyword arguments the demo's held-out evaluation passes to fastfair.evaluate.evaluate (stopped there,
    before any image is made)."""
    import fastfair.evaluate
    from fastfair.demo import evaluate_heldout

    seen = {}

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(fastfair.evaluate, "evaluate", spy)
    with pytest.raises(Stop):
        evaluate_heldout(cfg, tmp_path / "ckpt", tmp_path / "eval", 2)
    return seen


def test_demo_evaluates_in_the_dtype_the_run_sampled_in(tmp_path, monkeypatch):
    """model.dtype=bf16: the held-out images are generated in bf16, as the run trained (evaluate's own default is
    fp32)."""
    from fastfair.config import load_config
    from fastfair.demo import CONFIGS

    cfg = load_config(CONFIGS["gender"], ["model.dtype=bf16", "precision.mixed=bf16"])
    assert _demo_evaluation_arguments(cfg, tmp_path, monkeypatch)["dtype"] == "bf16"


def test_the_demo_scores_a_conditional_targets_intersection_as_trained(tmp_path, monkeypatch):
    """age given gender, young 90 % among women and 50 % among men: the intersection's target is the conditional
    one (a product of the marginals, 0.7 young for both, would score a model exactly on target at TV 0.2)."""
    import fastfair.evaluation.scoring
    from fastfair.config import load_config
    from fastfair.demo import CONFIGS

    cfg = load_config(CONFIGS["age"])
    age = cfg.targets["attributes"][2]
    assert age["name"] == "age"
    age.update(given=["gender"], probabilities={"female": {"young": 0.9, "old": 0.1},
                                                "male": {"young": 0.5, "old": 0.5}})
    seen = _demo_evaluation_arguments(cfg, tmp_path, monkeypatch)
    targets = seen["targets"]
    assert seen["attributes"] == ["gender", "race", "age"] and targets["age"] == pytest.approx([0.7, 0.3])
    classes = fastfair.evaluation.scoring.load_classifiers(["fastfair.toy:eval_classifier"], ["gender"])[1]["gender"]
    young = {"female": 0.9, "male": 0.5}
    expected = [(young[g] if a == "young" else 1 - young[g]) * 0.5 * 0.25 for g in classes for _ in range(4)
                for a in ("young", "old")]
    assert targets["gender,race,age"] == pytest.approx(expected)


def test_generate_samples_with_the_steps_and_guidance_its_export_records(tmp_path, monkeypatch):
    """No --steps / --guidance: the run's, as fastfair_export.json records them (not 20 / 7.5)."""
    from diffusers import StableDiffusionPipeline

    import fastfair.generate as generate_module
    from fastfair.export import EXPORT_INFO

    (tmp_path / "export").mkdir()
    (tmp_path / "export" / EXPORT_INFO).write_text(json.dumps({"guidance_scale": 2.0, "num_steps": 3,
                                                                "target": "text_lora"}))
    monkeypatch.setattr(generate_module, "finetuned_kind", lambda *args, **kwargs: "export")
    monkeypatch.setattr(generate_module, "load_into_pipeline", lambda pipe, folder: "")  # the weights: not the point
    called = []
    real_call = StableDiffusionPipeline.__call__
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", lambda pipe, *args, **kwargs: called.append(kwargs)
                        or real_call(pipe, *args, **kwargs))
    generate_main(["--model", "toy", "--lora", str(tmp_path / "export"), "--prompt", PROMPT, "--num-images", "1",
                   "--out", str(tmp_path / "images")])
    assert (called[0]["num_inference_steps"], called[0]["guidance_scale"]) == (3, 2.0)


def test_generate_takes_guidance_1_as_no_guidance(tmp_path):
    generate_main(["--model", "toy", "--prompt", PROMPT, "--num-images", "1", "--steps", "1", "--guidance", "1",
                   "--out", str(tmp_path / "images")])
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["00000.png"]


def test_user_errors_end_with_status_2_or_their_traceback_when_asked(monkeypatch, capsys):
    """A bad setting (ValueError) or path (OSError): one line, status 2, as argparse ends; FASTFAIR_TRACEBACK=1
    keeps the exception with its traceback for a bug report."""
    from fastfair.cli import user_errors

    monkeypatch.delenv("FASTFAIR_TRACEBACK", raising=False)
    from fastfair.process_group import OtherRankFailed

    for error in (ValueError("bad setting"), FileNotFoundError(2, "No such file or directory", "x.yaml"),
                  OtherRankFailed("rank 1 could not start, so no rank goes on: ConfigError: ...")):
        with pytest.raises(SystemExit) as exit_, user_errors("prog"):
            raise error
        assert exit_.value.code == 2 and capsys.readouterr().err == f"prog: error: {error}\n"
    with pytest.raises(SystemExit) as exit_, user_errors("prog", "the same command resumes"):
        raise KeyboardInterrupt  # Ctrl-C: how to go on, not the traceback of the frames it stopped in
    assert exit_.value.code == 130 and capsys.readouterr().err == "prog: interrupted; the same command resumes\n"
    monkeypatch.setenv("FASTFAIR_TRACEBACK", "1")
    with pytest.raises(ValueError, match="bad setting"), user_errors("prog"):
        raise ValueError("bad setting")


def converted_ctrl_c():
    """Ctrl-C arriving inside a library that turns the KeyboardInterrupt into another error (numpy 1.x's
    np.unique(axis=0), interrupted in its comparison of rows, raises this TypeError)."""
    import signal

    try:
        signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
        raise TypeError("Cannot compare structured arrays unless they have a common dtype") from None


def test_a_ctrl_c_a_library_turned_into_another_error_still_ends_as_interrupted(monkeypatch, capsys):
    """Status 130 and the resume hint, not a traceback and status 1 (or 2 for a ValueError); an error without a
    Ctrl-C keeps its own course, and SIGINT's handler is Python's again afterwards, inner blocks sharing the outer's."""
    import signal

    from fastfair.cli import user_errors

    monkeypatch.delenv("FASTFAIR_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_, user_errors("prog", "the same command resumes"):
        with user_errors("inner"):  # fastfair/train.py's main runs inside its own user_errors
            converted_ctrl_c()
    assert exit_.value.code == 130 and capsys.readouterr().err == "inner: interrupted\n"
    with pytest.raises(TypeError, match="structured"), user_errors("prog"):
        raise TypeError("Cannot compare structured arrays unless they have a common dtype")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_folder_flag_given_a_file_or_a_path_below_one_is_named_before_the_work(tmp_path):
    from fastfair.cli import file_instead_of_folder

    (tmp_path / "f").write_text("")
    assert file_instead_of_folder("--out", tmp_path / "f", "the images") == f"--out {tmp_path / 'f'}: a file; give a " \
                                                                           "folder for the images"
    assert file_instead_of_folder("--out", tmp_path / "f" / "a" / "b", "the images") == (
        f"--out {tmp_path / 'f' / 'a' / 'b'}: {tmp_path / 'f'} is a file; give a folder for the images")
    assert file_instead_of_folder("--out", "", "the images") == "--out '': give a folder for the images"
    # the path as the operating system walks it: not normalized, links followed
    assert f"{tmp_path / 'f'} is a file" in file_instead_of_folder("--out", f"{tmp_path / 'f'}/../x", "the images")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert "link is a link to nothing" in file_instead_of_folder("--out", tmp_path / "link" / "x", "the images")
    for fine in (tmp_path, tmp_path / "new" / "deeper"):
        assert file_instead_of_folder("--out", fine, "the images") is None


def test_a_file_flag_given_a_folder_is_named_before_the_work(tmp_path):
    """An existing folder, or a path ending in a separator that does not exist yet: both a folder, named at once."""
    from fastfair.cli import folder_instead_of_file

    for path in (str(tmp_path), str(tmp_path / "new") + os.sep):
        message = folder_instead_of_file("--out", path, "bank", "bank.safetensors")
        assert message == f"--out {path}: a folder; give the bank file to write, e.g. {path.rstrip(os.sep)}" \
                          f"{os.sep}bank.safetensors"
    assert folder_instead_of_file("--out", str(tmp_path / "bank.safetensors"), "bank", "bank.safetensors") is None


def test_a_file_flag_below_a_file_or_a_folder_flag_without_write_access_is_named(tmp_path, monkeypatch):
    from fastfair.cli import file_instead_of_folder, folder_instead_of_file

    (tmp_path / "f").write_text("")
    below = tmp_path / "f" / "new" / "deeper" / "bank.safetensors"
    assert folder_instead_of_file("--out", str(below), "bank", "bank.safetensors") == (
        f"--out {below}: {tmp_path / 'f'} is a file, not a folder; give a path in a folder")
    assert folder_instead_of_file("--out", str(tmp_path / "new" / "deeper" / "bank.safetensors"), "bank",
                                  "bank.safetensors") is None  # folders still to make
    real_access = os.access
    # as for a user without write permission there (root writes anywhere)
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.W_OK and real_access(path, mode))
    assert file_instead_of_folder("--out", tmp_path / "new", "the images") == (
        f"--out {tmp_path / 'new'}: {tmp_path} is not writable; give a folder you can write the images in")


def test_a_cuda_device_index_past_the_last_is_named(monkeypatch):
    from fastfair.cli import device_problem

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device_problem("--device", "cuda:1") is None and device_problem("--device", "cuda") is None
    assert device_problem("--device", "cuda:2") == "--device cuda:2: this machine has 2 CUDA device(s), cuda:0 onwards"


def test_prompts_from_a_shipped_set_a_file_or_a_prompt_set_factory(tmp_path, monkeypatch):
    from fastfair.evaluate import load_prompts
    from fastfair.prompts import load_prompt_set
    from fastfair.toy import occupation_prompts

    assert load_prompts("occupations") == load_prompt_set("occupations", "test")
    # a factory as data.sets.<n>.factory names one, called with the split (test unless given)
    assert load_prompts("fastfair.toy:occupation_prompts") == occupation_prompts("test")
    assert load_prompts("fastfair.toy:occupation_prompts:train", 3) == occupation_prompts("train")[:3]
    assert occupation_prompts("test") != occupation_prompts("train")
    for spec, why in (("occupation:test", "No module named 'occupation'"), ("fastfair.toy:nothing", "no attribute"),
                      ("nothing.txt", None)):
        with pytest.raises(ValueError, match=rf"--prompts {spec}: not a file, not a shipped set .*occupations.* and "
                                             rf"not a prompt-set factory .*{why or ''}"):
            load_prompts(spec)
    for spec, message in (("occupations:val", "the shipped set occupations has the splits train, test, not 'val'"),
                          ("fastfair.toy:occupation_prompts:val", r"fastfair.toy:occupation_prompts\('val'\) failed: "
                           r"ValueError: split 'val': the toy occupations have the splits 'train' and 'test'"),
                          ("os:getcwd", r"os:getcwd\('test'\) failed: TypeError")):
        with pytest.raises(ValueError, match=rf"--prompts {spec}: {message}"):
            load_prompts(spec)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sports").write_text("my own sport\n")  # a file named as a shipped set
    with pytest.raises(ValueError, match=r"--prompts sports: both a shipped prompt set and a file here; give "
                                         r"./sports for the file, or sports:test for the set"):
        load_prompts("sports")
    assert load_prompts("./sports") == ["my own sport"]
    assert load_prompts("sports:test") == load_prompt_set("sports", "test")
    (tmp_path / "lines.txt").write_text("a portrait\na portrait\n")
    with pytest.raises(ValueError, match="repeat"):  # held to the rules of a prompt file
        load_prompts(str(tmp_path / "lines.txt"))


def test_a_checkpoint_evaluated_on_another_base_model_than_its_own_is_warned_of(tmp_path):
    import warnings

    checkpoint = _toy_checkpoint(tmp_path / "run")  # trained on the toy model (pkg://, as --model toy resolves)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tmp_path / "own", finetuned=checkpoint)
    assert not [w for w in caught if "not on --model" in str(w.message)]
    other = tmp_path / "other_base"
    shutil.copytree(toy_pipeline(), other)
    with pytest.warns(UserWarning, match=rf"the run trained on model.pretrained={toy_pipeline()} \(.*\), not on "
                                         rf"--model {other}: its weights are put on another"):
        run(tmp_path / "other", model=other, finetuned=checkpoint)


def test_reports_inside_the_finetuned_folder_are_refused(tmp_path):
    """The report written into an export would change the files its images are keyed by: every rerun refused."""
    export = tmp_path / "export"
    shutil.copytree(toy_pipeline() / "unet", export / "unet")
    for flag, options in (("--out", dict(out=export)), ("--out", dict(out=export / "eval")),
                          ("--base-images", dict(out=tmp_path / "eval", base_images=export / "base"))):
        with pytest.raises(ValueError, match=rf"{flag} .*: inside --finetuned .*export, whose files the images are "
                                             "keyed by"):
            run(finetuned=export, **options)
    assert sorted(path.name for path in export.iterdir()) == ["unet"]


def test_the_model_spelled_another_way_keys_the_same_images(tmp_path, monkeypatch):
    """A relative path, from another working directory, or as an older version recorded it: the same images."""
    model = tmp_path / "models" / "toy"
    shutil.copytree(toy_pipeline(), model)
    out = tmp_path / "eval"
    assert len(run(out, model=model)["generated"]) == 2
    monkeypatch.chdir(tmp_path / "models")
    assert run(out, model="toy/.")["generated"] == []
    manifest = out / "images" / "manifest.json"
    stored = json.loads(manifest.read_text())
    assert stored["settings"]["model"] == str(model)
    monkeypatch.chdir(tmp_path)
    stored["settings"]["model"] = "models/toy"  # as typed here, recorded before paths were made absolute
    manifest.write_text(json.dumps(stored))
    assert run(out, model=model)["generated"] == []


def test_a_cached_image_cut_off_later_is_named_with_the_fix(tmp_path):
    out = tmp_path / "eval"
    first = run(out)
    path = out / "images" / first["guidance"]["3"]["base"]["images"][PROMPT][0]
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ValueError, match=rf"{path}: a cached image that cannot be read .*delete it and rerun"):
        run(out)
    path.unlink()
    assert len(run(out)["generated"]) == 1


def test_manifest_writers_never_rename_each_others_temp_file(tmp_path):
    """Two evaluations writing one manifest (sweep shards on one checkpoint) each rename their own temp file."""
    import threading

    from fastfair.evaluation.cache import MANIFEST, _write_json

    failures = []

    def write(tag):
        try:
            for index in range(200):
                _write_json(tmp_path / MANIFEST, {"writer": tag, "index": index})
        except OSError as error:
            failures.append(error)
    writers = [threading.Thread(target=write, args=(tag,)) for tag in "ab"]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert not failures and json.loads((tmp_path / MANIFEST).read_text())["index"] == 199
    assert sorted(path.name for path in tmp_path.iterdir()) == [MANIFEST]


def test_a_run_trained_at_model_resolution_is_generated_and_evaluated_at_it(tmp_path):
    """model.resolution: the export records it, and generate and evaluate sample at it (they sampled at the U-Net's
    own size, not as the run trained); a flag gives another."""
    import yaml
    from PIL import Image

    from fastfair.export import export, export_info
    from fastfair.generate import generate

    checkpoint = _toy_checkpoint(tmp_path / "run")
    settings = yaml.safe_load((checkpoint / "config.yaml").read_text())
    settings["model"]["resolution"] = 16  # the toy model's own is 32
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(settings))
    exported = export(checkpoint, tmp_path / "export")
    assert export_info(exported)["resolution"] == 16
    (path,) = generate("toy", str(exported), "a photo of the face of a nurse, a person", 1, tmp_path / "gen", steps=1)
    assert Image.open(path).size == (16, 16)
    (path,) = generate("toy", str(exported), "a photo of the face of a nurse, a person", 1, tmp_path / "gen32",
                       steps=1, resolution=32)
    assert Image.open(path).size == (32, 32)
    for finetuned in (checkpoint, exported):
        result = run(tmp_path / f"eval_{finetuned.name}", finetuned=finetuned)
        image = result["guidance"]["3"]["finetuned"]["images"][PROMPT][0]
        assert Image.open(tmp_path / f"eval_{finetuned.name}" / "images" / image).size == (16, 16)
        assert result["settings"]["resolution"] == 16
    with pytest.raises(ValueError, match=r"--resolution 18: .*a multiple of the VAE's factor 4"):
        run(tmp_path / "odd", finetuned=checkpoint, resolution=18)
    with pytest.raises(ValueError, match=r"--resolution 20: not a multiple of 8 \(the VAE's factor 4, and the "
                                         r"pipeline's 8\)"):  # diffusers' own refusal came after the model loaded
        generate("toy", str(exported), "a cook", 1, tmp_path / "gen20", steps=1, resolution=20)
    from fastfair.export import merged_export

    merged = merged_export(checkpoint, tmp_path / "merged")  # its own record, read when it is the --model
    assert run(tmp_path / "eval_merged", model=merged)["settings"]["resolution"] == 16
    settings["model"]["resolution"] = 12  # trains (a multiple of the toy VAE's 4), but the pipeline takes 8s only
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(settings))
    twelve = export(checkpoint, tmp_path / "export12")
    with pytest.raises(ValueError, match=r"export12/fastfair_export.json records the run's model.resolution 12: not "
                                         r"a multiple of 8 .*give --resolution N"):
        generate("toy", str(twelve), "a cook", 1, tmp_path / "gen12", steps=1)


def test_steps_and_resolution_are_refused_from_the_config_files_before_any_model_loads(tmp_path, monkeypatch):
    """generate and evaluate read the scheduler's and the VAE's configs first (fastfair.models.sampling_configs):
    a step count past the schedule or a side off the VAE's factor is named by flag without waiting for the load."""
    import fastfair.evaluate
    import fastfair.generate
    from fastfair.generate import generate

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr(fastfair.generate, "load_stable_diffusion", no_load)
    monkeypatch.setattr(fastfair.evaluate, "load_sources", no_load)
    for options, message in ((dict(steps=1000), r"--steps 1000: the model's noise schedule has 1000 timesteps"),
                             (dict(steps=1, resolution=20), r"--resolution 20: not a multiple of 8 \(the VAE's "
                                                            r"factor 4, and the pipeline's 8\)")):
        with pytest.raises(ValueError, match=message):
            generate("toy", None, PROMPT, 1, tmp_path / "gen", **options)
    for options, message in ((dict(num_steps=2000), r"^--steps 2000: the scheduler's noise levels repeat"),
                             (dict(resolution=18), r"--resolution 18: .*a multiple of the VAE's factor 4")):
        with pytest.raises(ValueError, match=message):
            run(tmp_path / "eval", **options)
    assert not (tmp_path / "gen").exists() and not (tmp_path / "eval").exists()


def test_a_prompt_holding_the_prefix_token_is_refused_where_fastfair_adds_it(tmp_path):
    """fastfair puts <fastfair-prefix> before every prompt of a prefix export itself: a prompt that held it was read
    with the token twice through an export (10 soft tokens) and as words through the checkpoint (latents 0.94
    apart)."""
    from fastfair.export import PREFIX_TOKEN
    from fastfair.generate import generate

    with pytest.raises(ValueError, match=rf"--prompt '{PREFIX_TOKEN} a nurse': holds {PREFIX_TOKEN}, which fastfair "
                                         "puts before the prompt of a prefix model itself"):
        generate("toy", None, [PROMPT, f"{PREFIX_TOKEN} a nurse"], 1, tmp_path / "gen", steps=1)
    with pytest.raises(ValueError, match=rf"--prompts: the prompt 'a {PREFIX_TOKEN} nurse': holds"):
        run(tmp_path / "eval", prompts=[f"a {PREFIX_TOKEN} nurse"])
    assert not (tmp_path / "gen").exists() and not (tmp_path / "eval").exists()


def _record_pipeline_calls(monkeypatch) -> list:
    """StableDiffusionPipeline.__call__ records its keyword arguments and returns blank images (no sampling)."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionPipeline
    from PIL import Image

    called = []

    def fake_call(pipe, *args, **kwargs):
        called.append(kwargs)
        return SimpleNamespace(images=[Image.new("RGB", (kwargs["width"], kwargs["height"]))
                                       for _ in range(kwargs["num_images_per_prompt"])])
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", fake_call)
    return called


def test_generate_gives_each_image_its_own_noise_whatever_the_batch(tmp_path, monkeypatch):
    """Image k of a batch that does not start at 0 starts from evaluate's noise of image k, not of image 0."""
    from fastfair.evaluation.cache import paired_noise

    called = _record_pipeline_calls(monkeypatch)
    generate_main(["--model", "toy", "--prompt", PROMPT, "--num-images", "5", "--batch-size", "2", "--seed", "3",
                   "--out", str(tmp_path / "images")])
    assert [len(call["latents"]) for call in called] == [2, 2, 1]
    shape = called[0]["latents"].shape[1:]
    assert torch.equal(torch.cat([call["latents"] for call in called]), paired_noise(3, PROMPT, range(5), shape))
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [f"{k:05d}.png" for k in range(5)]


def test_generate_without_an_export_samples_with_the_default_steps_and_guidance(tmp_path, monkeypatch):
    """No export records the run's sampling: 20 steps at guidance 7.5 (the module docstring's defaults)."""
    called = _record_pipeline_calls(monkeypatch)
    generate_main(["--model", "toy", "--prompt", PROMPT, "--num-images", "1", "--out", str(tmp_path / "images")])
    assert (called[0]["num_inference_steps"], called[0]["guidance_scale"]) == (20, 7.5)
