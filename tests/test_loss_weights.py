"""Dynamic semantics weights, the face-region gradient map and the combined loss."""
import pytest
import torch

from fastfair.losses import (LossWeights, combine_losses, face_box_mask, scale_gradient, semantic_weights,
                             target_disagreement)

WEIGHTS = LossWeights(lambda_img_1=8.0, lambda_img_2=2.0, lambda_img_3=0.5, lambda_face=0.1, lambda_img_no_face=1.0)


def test_the_library_defaults_are_the_trainer_s():
    """LossWeights() used as a library gets the weights a run's loss section defaults to (seed 0121's gender
    setting)."""
    from dataclasses import fields

    from fastfair.config import LossConfig

    names = [f.name for f in fields(LossWeights)]
    assert LossWeights() == LossWeights(**{name: getattr(LossConfig(), name) for name in names})
    assert (LossWeights().lambda_img_1, LossWeights().lambda_img_2, LossWeights().lambda_img_3) == (8.0, 1.6, 0.32)


def test_scale_gradient_is_identity_forward_and_scales_backward():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    y = scale_gradient(x, scale)
    assert torch.equal(y, x)
    upstream = torch.randn_like(x)
    (y * upstream).sum().backward()
    assert torch.allclose(x.grad, upstream * scale)


def test_scale_gradient_refuses_a_scale_that_would_grow_the_gradient_and_takes_numbers():
    """A scale [4, 1] on x [4] made a [4, 4] gradient that autograd summed back onto [4]: other numbers, no
    error."""
    x = torch.arange(1.0, 5.0, dtype=torch.float64, requires_grad=True)
    for scale in (torch.tensor([[1.0], [0.0], [0.0], [0.0]]), torch.ones(3)):
        with pytest.raises(ValueError, match=r"scale_gradient: scale of shape \((4, 1|3,)\) does not broadcast to x's "
                                             r"\(4,\)"):
            scale_gradient(x, scale)
    (scale_gradient(x, 2.0) * x.detach()).sum().backward()  # a number broadcasts
    assert torch.equal(x.grad, 2 * x.detach())


def test_face_box_mask_refuses_other_shapes():
    with pytest.raises(ValueError, match=r"has_face of shape \(1,\), expected \[2\], one flag per box"):
        face_box_mask(torch.zeros(2, 4), 4, 4, has_face=torch.tensor([True]))  # was broadcast to both
    with pytest.raises(ValueError, match=r"boxes of shape \(4,\), expected \[N, 4\]"):
        face_box_mask(torch.zeros(4), 4, 4)


def test_face_box_mask():
    boxes = torch.tensor([[1, 2, 3, 5], [0, 0, 4, 4]])
    mask = face_box_mask(boxes, 6, 4, has_face=torch.tensor([True, False]))
    assert mask.shape == (2, 1, 6, 4)
    expected = torch.zeros(6, 4)
    expected[2:5, 1:3] = 1
    assert torch.equal(mask[0, 0], expected) and mask[1].sum() == 0


def test_target_disagreement_per_attribute():
    target = {"gender": torch.tensor([0, 0, 1, 0]), "age": torch.tensor([0, 1, 1, 0])}
    original = {"gender": torch.tensor([0, 0, 1, 0]), "age": torch.tensor([0, 0, 1, 0])}
    differs = target_disagreement(target, original, torch.tensor([True, True, True, False]))
    assert differs["gender"].tolist() == [False, False, False, True]  # no original face: differs
    assert differs["age"].tolist() == [False, True, False, True]
    with pytest.raises(ValueError, match="target attributes .* differ from the original's"):
        target_disagreement(target, {"gender": original["gender"]}, torch.ones(4, dtype=torch.bool))


def test_semantic_weights_per_case():
    differs = {"gender": torch.tensor([False, True, True])}
    has_face = torch.tensor([True, True, False])
    face = face_box_mask(torch.tensor([[0, 0, 2, 2]] * 3), 4, 4, has_face)
    weight, pixel_map = semantic_weights(differs, has_face, face, WEIGHTS)
    assert weight.tolist() == [8.0, 2.0, 1.0]
    assert torch.equal(pixel_map[0], torch.ones(1, 4, 4)) and torch.equal(pixel_map[2], torch.ones(1, 4, 4))
    # disagreeing image with a face: lambda_2 outside, lambda_3 inside (map = lambda / lambda_2)
    assert torch.equal(pixel_map[1, 0], torch.where(face[1, 0] > 0, 0.25, 1.0))


def test_per_attribute_weights_take_the_smallest_concerned():
    """Seed 0123: gender lambda_2 = 0.2 x 8, lambda_3 = 0.2 x that; race 0.6 x 8 and 0.3 x that."""
    weights = LossWeights(lambda_img_1=8.0, lambda_img_2={"gender": 1.6, "race": 4.8},
                          lambda_img_3={"gender": 0.32, "race": 1.44})
    differs = {"gender": torch.tensor([False, True, False, True, True]),
               "race": torch.tensor([False, False, True, True, True])}
    has_face = torch.tensor([True, True, True, True, False])
    face = torch.ones(5, 1, 1, 1)  # the whole image is face: w_i * map_i = lambda_3
    weight, pixel_map = semantic_weights(differs, has_face, face, weights)
    assert torch.allclose(weight * pixel_map.flatten(), torch.tensor([8.0, 0.32, 1.44, 0.32, 1.6]))
    weight, _ = semantic_weights(differs, has_face, None, weights)  # outside the face: lambda_2
    assert torch.allclose(weight, torch.tensor([8.0, 1.6, 4.8, 1.6, 1.6]))
    with pytest.raises(ValueError, match="lambda_img_2 gives no value for attribute 'age'"):
        semantic_weights({"age": differs["race"]}, has_face, None, weights)


def test_effective_pixel_weights_of_the_semantics_gradient():
    """d(weighted semantics loss)/d pixel = lambda(pixel) * d(unweighted)/d pixel."""
    differs = {"gender": torch.tensor([False, True, True])}
    has_face = torch.tensor([True, True, False])
    face = face_box_mask(torch.tensor([[1, 1, 3, 4]] * 3), 5, 4, has_face)
    weight, pixel_map = semantic_weights(differs, has_face, face, WEIGHTS)
    images = torch.randn(3, 3, 5, 4, dtype=torch.float64, requires_grad=True)

    def per_image_loss(x):  # any differentiable per-image loss stands in for 1 - cos
        return (x.sin() ** 2).flatten(1).sum(1)

    (weight * per_image_loss(scale_gradient(images, pixel_map))).sum().backward()
    plain = torch.autograd.grad(per_image_loss(images).sum(), images)[0]
    lam = torch.stack([torch.full((1, 5, 4), 8.0), torch.where(face[1] > 0, 0.5, 2.0), torch.full((1, 5, 4), 1.0)])
    assert torch.allclose(images.grad, lam.double() * plain)


def test_combined_loss_returns_every_component():
    align = torch.tensor([0.5, 0.0, 1.5], requires_grad=True)
    semantics = {"clip": torch.tensor([0.1, 0.2, 0.3]), "dino": torch.tensor([0.05, 0.1, 0.0])}
    face = torch.tensor([0.4, 0.2, 0.0])
    image_weight = torch.tensor([8.0, 2.0, 1.0])
    parts = combine_losses(align, semantics, face, image_weight, WEIGHTS)
    assert set(parts) == {"loss", "align", "img", "img_unweighted", "face", "img/clip", "img/dino"}
    img = torch.tensor([0.15, 0.3, 0.3])
    assert torch.isclose(parts["align"], torch.tensor(2.0 / 3))
    assert torch.isclose(parts["img"], (image_weight * img).mean())
    assert torch.isclose(parts["img_unweighted"], img.mean())
    assert torch.isclose(parts["face"], face.mean()) and torch.isclose(parts["img/dino"], torch.tensor(0.05))
    assert torch.isclose(parts["loss"], parts["align"] + parts["img"] + 0.1 * parts["face"])
    parts["loss"].backward()
    assert torch.allclose(align.grad, torch.full((3,), 1 / 3))


def test_loss_weights_from_dict():
    weights = LossWeights.from_dict({"lambda_img_1": 4, "lambda_img_2": 1, "lambda_img_3": 0.1, "lambda_face": 0})
    assert weights.lambda_img_1 == 4.0 and weights.lambda_img_no_face is None
    assert LossWeights.from_dict({"lambda_img_2": {"gender": 1.6, "race": 4}}).lambda_img_2 == {"gender": 1.6, "race": 4.0}
    with pytest.raises(ValueError, match=r"lambda_img_3.race must be a finite number >= 0"):
        LossWeights.from_dict({"lambda_img_3": {"race": -0.1}})
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['lambda_img'\]"):
        LossWeights.from_dict({"lambda_img": 1})
    for bad in (-1, float("nan"), float("inf")):  # NaN passed `value < 0` and made every image weight NaN
        with pytest.raises(ValueError, match="lambda_img_3 must be a finite number >= 0"):
            LossWeights.from_dict({"lambda_img_3": bad})
    with pytest.raises(TypeError, match="must be a mapping"):
        LossWeights.from_dict([1, 2])
