"""5-point face alignment: a similarity transform onto the standard 112 x 112 template, then a warp.

The template is the ArcFace / SphereFace one the public code and opensphere use (pixel-index
coordinates in a 112 x 112 crop): left eye, right eye, nose, left and right mouth corners.
"""
import torch

from fastfair.faces.crop import warp_affine
from fastfair.faces.detect import check_images

TEMPLATE_112 = torch.tensor(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=torch.float64,
)


def similarity_transform(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation; no reflection) mapping source to target.

    source [N, K, 2], target [K, 2] or [N, K, 2] -> [N, 2, 3] in float64 with
    target ~= [[a, -b], [b, a]] @ source + t. In 2-D this least-squares problem is linear in
    (a, b, t), so its closed form is exact (the same fit as Umeyama's / skimage's SimilarityTransform).
    """
    source = source.detach().to(torch.float64)
    target = target.detach().to(device=source.device, dtype=torch.float64).expand_as(source)
    source_mean, target_mean = source.mean(1, keepdim=True), target.mean(1, keepdim=True)
    s, t = source - source_mean, target - target_mean
    norm = (s ** 2).sum((1, 2))
    if bool((norm <= 1e-12).any()):
        raise ValueError("landmarks must not all coincide (degenerate similarity fit)")
    a = (s * t).sum((1, 2)) / norm
    b = (s[..., 0] * t[..., 1] - s[..., 1] * t[..., 0]).sum(1) / norm
    rotation = torch.stack([torch.stack([a, -b], -1), torch.stack([b, a], -1)], dim=-2)  # [N, 2, 2]
    shift = target_mean.squeeze(1) - (rotation @ source_mean.transpose(1, 2)).squeeze(-1)
    return torch.cat([rotation, shift.unsqueeze(-1)], dim=-1)


def invert_similarity(matrices: torch.Tensor) -> torch.Tensor:
    """Inverse of [N, 2, 3] affine maps (as [N, 2, 3])."""
    rotation, shift = matrices[..., :2], matrices[..., 2:]
    inverse = torch.linalg.inv(rotation)
    return torch.cat([inverse, -inverse @ shift], dim=-1)


def template(size: int = 112) -> torch.Tensor:
    """The 5-point template [5, 2] for a size x size crop (scaled from 112, pixel-index coordinates)."""
    return (TEMPLATE_112 + 0.5) * (size / 112.0) - 0.5


def template_in_box(boxes: torch.Tensor) -> torch.Tensor:
    """Landmarks [N, 5, 2] estimated from boxes [N, 4], treating each box as the template's crop frame.

    For detectors without landmarks (Haar); an approximation that assumes the box frames the face
    like the template does.
    """
    boxes = boxes.detach().to(torch.float64)
    unit = (TEMPLATE_112.to(boxes.device) + 0.5) / 112.0  # template in [0, 1] crop coordinates
    origin, extent = boxes[:, None, :2], (boxes[:, None, 2:] - boxes[:, None, :2])
    return origin + unit * extent - 0.5


def align_faces(images: torch.Tensor, landmarks: torch.Tensor, size: int = 112, fill: float = -1.0) -> torch.Tensor:
    """Aligned face crops: warp each image so its 5 landmarks land on the template, differentiably.

    images [N, 3, H, W] in [-1, 1]; landmarks [N, 5, 2] (pixel-index x, y). Returns [N, 3, size, size].
    """
    check_images(images)
    if landmarks.shape != (images.shape[0], 5, 2):
        raise ValueError(f"landmarks must be [N, 5, 2] with N = {images.shape[0]}, got {tuple(landmarks.shape)}")
    to_template = similarity_transform(landmarks, template(size))
    return warp_affine(images, invert_similarity(to_template), size, fill)
