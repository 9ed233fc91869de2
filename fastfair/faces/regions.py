"""From detections to one face region per image: the largest-face rule, square crop boxes.

Seed 0109 / 0124: an image with several faces is represented by the one covering the largest area;
an image without a face is marked (``found`` False) and gets the whole image as a stand-in region so
that every downstream tensor stays finite.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

from fastfair.faces.align import template_in_box
from fastfair.faces.detect import Detector, Face, get_detector


@dataclass
class FaceRegions:
    """One face per image, as tensors (N images, float64 coordinates).

    found [N] bool; boxes [N, 4] the chosen detector box (x0, y0, x1, y1), as the detector gave it: a face cut by
    the frame keeps its box past the edge, so its crop stays centred on the face and of the face's size, as the
    public code's expand_bbox grows the raw box; crop_boxes [N, 4] squares around ``boxes`` enlarged by the
    margin (they may leave the image: crops pad);
    landmarks [N, 5, 2] the detector's, or estimated from the box; has_landmarks [N] bool; scores [N].
    The face-region mask of the semantics loss is ``fastfair.losses.weights.face_box_mask(crop_boxes, H, W, found)``:
    the region the classifier judges.
    """

    found: torch.Tensor
    boxes: torch.Tensor
    crop_boxes: torch.Tensor
    landmarks: torch.Tensor
    has_landmarks: torch.Tensor
    scores: torch.Tensor


def clipped_area(face: Face, height: int, width: int) -> float:
    """Area of the face's box inside the image (the public code's largest-face criterion)."""
    x0, y0, x1, y1 = face.box
    return max(0.0, min(x1, width) - max(x0, 0)) * max(0.0, min(y1, height) - max(y0, 0))


def square_boxes(boxes: torch.Tensor, margin) -> torch.Tensor:
    """Squares centred on boxes [N, 4], side = longer side * (1 + margin); margin a number or [N, 1]."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(dim=1, keepdim=True).values * (1 + margin) / 2
    return torch.cat([centre - half, centre + half], dim=1)


def select_largest(detections: List[List[Face]], height: int, width: int, margin: float = 0.5,
                   device: Optional[torch.device] = None) -> FaceRegions:
    """Apply the largest-face rule to N lists of faces of H x W images; see ``FaceRegions``.

    margin: how much the square crop box exceeds the face box (0.5 = the public code's expand_coef).
    """
    if not 0 <= margin < float("inf"):  # NaN too
        raise ValueError(f"margin must be finite and >= 0, got {margin}")
    whole = (0.0, 0.0, float(width), float(height))
    count = len(detections)
    found = torch.zeros(count, dtype=torch.bool)
    boxes = torch.tensor([whole] * count, dtype=torch.float64).reshape(count, 4)
    scores = torch.zeros(count, dtype=torch.float64)
    has_landmarks = torch.zeros(count, dtype=torch.bool)
    landmarks = torch.zeros(count, 5, 2, dtype=torch.float64)
    # an image taken whole (detector none, also as the last of a fallback list) is cropped as a classifier's
    # training read its face folders (classifiers.data.load_face_image): the centred square of the shorter side,
    # no margin; a margin, or a square of the longer side, would put it inside padding it never saw there
    margins = torch.full((count, 1), float(margin), dtype=torch.float64)
    whole_image = torch.zeros(count, dtype=torch.bool)
    for i, faces in enumerate(detections):
        visible = [face for face in faces if clipped_area(face, height, width) > 0]
        if not visible:
            continue
        face = max(visible, key=lambda f: clipped_area(f, height, width))
        boxes[i] = torch.tensor(face.box, dtype=torch.float64)
        found[i], scores[i] = True, face.score
        if face.whole_image:
            margins[i], whole_image[i] = 0.0, True
        if face.landmarks is not None:
            landmarks[i], has_landmarks[i] = torch.from_numpy(face.landmarks), True
    estimated = template_in_box(boxes)
    landmarks = torch.where(has_landmarks[:, None, None], landmarks, estimated)
    side = min(height, width)
    centred = torch.tensor([(width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2],
                           dtype=torch.float64)
    crop_boxes = torch.where(whole_image[:, None], centred, square_boxes(boxes, margins))
    regions = FaceRegions(found, boxes, crop_boxes, landmarks, has_landmarks, scores)
    if device is not None:
        regions = FaceRegions(*(getattr(regions, f).to(device) for f in FaceRegions.__dataclass_fields__))
    return regions


def locate_faces(images: torch.Tensor, detector="opencv", margin: float = 0.5) -> FaceRegions:
    """Detect (no grad) and select the largest face of each image [N, 3, H, W] in [-1, 1]. An image a detector
    takes whole as the face (``WholeImageDetector``: folders of face crops; alone or last in a fallback list) is
    cropped to the centred square of its shorter side, without margin, as classifier training reads face
    folders: a margin, or a square of the longer side, would put the face inside padding it never saw there."""
    detector = detector if isinstance(detector, Detector) else get_detector(detector)
    detections = detector.detect(images)
    return select_largest(detections, images.shape[-2], images.shape[-1], margin, device=images.device)
