"""The face detection interface: images in [-1, 1] -> per image a list of faces.

Every backend sees one image at a time as a uint8 RGB array [H, W, 3] (what
off-the-shelf detectors take) and returns ``Face`` records in that image's pixel
coordinates. Detection never carries gradient: ``Detector.detect`` runs under
``torch.no_grad`` and works on a detached copy.

Coordinates: boxes are continuous (a box covering all of a W x H image is
(0, 0, W, H)); landmarks are pixel-index coordinates (pixel centres at integers,
the OpenCV / insightface convention), in the order left eye, right eye, nose,
left mouth corner, right mouth corner (the viewer's left).
"""
import math
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
import torch

from fastfair.config import DETECTOR_BACKENDS, detector_names


class UnusableBox(ValueError):
    """A face box no face can fill: empty, inverted or not finite, or landmarks collapsed to a point."""


@dataclass
class Face:
    """One detected face: ``box`` (x0, y0, x1, y1), ``score``, optional ``landmarks`` [5, 2] (x, y);
    ``whole_image``: the image taken whole as the face (`WholeImageDetector`), cropped without a margin."""

    box: tuple
    score: float = 1.0
    landmarks: Optional[np.ndarray] = None
    whole_image: bool = False

    def __post_init__(self):
        box = tuple(float(v) for v in self.box)
        if len(box) != 4 or not box[2] > box[0] or not box[3] > box[1] or not all(map(math.isfinite, box)):
            raise UnusableBox(f"Face.box must be (x0, y0, x1, y1), finite, with x1 > x0 and y1 > y0, got {self.box}")
        self.box = box
        self.score = float(self.score)
        if self.landmarks is not None:
            points = np.asarray(self.landmarks, dtype=np.float64)
            # [5, 2] (x, y) rows, or those 10 numbers flat; MTCNN's own [2, 5] (xs; ys) reshaped would mix them
            if points.shape not in ((5, 2), (10,)):
                raise ValueError(f"Face.landmarks must be 5 (x, y) points, shape (5, 2), got shape {points.shape}")
            if not np.isfinite(points).all():  # unusable as a NaN box is: the face is dropped, not the step
                raise UnusableBox(f"Face.landmarks must be finite, got {points.tolist()}")
            self.landmarks = points.reshape(5, 2)
            spread = float(np.sqrt(((self.landmarks - self.landmarks.mean(0)) ** 2).sum(1).mean()))
            if not spread > 1e-3 * max(box[2] - box[0], box[3] - box[1]):
                # a collapsed set has no similarity fit to the template: its alignment raised for the whole batch
                # (or scaled the face up by ~1e7), and a bank build stopped at that image on every rerun
                raise UnusableBox(f"Face.landmarks are collapsed to a point (spread {spread:.3g} px in a box of side "
                                  f"{max(box[2] - box[0], box[3] - box[1]):.3g})")


def to_uint8_rgb(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3] (a detached CPU copy)."""
    check_images(images)
    values = images.detach().float().cpu()
    # a decoder overshoots [-1, 1] a little (clamped below); far beyond it, the images are 0..255 pixels, on which
    # every detector would quietly find no face. Non-finite values pass (as mid-gray): a diverged step's images,
    # whose loss the trainer skips
    finite = values[values.isfinite()]
    largest = finite.abs().max().item() if finite.numel() else 0.0
    if largest > OUT_OF_RANGE:
        raise ValueError(f"images must be in [-1, 1] (pixels p as p / 127.5 - 1), got values up to {largest:g} in "
                         "magnitude: 0..255 pixels?")
    pixels = ((values.nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp(-1, 1) + 1) * 127.5).round()
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


OUT_OF_RANGE = 2.0  # |value| above which images are not [-1, 1] images (a VAE's overshoot is far smaller)


def check_images(images) -> None:
    """Raise unless ``images`` is a float tensor [N, 3, H, W]."""
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a tensor [N, 3, H, W] in [-1, 1], got {shape}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [-1, 1], got {images.dtype}")


class Detector:
    """Base class: subclasses implement ``detect_array(rgb) -> list of Face``."""

    def detect_array(self, rgb: np.ndarray) -> List[Face]:
        raise NotImplementedError

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> List[List[Face]]:
        """images [N, 3, H, W] in [-1, 1] -> N lists of faces (possibly empty)."""
        return [list(self.detect_array(rgb)) for rgb in to_uint8_rgb(images)]

    __call__ = detect


def as_face(item) -> Face:
    """Accept a Face, a dict with box/score/landmarks, or a sequence (x0, y0, x1, y1[, score])."""
    if isinstance(item, Face):
        return item
    if isinstance(item, dict):
        return Face(item["box"], item.get("score", 1.0), item.get("landmarks"))
    values = [float(v) for v in item]
    if len(values) not in (4, 5):
        raise ValueError(f"a detected face must be (x0, y0, x1, y1[, score]), a dict or a Face, got {item!r}")
    return Face(values[:4], values[4] if len(values) == 5 else 1.0)


class CallableDetector(Detector):
    """Plug in any detector function.

    ``batched=False``: ``fn(rgb uint8 [H, W, 3]) -> faces`` per image.
    ``batched=True``: ``fn(images [N, 3, H, W] in [-1, 1]) -> N lists of faces`` (called under no_grad).
    A face may be a ``Face``, a dict (box, score, landmarks) or (x0, y0, x1, y1[, score]).
    """

    def __init__(self, fn: Callable, batched: bool = False):
        if not callable(fn):
            raise TypeError(f"CallableDetector needs a callable, got {type(fn).__name__}")
        self.fn, self.batched = fn, batched

    def detect_array(self, rgb):
        return usable_faces(self.fn(rgb))

    @torch.no_grad()
    def detect(self, images):
        if not self.batched:
            return super().detect(images)
        check_images(images)
        per_image = list(self.fn(images.detach()))
        if len(per_image) != images.shape[0]:
            raise ValueError(f"batched detector returned {len(per_image)} lists for {images.shape[0]} images")
        return [usable_faces(faces) for faces in per_image]

    __call__ = detect


class WholeImageDetector(Detector):
    """Treats every image as one face filling the frame: for folders of already-cropped faces."""

    def detect_array(self, rgb):
        height, width = rgb.shape[:2]
        return [Face((0, 0, width, height), whole_image=True)]


class FallbackDetector(Detector):
    """Detectors tried in order: each image takes the faces of the first one that finds any.

    The public code did this with insightface, then face_recognition for the images it missed.
    """

    def __init__(self, detectors: Sequence):
        if not detectors:
            raise ValueError("FallbackDetector needs at least one detector")
        self.detectors = [get_detector(d) for d in detectors]

    @torch.no_grad()
    def detect(self, images):
        results = self.detectors[0].detect(images)
        for detector in self.detectors[1:]:
            missed = [i for i, faces in enumerate(results) if not faces]
            if not missed:
                break
            for i, faces in zip(missed, detector.detect(images[missed])):
                results[i] = faces
        return results

    __call__ = detect


BACKENDS = DETECTOR_BACKENDS


def detector_hook(spec: str, key: str) -> Callable:
    """The 'package.module:function' detector ``spec`` names (``key``: its config key or flag), imported and its
    signature checked now: it is called per image, mid-run or after the images are made."""
    from fastfair.hooks import check_call, load_callable

    function = load_callable(spec, key)
    check_call(function, spec, key, (None,), "detector(rgb uint8 [H, W, 3]) -> faces")
    return function


def get_detector(spec: Union[str, Detector, Callable, list] = "opencv", **options) -> Detector:
    """A detector from a backend name (``opencv``, ``insightface``, ``mtcnn``, ``none``), a Detector, a
    callable (see ``CallableDetector``), or a list of these tried in order (``FallbackDetector``).

    ``options`` go to the backend's constructor (e.g. ``root=`` for insightface).
    """
    if isinstance(spec, Detector):
        return spec
    if isinstance(spec, (list, tuple)):
        return FallbackDetector(spec)
    if callable(spec):
        return CallableDetector(spec, **options)
    if spec == "opencv":
        from fastfair.faces.haar import HaarDetector

        return HaarDetector(**options)
    if spec == "insightface":
        from fastfair.faces.insightface_backend import InsightFaceDetector

        return InsightFaceDetector(**options)
    if spec == "mtcnn":
        from fastfair.faces.mtcnn_backend import MTCNNDetector

        return MTCNNDetector(**options)
    if spec == "none":
        return WholeImageDetector()
    raise ValueError(f"unknown face detector {spec!r}: use one of {BACKENDS}, a Detector or a callable")


def detector_from_flags(spec: str, path: Optional[str] = None):
    """--detector: a backend, package.module:function, or a comma-separated list tried in order per image (the
    public code: insightface, then another detector for the images it missed); --detector-path: insightface's
    local model root (faces.detector_path in a run config). Returns a spec for ``get_detector``; shared by
    python -m fastfair.evaluate and python -m fastfair.faces.build_bank, so both read the flags alike."""
    names = detector_names(spec)
    unknown = [name for name in names if name not in BACKENDS and ":" not in name]
    if not names or unknown:
        raise ValueError(f"--detector {spec!r}: expected {' | '.join(BACKENDS)} | package.module:function, or a "
                         "comma-separated list of them tried in order (e.g. insightface,mtcnn)")
    if path and "insightface" not in names:
        raise ValueError(f"--detector-path {path}: the insightface model root, but --detector {spec!r} has no "
                         "insightface")
    detectors = []
    for name in names:
        if ":" in name:  # package.module:function
            detectors.append(detector_hook(name, "--detector"))
        elif name == "insightface" and path:
            detectors.append(get_detector(name, root=path))
        else:
            detectors.append(name)
    return detectors[0] if len(detectors) == 1 else detectors


def faces_from_arrays(boxes: Sequence, scores: Optional[Sequence] = None, landmarks: Optional[Sequence] = None):
    """Zip a backend's parallel arrays (boxes [n, 4], scores [n], landmarks [n, 5, 2]) into Faces (`usable_faces`)."""
    return usable_faces({"box": tuple(box[:4]), "score": 1.0 if scores is None else scores[i],
                         "landmarks": None if landmarks is None else landmarks[i]}
                        for i, box in enumerate([] if boxes is None else boxes))


def usable_faces(items) -> List[Face]:
    """A detector's faces (`as_face` forms) with the boxes no face can fill left out, warned of: an empty or
    inverted box, a non-finite coordinate, landmarks collapsed to a point (one such box raised and ended the whole
    training step or batch)."""
    if items is None or isinstance(items, (str, bytes, dict)) or not hasattr(items, "__iter__"):  # None: nameless
        raise ValueError(f"a face detector returned a {type(items).__name__} for an image: expected a list of its "
                         "faces (boxes (x0, y0, x1, y1[, score]), dicts or Face), empty where it finds none")
    faces = []
    for item in items:
        try:
            faces.append(as_face(item))
        except UnusableBox as error:  # another error (a wrong format) is the detector's output, not one box
            warnings.warn(f"a face detector returned a box no face can fill, left out: {error}", stacklevel=2)
    return faces
