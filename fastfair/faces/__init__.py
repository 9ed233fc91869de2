"""Faces: detection (no grad), the largest-face rule, differentiable crops, alignment, embeddings, the bank.

Typical use inside a training step (images [N, 3, H, W] in [-1, 1], with grad)::

    regions = locate_faces(images, detector)                          # no grad
    crops = crop_boxes(images, regions.crop_boxes, 224)               # classifier input, differentiable
    aligned = align_faces(images, regions.landmarks.float(), 112)     # embedding input, differentiable
    embeddings = embedder(aligned)                                    # FaceEmbedder
    # use only rows where regions.found
"""
from fastfair.faces.align import TEMPLATE_112, align_faces, similarity_transform, template_in_box
from fastfair.faces.bank import FaceBank
from fastfair.faces.crop import crop_boxes, warp_affine
from fastfair.faces.detect import CallableDetector, Detector, Face, FallbackDetector, WholeImageDetector, get_detector
from fastfair.faces.embed import FaceEmbedder, load_face_embedder, load_sfnet
from fastfair.faces.regions import FaceRegions, locate_faces, select_largest
from fastfair.faces.sfnet import SFNet, sfnet

__all__ = [
    "TEMPLATE_112", "align_faces", "similarity_transform", "template_in_box", "FaceBank", "crop_boxes", "warp_affine",
    "CallableDetector", "Detector", "Face", "FallbackDetector", "WholeImageDetector", "get_detector", "FaceEmbedder",
    "load_face_embedder", "load_sfnet", "FaceRegions", "locate_faces", "select_largest", "SFNet", "sfnet",
]
