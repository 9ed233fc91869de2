"""Differentiable crops: an affine warp by ``grid_sample`` and the box crop built on it.

Gradients flow to the image pixels (the warp is linear in them); the boxes and
matrices come from detection and carry no gradient.
"""
import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F

from fastfair.faces.detect import check_images


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


ANTIALIAS_LIMIT = 4  # the intermediate crop's side at most this many times the output's (a box's pixels beyond
#                     it are sampled, not averaged)


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor, size: int = 224, fill: float = -1.0,
               antialias: bool = False) -> torch.Tensor:
    """Crop each image's box and resize it to size x size, differentiably (bilinear).

    images [N, 3, H, W] in [-1, 1]; boxes [N, 4] (x0, y0, x1, y1); parts of a box outside the image
    read ``fill`` (-1: black, as the public code padded). Returns [N, 3, size, size].
    antialias: shrink as PIL and torchvision resize a picture (each output pixel averages the box pixels it
    covers), as a classifier trained on resized pictures saw its inputs; else sample bilinearly (a box larger
    than the output is aliased). A box larger than the output is cropped at about its own resolution (at most
    ANTIALIAS_LIMIT x size), then shrunk by ``F.interpolate(antialias=True)`` (in float32 at least: the CPU has
    it for no half type), one box at a time: each crop is what it would be alone, whatever else is in the batch
    (a shared size would upsample the smaller boxes first, blurring them).
    """
    check_images(images)
    if boxes.shape != (images.shape[0], 4):
        raise ValueError(f"boxes must be [N, 4] with N = {images.shape[0]}, got {tuple(boxes.shape)}")
    sides = (boxes[:, 2:] - boxes[:, :2]).detach().to(torch.float64).cpu()  # [N, 2]: width, height
    larger = (sides > size).any(-1).tolist() if antialias else [False] * len(boxes)
    if not any(larger):
        return warp_affine(images, box_matrices(boxes, size), size, fill)
    crops = [None] * len(boxes)
    shrunk = [i for i, large in enumerate(larger) if large]
    sampled = [i for i, large in enumerate(larger) if not large]
    if sampled:
        for i, crop in zip(sampled, warp_affine(images[sampled], box_matrices(boxes[sampled], size), size, fill)):
            crops[i] = crop
    work = images.to(torch.promote_types(images.dtype, torch.float32))
    for i in shrunk:
        inner = tuple(min(max(math.ceil(side), size), ANTIALIAS_LIMIT * size) for side in sides[i].tolist()[::-1])
        crop = warp_affine(work[i:i + 1], box_matrices(boxes[i:i + 1], inner), inner, fill)
        crops[i] = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                                 align_corners=False)[0].to(images.dtype)
    return torch.stack(crops)
