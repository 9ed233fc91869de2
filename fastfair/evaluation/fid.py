"""Optional FID against a folder of reference images, with Inception weights the user supplies locally.

    FID = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))      (features' means mu, covariances S)

The feature extractor is a TorchScript file mapping uint8 images [N, 3, H, W] to features [N, D] (wrap the
Inception-v3 of your choice with ``torch.jit.script``/``trace``; nothing is downloaded). Reference images are
read upright by their EXIF orientation (`fastfair.image_files`); pytorch-fid and clean-fid read the stored
pixels, so a reference folder of photos with orientation tags scores otherwise there.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between feature sets a [N, D] and b [M, D] (float64; N, M >= 2).

    With the centred, scaled features X = (x - mean) / sqrt(N - 1), S = X^T X, and tr (S_a S_b)^(1/2) is the
    nuclear norm of X_a X_b^T (its singular values are the square roots of S_a S_b's eigenvalues). QR gives
    triangular R with R^T R = X^T X, so that norm is the sum of the singular values of R_a R_b^T
    [min(N, D), min(M, D)]: no matrix square root. A general square root of the non-symmetric S_a S_b
    (scipy's sqrtm, as pytorch-fid takes it) warns and returns complex noise where the covariances are
    singular, as they are whenever there are fewer images than feature dimensions (2048 for Inception).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"FID needs two feature sets [N >= 2, D] of the same D, got {a.shape} and {b.shape}")
    centred_a, centred_b = ((x - x.mean(0)) / np.sqrt(len(x) - 1) for x in (a, b))
    factor_a, factor_b = (np.linalg.qr(x, mode="r") for x in (centred_a, centred_b))
    trace_root = np.linalg.svd(factor_a @ factor_b.T, compute_uv=False).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + (centred_a ** 2).sum() + (centred_b ** 2).sum()
                 - 2 * trace_root)


class FeatureExtractor:
    """The user's TorchScript extractor; ``__call__(images [N, 3, H, W] in [-1, 1]) -> [N, D] numpy``."""

    def __init__(self, path, device="cpu", batch_size: int = 32):
        if not Path(path).is_file():
            raise ValueError(f"--fid-inception {path}: expected a local TorchScript file (uint8 [N,3,H,W] -> [N,D])")
        self.model = torch.jit.load(str(path), map_location=device).eval()
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return torch.cat([self.model(pixels[i:i + self.batch_size].to(self.device)).float().cpu()
                          for i in range(0, len(pixels), self.batch_size)]).double().numpy()


def reference_images(folder) -> list:
    """The image files of a reference folder (sorted); ValueError when it holds fewer than 2."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < 2:
        raise ValueError(f"--fid-reference {folder}: needs at least 2 images ({', '.join(IMAGE_SUFFIXES)})")
    return files
