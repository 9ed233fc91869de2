"""Face realism preserving loss (seed Eq. 8): 1 - cos(emb(face), its nearest real face in the bank).

Per image i with unit embedding e_i (with grad) and a target t_i found without grad:

    L_face,i = 1 - <e_i, t_i>,   t_i = argmax_{F in D_F} <e_i, emb(F)>

(Eq. 8 prints min; the nearest face maximizes the cosine, as the public code does.) Public practice,
kept here: when the frozen model's original image already shows the target class with high
confidence, the original face's embedding is the target instead, so that face is kept rather than
pulled toward a stranger. Images without a face get no face loss: the caller masks them.
"""
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from fastfair.faces.bank import FaceBank


def face_realism_loss(face_embeddings: torch.Tensor, bank: FaceBank, original_embeddings: Optional[torch.Tensor] = None,
                      use_original: Optional[torch.Tensor] = None, chunk_size: int = 65536) -> torch.Tensor:
    """Per-image face loss [N] (differentiable in ``face_embeddings``; targets carry no grad).

    face_embeddings [N, D] (normalized here again, so any embedder works); bank: the real faces;
    original_embeddings [N, D] and use_original [N] bool: rows where the original face is the target.
    """
    if face_embeddings.dim() != 2:
        raise ValueError(f"face_embeddings must be [N, D], got {tuple(face_embeddings.shape)}")
    embeddings = F.normalize(face_embeddings.float(), dim=-1)
    targets = bank.neighbours(embeddings, chunk_size)
    if use_original is not None:
        if original_embeddings is None or original_embeddings.shape != face_embeddings.shape:
            raise ValueError("use_original needs original_embeddings of the same shape as face_embeddings")
        if use_original.shape != (face_embeddings.shape[0],):
            raise ValueError(f"use_original must be [N] bool, got {tuple(use_original.shape)}")
        originals = F.normalize(original_embeddings.detach().float(), dim=-1)
        targets = torch.where(use_original.to(targets.device)[:, None], originals, targets)
    return 1 - (embeddings * targets).sum(dim=-1)


def original_shows_targets(original_logits: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
                           confidence: float = 0.9) -> torch.Tensor:
    """[N] bool: for every attribute of ``targets`` ({name: [N] long class, -1: no target}), the original face's
    predicted class is the target with probability >= confidence, each attribute on its own softmax of
    ``original_logits[name]`` [N, K_name] (the public code's per-attribute check: a joint cell's probability, their
    product, would be stricter, 0.95 x 0.90 = 0.855)."""
    if not targets:
        raise ValueError("original_shows_targets needs at least one attribute")
    use = None
    for name, target in targets.items():
        shown = original_is_target(original_logits[name].float().softmax(-1), target, confidence)
        use = shown if use is None else use & shown
    return use


def original_is_target(original_probs: torch.Tensor, targets: torch.Tensor, confidence: float = 0.9) -> torch.Tensor:
    """[N] bool: the original image's predicted class equals the target with probability >= confidence.

    original_probs [N, K] class probabilities of the original face; targets [N] long (-1: no target).
    0.9 is the public code's ``face_gender_confidence_level``.
    """
    if original_probs.dim() != 2 or targets.shape != original_probs.shape[:1]:
        raise ValueError(f"original_probs must be [N, K] and targets [N], got {tuple(original_probs.shape)} "
                         f"and {tuple(targets.shape)}")
    top_prob, top_class = original_probs.max(dim=-1)
    return (targets >= 0) & (top_class == targets) & (top_prob >= confidence)
