"""The toy face bank: embeddings of real (drawn) toy faces for the face realism loss (seed Eq. 8).

Embedding (no weights): the aligned face crop (``fastfair.faces.align_faces``, 112x112, landmarks
estimated from the toy detector's box) average-pooled to 16x16 RGB, flattened (768 values) and
centred by its mean; ``FaceEmbedder`` adds the mirrored crop's vector and L2-normalizes. The cosine of
two such embeddings is the correlation of the two faces' coarse colour layouts: near 1 for a
generated face that looks like some drawn face, lower for smeared or off-palette faces. The bank
holds the embeddings of portraits with uniformly drawn attributes, aligned by the same pipeline the
trainer uses (``select_largest`` then ``align_faces``), from the portraits' true face boxes.
"""
import json
import os
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastfair.faces import Face, FaceBank, FaceEmbedder, align_faces, select_largest
from fastfair.faces.bank import BANK_FORMAT
from fastfair.files import save_safetensors, write_text
from fastfair.toy.files import weights_path
from fastfair.toy.world import draw_random_portraits

POOLED_SIZE = 16
ALIGNED_SIZE = 112
BANK_FILE = "face_bank.safetensors"


class PooledPixels(nn.Module):
    """images [N, 3, H, W] -> [N, 3 * size * size]: average-pooled pixels minus each image's mean
    (differentiable). The toy face embedding (size 16, on aligned faces) and the toy semantics' layout encoder
    (size 8, on whole images)."""

    def __init__(self, size: int = POOLED_SIZE):
        super().__init__()
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(images, self.size).flatten(1)
        return pooled - pooled.mean(dim=1, keepdim=True)


def toy_face_embedder() -> FaceEmbedder:
    """The face embedder the toy bank was built with (flip-summed, unit-normalized, 112x112 input)."""
    return FaceEmbedder(PooledPixels(POOLED_SIZE), flip=True, input_size=ALIGNED_SIZE)


@torch.no_grad()
def embed_faces(images: torch.Tensor, detections: List[List[Face]]) -> torch.Tensor:
    """Unit embeddings [N, D] of each image's largest detected face (the whole image where there is none)."""
    regions = select_largest(detections, images.shape[-2], images.shape[-1], device=images.device)
    aligned = align_faces(images, regions.landmarks.to(images.dtype), ALIGNED_SIZE)
    return toy_face_embedder()(aligned)


def build_face_bank(count: int, seed: int) -> torch.Tensor:
    """Unit embeddings [count, D] of ``count`` drawn faces (uniform attributes), located by their true boxes."""
    portraits = draw_random_portraits(count, seed)
    return embed_faces(portraits.images, [[Face(tuple(box))] for box in portraits.boxes.tolist()])


def save_face_bank(embeddings: torch.Tensor, folder: str, info: Dict) -> None:
    """BANK_FILE in ``fastfair.faces.FaceBank``'s format (float16) and its provenance in face_bank.json.

    Only the one metadata key ``format``: safetensors writes several keys in a random order, which would
    make the file's bytes, and so the build checksum, vary between runs.
    """
    save_safetensors({"embeddings": embeddings.to(torch.float16)}, os.path.join(folder, BANK_FILE),
                     {"format": BANK_FORMAT})
    write_text(os.path.join(folder, BANK_FILE.replace(".safetensors", ".json")),
               json.dumps({"embedding": "fastfair.toy.face_bank.toy_face_embedder", **info}, indent=2))


def load_toy_face_bank(weights_dir: Optional[str] = None) -> FaceBank:
    """The shipped (or ``weights_dir``'s) toy face bank."""
    return FaceBank.load(weights_path(BANK_FILE, weights_dir))
