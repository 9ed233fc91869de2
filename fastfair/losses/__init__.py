"""Losses of the fairness finetuning (seed paragraphs 0105-0109).

- ``alignment``: expected optimal-transport targets and the distributional alignment loss (Eq. 4-6);
- ``global_batch``: the same targets over all ``torch.distributed`` ranks;
- ``semantics``: the image semantics preserving loss with CLIP / DINOv2 encoders (Eq. 7);
- ``face``: the face realism preserving loss against a bank of real face embeddings (Eq. 8; import it from
  ``fastfair.losses.face``: it needs ``fastfair.faces``, which this package does not load);
- ``weights``: the dynamic lambda_img weights, the face-region gradient map, the combined loss.
"""
from .alignment import alignment_loss, expected_ot_targets
from .global_batch import gather_rows, global_expected_ot_targets
from .semantics import Preprocess, SemanticEncoder, SemanticsLoss, load_semantic_encoder
from .weights import (LossWeights, combine_losses, face_box_mask, scale_gradient, semantic_weights,
                      target_disagreement)

__all__ = [
    "alignment_loss", "expected_ot_targets", "gather_rows", "global_expected_ot_targets", "Preprocess",
    "SemanticEncoder", "SemanticsLoss", "load_semantic_encoder", "LossWeights", "combine_losses",
    "face_box_mask", "scale_gradient", "semantic_weights", "target_disagreement",
]
