"""Differentiable crops: an affine warp by ``grid_sample`` and the box crop built on it.

Gradients flow to the image pixels (the warp is linear in them); the boxes and
matrices come from detection and carry no gradient.
"""
import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F

from fastfair.faces.detect import check_images
from fastfair.kernels.host_copy import to_device


def warp_affine(images: torch.Tensor, matrices: torch.Tensor, out_size: Union[int, Tuple[int, int]],
                fill: float = -1.0) -> torch.Tensor:
    """Bilinear affine warp, OpenCV's ``warpAffine(..., WARP_INVERSE_MAP, BORDER_CONSTANT)`` in torch.

    images [N, C, H, W]; matrices [N, 2, 3] map an output pixel index (u, v, 1) to the input pixel
    index (x, y) it samples (pixel centres at integers); out_size h or (h, w); samples outside the
    image read ``fill``. Returns [N, C, h, w] in the images' dtype.
    """
    if matrices.dim() != 3 or matrices.shape[1:] != (2, 3) or matrices.shape[0] != images.shape[0]:
        raise ValueError(f"matrices must be [N, 2, 3] with N = {images.shape[0]}, got {tuple(matrices.shape)}")
    out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else out_size
    height, width = images.shape[-2:]
    # half-precision sampling coordinates would be off by up to half a pixel on a 512-pixel image
    dtype, device = torch.promote_types(images.dtype, torch.float32), images.device
    v, u = torch.meshgrid(torch.arange(out_h, dtype=dtype, device=device),
                          torch.arange(out_w, dtype=dtype, device=device), indexing="ij")
    # elementwise, not a matmul: autocast runs a matmul (einsum) in half precision whatever its inputs' dtype,
    # and training's losses run under autocast (bf16: coordinates off by up to 1.9 pixels at 512)
    m = matrices.to(dtype=dtype, device=device)[:, :, :, None, None]  # [N, 2, 3, 1, 1]
    source = torch.stack([m[:, row, 0] * u + m[:, row, 1] * v + m[:, row, 2] for row in (0, 1)], -1)  # [N, h, w, 2]
    # pixel index -> grid_sample's normalized coordinates with align_corners=False
    scale = torch.tensor([2.0 / width, 2.0 / height], dtype=dtype, device=device)
    grid = (source + 0.5) * scale - 1
    # zero padding around (images - fill) == constant padding with `fill` around images
    warped = F.grid_sample(images.to(dtype) - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (warped + fill).to(images.dtype)


def box_matrices(boxes: torch.Tensor, size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """[N, 4] boxes (x0, y0, x1, y1, continuous coordinates) -> [N, 2, 3] maps from a size x size (or h x w)
    output."""
    boxes = boxes.detach().to(torch.float64)
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x0, y0, x1, y1 = boxes.unbind(-1)
    sx, sy = (x1 - x0) / out_w, (y1 - y0) / out_h
    zero = torch.zeros_like(sx)
    # output index u covers [u, u + 1) of the box frame: its centre u + 0.5 lands at x0 + (u + 0.5) * sx
    tx, ty = x0 + 0.5 * sx - 0.5, y0 + 0.5 * sy - 0.5
    return torch.stack([torch.stack([sx, zero, tx], -1), torch.stack([zero, sy, ty], -1)], dim=-2)


def resize_weights(start: float, length: float, out: int, extent: int, dtype=torch.float64,
                   device=None) -> Tuple[int, torch.Tensor]:
    """One axis of PIL's bilinear resize of the span [start, start + length) of an axis of ``extent`` pixels to
    ``out`` pixels: (first, weights [out, k]), the weights of the image's pixels first .. first + k - 1, those the
    span touches (the others weigh nothing).

    Output pixel i is centred at c_i = start + (i + 0.5) s, s = length / out, and averages input pixels j (centres
    j + 0.5) with the triangle filter max(0, 1 - |j + 0.5 - c_i| / r), r = max(s, 1) (a shrink averages every
    pixel it covers; an enlargement interpolates), normalized to sum 1 over the pixels the span touches, as PIL
    resizes a crop of them (its edges clamped, nothing beyond the crop read), those outside the image included
    (their share, 1 - the row's sum, reads the crop's fill, as PIL's crop pads). A fractional ``start`` is
    weighed exactly, not resampled first."""
    scale = length / out
    support = max(scale, 1.0)
    centres = start + (torch.arange(out, dtype=torch.float64) + 0.5) * scale
    pixels = torch.arange(math.floor(start), max(math.ceil(start + length), math.floor(start) + 1),
                          dtype=torch.float64)
    weights = (1 - (pixels + 0.5 - centres[:, None]).abs() / support).clamp(min=0)
    weights = weights / weights.sum(1, keepdim=True)
    inside = (pixels >= 0) & (pixels < extent)
    first = int(pixels[inside][0]) if bool(inside.any()) else 0
    return first, to_device(weights[:, inside].to(dtype), torch.device(device or "cpu"))  # a GPU's queued


def resize_box(image: torch.Tensor, box, size: int, fill: float = -1.0) -> torch.Tensor:
    """PIL's bilinear resize of one box of one image, differentiably: image [C, H, W], box (x0, y0, x1, y1) in
    continuous pixel coordinates (parts outside the image read ``fill``) -> [C, size, size], computed in float32
    at least as fill + Wy (image - fill) Wx^T with ``resize_weights`` (the box's pixels each weighed once, at any
    ratio of box to output)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dtype = torch.promote_types(image.dtype, torch.float32)
    top, rows = resize_weights(y0, y1 - y0, size, image.shape[-2], dtype, image.device)
    left, columns = resize_weights(x0, x1 - x0, size, image.shape[-1], dtype, image.device)
    touched = image[:, top:top + rows.shape[1], left:left + columns.shape[1]]  # only these pixels weigh
    # matmuls out of autocast: it would run them in half precision whatever their inputs' dtype
    with torch.autocast(image.device.type, enabled=False):
        return rows @ (touched.to(dtype) - fill) @ columns.T + fill


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor, size: int = 224, fill: float = -1.0,
               antialias: bool = False) -> torch.Tensor:
    """Crop each image's box and resize it to size x size, differentiably (bilinear).

    images [N, 3, H, W] in [-1, 1]; boxes [N, 4] (x0, y0, x1, y1); parts of a box outside the image
    read ``fill`` (-1: black, as the public code padded). Returns [N, 3, size, size].
    antialias: shrink as PIL and torchvision resize a picture (each output pixel averages the box pixels it
    covers: ``resize_box``), as a classifier trained on resized pictures saw its inputs; else sample bilinearly
    (a box larger than the output is aliased). Each crop is what it would be alone, whatever else is in the batch.
    """
    check_images(images)
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes must be [N, 4] with N = {images.shape[0]}, got {tuple(boxes.shape)}")
    corners = boxes.detach().to(torch.float64).cpu()  # one wait for a GPU, not one per box
    sides = corners[:, 2:] - corners[:, :2]  # [N, 2]: width, height
    bad = ~(sides > 0).all(-1)  # NaN sides too
    if bool(bad.any()):  # an empty box gives a constant crop, an inverted one a mirrored crop: never a face's
        i = int(bad.nonzero()[0])
        raise ValueError(f"boxes[{i}] = {corners[i].tolist()}: expected (x0, y0, x1, y1), finite, with x1 > x0 and "
                         "y1 > y0")
    larger = (sides > size).any(-1).tolist() if antialias else [False] * len(boxes)
    if not any(larger):
        return warp_affine(images, box_matrices(boxes, size), size, fill)
    crops = [None] * len(boxes)
    shrunk = [i for i, large in enumerate(larger) if large]
    sampled = [i for i, large in enumerate(larger) if not large]
    if sampled:
        for i, crop in zip(sampled, warp_affine(images[sampled], box_matrices(boxes[sampled], size), size, fill)):
            crops[i] = crop
    for i in shrunk:
        crops[i] = resize_box(images[i], corners[i].tolist(), size, fill).to(images.dtype)
    with torch.autocast(images.device.type, enabled=False):  # CPU bf16 autocast refuses to stack fp16 crops
        return torch.stack(crops)
