"""The toy attribute classifiers: face crops -> logits over [gender 2 | race 4 | age 2].

Two independent models (seed 0124): ``train`` (the alignment loss's; fastfair's ``SmallCNN``, seed
11) and ``eval`` (evaluation only; ``ToyResNet`` below, other architecture, normalization and seed).

Input: face crops in [-1, 1] as ``fastfair.faces`` makes them: the detector's box made square with
margin 0.5 (``select_largest``'s default), resized to ``input_size`` (32). Training draws margins in
[0.2, 1.0] with the centre jittered, and 20 % whole images, so whole 32x32 images work too (the train
model less well there: gender 95 %, race 98 %, against > 99 % on crops); other
input sizes are resized (bilinear, antialiased, differentiable). Crops are blurred and noised in
training so the decoded images of the toy model are in distribution.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from fastfair.classifiers.heads import Attribute, AttributeHead
from fastfair.classifiers.small_cnn import SmallCNN
from fastfair.faces.crop import crop_boxes
from fastfair.faces.regions import square_boxes
from fastfair.toy.augment import degrade
from fastfair.toy.files import load_module_files, save_module
from fastfair.toy.training import fit
from fastfair.toy.world import ATTRIBUTES, IMAGE_SIZE, Portraits, draw_random_portraits

KINDS = {
    "train": dict(arch="small_cnn", options={"width": 16}, seed=11),
    "eval": dict(arch="toy_resnet", options={"width": 16}, seed=23),
}
WHOLE_IMAGE_SHARE = 0.2


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(4, channels), nn.GELU(),
                                  nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(4, channels))

    def forward(self, x):
        return F.gelu(x + self.body(x))


class ToyResNet(nn.Module):
    """[N, 3, H, W] -> logits [N, num_outputs]: 5x5 stem, residual stages with max pooling, GroupNorm,
    then average and max pooling side by side into a linear head."""

    def __init__(self, num_outputs: int, width: int = 24):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 5, padding=2), nn.GroupNorm(4, width), nn.GELU(), ResidualBlock(width),
            nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), ResidualBlock(2 * width),
            nn.MaxPool2d(2), nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.GELU())
        self.classifier = nn.Linear(8 * width, num_outputs)

    def forward(self, x):
        features = self.features(x)
        return self.classifier(torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1))


ARCHITECTURES = {"small_cnn": SmallCNN, "toy_resnet": ToyResNet}


class ToyClassifier(nn.Module):
    """crops [N, 3, H, W] in [-1, 1] -> logits [N, 8] ([gender 2 | race 4 | age 2], ``head`` names them).

    Same interface as ``fastfair.classifiers.AttributeClassifier`` (``head``, ``input_size``,
    ``probabilities``); inputs of another size are resized to ``input_size`` first.
    """

    antialias = False  # trained on crop_boxes' bilinear samples (face_crops): judged on the same

    def __init__(self, arch: str, options: Dict, input_size: int = IMAGE_SIZE):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown toy classifier architecture {arch!r}: use one of {sorted(ARCHITECTURES)}")
        self.head = AttributeHead([Attribute(name, classes) for name, classes in ATTRIBUTES.items()])
        self.arch, self.options, self.input_size = arch, dict(options), input_size
        self.network = ARCHITECTURES[arch](self.head.num_outputs, **options)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"toy classifier input must be [N, 3, H, W] in [-1, 1], got {tuple(images.shape)}")
        if images.shape[-2:] != (self.input_size, self.input_size):
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return self.network(images)

    def probabilities(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{attribute: probabilities [N, K]}."""
        return self.head.probabilities(self(images))


def face_crops(portraits: Portraits, generator: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Training crops: square boxes around the true face boxes, margin ~ U(0.2, 1.0), centre jittered by up
    to 10 % of the box; a ``WHOLE_IMAGE_SHARE`` of rows is the whole image instead."""
    count = portraits.images.shape[0]
    margin = 0.2 + 0.8 * torch.rand(count, 1, generator=generator, dtype=torch.float64)
    boxes = portraits.boxes.to(torch.float64)
    side = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True)
    jitter = 0.1 * side * (2 * torch.rand(count, 2, generator=generator, dtype=torch.float64) - 1)
    centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2 + jitter, side * (1 + margin) / 2
    crops = torch.cat([centre - half, centre + half], dim=1)
    height, width = portraits.images.shape[-2:]
    whole = torch.rand(count, generator=generator) < WHOLE_IMAGE_SHARE
    crops[whole] = torch.tensor([0.0, 0.0, float(width), float(height)], dtype=torch.float64)
    return crop_boxes(portraits.images, crops, size)


def labels_tensor(labels: Dict[str, torch.Tensor]) -> torch.Tensor:
    """{attribute: [N]} -> [N, A] in head order."""
    return torch.stack([labels[name] for name in ATTRIBUTES], dim=1)


def attribute_loss(classifier: ToyClassifier, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the mean cross-entropy."""
    parts = classifier.head.split(logits)
    return sum(F.cross_entropy(parts[name], labels[:, i]) for i, name in enumerate(ATTRIBUTES))


@torch.no_grad()
def accuracy(classifier: nn.Module, images: torch.Tensor, labels: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """{attribute: fraction of images whose argmax class is the label}."""
    parts = classifier.head.split(classifier(images))
    return {name: (parts[name].argmax(dim=1) == labels[name]).double().mean().item() for name in ATTRIBUTES}


def heldout_crops(count: int, seed: int) -> tuple:
    """Held-out check data: (crops with margin 0.5 around the true boxes [count, 3, 32, 32], labels)."""
    portraits = draw_random_portraits(count, seed)
    return crop_boxes(portraits.images, square_boxes(portraits.boxes.double(), 0.5), IMAGE_SIZE), portraits.labels


def train_toy_classifier(kind: str, steps: int, batch_size: int, data_seed: int, lr: float = 2e-3):
    """A trained ``ToyClassifier`` of ``kind`` ("train" / "eval"), in eval mode."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    spec = KINDS[kind]
    torch.manual_seed(spec["seed"])
    classifier = ToyClassifier(spec["arch"], spec["options"])
    generator = torch.Generator().manual_seed(spec["seed"] * 7919 + data_seed)

    def loss_at(step):
        portraits = draw_random_portraits(batch_size, seed=(spec["seed"] * 7919 + data_seed) * 100_003 + step)
        crops = degrade(face_crops(portraits, generator), generator)
        return attribute_loss(classifier, classifier(crops), labels_tensor(portraits.labels))

    classifier.train()
    fit(list(classifier.parameters()), loss_at, steps, lr, f"{kind} classifier", weight_decay=1e-4)
    return classifier.eval()


def save_toy_classifier(classifier: ToyClassifier, kind: str, folder: str, info: Optional[Dict] = None) -> None:
    config = {"kind": kind, "arch": classifier.arch, "options": classifier.options,
              "input_size": classifier.input_size, "attributes": [[n, list(c)] for n, c in ATTRIBUTES.items()],
              "input": "face crop in [-1, 1]: the face box made square with margin 0.5 (0.2-1.0 and whole "
                       "images also work)", **(info or {})}
    save_module(classifier.network, folder, f"classifier_{kind}", config)


def load_toy_classifier(kind: str = "train", weights_dir: Optional[str] = None) -> ToyClassifier:
    """The shipped (or ``weights_dir``'s) toy classifier: "train" for the alignment loss, "eval" for evaluation;
    eval mode, frozen."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    state, config = load_module_files(f"classifier_{kind}", weights_dir)
    classifier = ToyClassifier(config["arch"], config["options"], config["input_size"])
    classifier.network.load_state_dict(state)
    return classifier.eval().requires_grad_(False)
