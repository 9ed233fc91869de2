"""The toy face detector: a tiny CenterNet-style CNN that finds the face of toy portraits.

The network maps a 32x32 image to an 8x8 grid (stride 4); each cell predicts a face-centre score and
the box (centre offset within the cell, log width and height). Training: world portraits (target
score exp(-d^2 / (2 * 0.5^2)) for a cell at distance d cells from the face centre, boxes regressed
at cells with target > 0.3) and as many face-free images (uniform, Gaussian and smooth noise, colour
gradients, portraits cut into shuffled 8x8 tiles), all blurred and noised like decoded images.
Detection: local maxima of the score map above ``SCORE_THRESHOLD``, in pixel coordinates of the
input (other sizes are resized to 32 first and the boxes scaled back).
"""
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastfair.toy.augment import degrade
from fastfair.toy.files import load_module, save_module
from fastfair.toy.training import fit
from fastfair.toy.world import IMAGE_SIZE, draw_random_portraits

STRIDE = 4
SCORE_THRESHOLD = 0.3
TARGET_SIGMA = 0.5  # cells
REGRESS_FROM = 0.3  # regress boxes at cells whose target score exceeds this
Box = Tuple[float, float, float, float, float]


def conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(4, cout), nn.SiLU())


class ToyDetectorNet(nn.Module):
    """[N, 3, 32, 32] -> [N, 5, 8, 8]: score logit, centre offset (dx, dy) in cells, log(w / 4), log(h / 4)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(conv(3, width), conv(width, 2 * width, 2), conv(2 * width, 2 * width),
                                  conv(2 * width, 4 * width, 2), conv(4 * width, 4 * width), conv(4 * width, 4 * width))
        self.head = nn.Conv2d(4 * width, 5, 1)

    def forward(self, images):
        return self.head(self.body(images))


class ToyFaceDetector:
    """images [N, 3, H, W] in [-1, 1] -> per image a list of (x0, y0, x1, y1, score), no grad; or one uint8
    RGB array [H, W, 3] -> its list.

    Plugs into ``fastfair.faces`` as ``CallableDetector(detector, batched=True)`` (tensors) or
    ``CallableDetector(detector)`` (one uint8 array at a time).
    """

    def __init__(self, network: ToyDetectorNet, threshold: float = SCORE_THRESHOLD):
        self.network = network.eval().requires_grad_(False)
        self.threshold = threshold

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> List[List[Box]]:
        if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 3:
            return self(torch.from_numpy(images).permute(2, 0, 1)[None].float() / 127.5 - 1)[0]
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError("images must be a tensor [N, 3, H, W] in [-1, 1] or a uint8 array [H, W, 3], got "
                             f"{getattr(images, 'shape', images)}")
        height, width = images.shape[-2:]
        # the network follows the images (the trainer detects on its device, evaluation on the CPU): it is not a
        # module of the trainer's, so nothing else moves it
        if next(self.network.parameters()).device != images.device:
            self.network.to(images.device)
        images = images.detach().float()
        if (height, width) != (IMAGE_SIZE, IMAGE_SIZE):
            images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        output = self.network(images)
        scores = torch.sigmoid(output[:, 0])
        peaks = (scores == F.max_pool2d(scores[:, None], 3, 1, 1)[:, 0]) & (scores > self.threshold)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32,
                             device=images.device)[None, :, None, None] / IMAGE_SIZE
        boxes = decode_boxes(output[:, 1:]) * scale
        return [[(*boxes[i, :, y, x].tolist(), scores[i, y, x].item()) for y, x in peaks[i].nonzero().tolist()]
                for i in range(images.shape[0])]


def cell_centres(cells: int, device=None) -> torch.Tensor:
    return (torch.arange(cells, dtype=torch.float32, device=device) + 0.5) * STRIDE


def decode_boxes(regression: torch.Tensor) -> torch.Tensor:
    """[N, 4, h, w] (dx, dy, log w/4, log h/4) -> [N, 4, h, w] boxes (x0, y0, x1, y1) in pixels."""
    cells = regression.shape[-1]
    centres = cell_centres(cells, regression.device)
    cx = centres[None, None, :] + regression[:, 0] * STRIDE
    cy = centres[None, :, None] + regression[:, 1] * STRIDE
    half_w, half_h = torch.exp(regression[:, 2]) * STRIDE / 2, torch.exp(regression[:, 3]) * STRIDE / 2
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)


def detection_targets(boxes: torch.Tensor, cells: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """True boxes [N, 4] -> (score targets [N, h, w], regression targets [N, 4, h, w])."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    size = boxes[:, 2:] - boxes[:, :2]
    grid = cell_centres(cells, boxes.device)
    dx = (centre[:, 0, None, None] - grid[None, None, :]) / STRIDE  # [N, 1, w]
    dy = (centre[:, 1, None, None] - grid[None, :, None]) / STRIDE  # [N, h, 1]
    scores = torch.exp(-(dx ** 2 + dy ** 2) / (2 * TARGET_SIGMA ** 2))
    log_size = torch.log(size / STRIDE)[:, :, None, None].expand(-1, -1, cells, cells)
    regression = torch.cat([torch.stack([dx.expand(-1, cells, -1), dy.expand(-1, -1, cells)], dim=1), log_size], 1)
    return scores, regression


def face_free_images(count: int, generator: torch.Generator) -> torch.Tensor:
    """[count, 3, 32, 32] in [-1, 1] without a face: five kinds of noise and clutter, in turn."""
    size = IMAGE_SIZE
    uniform = torch.rand(count, 3, size, size, generator=generator) * 2 - 1
    gaussian = (torch.randn(count, 3, size, size, generator=generator) * 0.5).clamp(-1, 1)
    smooth = F.interpolate(torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1, size=size, mode="bicubic",
                           align_corners=False).clamp(-1, 1)
    ramp = torch.linspace(0, 1, size)[None, None, :, None]
    top, bottom = (torch.rand(count, 3, 1, 1, generator=generator) * 2 - 1 for _ in range(2))
    gradient = (top + (bottom - top) * ramp).expand(-1, -1, -1, size)
    tiles = draw_random_portraits(count, int(torch.randint(2 ** 31, (), generator=generator))).images
    tiles = tiles.reshape(count, 3, 4, 8, 4, 8).permute(0, 1, 2, 4, 3, 5).reshape(count, 3, 16, 8, 8)
    order = torch.argsort(torch.rand(count, 16, generator=generator), dim=1)
    tiles = torch.gather(tiles, 2, order[:, None, :, None, None].expand_as(tiles))
    shuffled = tiles.reshape(count, 3, 4, 4, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(count, 3, size, size)
    kind = torch.arange(count) % 5
    choices = torch.stack([uniform, gaussian, smooth, gradient, shuffled])  # [5, N, 3, H, W]
    return choices[kind, torch.arange(count)]


def detector_loss(network: ToyDetectorNet, images: torch.Tensor, boxes: torch.Tensor, has_face: torch.Tensor):
    output = network(images)
    cells = output.shape[-1]
    score_target, box_target = detection_targets(boxes, cells)
    score_target = score_target * has_face[:, None, None]
    score_loss = F.binary_cross_entropy_with_logits(output[:, 0], score_target, reduction="sum") / images.shape[0]
    where = (score_target > REGRESS_FROM)[:, None].expand_as(box_target)
    box_loss = F.smooth_l1_loss(output[:, 1:][where], box_target[where], beta=0.1)
    return score_loss + box_loss


def train_toy_detector(steps: int, batch_size: int, seed: int, lr: float = 2e-3) -> ToyFaceDetector:
    torch.manual_seed(seed)
    network = ToyDetectorNet()
    generator = torch.Generator().manual_seed(seed)
    half = batch_size // 2

    def loss_at(step):
        portraits = draw_random_portraits(half, seed=seed * 100_003 + step)
        images = degrade(torch.cat([portraits.images, face_free_images(batch_size - half, generator)]), generator)
        boxes = torch.cat([portraits.boxes, portraits.boxes[: batch_size - half]])  # the second half's are unused
        has_face = (torch.arange(batch_size) < half).float()
        return detector_loss(network, images, boxes, has_face)

    network.train()
    fit(list(network.parameters()), loss_at, steps, lr, "face detector", weight_decay=1e-4)
    return ToyFaceDetector(network)


def save_toy_detector(detector: ToyFaceDetector, folder: str, info: Optional[dict] = None) -> None:
    config = {"stride": STRIDE, "threshold": detector.threshold, "input_size": IMAGE_SIZE, **(info or {})}
    save_module(detector.network, folder, "detector", config)


def load_toy_detector(weights_dir: Optional[str] = None) -> ToyFaceDetector:
    """The shipped (or ``weights_dir``'s) toy face detector."""
    network, config = load_module("detector", lambda config: ToyDetectorNet(), weights_dir)
    return ToyFaceDetector(network, config["threshold"])


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise IoU of boxes a, b [N, 4]."""
    low, high = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    intersection = (high - low).clamp(min=0).prod(dim=1)
    area_a, area_b = ((boxes[:, 2:] - boxes[:, :2]).prod(dim=1) for boxes in (a, b))
    return intersection / (area_a + area_b - intersection)


def detection_rate(detector: ToyFaceDetector, images: torch.Tensor, boxes: torch.Tensor, min_iou: float = 0.5):
    """Fraction of images whose highest-scoring detection overlaps the true box with IoU >= min_iou."""
    found = torch.zeros(len(images), 4)
    hit = torch.zeros(len(images), dtype=torch.bool)
    for i, detections in enumerate(detector(images)):
        if detections:
            found[i] = torch.tensor(max(detections, key=lambda d: d[4])[:4])
            hit[i] = True
    return (hit & (box_iou(found, boxes.float()) >= min_iou)).double().mean().item()
