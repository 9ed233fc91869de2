"""Semantics preserving loss with tiny random CLIP / DINOv2 models loaded from temp directories."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from fastfair.losses import Preprocess, SemanticsLoss, load_semantic_encoder

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)


@pytest.fixture(scope="module")
def built_models():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    return {"clip": CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=32, projection_dim=16, **TINY)).eval(),
            "dino": Dinov2Model(Dinov2Config(image_size=32, **TINY)).eval()}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, built_models):
    """The CLIP vision tower saved without preprocessor config (defaults), the DINOv2 with one."""
    root = tmp_path_factory.mktemp("semantic_models")
    for name, model in built_models.items():
        model.save_pretrained(root / name)
    (root / "dino" / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 40}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3}))
    return root


@pytest.fixture(scope="module")
def semantics(model_dirs):
    return SemanticsLoss.from_config({
        "clip": {"backend": "clip", "path": str(model_dirs / "clip")},
        "dino": {"backend": "dinov2", "path": str(model_dirs / "dino")},
    })


def images(seed, n=2, size=48):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_loaded_models_and_preprocessing(built_models, semantics):
    x = images(0, size=32)
    pixels = {name: encoder.preprocess(x) for name, encoder in semantics.encoders.items()}
    with torch.no_grad():
        assert torch.allclose(semantics.encoders["clip"](x),
                              built_models["clip"](pixel_values=pixels["clip"]).image_embeds, atol=1e-6)
        assert torch.allclose(semantics.encoders["dino"](x),
                              built_models["dino"](pixel_values=pixels["dino"]).pooler_output, atol=1e-6)
    clip = semantics.encoders["clip"].preprocess
    assert clip == Preprocess(32, (32, 32), (0.48145466, 0.4578275, 0.40821073),
                              (0.26862954, 0.26130258, 0.27577711), "bicubic")
    # DINO sees a square image whole: its shortest edge goes to the crop size (32), not the processor's 40
    assert semantics.encoders["dino"].preprocess.resize == 32 and semantics.encoders["dino"].preprocess.crop == (32, 32)


def test_zero_for_identical_images_and_grad_only_to_finetuned(semantics):
    finetuned = images(1).requires_grad_(True)
    originals = images(1).requires_grad_(True)
    original_embeddings = semantics.embed_originals(originals)
    assert all(not e.requires_grad for e in original_embeddings.values())
    losses = semantics(finetuned, original_embeddings)
    assert set(losses) == {"clip", "dino"}
    for value in losses.values():
        assert value.shape == (2,) and value.abs().max() < 1e-5
    different = semantics(images(2), original_embeddings)
    assert all((value > 1e-4).all() for value in different.values())
    # grads through the cosine (at identical images the loss is at its minimum: use different ones)
    moved = (finetuned + 0.3 * images(3)).detach().requires_grad_(True)
    sum(semantics(moved, original_embeddings).values()).sum().backward()
    assert moved.grad is not None and torch.isfinite(moved.grad).all() and moved.grad.abs().sum() > 0
    assert originals.grad is None
    assert all(not p.requires_grad for p in semantics.parameters())
    with pytest.raises(ValueError, match=r"semantics 'clip': \(1, \d+\) embeddings of the images against \(2, \d+\)"):
        semantics(images(4)[:1], original_embeddings)  # one image was broadcast against both originals


def test_encoders_stay_frozen_in_eval(semantics):
    semantics.train()
    assert not any(m.training for encoder in semantics.encoders.values() for m in encoder.modules())


def test_preprocess_matches_the_transformers_processor():
    """Resize (bicubic, antialiased), center crop and normalize like the PIL-based processor."""
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 24, "width": 24})
    image = images(4, n=1, size=64)[:, :, :, :56]  # 64 x 56: resize to 36 x 32, crop 24 x 24
    pixels = ((image[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    expected = processor(images=pixels, return_tensors="np")["pixel_values"][0]
    mine = Preprocess(32, (24, 24), tuple(processor.image_mean), tuple(processor.image_std), "bicubic")
    got = mine(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1)[0].numpy()
    assert got.shape == expected.shape == (3, 24, 24)
    # PIL resamples in 8 bit; a wrong crop offset, channel order or mean/std gives errors > 0.5
    assert np.abs(got - expected).mean() < 0.02  # (bilinear instead of bicubic: 0.09)


def test_bad_encoder_specs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        load_semantic_encoder("siglip", path=str(tmp_path))
    with pytest.raises(ValueError, match="needs `path`, a local model directory"):
        load_semantic_encoder("clip", path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="needs model_name .* and checkpoint, a local file"):
        load_semantic_encoder("open_clip", model_name="ViT-H-14", checkpoint=str(tmp_path / "none.bin"))
    with pytest.raises(ValueError, match=r"semantics config 'clip': a mapping with fields from .*'size': 224"):
        SemanticsLoss.from_config({"clip": {"backend": "clip", "path": str(tmp_path), "size": 224}})
    with pytest.raises(ValueError, match="resize .* must be >= the crop size"):
        Preprocess(16, (32, 32), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match=r"images must be \[N, 3, H, W\]"):
        Preprocess(32, (32, 32), (0.5,) * 3, (0.5,) * 3)(torch.zeros(1, 1, 32, 32))


def _open_clip_importable():
    try:
        import open_clip  # noqa: F401
    except Exception as err:  # missing, or torchvision failing beside this torch
        return f"open_clip is not importable here ({type(err).__name__}: {err})"
    return None


OPEN_CLIP_SKIP = _open_clip_importable() if importlib.util.find_spec("open_clip") else "open_clip_torch is not installed"


def test_open_clip_without_the_package_says_how_to_install(tmp_path):
    if OPEN_CLIP_SKIP is None:
        pytest.skip("open_clip is importable here; the backend is tested below")
    checkpoint = tmp_path / "model.bin"
    checkpoint.write_bytes(b"")
    with pytest.raises(ImportError, match=r"open_clip_torch and an importable torchvision"):
        load_semantic_encoder("open_clip", model_name="ViT-H-14", checkpoint=str(checkpoint))


def test_open_clip_hub_and_local_dir_names_are_rejected(tmp_path):
    checkpoint = tmp_path / "model.bin"
    checkpoint.write_bytes(b"")
    with pytest.raises(ValueError, match="built-in open_clip name such as 'ViT-H-14', not a schema"):
        load_semantic_encoder("open_clip", model_name="hf-hub:laion/CLIP-ViT-H-14", checkpoint=str(checkpoint))


@pytest.mark.skipif(OPEN_CLIP_SKIP is not None, reason=OPEN_CLIP_SKIP or "")
def test_open_clip_backend(tmp_path, monkeypatch):
    import open_clip
    from PIL import Image

    (tmp_path / "tiny-vit.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
    }))
    open_clip.add_model_config(tmp_path / "tiny-vit.json")
    torch.manual_seed(0)
    model, _, pil_preprocess = open_clip.create_model_and_transforms("tiny-vit")  # random weights, no download
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    encoder = load_semantic_encoder("open_clip", model_name="tiny-vit", checkpoint=str(tmp_path / "tiny.pt"))
    x = images(5)
    with torch.no_grad():
        assert torch.equal(encoder(x), model.eval().encode_image(encoder.preprocess(x)))

    # the differentiable preprocessing against open_clip's PIL one: a 64 x 56 noise image (resize to 36 x 32,
    # crop 32 x 32) and a flat colour, which isolates mean/std (bilinear instead of bicubic gives 0.09)
    noise = torch.randint(0, 256, (64, 56, 3), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    for pixels, tolerance in ((noise, 0.02), (torch.tensor([30, 140, 220], dtype=torch.uint8).expand(64, 56, 3), 1e-5)):
        expected = pil_preprocess(Image.fromarray(pixels.numpy()))
        got = encoder.preprocess(pixels.permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
        assert got.shape == expected.shape == (3, 32, 32)
        assert (got - expected).abs().mean() < tolerance

    loss = SemanticsLoss({"clip": encoder})
    x.requires_grad_(True)
    assert loss(x, loss.embed_originals(x))["clip"].abs().max() < 1e-5
    moved = (x + 0.3 * images(6)).detach().requires_grad_(True)
    loss(moved, loss.embed_originals(x))["clip"].sum().backward()
    assert torch.isfinite(moved.grad).all() and moved.grad.abs().sum() > 0

    def squashing(*args, **kwargs):  # a resize mode the differentiable preprocessing does not implement
        squashed = create_model(*args, **kwargs)
        squashed.visual.preprocess_cfg = dict(squashed.visual.preprocess_cfg, resize_mode="squash")
        return squashed

    create_model = open_clip.create_model
    monkeypatch.setattr(open_clip, "create_model", squashing)
    with pytest.raises(ValueError, match="resized by the shortest edge are supported.*'squash'"):
        load_semantic_encoder("open_clip", model_name="tiny-vit", checkpoint=str(tmp_path / "tiny.pt"))


def test_full_clip_model_folder_keeps_its_projection(tmp_path):
    """A CLIPModel folder (both towers, as laion's ViT-H-14 ships) loads with the model's projection_dim, giving
    exactly CLIPModel.get_image_features, not a re-initialized projection of the nested default size."""
    from transformers import CLIPConfig, CLIPModel

    from fastfair.losses.semantics import load_semantic_encoder

    torch.manual_seed(0)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(small, vocab_size=50, max_position_embeddings=8),
                        vision_config=dict(small, image_size=16, patch_size=8), projection_dim=8)
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path / "clip")
    encoder = load_semantic_encoder("clip", str(tmp_path / "clip"))
    pixels = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ours = encoder.model(pixel_values=pixels).image_embeds
        expected = full.get_image_features(pixel_values=pixels)
    expected = getattr(expected, "image_embeds", expected)
    if not torch.is_tensor(expected):
        expected = expected.pooler_output
    assert ours.shape == (2, 8)
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("backend, name", [("clip", "clip"), ("dinov2", "dino")])
def test_load_in_8bit_quantizes_and_stays_close(model_dirs, backend, name):
    """bitsandbytes' CPU backend (>= 0.48) runs transformers' 8-bit loading here: int8 linear weights, outputs
    within a few per cent of the full-precision encoder, gradients still reach the images."""
    pytest.importorskip("bitsandbytes")
    full = load_semantic_encoder(backend, str(model_dirs / name))
    quantized = load_semantic_encoder(backend, str(model_dirs / name), load_in_8bit=True)
    assert torch.int8 in {p.dtype for p in quantized.model.parameters()}
    x = images(7).requires_grad_()
    reference, out = full(x.detach()), quantized(x)
    assert (out - reference).abs().max() <= 0.05 * reference.abs().max()
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()  # not a plain sum:
    # DINOv2's embedding ends in a LayerNorm, whose outputs sum to a constant
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
