"""MTCNN from facenet-pytorch (its wheel ships the MTCNN weights, so it works offline).

facenet-pytorch pins an old torch; install it without its dependencies so it keeps yours:
``pip install --no-deps facenet-pytorch`` (it also needs an importable torchvision).
"""
import numpy as np

from fastfair.faces.detect import Detector, faces_from_arrays
from fastfair.optional import MissingPackage


class MTCNNDetector(Detector):
    """``facenet_pytorch.MTCNN(keep_all=True).detect(..., landmarks=True)``; landmarks in the template's order."""

    def __init__(self, device="cpu", min_face_size=20, thresholds=(0.6, 0.7, 0.7)):
        try:
            from facenet_pytorch import MTCNN
        except ImportError as error:
            raise MissingPackage(
                "the 'mtcnn' detector needs facenet-pytorch: pip install --no-deps facenet-pytorch "
                "(it pins an old torch; --no-deps keeps yours) and an importable torchvision"
            ) from error
        self.mtcnn = MTCNN(keep_all=True, device=device, min_face_size=min_face_size, thresholds=list(thresholds))

    def detect_array(self, rgb):
        boxes, scores, landmarks = self.mtcnn.detect(np.ascontiguousarray(rgb), landmarks=True)
        return faces_from_arrays(boxes, scores, landmarks)
