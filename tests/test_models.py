"""fastfair.models loads a saved tiny SD folder; fastfair.finetune adds exactly the trainable weights asked for."""
import re

import pytest
import torch

from fastfair.config import LoraConfig
from fastfair.finetune import FinetunedModel
from fastfair.models import load_stable_diffusion
from test_trainer_world import save_tiny_sd


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd") / "sd")


def test_loads_folder_frozen_in_dtype(sd_dir, caplog):
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.enable_propagation()  # to caplog
    try:
        parts = load_stable_diffusion(sd_dir, dtype="bf16")
    finally:
        diffusers_logging.disable_propagation()
    assert "should be kept in float32" not in caplog.text  # diffusers' warning at a cast, of an empty list
    assert isinstance(parts.scheduler, DPMSolverMultistepScheduler)
    for module in (parts.text_encoder, parts.unet, parts.vae):
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in module.parameters())
    assert not parts.unet.training


def test_missing_layout_names_key_and_layout(tmp_path, sd_dir):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match=r"model.pretrained=.* lacks .*vae/.*expected a diffusers folder"):
        load_stable_diffusion(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_stable_diffusion(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="xformers"):
        load_stable_diffusion(sd_dir, attention="xformers")
    # an architecture folder beside a diffusers folder would go unread (generate --model-config was ignored)
    with pytest.raises(ValueError, match=r"--model-config=/elsewhere is read only with a single-file checkpoint, "
                                         r"but --model=.* is a diffusers folder"):
        load_stable_diffusion(sd_dir, config="/elsewhere", key="--model", config_key="--model-config")


def test_a_folder_of_fp16_variant_files_alone_loads(sd_dir, tmp_path):
    """A download of a model's fp16 files alone (diffusion_pytorch_model.fp16.safetensors, ...): from_pretrained
    reads them only when the variant is named, so it was an OSError about missing model.safetensors."""
    from diffusers import StableDiffusionPipeline

    from fastfair.models import weights_variant

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, local_files_only=True, safety_checker=None)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    assert weights_variant(tmp_path / "fp16" / "unet") == "fp16" and weights_variant(sd_dir / "unet") is None
    plain, variant = load_stable_diffusion(sd_dir, "fp16"), load_stable_diffusion(tmp_path / "fp16", "fp16")
    for part in ("text_encoder", "unet", "vae"):
        expected, loaded = getattr(plain, part).state_dict(), getattr(variant, part).state_dict()
        assert expected.keys() == loaded.keys() and all(torch.equal(expected[k], loaded[k]) for k in expected)
    for name, shard in (("diffusion_pytorch_model-00001-of-00002.safetensors", None),
                        ("diffusion_pytorch_model.fp16-00001-of-00002.safetensors", "fp16")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_bytes(b"")
        assert weights_variant(folder) == shard


def _model(sd_dir, target, **kwargs):
    parts = load_stable_diffusion(sd_dir, dtype="bf16")
    return FinetunedModel(parts.tokenizer, parts.text_encoder, parts.unet, target,
                          lora=LoraConfig(rank=4, text_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1",
                                                                "fc2"]), **kwargs)


@pytest.mark.parametrize("target,prefix", [("prefix", "text_encoder"), ("text_lora", "text_encoder"),
                                           ("unet_lora", "unet"), ("text_unet_lora", None), ("unet_full", "unet")])
def test_trainable_weights_fp32_and_where_asked(sd_dir, target, prefix):
    model = _model(sd_dir, target, prefix_tokens=3)
    names = list(model.trainable)
    assert names and all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    # the frozen weights stay in the model's dtype (an fp32 copy of them would double their memory)
    frozen = [p for m in (model.text_encoder, model.unet) for p in m.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert model.trains_unet == any(n.startswith("unet.") for n in names)
    if prefix:
        assert all(n.startswith(prefix) for n in names)
    else:
        assert {n.split(".")[0] for n in names} == {"text_encoder", "unet"}
    if "lora" in target:
        assert all("lora_" in n for n in names)
    if target == "text_lora":  # every named layer of every block carries a LoRA pair
        assert sum("lora_A" in n for n in names) == 2 * 6
    if target == "prefix":
        assert len(names) == 1 and names[0].endswith("embeddings.token_embedding.prefix")
        assert model.prefix.prefix.shape == (3, 16)


def test_prefix_only_in_positive_prompt_and_original_untouched(sd_dir):
    model = _model(sd_dir, "prefix", prefix_tokens=2)
    with torch.no_grad():
        model.prefix.prefix.normal_()
    original = model.encode_original(["a cat"])
    assert torch.equal(model.encode(["a cat"], positive=False), original)
    cond = model.encode(["a cat"])
    assert cond.shape == original.shape and not torch.equal(cond, original)
    # the start token is before the prefix and the causal mask hides what follows: its output is unchanged
    torch.testing.assert_close(cond[:, 0], original[:, 0])
    cond.float().sum().backward()
    assert model.prefix.prefix.grad.abs().sum() > 0


def test_prefix_starts_as_the_mean_row_or_distinct_random_tokens_of_the_seed(sd_dir):
    base = _model(sd_dir, "text_lora").text_encoder.get_input_embeddings().weight.detach().float()
    mean = _model(sd_dir, "prefix", prefix_tokens=3).prefix.prefix.detach()
    torch.testing.assert_close(mean, base.mean(0, keepdim=True).expand(3, -1))
    torch.manual_seed(7)
    drawn = _model(sd_dir, "prefix", prefix_tokens=3, prefix_init="random_tokens").prefix.prefix.detach()
    rows = [int(torch.nonzero((base == row).all(1))[0]) for row in drawn]  # each a vocabulary row, bit for bit
    assert len(set(rows)) == 3 and drawn.dtype == torch.float32
    torch.manual_seed(7)  # the trainer seeds torch's generator with the run's seed first
    again = _model(sd_dir, "prefix", prefix_tokens=3, prefix_init="random_tokens").prefix.prefix.detach()
    assert torch.equal(again, drawn)
    with pytest.raises(ValueError, match=r"finetune.prefix_init='zeros': expected one of \('mean', 'random_tokens'\)"):
        _model(sd_dir, "prefix", prefix_init="zeros")


@pytest.mark.parametrize("target, key, modules, unmatched", [
    ("text_lora", "finetune.lora.text_modules", ["q_proj", "nosuchmodule"], "'nosuchmodule'"),  # peft: q_proj only
    ("text_lora", "finetune.lora.text_modules", ["nosuchmodule"], "'nosuchmodule'"),  # peft: its own words
    ("unet_lora", "finetune.lora.unet_modules", ["to_q", "to_out.1", "bogus"], "'to_out.1', 'bogus'"),
    ("text_lora", "finetune.lora.text_modules", ["proj"], "'proj'"),  # the end of q_proj's name, not a component
])
def test_lora_modules_that_name_no_layer_are_refused_by_key(sd_dir, target, key, modules, unmatched):
    """Each listed module must name a layer: peft adapted the others of a list unsaid (a typo trained fewer
    layers), and refused a list naming none without the setting's name."""
    parts = load_stable_diffusion(sd_dir, dtype="bf16")
    lora = LoraConfig(rank=4, text_modules=modules, unet_modules=modules)
    with pytest.raises(ValueError, match=re.escape(f"{key}={modules}: {unmatched} names no layer of the ")) as error:
        FinetunedModel(parts.tokenizer, parts.text_encoder, parts.unet, target, lora=lora)
    assert ("q_proj" if target == "text_lora" else "to_q") in str(error.value)  # what it could have named
    # the layers' whole dotted names and their ends match, as peft matches them
    FinetunedModel(parts.tokenizer, parts.text_encoder, parts.unet, target, lora=LoraConfig(
        rank=4, text_modules=["self_attn.q_proj", "encoder.layers.0.mlp.fc1"], unet_modules=["attn1.to_out.0"]))


def test_lora_adapters_off_for_original(sd_dir):
    model = _model(sd_dir, "text_lora")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    assert not torch.equal(model.encode(["a dog"]), model.encode_original(["a dog"]))
    from fastfair.finetune import _lora_layers

    assert {layer.scaling["default"] for layer in _lora_layers(model.text_encoder)} == {1.0}  # alpha null: = rank
    assert torch.equal(model.encode_original(["a dog"]), _model(sd_dir, "prefix").encode_original(["a dog"]))


def test_unet_full_keeps_frozen_copy(sd_dir):
    model = _model(sd_dir, "unet_full")
    with model.original_unet() as unet:
        assert unet is not model.unet and not any(p.requires_grad for p in unet.parameters())
    model = _model(sd_dir, "unet_lora")
    from fastfair.finetune import _lora_layers

    with model.original_unet() as unet:
        assert unet is model.unet
        assert all(layer.disable_adapters for layer in _lora_layers(unet))
    assert not any(layer.disable_adapters for layer in _lora_layers(model.unet))


@pytest.mark.parametrize("target", ["text_lora", "unet_full"])
def test_a_model_built_to_sample_only_casts_nothing_and_copies_no_unet(sd_dir, target):
    """training=False (evaluation): the trainable weights stay in the model's dtype (bf16 here) and unet_full
    keeps no frozen copy, whose original_unet then refuses instead of handing the finetuned U-Net."""
    model = _model(sd_dir, target, training=False)
    assert model.parameters() and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.frozen_unet is None
    if target == "unet_full":
        with pytest.raises(RuntimeError, match="training=False keeps no frozen copy"):
            with model.original_unet():
                pass


def test_a_folder_with_plain_and_variant_files_reads_the_plain_ones(tmp_path):
    """A full download holds both (diffusion_pytorch_model.safetensors and .fp16.safetensors): the plain, full
    precision weights are read, not the half ones."""
    from fastfair.models import weights_variant

    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert weights_variant(tmp_path) is None
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "diffusion_pytorch_model.ema.safetensors").write_bytes(b"")
    assert weights_variant(tmp_path) == "fp16"  # of several variants, the fp16 one


def test_every_prefix_token_reads_its_own_row(sd_dir):
    """Token id V (the first prefix slot) reads prefix[0], not the vocabulary's last row; each row is trained."""
    model = _model(sd_dir, "prefix", prefix_tokens=3)
    embedding = model.prefix
    with torch.no_grad():
        embedding.prefix.normal_()
    ids = embedding.token_ids()
    rows = embedding(ids[None])[0]  # in the frozen embedding's dtype (bf16 here)
    assert torch.equal(rows, embedding.prefix.detach().to(rows.dtype))
    model.encode(["a cat"]).float().sum().backward()
    assert (embedding.prefix.grad.abs().sum(1) > 0).all()


def test_random_token_prefix_rows_are_distinct_vocabulary_rows():
    """random_tokens draws N distinct tokens (as the public script's sampling without replacement): with N = V every
    vocabulary row appears exactly once."""
    from fastfair.finetune import PrefixEmbedding

    base = torch.nn.Embedding(8, 4)
    for seed in range(3):
        torch.manual_seed(seed)
        rows = PrefixEmbedding(base, 8, "random_tokens").prefix.detach()
        drawn = sorted(int(torch.nonzero((base.weight == row).all(1))[0]) for row in rows)
        assert drawn == list(range(8)), (seed, drawn)
    starts = []
    for seed in (3, 4):  # another seed, other tokens (a fixed draw would pass the checks above)
        torch.manual_seed(seed)
        starts.append(PrefixEmbedding(base, 3, "random_tokens").prefix.detach())
    assert not torch.equal(*starts)
    with pytest.raises(ValueError, match="finetune.prefix_tokens=9: prefix_init=random_tokens draws distinct tokens "
                                         "and the vocabulary has 8"):
        PrefixEmbedding(base, 9, "random_tokens")


def test_the_adapters_are_back_on_after_the_original_is_encoded(sd_dir):
    """encode_original switches the LoRA layers off for its own call only: the finetuned model encodes as before it
    (and its U-Net after original_unet), or every later step would train a model without its adapters."""
    model = _model(sd_dir, "text_unet_lora")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    before = model.encode(["a dog"])
    model.encode_original(["a dog"])
    with model.original_unet():
        pass
    assert torch.equal(model.encode(["a dog"]), before)
    from fastfair.finetune import _lora_layers

    assert all(not layer.disable_adapters for layer in _lora_layers(model.unet) + _lora_layers(model.text_encoder))


def test_the_latent_decoder_undoes_the_latent_scaling(sd_dir):
    """The sampler's latents are the VAE's scaled by its scaling_factor (0.18215 for SD 1.x): decoded divided by it,
    in float32 from a half VAE, clamped to [-1, 1] unless asked not to."""
    from fastfair.models import LatentDecoder

    vae = load_stable_diffusion(sd_dir).vae
    assert vae.config.scaling_factor != 1
    z = torch.randn(2, vae.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        expected = vae.decode(z / vae.config.scaling_factor).sample
        assert torch.equal(LatentDecoder(vae, clamp=False)(z), expected)
        assert torch.equal(LatentDecoder(vae)(z), expected.clamp(-1, 1))
        half = LatentDecoder(load_stable_diffusion(sd_dir, dtype="bf16").vae, clamp=False)(z)
    assert half.dtype == torch.float32 and (half - expected).abs().max() < 0.1 * expected.abs().max()
