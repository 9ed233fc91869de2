"""Single-file (original CompVis/LDM layout) Stable Diffusion checkpoints, loaded offline with a local diffusers
folder as their architecture: exact weights, exact samples, config checks, and a training run from one."""
import shutil
from pathlib import Path

import pytest
import torch

from fastfair.config import ConfigError, check_files, load_config
from fastfair.testing import ldm_state_dict, save_tiny_single_file
from test_trainer_world import world, write_config  # noqa: F401 (world: a fixture)

PARTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def single_file(world, tmp_path_factory):
    return save_tiny_single_file(world["sd"], tmp_path_factory.mktemp("single") / "model.safetensors")


def test_single_file_has_the_ldm_layout_and_loads_every_weight_exactly(tmp_path, world, single_file):
    from safetensors.torch import load_file

    from fastfair.models import load_stable_diffusion

    names = set(load_file(str(single_file)))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(name.startswith(prefixes) for name in names)
    assert {"model.diffusion_model.input_blocks.1.1.proj_in.weight", "model.diffusion_model.time_embed.0.weight",
            "model.diffusion_model.output_blocks.1.1.conv.weight", "first_stage_model.decoder.up.1.upsample.conv.bias",
            "first_stage_model.encoder.mid.attn_1.q.weight",
            "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"} <= names
    # a .ckpt (torch pickle, weights under "state_dict") with the extra entries real SD 1.x files carry
    extras = {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(12)[None],
              "alphas_cumprod": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999)}
    torch.save({"state_dict": {**load_file(str(single_file)), **extras}}, tmp_path / "model.ckpt")
    folder = load_stable_diffusion(world["sd"], "fp32")
    for path in (single_file, tmp_path / "model.ckpt"):
        from_file = load_stable_diffusion(path, "fp32", config=str(world["sd"]))
        for part in PARTS:
            expected, loaded = getattr(folder, part).state_dict(), getattr(from_file, part).state_dict()
            assert expected.keys() == loaded.keys(), (path, part)
            assert all(torch.equal(expected[name], loaded[name]) for name in expected), (path, part)
    assert len(names) == sum(len(getattr(folder, part).state_dict()) for part in PARTS)


def test_same_noise_gives_the_same_latents_and_images_through_the_evaluation_loader(world, single_file):
    from fastfair.dft import sample
    from fastfair.evaluation.sources import load_sources

    torch.manual_seed(0)
    z_T = torch.randn(2, 4, 8, 8)
    results = []
    for model, model_config in ((str(world["sd"]), None), (str(single_file), str(world["sd"]))):
        vae, scheduler, sources = load_sources(model, model_config=model_config)
        cond, uncond = sources["base"].embeddings("a photo of a nurse")
        with torch.no_grad():
            z_0 = sample(sources["base"].unet, scheduler, z_T, cond, uncond, num_steps=3, guidance_scale=3.0)
            results.append((z_0, vae.decode(z_0 / vae.config.scaling_factor).sample))
    (z_folder, image_folder), (z_file, image_file) = results
    assert z_folder.abs().max() > 0 and not torch.equal(z_folder, z_T)
    assert torch.equal(z_folder, z_file) and torch.equal(image_folder, image_file)


def test_a_single_file_without_its_architecture_folder_is_refused_naming_the_setting(tmp_path, world, single_file):
    from fastfair.evaluation.sources import load_sources

    path = write_config(tmp_path, world)
    with pytest.raises(ConfigError, match=r"single-file checkpoint, which holds weights only: set model\.config"):
        check_files(load_config(path, [f"model.pretrained={single_file}"]))
    (tmp_path / "bare" / "unet").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"model\.config=\S+bare lacks vae/, text_encoder/, tokenizer/, "
                                          r"scheduler/, model_index.json"):
        check_files(load_config(path, [f"model.pretrained={single_file}", f"model.config={tmp_path / 'bare'}"]))
    check_files(load_config(path, [f"model.pretrained={single_file}", f"model.config={world['sd']}"]))
    import fastfair  # model.config is a path field: pkg:// resolves like the others

    packaged = load_config(path, ["model.config=pkg://fastfair/sd"]).model.config
    assert packaged == str(Path(fastfair.__file__).parent / "sd")
    with pytest.raises(ValueError, match=r"--model=\S+ is a single-file checkpoint.*set --model-config to"):
        load_sources(str(single_file))


def test_two_training_iterations_from_a_single_file(tmp_path, world, single_file):
    from fastfair.trainer import Trainer

    cfg = load_config(write_config(tmp_path, world, "prefix"),
                      [f"model.pretrained={single_file}", f"model.config={world['sd']}"])
    trainer = Trainer(cfg)
    before = trainer.model.prefix.prefix.detach().clone()
    parts = [trainer.iteration(it) for it in range(2)]
    assert all(torch.isfinite(torch.tensor(list(part.values()))).all() and part["loss"] > 0 for part in parts)
    assert trainer.skipped == 0 and not torch.equal(before, trainer.model.prefix.prefix)


# Names every SD 1.x checkpoint has (the original LDM code's modules), one per kind of block and layer; the toy
# U-Net and VAE below have SD 1.x's block structure, so their numbering is SD 1.x's.
SD1_NAMES = [f"model.diffusion_model.{name}" for name in (
    "time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight", "input_blocks.1.0.in_layers.0.weight",
    "input_blocks.1.0.in_layers.2.weight", "input_blocks.1.0.emb_layers.1.weight",
    "input_blocks.1.0.out_layers.0.bias", "input_blocks.1.0.out_layers.3.weight", "input_blocks.1.1.norm.weight",
    "input_blocks.1.1.proj_in.weight", "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
    "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight", "input_blocks.6.0.op.bias",
    "input_blocks.9.0.op.weight", "input_blocks.11.0.out_layers.3.weight", "middle_block.0.in_layers.0.weight",
    "middle_block.1.proj_out.weight", "middle_block.2.emb_layers.1.weight", "output_blocks.0.0.skip_connection.weight",
    "output_blocks.2.1.conv.weight", "output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight",
    "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.bias", "output_blocks.11.0.skip_connection.weight",
    "output_blocks.11.1.transformer_blocks.0.norm3.weight", "out.0.weight", "out.2.bias")] + [
    f"first_stage_model.{name}" for name in (
        "quant_conv.weight", "post_quant_conv.bias", "encoder.conv_in.weight", "encoder.down.0.block.1.norm1.weight",
        "encoder.down.2.block.0.nin_shortcut.weight", "encoder.down.0.downsample.conv.weight",
        "encoder.down.2.downsample.conv.bias", "encoder.mid.block_1.conv1.weight", "encoder.mid.block_2.norm2.bias",
        "encoder.mid.attn_1.norm.weight", "encoder.mid.attn_1.q.weight", "encoder.mid.attn_1.proj_out.weight",
        "encoder.norm_out.weight", "decoder.mid.attn_1.v.bias", "decoder.up.3.block.2.conv2.weight",
        "decoder.up.3.upsample.conv.weight", "decoder.up.1.block.0.nin_shortcut.weight",
        "decoder.up.1.upsample.conv.weight", "decoder.norm_out.bias")]
DIFFUSERS_WORDS = ("down_blocks", "up_blocks", "mid_block", "resnets", "attentions", "samplers", "time_embedding",
                   "time_emb_proj", "conv_shortcut", "conv_norm_out", "group_norm", "attn_1.to_")


def test_sd1_block_structure_has_the_original_names_and_round_trips_through_diffusers_conversion():
    """At toy width but with SD 1.x's blocks (4 levels, 2 layers each, attention in the first 3 down / last 3 up
    blocks; a 4-level VAE): the original names (diffusers' own conversion also accepts some diffusers-style
    names, so it cannot tell them apart), diffusers recognizes SD 1.x, and its conversion gives back every weight."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, infer_diffusers_model_type,
    )

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(4, 8, 8, 8), layers_per_block=2, cross_attention_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(4, 4, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=4)
    ldm = ldm_state_dict(unet, vae)
    assert set(SD1_NAMES) <= set(ldm)
    assert not [name for name in ldm if any(word in name for word in DIFFUSERS_WORDS)]
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in ldm
    assert ldm["first_stage_model.decoder.mid.attn_1.k.weight"].shape == (8, 8, 1, 1)  # a 1x1 convolution
    assert infer_diffusers_model_type(ldm) == "v1"
    for module, converted in ((unet, convert_ldm_unet_checkpoint(ldm, unet.config)),
                              (vae, convert_ldm_vae_checkpoint(ldm, vae.config))):
        expected = module.state_dict()
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[name], expected[name]) for name in expected)


def test_unet_full_from_a_single_file_exports_the_ema_unet(tmp_path, world, single_file):
    """export builds the U-Net from the architecture folder (model.config): the single file is no folder."""
    from fastfair.checkpoint import load_checkpoint
    from fastfair.export import export
    from fastfair.trainer import Trainer

    cfg = load_config(write_config(tmp_path, world, "unet_full"),
                      [f"model.pretrained={single_file}", f"model.config={world['sd']}", "max_steps=1"])
    Trainer(cfg).train()
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000001"
    _, ema, _ = load_checkpoint(ckpt)
    out = export(ckpt, tmp_path / "export")
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(out / "unet", local_files_only=True).state_dict()
    assert {f"unet.{name}" for name in exported} == set(ema)
    assert all(torch.equal(t, ema[f"unet.{name}"]) for name, t in exported.items())


def test_sampling_configs_read_without_weights_match_the_loaded_model(tmp_path, world, single_file):
    """What a step count and a resolution are checked against before the load (fastfair.models.sampling_configs)
    is what the load builds, for a folder and for a single file with its architecture folder; None where the
    layout is not one the load reads (the load then says why)."""
    from fastfair.models import load_stable_diffusion, sampling_configs, vae_factor

    loaded = load_stable_diffusion(world["sd"], "fp32")
    for model, config in ((world["sd"], None), (single_file, str(world["sd"]))):
        configs = sampling_configs(model, config)
        assert dict(configs.scheduler.config) == dict(loaded.scheduler.config)
        assert configs.vae_factor == vae_factor(loaded.vae.config.block_out_channels) > 1
    assert sampling_configs(single_file) is None  # no architecture folder
    assert sampling_configs(tmp_path / "missing") is None
    broken = tmp_path / "broken"
    shutil.copytree(world["sd"], broken)
    (broken / "vae" / "config.json").write_text("{not json")
    assert sampling_configs(broken) is None
    with pytest.raises(OSError, match=r"broken/vae/config.json' is not a valid JSON file"):  # the load's word
        load_stable_diffusion(broken, "fp32")
