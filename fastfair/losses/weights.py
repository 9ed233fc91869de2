"""Dynamic loss weights and the combined loss (seed paragraphs 0109, 0122-0123).

    L = L_align + lambda_img L_img + lambda_face L_face

with a per-image, per-pixel lambda_img:
- lambda_img_1 when the image's target class (argmax q_i; a tied row's is the original's class where it is among
  the maxima, `fastfair.losses.alignment.target_cells`) equals the original image's class (the classifier's argmax
  on the original's face) for every attribute: keep the image close;
- otherwise lambda_img_2 outside the face region and lambda_img_3 inside it (the face must change);
- an image without a face gets only L_img, weighted lambda_img_no_face (default: lambda_img_2).
Each lambda_img is one number or one per attribute (seed 0123: gender 0.2 x, race 0.6 x); an image
takes the smallest value among the attributes concerned: all attributes for lambda_img_1 and for
images without a face, the attributes whose target class differs for lambda_img_2 and _3 (as the
public code does).

The per-pixel part acts on the gradient: the semantics loss of image i is weighted by
w_i = max over its pixels of lambda, and the gradient reaching each pixel of the image fed to the
semantics encoders is multiplied by lambda(pixel) / w_i (`scale_gradient`). Feed the classifier the
unscaled image, so only the semantics gradient is reweighted:

    differs = target_disagreement(target_classes, original_classes, original_has_face)
    w, pixel_map = semantic_weights(differs, has_face, face_mask, loss_weights)
    sem = semantics_loss(scale_gradient(images, pixel_map), original_embeddings)
    parts = combine_losses(align_per_image, sem, face_per_image, w, loss_weights)

Defaults are seed 0121's gender setting (fastfair.config.LossConfig's too): lambda_img_1 8, lambda_img_2 0.2 x 8,
lambda_img_3 0.2 x that; lambda_face 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Real
from typing import Dict, Mapping, Optional, Union

import torch

Weight = Union[float, Dict[str, float]]  # one value, or one per attribute name


@dataclass(frozen=True)
class LossWeights:
    """Weights of the combined loss (module docstring); lambda_img_* are a number or {attribute: number}."""

    lambda_img_1: Weight = 8.0
    lambda_img_2: Weight = 1.6
    lambda_img_3: Weight = 0.32
    lambda_face: float = 1.0
    lambda_img_no_face: Optional[float] = None  # None: lambda_img_2 (its smallest value)

    @classmethod
    def from_dict(cls, config: Mapping) -> "LossWeights":
        if not isinstance(config, Mapping):
            raise TypeError(f"loss weights must be a mapping, got {type(config).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(config) - names
        if unknown:
            raise ValueError(f"loss weights: unknown field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        per_attribute = {"lambda_img_1", "lambda_img_2", "lambda_img_3"}
        parsed = {}
        for name, value in config.items():
            if value is None and name == "lambda_img_no_face":
                parsed[name] = None
            elif isinstance(value, Mapping) and name in per_attribute:
                parsed[name] = {a: _weight(f"{name}.{a}", v) for a, v in value.items()}
            else:
                parsed[name] = _weight(name, value)
        return cls(**parsed)

    def value(self, name: str, attributes) -> torch.Tensor:
        """[N] smallest value of weight `name` among the attributes that apply ([N] bool each);
        +inf where none applies."""
        weight = getattr(self, name)
        first = next(iter(attributes.values()))
        smallest = torch.full(first.shape, float("inf"), device=first.device)
        for attribute, applies in attributes.items():
            if isinstance(weight, Mapping) and attribute not in weight:
                raise ValueError(f"loss weights: {name} gives no value for attribute {attribute!r} "
                                 f"(it has {sorted(weight)}); give one per attribute or a single number")
            value = weight[attribute] if isinstance(weight, Mapping) else weight
            smallest = torch.where(applies, torch.clamp(smallest, max=value), smallest)
        return smallest


def _weight(name, value):
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value < math.inf:  # NaN fails too
        raise ValueError(f"loss weights: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def target_disagreement(target_classes: Mapping, original_classes: Mapping, original_has_face) -> Dict:
    """{attribute: [N] bool}: the image's target class differs from the original image's class
    (True where the original has no face). Both inputs: {attribute: [N] class indices}."""
    if set(target_classes) != set(original_classes):
        raise ValueError(f"target_disagreement: target attributes {sorted(target_classes)} differ from the "
                         f"original's {sorted(original_classes)}")
    no_face = ~original_has_face.bool()
    return {name: (target_classes[name] != original_classes[name]) | no_face for name in target_classes}


def semantic_weights(differs: Mapping, has_face, face_mask, weights: LossWeights):
    """Per-image weights w [N] and the per-pixel gradient map [N, 1, H, W] (lambda / w; 0 where w = 0).

    differs: {attribute: [N] bool} from `target_disagreement`; has_face: [N] bool (the finetuned
    image); face_mask: [N, 1, H, W] in [0, 1] (1 inside the face region), or None (map [N, 1, 1, 1]).
    """
    if not differs:
        raise ValueError("semantic_weights: `differs` needs at least one attribute")
    has_face = has_face.bool()
    every = {name: torch.ones_like(has_face) for name in differs}
    differs = {name: d.bool().to(has_face.device) for name, d in differs.items()}
    agrees = ~torch.stack(list(differs.values())).any(0)
    no_face = (weights.value("lambda_img_2", every) if weights.lambda_img_no_face is None
               else torch.full(has_face.shape, weights.lambda_img_no_face, device=has_face.device))
    outside = torch.where(agrees, weights.value("lambda_img_1", every), weights.value("lambda_img_2", differs))
    inside = torch.where(agrees, weights.value("lambda_img_1", every), weights.value("lambda_img_3", differs))
    if face_mask is None:
        face_mask = torch.zeros(len(has_face), 1, 1, 1, device=has_face.device)
    outside = torch.where(has_face, outside, no_face).to(face_mask)[:, None, None, None]
    inside = torch.where(has_face, inside, no_face).to(face_mask)[:, None, None, None]
    pixel = outside + (inside - outside) * face_mask
    image_weight = pixel.flatten(1).amax(1)
    safe = torch.where(image_weight > 0, image_weight, torch.ones_like(image_weight))
    return image_weight, pixel / safe[:, None, None, None]


def face_box_mask(boxes, height, width, has_face=None) -> torch.Tensor:
    """[N, 1, H, W] float mask, 1 inside the [N, 4] (x0, y0, x1, y1) pixel boxes; 0 where has_face [N] is
    False."""
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"face_box_mask: boxes of shape {tuple(boxes.shape)}, expected [N, 4] (x0, y0, x1, y1)")
    if has_face is not None and tuple(has_face.shape) != (len(boxes),):  # one flag would pass for every box
        raise ValueError(f"face_box_mask: has_face of shape {tuple(has_face.shape)}, expected [{len(boxes)}], one "
                         "flag per box")
    boxes = boxes.float()
    ys = torch.arange(height, device=boxes.device)[:, None] + 0.5  # pixel centres
    xs = torch.arange(width, device=boxes.device)[None, :] + 0.5
    x0, y0, x1, y1 = (boxes[:, i, None, None] for i in range(4))
    mask = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    if has_face is not None:
        mask &= has_face.bool()[:, None, None]
    return mask[:, None].float()


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (scale,) = ctx.saved_tensors
        return grad * scale, None


def scale_gradient(x: torch.Tensor, scale) -> torch.Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by `scale` (a number or a tensor that
    broadcasts to x's shape without growing it)."""
    scale = torch.as_tensor(scale).detach().to(x)
    try:
        grows = torch.broadcast_shapes(scale.shape, x.shape) != x.shape
    except RuntimeError:
        grows = True
    if grows:  # autograd would sum the larger gradient back onto x's shape: other numbers, no error
        raise ValueError(f"scale_gradient: scale of shape {tuple(scale.shape)} does not broadcast to x's "
                         f"{tuple(x.shape)}; give a number or a tensor of x's shape (or one that broadcasts to it)")
    return _ScaleGradient.apply(x, scale)


def combine_losses(align, semantics: Mapping, face, image_weight, weights: LossWeights) -> dict:
    """Total loss and every component, each the mean over the N images of the batch.

    align, face: [N] per-image losses (0 where an image has no face / no confident target);
    semantics: {encoder name: [N]} 1 - cos; image_weight: [N] from `semantic_weights`.
    Returns {"loss", "align", "img" (weighted), "img_unweighted", "face", "img/<name>" per encoder}.
    """
    img = sum(semantics.values())
    parts = {
        "align": align.mean(),
        "img": (image_weight * img).mean(),
        "img_unweighted": img.mean(),
        "face": face.mean(),
        **{f"img/{name}": value.mean() for name, value in semantics.items()},
    }
    parts["loss"] = parts["align"] + parts["img"] + weights.lambda_face * parts["face"]
    return parts
