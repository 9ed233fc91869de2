"""OpenCV Haar-cascade face detector: the default offline backend.

The frontal-face cascades ship inside opencv-python(-headless) 4.x wheels
(``cv2.data.haarcascades``); 5.x wheels ship none, hence the ``<5`` pin of the
``faces`` extra. Haar gives boxes and a confidence (the final stage's weight)
but no landmarks; the aligned crop then estimates them from the box.
"""
import os

import numpy as np

from fastfair.faces.detect import Detector, faces_from_arrays
from fastfair.optional import MissingPackage


def _cv2():
    try:
        import cv2
    except ImportError as error:
        raise MissingPackage(
            "the 'opencv' face detector needs OpenCV 4.x: pip install 'opencv-python-headless>=4.8,<5' "
            "(or fastfair[faces])"
        ) from error
    return cv2


class HaarDetector(Detector):
    """``cv2.CascadeClassifier`` on the grey image.

    cascade: a file name inside ``cv2.data.haarcascades`` or a path to a cascade XML.
    scale_factor, min_neighbors: detectMultiScale's; min_size_fraction: the smallest face side as
    a fraction of the image's shorter side (rejects tiny false positives).
    """

    def __init__(self, cascade="haarcascade_frontalface_default.xml", scale_factor=1.1, min_neighbors=5,
                 min_size_fraction=0.1):
        cv2 = _cv2()
        path = cascade if os.path.isfile(cascade) else os.path.join(getattr(cv2.data, "haarcascades", ""), cascade)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Haar cascade {cascade!r} not found (looked in cv2.data.haarcascades); OpenCV 5.x wheels ship "
                "no cascades: install opencv-python-headless<5 or pass a path to a cascade XML"
            )
        self.classifier = cv2.CascadeClassifier(path)
        if self.classifier.empty():
            raise ValueError(f"could not load the Haar cascade {path}")
        if scale_factor <= 1:
            raise ValueError(f"scale_factor must be > 1, got {scale_factor}")
        self.scale_factor, self.min_neighbors, self.min_size_fraction = scale_factor, min_neighbors, min_size_fraction

    def detect_array(self, rgb):
        cv2 = _cv2()
        grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        side = max(1, int(self.min_size_fraction * min(grey.shape)))
        rects, _, weights = self.classifier.detectMultiScale3(
            grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(side, side),
            outputRejectLevels=True,
        )
        boxes = [(x, y, x + w, y + h) for x, y, w, h in np.asarray(rects).reshape(-1, 4)]
        return faces_from_arrays(boxes, np.asarray(weights, dtype=np.float64).reshape(-1))
