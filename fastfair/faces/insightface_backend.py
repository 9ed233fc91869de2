"""insightface's detector (SCRFD / RetinaFace in a model pack such as ``buffalo_l``), as the public code used.

Optional: ``pip install insightface onnxruntime-gpu`` (or ``onnxruntime`` on CPU). Weights are never
downloaded here: ``root`` must hold ``models/<name>/`` (insightface's own layout, e.g.
``~/.insightface/models/buffalo_l/det_10g.onnx``), otherwise a clear error names the path.
"""
import os

import numpy as np

from fastfair.faces.detect import Detector, usable_faces
from fastfair.optional import MissingPackage


class InsightFaceDetector(Detector):
    """insightface ``FaceAnalysis`` restricted to detection; gives boxes, scores and 5 landmarks (kps)."""

    def __init__(self, root="~/.insightface", name="buffalo_l", det_size=(640, 640), ctx_id=0, providers=None):
        root = os.path.expanduser(root)
        model_dir = os.path.join(root, "models", name)
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(
                f"insightface model pack not found at {model_dir}: put the pack's .onnx files there "
                "(fastfair never downloads weights), or choose another detector"
            )
        try:
            from insightface.app import FaceAnalysis
        except ImportError as error:
            raise MissingPackage("the 'insightface' detector needs: pip install insightface onnxruntime") from error
        if providers is None:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        self.app = FaceAnalysis(name=name, root=root, allowed_modules=["detection"], providers=providers)
        self.app.prepare(ctx_id=ctx_id, det_size=tuple(det_size))

    def detect_array(self, rgb):
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # insightface expects OpenCV's BGR
        return usable_faces({"box": tuple(face.bbox[:4]), "score": float(face.det_score), "landmarks": face.kps}
                            for face in self.app.get(bgr))
