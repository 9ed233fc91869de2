"""The toy world's portraits: small RGB images drawn procedurally, vectorized, from a seed.

Every image shows one head and shoulders on a background. The three attributes are visible cues;
everything else is nuisance:

| attribute | classes (classifier order)      | what shows it                                      |
|-----------|---------------------------------|----------------------------------------------------|
| gender    | female, male                    | hair: long (frames the face, falls to the shoulders) / short cap |
| race      | WMELH, Asian, Black, Indian     | skin tone: four well separated palette colours      |
| age       | young, old                      | hair colour: dark / grey to white                   |

Nuisance: head position and size, roll, a sideways gaze shift of eyes and mouth, two-colour
background gradient, clothing colour, small colour jitter of skin and hair.

The face (skin ellipse with two eyes and a mouth) is the region the toy face detector finds; its
axis-aligned bounding box is returned as ``boxes`` (continuous pixel coordinates, (0, 0, W, H) is
the whole image, the convention of ``fastfair.faces``).
"""
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from fastfair.classifiers.heads import AGE, GENDER

# the toy's own race order (SKIN_TONES' rows, the shipped classifiers' outputs); fastfair.classifiers.RACE, the
# public classifiers' output order, lists the same names as WMELH, Black, Indian, Asian
TOY_RACE = ("WMELH", "Asian", "Black", "Indian")
ATTRIBUTES: Dict[str, tuple] = {"gender": GENDER, "race": TOY_RACE, "age": AGE}
IMAGE_SIZE = 32
SKIN_TONES = torch.tensor([[0.95, 0.78, 0.68], [0.93, 0.80, 0.45], [0.38, 0.24, 0.16], [0.66, 0.44, 0.28]])
YOUNG_HAIR = torch.tensor([[0.07, 0.05, 0.05], [0.30, 0.17, 0.08], [0.48, 0.22, 0.10]])
OLD_HAIR_GREY = (0.62, 0.92)  # range of the grey level of old hair
FACE_SEMI_AXES = (5.0, 6.3)  # the face ellipse's half width and half height at scale 1, in pixels of 32
EDGE_SHARPNESS = 2.5  # 1 / soft-edge width in pixels: anti-aliasing without visible blur


@dataclass
class Portraits:
    """images [N, 3, S, S] in [-1, 1]; boxes [N, 4] face boxes (x0, y0, x1, y1); labels {attribute: [N] long}."""

    images: torch.Tensor
    boxes: torch.Tensor
    labels: Dict[str, torch.Tensor]


def check_labels(labels: Dict[str, torch.Tensor]) -> int:
    """Raise unless labels holds a long tensor [N] of valid class indices for each attribute; return N."""
    if set(labels) != set(ATTRIBUTES):
        raise ValueError(f"labels must have exactly the keys {sorted(ATTRIBUTES)}, got {sorted(labels)}")
    sizes = {name: tuple(value.shape) for name, value in labels.items()}
    if len(set(sizes.values())) != 1 or len(next(iter(sizes.values()))) != 1:
        raise ValueError(f"labels must be 1-d tensors of one length, got shapes {sizes}")
    for name, value in labels.items():
        if value.dtype != torch.long or value.numel() and (value.min() < 0 or value.max() >= len(ATTRIBUTES[name])):
            raise ValueError(f"labels[{name!r}] must be long indices in [0, {len(ATTRIBUTES[name])}), got {value}")
    return len(labels["gender"])


def random_labels(count: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Uniformly drawn labels {attribute: [count] long}."""
    return {name: torch.randint(len(classes), (count,), generator=generator) for name, classes in ATTRIBUTES.items()}


def _uniform(count: int, low: float, high: float, generator: torch.Generator, *shape) -> torch.Tensor:
    return low + (high - low) * torch.rand(count, *shape, generator=generator)


def _soft(signed_distance: torch.Tensor) -> torch.Tensor:
    """Coverage from a signed distance in pixels (positive inside)."""
    return torch.sigmoid(EDGE_SHARPNESS * signed_distance)


def _ellipse(u, v, cu, cv, au, av):
    """Soft mask of the ellipse centred (cu, cv) with semi-axes (au, av), in the frame (u, v)."""
    radius = torch.sqrt(((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 + 1e-12)
    return _soft((1 - radius) * torch.minimum(au, av))


def _paint(canvas, colour, mask):
    """Alpha-composite colour [N, 3] over canvas [N, 3, H, W] with coverage mask [N, H, W]."""
    mask = mask[:, None]
    return canvas * (1 - mask) + colour[:, :, None, None] * mask


def draw_portraits(labels: Dict[str, torch.Tensor], generator: torch.Generator, size: int = IMAGE_SIZE) -> Portraits:
    """Draw one portrait per row of labels; nuisance from generator (same labels + generator state, same images).

    Geometry is defined on a 32-pixel canvas and scaled to ``size``.
    """
    count = check_labels(labels)
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    gender, race, age = labels["gender"], labels["race"], labels["age"]
    n, g = count, generator
    # nuisance, drawn in a fixed order so a seed fixes everything
    cx, cy = 16 + _uniform(n, -3, 3, g), 14.5 + _uniform(n, -1.5, 1.5, g)
    scale = _uniform(n, 0.85, 1.15, g)
    roll = _uniform(n, -0.25, 0.25, g)
    gaze = _uniform(n, -1.0, 1.0, g)
    background_top, background_bottom = _uniform(n, 0.05, 0.95, g, 3), _uniform(n, 0.05, 0.95, g, 3)
    clothing = _uniform(n, 0.05, 0.95, g, 3)
    skin = (SKIN_TONES[race] + _uniform(n, -0.04, 0.04, g, 3)).clamp(0, 1)
    young_mix = torch.softmax(3 * torch.rand(n, len(YOUNG_HAIR), generator=g), dim=1)
    grey = _uniform(n, *OLD_HAIR_GREY, g)[:, None].expand(n, 3)
    hair = torch.where(age[:, None] == 1, grey, young_mix @ YOUNG_HAIR) + _uniform(n, -0.03, 0.03, g, 3)
    hair = hair.clamp(0, 1)

    # pixel centres in the 32-pixel frame, and each head's rotated frame (u right, v down)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) * (IMAGE_SIZE / size)
    y, x = coords[None, :, None], coords[None, None, :]
    cx_, cy_, cos, sin = (t[:, None, None] for t in (cx, cy, torch.cos(roll), torch.sin(roll)))
    u = cos * (x - cx_) + sin * (y - cy_)
    v = -sin * (x - cx_) + cos * (y - cy_)
    half_width, half_height = FACE_SEMI_AXES[0] * scale, FACE_SEMI_AXES[1] * scale
    a, b = half_width[:, None, None], half_height[:, None, None]
    gaze_ = gaze[:, None, None]

    height_fraction = (y / IMAGE_SIZE)[:, None]
    canvas = torch.lerp(background_top[:, :, None, None], background_bottom[:, :, None, None], height_fraction)
    shoulders = _ellipse(x, y, cx_, cy_ + b + 8 * scale[:, None, None], 12 * scale[:, None, None],
                         7 * scale[:, None, None])
    canvas = _paint(canvas, clothing, shoulders)
    neck = _soft(torch.minimum(0.45 * a - u.abs(), torch.minimum(v - 0.5 * b, 1.7 * b - v)))
    canvas = _paint(canvas, skin * 0.85, neck)
    long_hair = _ellipse(u, v, 0.0, 0.15 * b, 1.38 * a, 1.45 * b) * _soft(1.3 * b - v)
    canvas = _paint(canvas, hair, long_hair * (gender == 0).float()[:, None, None])
    canvas = _paint(canvas, skin, _ellipse(u, v, 0.0, 0.0, a, b))
    hair_cap = _ellipse(u, v, 0.0, -0.12 * b, 1.15 * a, 1.05 * b) * _soft(-0.38 * b - v + 0.6 * torch.sin(u))
    canvas = _paint(canvas, hair, hair_cap)
    dark = torch.full((n, 3), 0.06)
    for side in (-1, 1):
        canvas = _paint(canvas, dark, _ellipse(u, v, side * 0.42 * a + gaze_, -0.05 * b, 0.17 * a, 0.13 * b))
    mouth_colour = torch.tensor([0.55, 0.12, 0.14]).expand(n, 3)
    canvas = _paint(canvas, mouth_colour, _ellipse(u, v, 0.7 * gaze_, 0.52 * b, 0.36 * a, 0.09 * b))

    # the face ellipse's axis-aligned bounding box, in pixels of the output size
    cos, sin = torch.cos(roll), torch.sin(roll)
    half_w = torch.sqrt((half_width * cos) ** 2 + (half_height * sin) ** 2)
    half_h = torch.sqrt((half_width * sin) ** 2 + (half_height * cos) ** 2)
    boxes = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1) * (size / IMAGE_SIZE)
    images = (canvas.clamp(0, 1) * 2 - 1).contiguous()
    return Portraits(images, boxes, {name: value.clone() for name, value in labels.items()})


def draw_random_portraits(count: int, seed: int, size: int = IMAGE_SIZE,
                          labels: Optional[Dict[str, torch.Tensor]] = None) -> Portraits:
    """``count`` portraits with uniform labels (or the given ones), fully determined by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    labels = random_labels(count, generator) if labels is None else labels
    return draw_portraits(labels, generator, size)
