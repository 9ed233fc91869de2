"""Differentiable crops and 5-point alignment: exactness against references, finite-difference gradients."""
import math

import numpy as np
import pytest
import torch

from fastfair.faces.align import TEMPLATE_112, align_faces, invert_similarity, similarity_transform, template
from fastfair.faces.crop import crop_boxes, warp_affine


def bilinear_reference(image, matrix, out_h, out_w, fill):
    """Loop-by-pixel bilinear warp in float64 numpy (cv2 WARP_INVERSE_MAP semantics, constant border)."""
    channels, height, width = image.shape
    out = np.zeros((channels, out_h, out_w))
    for v in range(out_h):
        for u in range(out_w):
            x, y = matrix @ np.array([u, v, 1.0])
            x0, y0 = math.floor(x), math.floor(y)
            value = np.zeros(channels)
            for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                    pixel = image[:, yy, xx] if 0 <= yy < height and 0 <= xx < width else np.full(channels, fill)
                    value += wy * wx * pixel
            out[:, v, u] = value
    return out


def rotation_matrix(angle, scale, tx, ty):
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return torch.tensor([[[c, -s, tx], [s, c, ty]]], dtype=torch.float64)


def test_warp_affine_matches_bilinear_reference_in_float64():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 9, 11, dtype=torch.float64) * 2 - 1
    matrix = rotation_matrix(0.3, 1.3, -1.7, 0.4)  # parts of the output fall outside the image
    warped = warp_affine(image, matrix, (7, 8), fill=-1.0)
    expected = bilinear_reference(image[0].numpy(), matrix[0].numpy(), 7, 8, -1.0)
    np.testing.assert_allclose(warped[0].numpy(), expected, atol=1e-12)


def test_crop_of_whole_image_is_identity_and_integer_box_is_a_slice():
    image = torch.rand(2, 3, 16, 20, dtype=torch.float64)
    whole = torch.tensor([[0, 0, 20, 16]] * 2, dtype=torch.float64)
    assert torch.allclose(warp_affine(image, translation_matrices(whole), (16, 20)), image, atol=1e-12)
    box = torch.tensor([[3, 2, 11, 10], [8, 5, 16, 13]], dtype=torch.float64)
    crops = crop_boxes(image, box, size=8)
    assert torch.allclose(crops[0], image[0, :, 2:10, 3:11], atol=1e-12)
    assert torch.allclose(crops[1], image[1, :, 5:13, 8:16], atol=1e-12)


def translation_matrices(boxes):
    """Maps that shift by the boxes' corners at scale 1 (an output as large as the box)."""
    zero = torch.zeros(len(boxes), dtype=torch.float64)
    one = torch.ones_like(zero)
    return torch.stack([torch.stack([one, zero, boxes[:, 0]], -1), torch.stack([zero, one, boxes[:, 1]], -1)], 1)


def test_half_precision_images_are_sampled_at_float32_coordinates():
    image = torch.rand(1, 3, 512, 512) * 2 - 1
    boxes = torch.tensor([[301.3, 287.9, 433.6, 420.2]])
    reference = crop_boxes(image, boxes, size=64)
    crops = crop_boxes(image.to(torch.bfloat16), boxes, size=64)
    assert crops.dtype == torch.bfloat16
    assert (crops.float() - reference).abs().max() < 0.02  # bfloat16 pixel rounding only


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_crops_and_aligned_faces_under_autocast_are_sampled_at_float32_coordinates(dtype):
    """Training computes its losses under autocast, which ran the sampling coordinates' matmul in half precision
    (bf16: up to 1.9 pixels off at 512); the crops and aligned faces must be those computed without it."""
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)) * 2 - 1
    boxes = torch.tensor([[301.3, 287.9, 433.6, 420.2]], dtype=torch.float64)
    points = template(112)[None].double() * 1.3 + torch.tensor([[[250.7, 260.3]]], dtype=torch.float64)
    reference = crop_boxes(image, boxes, size=64), align_faces(image, points, size=112)
    with torch.autocast("cpu", dtype=dtype):
        crops = crop_boxes(image, boxes, size=64), align_faces(image, points, size=112)
    for got, expected in zip(crops, reference):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_crop_outside_the_image_reads_the_fill_value():
    image = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    crops = crop_boxes(image, torch.tensor([[-8.0, 0, 0, 8]], dtype=torch.float64), size=8, fill=-1.0)
    assert torch.allclose(crops, torch.full_like(crops, -1.0))


def test_crop_and_align_gradients_match_finite_differences_in_float64():
    torch.manual_seed(1)
    image = (torch.rand(2, 3, 6, 7, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    boxes = torch.tensor([[0.6, 0.3, 5.1, 4.8], [-1.0, 1.5, 4.7, 7.2]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: crop_boxes(x, boxes, size=4), (image,))
    shift = torch.tensor([[[0.3, 0.2]], [[0.9, -0.4]]], dtype=torch.float64)
    points = template(112)[None] * 0.05 + shift  # landmarks of a ~5-pixel face, a different one per image
    assert torch.autograd.gradcheck(lambda x: align_faces(x, points, size=6), (image,))


def test_similarity_fit_recovers_a_known_transform_and_is_least_squares():
    known = rotation_matrix(-0.4, 2.5, 30.0, -12.0)
    source = torch.rand(3, 5, 2, dtype=torch.float64) * 100
    target = source @ known[0, :, :2].T + known[0, :, 2]
    fitted = similarity_transform(source, target)
    assert torch.allclose(fitted, known.expand(3, 2, 3), atol=1e-9)
    assert torch.allclose(invert_similarity(fitted)[0, :, :2] @ known[0, :, :2], torch.eye(2, dtype=torch.float64))
    # noisy points: the closed form equals the linear least-squares solution over (a, b, tx, ty)
    noisy = target[0] + torch.randn(5, 2, dtype=torch.float64)
    x, y = source[0, :, 0].numpy(), source[0, :, 1].numpy()
    rows = np.concatenate([np.stack([x, -y, np.ones(5), np.zeros(5)], 1), np.stack([y, x, np.zeros(5), np.ones(5)], 1)])
    a, b, tx, ty = np.linalg.lstsq(rows, np.concatenate([noisy[:, 0].numpy(), noisy[:, 1].numpy()]), rcond=None)[0]
    expected = np.array([[a, -b, tx], [b, a, ty]])
    np.testing.assert_allclose(similarity_transform(source[:1], noisy)[0].numpy(), expected, atol=1e-9)


def test_align_undoes_a_similarity_warp_of_an_aligned_face():
    # a smooth "aligned face", placed into a larger image by a known similarity, is recovered by alignment
    v, u = torch.meshgrid(torch.arange(112.0), torch.arange(112.0), indexing="ij")
    face = torch.stack([torch.sin(u / 9), torch.cos(v / 7), torch.sin((u + v) / 11)])[None].double()
    to_image = rotation_matrix(0.25, 1.6, 60.0, 40.0)  # aligned-crop index -> image index
    image = warp_affine(face, invert_similarity(to_image), (260, 280), fill=-1.0)
    landmarks = (TEMPLATE_112 @ to_image[0, :, :2].T + to_image[0, :, 2])[None]
    aligned = align_faces(image, landmarks, size=112)
    assert (aligned - face)[..., 4:-4, 4:-4].abs().max() < 0.02  # two bilinear resamplings of a smooth image


def test_bad_shapes_raise_clear_errors():
    image = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="boxes must be"):
        crop_boxes(image, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="landmarks must be"):
        align_faces(image, torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        crop_boxes(torch.zeros(3, 8, 8), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="coincide"):
        similarity_transform(torch.ones(1, 5, 2), TEMPLATE_112)


def test_template_of_another_size_is_the_112_template_resampled_at_pixel_centres():
    """Aligning a 112 x 112 face whose landmarks sit on the 112 template into a 56 x 56 crop samples each output
    pixel at the centre of a 2 x 2 block: bilinear there is the block's mean, i.e. 2 x 2 average pooling."""
    import torch.nn.functional as F

    image = torch.rand(1, 3, 112, 112, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    aligned = align_faces(image, TEMPLATE_112[None].clone(), size=56)
    torch.testing.assert_close(aligned, F.avg_pool2d(image, 2), atol=1e-9, rtol=0)
    torch.testing.assert_close(template(224), (TEMPLATE_112 + 0.5) * 2 - 0.5)


def test_an_antialiased_crop_shrinks_a_box_as_pil_resizes_the_picture_of_it():
    """A classifier trained on pictures PIL resized (python -m fastfair.classifiers.train) is judged on crops
    shrunk the same way: a 448-pixel box to 224 agrees with PIL's bilinear resize of the box's pixels, where plain
    bilinear sampling (the toy's classifiers' inputs) aliases fine detail."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 3, 128, 128, generator=generator) * 2 - 1  # detail at every scale
    images = torch.nn.functional.interpolate(noise, size=(512, 512), mode="bicubic", align_corners=False).clamp(-1, 1)
    box = torch.tensor([[32.0, 16.0, 480.0, 464.0]])  # 448 x 448 pixels, on pixel edges
    pixels = ((images[0, :, 16:464, 32:480] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = np.asarray(Image.fromarray(pixels).resize((224, 224), Image.BILINEAR), dtype=np.float64) / 127.5 - 1
    pil = torch.from_numpy(pil).permute(2, 0, 1)[None]
    antialiased = crop_boxes(images, box, 224, antialias=True).double()
    sampled = crop_boxes(images, box, 224).double()
    assert (antialiased - pil).abs().mean() < 0.01 < (sampled - pil).abs().mean()
    # differentiable, in half precision too (the CPU's antialiased resize has no half kernels: float32 inside)
    half = images.to(torch.bfloat16).requires_grad_(True)
    crops = crop_boxes(half, box, 224, antialias=True)
    crops.float().sum().backward()
    assert crops.dtype == torch.bfloat16 and half.grad is not None and half.grad.abs().sum() > 0
    # a box no larger than the output: sampled as before, antialias or not
    small = torch.tensor([[100.0, 100.0, 300.0, 300.0]])
    assert torch.equal(crop_boxes(images, small, 224, antialias=True), crop_boxes(images, small, 224))


@pytest.mark.parametrize("box", [(99.5, 49.5, 432.5, 382.5), (32.25, 16.75, 480.25, 464.75), (0.0, 0.0, 512.0, 512.0),
                                 (10.3, 200.6, 500.9, 300.2), (120.5, 80.5, 300.5, 400.5), (20.0, 30.0, 470.0, 500.0)])
def test_an_antialiased_crop_of_a_fractional_box_is_pil_s_resize_of_that_box(box):
    """Boxes grown from detector boxes start at fractional pixels (a square Haar box of side 222 grown by half:
    99.5): a crop resampled at the box's resolution first blurred them (0.034 from PIL at half a pixel); each
    box is now weighed exactly as PIL's resize(box=...) weighs it, at any ratio of box to output, one axis
    enlarged or both shrunk."""
    from PIL import Image

    generator = torch.Generator().manual_seed(1)
    noise = torch.rand(1, 3, 128, 128, generator=generator) * 2 - 1
    images = torch.nn.functional.interpolate(noise, size=(512, 512), mode="bicubic", align_corners=False)
    images = images.clamp(-1, 1).double()
    inside = tuple(min(max(v, 0.0), 512.0) for v in box)
    assert inside == box, "PIL's resize takes boxes inside the image"
    pil = np.stack([np.asarray(Image.fromarray(images[0, c].numpy().astype(np.float32), mode="F").resize(
        (224, 224), Image.BILINEAR, box=box), dtype=np.float64) for c in range(3)])
    crop = crop_boxes(images, torch.tensor([box], dtype=torch.float64), 224, antialias=True)[0].numpy()
    # PIL's resize(box=) also reads the pixels around the box, a crop's resize does not: they differ at the edges
    assert np.abs(crop - pil)[:, 3:-3, 3:-3].max() < 1e-5
    if all(float(v).is_integer() for v in box):  # a crop of whole pixels: exactly PIL's resize of that crop
        x0, y0, x1, y1 = (int(v) for v in box)
        cropped = np.stack([np.asarray(Image.fromarray(images[0, c, y0:y1, x0:x1].numpy().astype(np.float32),
                                                       mode="F").resize((224, 224), Image.BILINEAR), dtype=np.float64)
                            for c in range(3)])
        assert np.abs(crop - cropped).max() < 1e-5


def test_an_antialiased_crop_past_the_image_reads_fill_and_is_differentiable():
    """Beyond the image the box reads ``fill`` (a box all outside is all fill), and the crop is linear in the
    pixels: gradcheck in float64."""
    images = torch.rand(1, 3, 40, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    outside = crop_boxes(images, torch.tensor([[100.0, 100.0, 160.0, 170.0]], dtype=torch.float64), 16, fill=-1.0,
                         antialias=True)
    assert torch.equal(outside, torch.full_like(outside, -1.0))
    partly = torch.tensor([[-10.5, 5.25, 25.5, 50.75]], dtype=torch.float64)
    crop = crop_boxes(images, partly, 8, fill=0.5, antialias=True)
    padded = torch.nn.functional.pad(images, (20, 20, 20, 20), value=0.5)  # the same box in a padded image
    torch.testing.assert_close(crop_boxes(padded, partly + 20, 8, fill=0.5, antialias=True), crop)
    leaf = images.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: crop_boxes(x, partly, 8, antialias=True), (leaf,))
    # an empty, inverted or NaN box is no face's: refused (a constant or mirrored crop came back)
    for bad in ([5.0, 5.0, 5.0, 9.0], [9.0, 5.0, 5.0, 9.0], [0.0, float("nan"), 4.0, 4.0]):
        with pytest.raises(ValueError, match=r"boxes\[0\] = .*expected \(x0, y0, x1, y1\), finite, with x1 > x0"):
            crop_boxes(images, torch.tensor([bad], dtype=torch.float64), 8, antialias=True)
    # half-precision images under CPU bf16 autocast (torch.stack there refused fp16 tensors), sampled and shrunk
    small = torch.tensor([[3.0, 4.0, 9.0, 9.0]], dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = crop_boxes(images.half().repeat(2, 1, 1, 1), torch.cat([partly, small]), 8, antialias=True)
    assert mixed.dtype == torch.float16 and mixed.shape == (2, 3, 8, 8)


def test_judges_crop_as_their_classifier_was_trained():
    from fastfair.classifiers import AttributeClassifier
    from fastfair.classifiers.heads import head_from_names
    from fastfair.toy.classifiers import ToyClassifier

    assert AttributeClassifier(head_from_names(["gender"]), "small_cnn", input_size=32, width=4).antialias
    assert not ToyClassifier("toy_resnet", {}).antialias


def test_each_antialiased_crop_is_what_it_would_be_alone_whatever_else_is_in_the_batch():
    """One box's crop does not depend on the others: a face beside a faceless image (whose box is the whole image
    with its margin, 768 px at 512) was upsampled to that size first, then shrunk, blurring it."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 512, 512, generator=generator) * 2 - 1
    boxes = torch.tensor([[0.0, 20.0, 360.0, 380.0], [-128.0, -128.0, 640.0, 640.0], [100.0, 90.0, 200.0, 190.0]])
    together = crop_boxes(images, boxes, 224, antialias=True)
    for i in range(3):
        alone = crop_boxes(images[i:i + 1], boxes[i:i + 1], 224, antialias=True)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=1e-6)
    assert torch.equal(together[2:], crop_boxes(images[2:], boxes[2:], 224))  # no shrink: sampled, as before
