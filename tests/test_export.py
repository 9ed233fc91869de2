"""Export a checkpoint, load it into a diffusers StableDiffusionPipeline: the same model as in training; generate."""
import os

import numpy as np
import pytest
import torch

from fastfair.config import load_config
from fastfair.evaluation.cache import paired_noise
from safetensors.torch import load_file

from fastfair.export import LORA_FILE, export, load_into_pipeline
from fastfair.trainer import Trainer
from test_trainer_world import flatten_text_names, world, write_config  # noqa: F401 (world: a fixture)


def _trained(tmp_path, world, target):
    # ema_decay 0: the exported (EMA) weights are the trainer's current weights
    cfg = load_config(write_config(tmp_path, world, target), ["max_steps=1", "optim.ema_decay=0", "optim.lr=0.05"])
    trainer = Trainer(cfg)
    trainer.train()
    return trainer, tmp_path / "run" / "checkpoints" / "step_00000001"


def _pipeline(world):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(world["sd"], local_files_only=True, safety_checker=None)


def _eps(unet, emb):
    torch.manual_seed(1)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    return unet(x, t, encoder_hidden_states=emb).sample


@pytest.mark.parametrize("target", ["text_unet_lora", "prefix"])
def test_exported_pipeline_matches_training_model(tmp_path, world, target):
    umask = os.umask(0o022)
    try:
        trainer, ckpt = _trained(tmp_path, world, target)
        (tmp_path / "export").mkdir()
        (tmp_path / "export" / "private.key").write_text("not the export's")
        os.chmod(tmp_path / "export" / "private.key", 0o600)
        out = export(ckpt, tmp_path / "export")
    finally:
        os.umask(umask)
    # safetensors writes 0600: a group sharing the run could not read the export (nor the checkpoint); a file the
    # export did not write keeps its mode
    for folder in (out, ckpt):
        assert {f.name: oct(f.stat().st_mode & 0o777) for f in folder.iterdir()} == \
            {f.name: "0o600" if f.name == "private.key" else "0o644" for f in folder.iterdir()}
    if target != "prefix":  # text-encoder keys in the published layout, also from a checkpoint in the other one
        written = load_file(str(out / LORA_FILE))
        text_keys = [key for key in written if key.startswith("text_encoder.")]
        assert text_keys and all(key.startswith("text_encoder.text_model.encoder.layers.") for key in text_keys)
        flatten_text_names(ckpt)
        again = load_file(str(export(ckpt, tmp_path / "export_again") / LORA_FILE))
        assert set(again) == set(written) and all(torch.equal(again[key], written[key]) for key in written)
    pipe = _pipeline(world)
    base_emb = pipe.encode_prompt("ab", "cpu", 1, False)[0]
    prefix = load_into_pipeline(pipe, out)
    model = trainer.model
    with torch.no_grad():
        expected = model.encode(["ab"])
        got = pipe.encode_prompt(prefix + "ab", "cpu", 1, False)[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, base_emb, atol=1e-4)  # the export changed the model
        torch.testing.assert_close(_eps(pipe.unet, expected), _eps(model.unet, expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["text_unet_lora", "prefix", "unet_full"])
def test_a_merged_export_is_the_training_model_without_adapters(tmp_path, world, target, capsys):
    """--merged: a whole diffusers folder that from_pretrained loads with no LoRA layers left, giving the training
    model's text embeddings (the prefix token at the prompt's start) and U-Net outputs; generate takes the run's
    guidance and prefix from it, evaluation its prefix; the folder must be new."""
    from diffusers import StableDiffusionPipeline

    from fastfair.evaluation.sources import load_sources
    from fastfair.export import PREFIX_TOKEN, export_info, main as export_main
    from fastfair.generate import main as generate_main

    trainer, ckpt = _trained(tmp_path, world, target)
    export_main([str(ckpt), "--out", str(tmp_path / "merged"), "--merged"])
    # the layout transformers 4 reads too (5's own: unprefixed text-encoder keys, which 4 leaves at random init,
    # and no tokenizer vocabulary files, without which 4 cannot build the tokenizer)
    assert all(key.startswith("text_model.") for key in load_file(str(tmp_path / "merged" / "text_encoder" /
                                                                      "model.safetensors")))
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "merged" / "tokenizer"))
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert not [name for name, _ in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]
                if "lora" in name]
    info = export_info(tmp_path / "merged")
    assert info["merged"] and info["target"] == target and info["model"] == str(world["sd"])
    assert info["prompt_prefix"] == (PREFIX_TOKEN + " " if target == "prefix" else "")
    model = trainer.model
    with torch.no_grad():
        expected = model.encode(["ab"])
        got = pipe.encode_prompt(info["prompt_prefix"] + "ab", "cpu", 1, False)[0]
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_eps(pipe.unet, expected), _eps(model.unet, expected), rtol=1e-5, atol=1e-5)
        # evaluation samples it as trained too, its prefix included
        _, _, sources = load_sources(str(tmp_path / "merged"))
        torch.testing.assert_close(sources["base"].embeddings("ab")[0], expected, rtol=1e-5, atol=1e-5)
    capsys.readouterr()
    prompts = []
    real_call = StableDiffusionPipeline.__call__
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(StableDiffusionPipeline, "__call__", lambda self, prompt, **kwargs: prompts.append(prompt)
                      or real_call(self, prompt, **kwargs))
        generate_main(["--model", str(tmp_path / "merged"), "--prompt", "a cook", "--num-images", "1",
                       "--out", str(tmp_path / "images")])
    assert prompts == [info["prompt_prefix"] + "a cook"]
    assert "--steps 3 and --guidance 3.0: as the run trained" in capsys.readouterr().err
    assert (tmp_path / "images" / "00000.png").is_file()
    with pytest.raises(ValueError, match="--out .*merged: not an empty folder"):
        export_main([str(ckpt), "--out", str(tmp_path / "merged"), "--merged"])
    with pytest.raises(SystemExit):  # --dtype without --merged
        export_main([str(ckpt), "--out", str(tmp_path / "plain"), "--dtype", "fp16"])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="--out .*a_file: a file"):
        export_main([str(ckpt), "--out", str(tmp_path / "a_file"), "--merged"])
    with pytest.raises(ValueError, match="--out .*sub: .*a_file is a file"):  # before the base model loads
        export_main([str(ckpt), "--out", str(tmp_path / "a_file" / "sub"), "--merged"])
    with pytest.raises(ValueError, match="--model-config .* goes with --model"):
        export_main([str(ckpt), "--out", str(tmp_path / "other"), "--merged", "--model-config", str(world["sd"])])
    # half precision: the fp32 merge cast once (LoRA fused at full precision)
    export_main([str(ckpt), "--out", str(tmp_path / "half"), "--merged", "--dtype", "fp16"])
    half = StableDiffusionPipeline.from_pretrained(tmp_path / "half", local_files_only=True, torch_dtype=torch.float16)
    for name in ("unet", "text_encoder"):
        full_weights, half_weights = getattr(pipe, name).state_dict(), getattr(half, name).state_dict()
        assert all(torch.equal(half_weights[key], t.half()) for key, t in full_weights.items()
                   if t.is_floating_point())
        stored = load_file(str(next((tmp_path / "half" / name).glob("*.safetensors"))))
        assert {t.dtype for t in stored.values() if t.is_floating_point()} == {torch.float16}
    if target == "prefix":  # a second prefix on a merged prefix model: named, not diffusers' token clash
        export(ckpt, tmp_path / "prefix_export")
        info_file = tmp_path / "prefix_export" / "fastfair_export.json"  # as another checkpoint's export
        info_file.write_text(info_file.read_text().replace(str(ckpt.resolve()), str(tmp_path / "another")))
        with pytest.raises(ValueError, match="the --model holds a prefix run's already"):
            generate_main(["--model", str(tmp_path / "merged"), "--lora", str(tmp_path / "prefix_export"),
                           "--prompt", "a cook", "--out", str(tmp_path / "twice")])


def test_a_run_drawing_its_step_count_exports_its_num_steps(tmp_path, world):
    """sampler.num_steps lies inside num_steps_range (validate), and is the count the demo evaluates at: the export
    records it too (it recorded the middle of the range, 4 here)."""
    from fastfair.export import export_info

    cfg = load_config(write_config(tmp_path, world), ["max_steps=1", "sampler.num_steps_range=[2, 5]"])
    Trainer(cfg).train()
    export(tmp_path / "run" / "checkpoints" / "step_00000001", tmp_path / "export")
    assert export_info(tmp_path / "export")["num_steps"] == cfg.sampler.num_steps == 3
    # a run saved before num_steps had to lie inside the range: the middle of its range
    import yaml

    folder = tmp_path / "run" / "checkpoints" / "step_00000001"
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    saved["sampler"]["num_steps"] = 20
    (folder / "config.yaml").write_text(yaml.safe_dump(saved))
    export(folder, tmp_path / "old_export")
    assert export_info(tmp_path / "old_export")["num_steps"] == 4


def test_generate_cli_writes_images(tmp_path, world, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from fastfair.export import export_info
    from fastfair.generate import main

    _, ckpt = _trained(tmp_path, world, "text_lora")
    export(ckpt, tmp_path / "export")
    info = export_info(tmp_path / "export")  # the run sampled at guidance 3 with 3 steps (test_trainer_world)
    assert (info["guidance_scale"], info["num_steps"], info["target"]) == (3.0, 3, "text_lora")
    called = []
    real_call = StableDiffusionPipeline.__call__
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", lambda pipe, *args, **kwargs: called.append(kwargs)
                        or real_call(pipe, *args, **kwargs))
    main(["--model", str(world["sd"]), "--lora", str(tmp_path / "export"), "--prompt", "a cook",
          "--num-images", "2", "--out", str(tmp_path / "images"), "--steps", "2"])
    # the guidance the run was debiased at, not diffusers' 7.5; the steps given
    assert "--guidance 3.0: as the run trained" in capsys.readouterr().err
    assert (called[0]["guidance_scale"], called[0]["num_inference_steps"]) == (3.0, 2)
    files = sorted((tmp_path / "images").iterdir())
    assert [f.name for f in files] == ["00000.png", "00001.png"]
    assert Image.open(files[0]).size == (16, 16)
    # image k starts from evaluate's noise of image k, whatever the batch size: the same images one at a time
    noise = called[0]["latents"]
    assert torch.equal(noise, paired_noise(0, "a cook", range(2), noise.shape[1:]))
    main(["--model", str(world["sd"]), "--lora", str(tmp_path / "export"), "--prompt", "a cook", "--num-images", "3",
          "--out", str(tmp_path / "batched"), "--steps", "2", "--batch-size", "2"])
    assert [len(call["latents"]) for call in called[1:]] == [2, 1]  # the last batch: what is left
    assert torch.equal(torch.cat([call["latents"] for call in called[1:]])[:2], noise)
    main(["--model", str(world["sd"]), "--prompt", "a cook", "--num-images", "2", "--out", str(tmp_path / "seed5"),
          "--steps", "1", "--seed", "5"])  # --seed: evaluate's noise of that seed
    assert torch.equal(called[-1]["latents"], paired_noise(5, "a cook", range(2), noise.shape[1:]))
    assert not torch.equal(called[-1]["latents"], noise)
    assert sorted(f.name for f in (tmp_path / "batched").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    for name in ("00000.png", "00001.png"):  # equal up to the rounding of another batch shape's arithmetic
        together, batched = (np.asarray(Image.open(tmp_path / folder / name), dtype=np.int16)
                             for folder in ("images", "batched"))
        assert np.abs(together - batched).max() <= 1
    with pytest.raises(ValueError, match="--batch-size 0: expected at least 1 image per batch"):
        main(["--model", str(world["sd"]), "--prompt", "a nurse", "--out", str(tmp_path / "none"), "--batch-size", "0"])
    # a second run into the same folder would overwrite some images and leave others: refused before any work
    with pytest.raises(ValueError, match="--out .*images: holds images of an earlier run \\(00000.png"):
        main(["--model", str(world["sd"]), "--prompt", "a nurse", "--num-images", "1", "--out",
              str(tmp_path / "images")])
    # nor one prompt's images beside a prompt set's, nor a set's beside one prompt's
    main(["--model", str(world["sd"]), "--prompt", "a", "--prompt", "b", "--num-images", "1", "--steps", "1",
          "--out", str(tmp_path / "set")])
    for out, prompts in (("set", ["--prompt", "c"]), ("images", ["--prompt", "c", "--prompt", "d"])):
        with pytest.raises(ValueError, match=f"--out .*{out}: holds images of an earlier run"):
            main(["--model", str(world["sd"]), *prompts, "--num-images", "1", "--out", str(tmp_path / out)])
    with pytest.raises(ValueError, match=f"--lora .*{LORA_FILE}: a file; pass the folder that holds it"):
        main(["--model", str(world["sd"]), "--lora", str(tmp_path / "export" / LORA_FILE), "--prompt", "a cook",
              "--out", str(tmp_path / "more")])


def test_export_needs_a_checkpoint_folder_and_its_run_config(tmp_path):
    from safetensors.torch import save_file

    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    with pytest.raises(ValueError, match="step_00000001: not a checkpoint folder"):
        export(ckpt, tmp_path / "out")
    with pytest.raises(ValueError, match="run: not a checkpoint folder"):  # the run's folder, not a checkpoint
        export(tmp_path / "run", tmp_path / "out")
    for name in ("weights.safetensors", "ema.safetensors"):
        save_file({"text_encoder.x": torch.zeros(1)}, str(ckpt / name))
    with pytest.raises(ValueError, match=f"no run config at {tmp_path / 'run' / 'config.yaml'}"):
        export(ckpt, tmp_path / "out")
    from fastfair.export import main as export_main

    with pytest.raises(ValueError, match=rf"run: a training run's folder, not a checkpoint; pass one of its "
                                         rf"checkpoints, e.g. {ckpt}"):
        export_main([str(tmp_path / "run"), "--out", str(tmp_path / "out")])


def test_unet_full_export_is_the_ema_unet_and_generates(tmp_path, world):
    from fastfair.checkpoint import load_checkpoint
    from fastfair.dft import sample
    from fastfair.evaluation.sources import load_sources
    from fastfair.generate import main

    Trainer(load_config(write_config(tmp_path, world, "unet_full"))).train()  # 2 iterations, EMA decay 0.5
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    raw, ema, _ = load_checkpoint(ckpt)
    assert any(not torch.equal(ema[name], raw[name]) for name in ema)  # so the check below tells EMA from raw
    out = export(ckpt, tmp_path / "export")
    pipe = _pipeline(world)
    base = {name: t.clone() for name, t in pipe.unet.state_dict().items()}
    assert load_into_pipeline(pipe, out) == ""
    exported = pipe.unet.state_dict()
    assert {f"unet.{name}" for name in exported} == set(ema)
    for name, t in exported.items():
        assert torch.equal(t, ema[f"unet.{name}"]), name
    assert any(not torch.equal(t, base[name]) for name, t in exported.items())  # training changed the U-Net
    for finetuned in (out, ckpt):  # evaluation's sources (export folder, checkpoint), in bf16 as --dtype bf16
        _, scheduler, sources = load_sources(str(world["sd"]), str(finetuned), "bf16")
        source = sources["finetuned"]
        assert all(torch.equal(t, exported[name].bfloat16()) for name, t in source.unet.state_dict().items())
        with torch.no_grad():
            sample(source.unet, scheduler, torch.randn(1, 4, 8, 8), *source.embeddings("a cook"), num_steps=1)
    main(["--model", str(world["sd"]), "--lora", str(out), "--prompt", "a cook", "--num-images", "2",
          "--out", str(tmp_path / "images"), "--steps", "2"])
    assert sorted(f.name for f in (tmp_path / "images").iterdir()) == ["00000.png", "00001.png"]


def test_a_checkpoint_exports_with_its_own_settings_and_exports_do_not_mix(tmp_path, world):
    """A resume that changed finetune.lora.alpha (resume_allow) leaves earlier checkpoints with the alpha they were
    trained with; a second export into a folder holding another kind of export is refused, as is a folder holding
    two; evaluation's --weights raw cannot apply to an export."""
    import json

    from safetensors import safe_open

    from fastfair.evaluation.sources import load_sources

    def exported_alpha(folder):
        with safe_open(str(folder / LORA_FILE), "pt") as f:
            return json.loads(f.metadata()["lora_adapter_metadata"])["text_encoder.lora_alpha"]

    cfg = load_config(write_config(tmp_path, world), ["max_steps=2"])
    Trainer(cfg).train()
    Trainer(load_config(write_config(tmp_path, world), ["max_steps=3", "resume=auto", "finetune.lora.alpha=8",
                                                          "resume_allow=[finetune.lora.alpha]"])).train()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert exported_alpha(export(checkpoints / "step_00000002", tmp_path / "two")) == 4  # alpha null: the rank
    assert exported_alpha(export(checkpoints / "step_00000003", tmp_path / "three")) == 8
    (tmp_path / "three" / "prefix.safetensors").write_bytes(b"")  # as from a prefix run's export
    with pytest.raises(ValueError, match=r"holds pytorch_lora_weights.safetensors and prefix.safetensors, the "
                                         r"exports of different runs"):
        load_into_pipeline(_pipeline(world), tmp_path / "three")
    with pytest.raises(ValueError, match=r"--out \S+ holds prefix.safetensors of another export"):
        export(checkpoints / "step_00000003", tmp_path / "three")
    with pytest.raises(ValueError, match=r"--weights raw: --finetuned \S+ is an export"):
        load_sources(str(world["sd"]), str(tmp_path / "two"), weights="raw")


def test_a_whole_model_folder_is_not_taken_for_an_export(world):
    """A diffusers model folder has a unet/ as a unet_full export does: read as one, its U-Net replaced the base
    model's while the base's text encoder stayed, silently."""
    from fastfair.evaluation.sources import finetuned_kind

    with pytest.raises(ValueError, match="a whole diffusers model .*pass it as --model"):
        finetuned_kind(world["sd"])
    with pytest.raises(ValueError, match="--lora .*a whole diffusers model"):
        load_into_pipeline(_pipeline(world), world["sd"])


def test_an_export_of_another_architecture_is_named(tmp_path, world):
    """An export made from another base model: each kind fails naming --lora and the widths that differ, not with
    a library traceback (a U-Net of another text width would only fail when first called)."""
    from safetensors.torch import save_file

    from fastfair.testing import tiny_unet

    pipe = _pipeline(world)
    width = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
    (tmp_path / "prefix").mkdir()
    save_file({"emb_params": torch.zeros(2, width + 3)}, str(tmp_path / "prefix" / "prefix.safetensors"))
    with pytest.raises(ValueError, match=f"--lora .*prefix: its prefix.safetensors does not fit the --model "
                                         f"\\(its tokens are {width + 3} wide.* {width} wide"):
        load_into_pipeline(pipe, tmp_path / "prefix")
    tiny_unet(cross_attention_dim=width + 3).save_pretrained(tmp_path / "full" / "unet")
    with pytest.raises(ValueError, match=f"its unet does not fit .*reads text of width {width + 3}"):
        load_into_pipeline(pipe, tmp_path / "full")
    name = next(n for n, _ in pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    (tmp_path / "lora").mkdir()
    save_file({f"unet.{name}.lora_A.weight": torch.zeros(4, width + 3), f"unet.{name}.lora_B.weight": torch.zeros(
        pipe.unet.get_submodule(name).out_features, 4)}, str(tmp_path / "lora" / LORA_FILE))
    with pytest.raises(ValueError, match=f"--lora .*lora: its {LORA_FILE} does not fit the --model \\(size mismatch"):
        load_into_pipeline(pipe, tmp_path / "lora")
    with pytest.raises(ValueError, match="--finetuned .*lora: its"):  # evaluate names its own flag
        load_into_pipeline(pipe, tmp_path / "lora", "--finetuned")


def test_an_unreadable_lora_export_is_named_by_evaluate(tmp_path, world):
    """A LoRA file cut short (a full disk): evaluate's loader names --finetuned, the file and the fix."""
    from fastfair.evaluation.sources import load_sources

    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / LORA_FILE).write_bytes(b"cut")
    with pytest.raises(ValueError, match=f"--finetuned .*lora: its {LORA_FILE} is not a readable safetensors file "
                                         ".*export the checkpoint again"):
        load_sources(str(world["sd"]), str(tmp_path / "lora"))


@pytest.mark.parametrize("target", ["unet_lora", "text_lora"])
def test_a_checkpoint_and_its_export_sample_alike_in_half_precision(tmp_path, world, target):
    """Evaluation in bf16 (--dtype bf16): the export loads into a pipeline whose adapters diffusers casts to bf16;
    the training checkpoint's adapters are cast too, so one set of weights gives the same U-Net outputs and text
    embeddings whichever of the two is evaluated (the checkpoint's stayed fp32)."""
    from fastfair.evaluation.sources import load_sources

    Trainer(load_config(write_config(tmp_path, world, target))).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    out = export(ckpt, tmp_path / "export")
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).bfloat16()
    results = []
    for finetuned in (out, ckpt):
        _, _, sources = load_sources(str(world["sd"]), str(finetuned), "bf16")
        source = sources["finetuned"]
        assert {p.dtype for p in source.unet.parameters()} == {torch.bfloat16}
        with torch.no_grad():
            cond, uncond = source.embeddings("a cook")
            results.append((cond, source.unet(z, 500, encoder_hidden_states=cond.expand(2, -1, -1)).sample))
    (cond_export, eps_export), (cond_ckpt, eps_ckpt) = results
    assert torch.equal(cond_export, cond_ckpt) and torch.equal(eps_export, eps_ckpt)


# the parts each target's evaluation copies (and so may change) from a checkpoint, and from its export
COPIED = {"prefix": ({"text_encoder"}, {"tokenizer", "text_encoder"}), "text_lora": ({"text_encoder"},) * 2,
          "unet_lora": ({"unet"},) * 2, "text_unet_lora": ({"text_encoder", "unet"},) * 2,
          "unet_full": ({"unet"}, set())}  # an export's U-Net folder replaces the pipeline's U-Net


@pytest.mark.parametrize("target", list(COPIED))
def test_an_evaluation_copies_only_the_parts_its_finetuned_model_changes(tmp_path, world, target, monkeypatch):
    """load_sources builds a checkpoint's or an export's model on copies of the parts it changes and shares the
    others with the held base model, which stays as read (weights, keys: no adapter injected, tokenizer); the
    finetuned model embeds and predicts as one built on a copy of the whole base model (the earlier way)."""
    import fastfair.evaluation.sources as sources
    from fastfair.evaluation.shared import SharedLoads
    from fastfair.models import load_stable_diffusion

    _, ckpt = _trained(tmp_path, world, target)
    out = export(ckpt, tmp_path / "export")
    fresh = load_stable_diffusion(str(world["sd"]))
    copy_parts, shared = sources._copy_parts, SharedLoads()  # one base model for every load, as in a sweep
    for folder, copied in zip((ckpt, out), COPIED[target]):
        results = []
        for whole in (False, True):
            made = []
            monkeypatch.setattr(sources, "_copy_parts", lambda base, changed: made.append(
                (base, copy_parts(base, ("tokenizer", "text_encoder", "unet", "vae") if whole else changed))) or
                made[-1][1])
            _, _, models = sources.load_sources(str(world["sd"]), str(folder), shared=shared)
            base, parts = made[0]
            if not whole:
                assert {name for name in ("tokenizer", "text_encoder", "unet", "vae")
                        if getattr(parts, name) is not getattr(base, name)} == copied, folder
                assert (models["finetuned"].unet is base.unet) == (target not in ("unet_lora", "text_unet_lora",
                                                                                  "unet_full"))
            with torch.no_grad():
                cond, uncond = models["finetuned"].embeddings("a cook")
                results.append((cond, uncond, _eps(models["finetuned"].unet, cond)))
            for name in ("text_encoder", "unet", "vae"):
                held, expected = getattr(base, name).state_dict(), getattr(fresh, name).state_dict()
                assert list(held) == list(expected) and all(torch.equal(held[k], expected[k]) for k in expected), \
                    (folder, name)
            assert len(base.tokenizer) == len(fresh.tokenizer)
            for name in ("text_encoder", "unet"):  # nor peft's or diffusers' adapter bookkeeping
                module = getattr(base, name)
                assert not any(getattr(module, a, None) for a in ("peft_config", "_hf_peft_config_loaded")), \
                    (folder, name)
            with torch.no_grad():  # the base source is still the base model
                assert torch.equal(models["base"].embeddings("a cook")[0],
                                   fresh.text_encoder(fresh.tokenizer(["a cook"], padding="max_length",
                                                                      return_tensors="pt").input_ids)[0])
        for shared_parts, whole_copy in zip(*results):
            # not bit-equal: a copy's weights sit at other addresses (the loaded ones at the file's offsets), which
            # changes the CPU kernels' summation order (a U-Net and its deepcopy differ by 5e-7 on these inputs)
            torch.testing.assert_close(shared_parts, whole_copy, rtol=1e-5, atol=1e-5, msg=str(folder))
        base_cond = models["base"].embeddings("a cook")[0]
        changed_text = target in ("prefix", "text_lora", "text_unet_lora")
        assert torch.equal(results[0][0], base_cond) != changed_text  # the finetuned model is not the base


def test_an_export_never_replaces_a_model_a_file_or_another_checkpoints_export(tmp_path, world):
    import shutil

    from fastfair.export import PREFIX_FILE

    _, first = _trained(tmp_path / "a", world, "unet_full")
    model = shutil.copytree(world["sd"], tmp_path / "model")  # a unet_full export writes unet/: as a model's
    before = sorted(p.stat().st_mtime_ns for p in (model / "unet").iterdir())
    with pytest.raises(ValueError, match=r"--out .*model: a whole diffusers model \(model_index.json\); its files "
                                         r"would be replaced"):
        export(first, model)
    assert sorted(p.stat().st_mtime_ns for p in (model / "unet").iterdir()) == before
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"--out .*a_file: a file; give a folder"):
        export(first, tmp_path / "a_file")
    _, second = _trained(tmp_path / "b", world, "unet_full")
    export(first, tmp_path / "out")
    export(first, tmp_path / "out", weights="raw")  # the same checkpoint's again: written over
    with pytest.raises(ValueError, match=rf"--out .*out holds the export of {first.resolve()}: export into an empty"):
        export(second, tmp_path / "out")
    (tmp_path / "prefix").mkdir()
    (tmp_path / "prefix" / PREFIX_FILE).write_bytes(b"cut short")
    with pytest.raises(ValueError, match=rf"--lora .*prefix: its {PREFIX_FILE} cannot be read .*export the "
                                         r"checkpoint again"):
        load_into_pipeline(_pipeline(world), tmp_path / "prefix")


def test_generate_refuses_steps_past_the_schedule_a_negative_seed_and_a_file_as_out(tmp_path, world):
    from fastfair.generate import main

    common = ["--model", str(world["sd"]), "--prompt", "a nurse", "--num-images", "1"]
    for flags, message in ((["--steps", "1000", "--out", str(tmp_path / "g")], "--steps 1000: the model's noise "
                            "schedule has 1000 timesteps"), (["--seed", "-1", "--out", str(tmp_path / "g")],
                                                            "--seed -1: expected a seed >= 0"),
                           (["--out", str(tmp_path / "a_file")], "a_file: a file; give a folder for the images")):
        (tmp_path / "a_file").write_text("")
        with pytest.raises(ValueError, match=message):
            main(common + flags)
        assert not (tmp_path / "g").exists()


def test_a_merged_model_given_its_own_weights_again_is_refused_and_another_base_warned_of(tmp_path, world):
    """A model written by export --merged holds its checkpoint's weights: the export or checkpoint it came from put on
    it again would apply them twice (pixels off by up to 179 of 255 on the toy model): refused by generate and by
    evaluation before any load; weights on a base model other than their run's are warned of."""
    import shutil

    from fastfair.evaluation.sources import load_sources
    from fastfair.export import main as export_main
    from fastfair.generate import main

    _, ckpt = _trained(tmp_path, world, "text_unet_lora")
    export(ckpt, tmp_path / "export")
    export_main([str(ckpt), "--out", str(tmp_path / "merged"), "--merged"])
    twice = (r"--model .*merged was written by python -m fastfair.export --merged"
             r" from the same checkpoint .*apply twice")
    with pytest.raises(ValueError, match=rf"--lora .*export: {twice}; pass --model .*merged alone, or --model "
                                         rf"{world['sd']} --lora"):
        main(["--model", str(tmp_path / "merged"), "--lora", str(tmp_path / "export"), "--prompt", "a cook",
              "--out", str(tmp_path / "images")])
    (tmp_path / "link").symlink_to(ckpt)  # the same checkpoint under another name
    for finetuned in (tmp_path / "export", ckpt, tmp_path / "link", f"{ckpt}/../{ckpt.name}/"):
        with pytest.raises(ValueError, match=rf"--finetuned .*: {twice}"):
            load_sources(str(tmp_path / "merged"), str(finetuned))
    assert not (tmp_path / "images").exists()
    other = tmp_path / "other_base"
    shutil.copytree(world["sd"], other)
    with pytest.warns(UserWarning, match=rf"--lora: the run trained on model.pretrained={world['sd']} \(.*export"
                                         rf".*\), not on --model {other}: its weights are put on another base"):
        main(["--model", str(other), "--lora", str(tmp_path / "export"), "--prompt", "a cook", "--num-images", "1",
              "--steps", "1", "--out", str(tmp_path / "other_images")])


def test_generate_names_its_outputs_and_inputs_problems(tmp_path, world, monkeypatch):
    """Problems found before the model loads name their flag; a run stopped before its first image does not block
    the next; prompts.txt is UTF-8 whatever the locale; running out of memory names --batch-size."""
    from diffusers import StableDiffusionPipeline

    from fastfair import generate as generating
    from fastfair.generate import PROMPTS_FILE, main

    loads = []
    real_load = generating.load_stable_diffusion
    monkeypatch.setattr(generating, "load_stable_diffusion", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    common = ["--model", str(world["sd"]), "--num-images", "1", "--steps", "1"]
    (tmp_path / "a_file").write_text("")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "prompt_001").write_text("")  # mkdir's "File exists" came after the model loaded
    for flags, message in ((["--prompt", "a cook", "--out", str(tmp_path / "a_file" / "sub")], "a_file is a file"),
                           (["--prompt", "a \udcff cook", "--out", str(tmp_path / "g")], "not valid UTF-8 text"),
                           (["--prompt", "a cook", "--prompt", "a nurse", "--out", str(tmp_path / "taken")],
                            r"--out \S+taken: \S+prompt_001 is a file where a prompt's images go")):
        with pytest.raises(ValueError, match=message):
            main(common + flags)
    assert not loads and not (tmp_path / "g").exists()
    out = tmp_path / "set"
    out.mkdir()
    (out / PROMPTS_FILE).write_text("an earlier run's prompt\n")  # stopped before its first image
    real_write = type(out).write_text
    monkeypatch.setattr(type(out), "write_text", lambda path, text, encoding=None, **k: real_write(
        path, text, encoding=encoding or "ascii", **k))  # as under LC_ALL=C: only an explicit encoding passes
    main(common + ["--prompt", " ein Bäcker ", "--prompt", "a cook", "--out", str(out)])
    assert (out / PROMPTS_FILE).read_text(encoding="utf-8") == "ein Bäcker\na cook\n"  # stripped, as read back
    assert sorted(p.name for p in out.rglob("*.png")) == ["00000.png", "00000.png"]

    def no_memory(pipe, *args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", no_memory)
    with pytest.raises(ValueError, match=r"--batch-size 8: out of memory sampling 8 images at once .*give a smaller "
                                         r"--batch-size"):
        main(["--model", str(world["sd"]), "--prompt", "a cook", "--num-images", "9", "--out", str(tmp_path / "m")])


def test_an_embedding_lora_is_exported_under_the_names_diffusers_reads():
    """peft names an embedding's LoRA ...lora_embedding_A.default (no trailing part): '.default' was left on it, and
    diffusers dropped the adapter with a warning."""
    from fastfair.export import _peft_to_diffusers

    weights = {"text_encoder.text_model.embeddings.token_embedding.lora_embedding_A.default": torch.zeros(1),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(1),
               "unet.down_blocks.0.attn.to_q.lora_B.default.weight": torch.zeros(1)}
    assert sorted(_peft_to_diffusers(weights, "text_encoder")) == [
        "text_model.embeddings.token_embedding.lora_embedding_A",
        "text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"]
    assert list(_peft_to_diffusers(weights, "unet")) == ["down_blocks.0.attn.to_q.lora_B.weight"]
