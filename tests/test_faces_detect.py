"""Face detection: the Haar backend on a real photograph, the largest-face rule, boxes, hooks, adapters."""
import os
import sys
import types

import numpy as np
import pytest
import torch

from fastfair.faces.detect import CallableDetector, Face, UnusableBox, get_detector, to_uint8_rgb
from fastfair.faces.regions import locate_faces, select_largest, square_boxes


def photograph():
    """Grace Hopper's portrait, shipped with matplotlib (a test dependency), as [1, 3, H, W] in [-1, 1]."""
    matplotlib = pytest.importorskip("matplotlib")
    from PIL import Image

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
    return torch.from_numpy(rgb).permute(2, 0, 1)[None] / 127.5 - 1


def test_haar_finds_the_face_on_a_photograph_and_none_on_noise():
    pytest.importorskip("cv2")
    image = photograph()  # 600 x 512; her face spans roughly x 150-380, y 100-330
    noise = torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    regions = locate_faces(torch.cat([image[..., 90:346, 138:394], noise]), "opencv")
    assert regions.found.tolist() == [True, False, False]
    regions = locate_faces(image, "opencv")
    x0, y0, x1, y1 = regions.boxes[0].tolist()
    assert 120 < x0 < 200 and 80 < y0 < 150 and 330 < x1 < 420 and 280 < y1 < 360
    assert not regions.has_landmarks[0]  # Haar gives none: they are estimated from the box
    assert (regions.landmarks[0, :, 0] > x0).all() and (regions.landmarks[0, :, 1] < y1).all()


def test_largest_face_rule_counts_only_the_area_inside_the_image():
    faces = [
        [Face((0, 0, 10, 10), 0.9), Face((-60, 0, 20, 30), 0.8), Face((30, 30, 55, 50), 0.7)],  # areas 100, 600, 500
        [],
        [Face((40, 40, 90, 90), 0.5)],  # only 24 x 24 of it inside
    ]
    regions = select_largest(faces, height=64, width=64, margin=0.5)
    assert regions.found.tolist() == [True, False, True]
    assert regions.boxes[0].tolist() == [-60, 0, 20, 30]  # as detected: a face cut by the frame keeps its box
    assert regions.boxes[1].tolist() == [0, 0, 64, 64]  # no face: the whole image stands in
    assert regions.boxes[2].tolist() == [40, 40, 90, 90]
    assert regions.scores.tolist() == [0.8, 0.0, 0.5]
    # squares: side = longer side * 1.5, centred on the face's box, as the public code's expand_bbox (not on the
    # part inside the image, which moved the crop off the face toward the image's centre and shrank it)
    assert regions.crop_boxes[0].tolist() == [-80, -45, 40, 75]
    assert regions.crop_boxes[2].tolist() == [27.5, 27.5, 102.5, 102.5]
    # landmarks estimated from the whole face box: the eyes of a face cut at the left edge lie left of the image
    assert (regions.landmarks[0, :2, 0] < 0).all()


def test_the_whole_image_detector_crops_the_image_itself():
    """detector none (folders of face crops): the crop is the image, not the image shrunk inside a margin."""
    from fastfair.faces import crop_boxes

    images = torch.rand(2, 3, 24, 24) * 2 - 1
    regions = locate_faces(images, "none", margin=0.5)
    assert regions.found.all() and regions.crop_boxes.tolist() == [[0, 0, 24, 24]] * 2
    torch.testing.assert_close(crop_boxes(images, regions.crop_boxes.float(), 24), images, atol=1e-5, rtol=0)


def test_square_boxes_margin_zero_keeps_the_longer_side():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]], dtype=torch.float64)
    assert square_boxes(boxes, 0.0).tolist() == [[0.0, 20.0, 40.0, 60.0]]
    for margin in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="margin must be finite and >= 0"):
            select_largest([[]], 8, 8, margin=margin)


def test_callable_detectors_per_image_and_batched():
    images = torch.zeros(2, 3, 32, 32)
    images[1] = 1.0
    seen = []

    def per_image(rgb):
        seen.append((rgb.dtype, rgb.shape, int(rgb[0, 0, 0])))
        return [(2, 3, 12, 14, 0.7)] if rgb.mean() > 200 else []

    regions = locate_faces(images, CallableDetector(per_image))
    assert seen == [(np.uint8, (32, 32, 3), 128), (np.uint8, (32, 32, 3), 255)]
    assert regions.found.tolist() == [False, True] and regions.boxes[1].tolist() == [2, 3, 12, 14]

    points = np.arange(10.0).reshape(5, 2) + 5
    batched = CallableDetector(lambda x: [[{"box": (1, 1, 9, 9), "landmarks": points}] for _ in x], batched=True)
    regions = locate_faces(images.requires_grad_(True), batched)
    assert regions.has_landmarks.all() and torch.equal(regions.landmarks[0], torch.from_numpy(points))


def test_fallback_detector_asks_the_next_detector_only_for_missed_images():
    images = torch.zeros(3, 3, 16, 16)
    images[1] = 1.0
    asked = []

    def second(batch):
        asked.append(batch.shape[0])
        return [[(0, 0, 4, 4)] for _ in batch]

    first = CallableDetector(lambda rgb: [(1, 1, 9, 9)] if rgb.mean() > 200 else [])
    faces = get_detector([first, CallableDetector(second, batched=True)]).detect(images)
    assert asked == [2]
    assert [f[0].box for f in faces] == [(0, 0, 4, 4), (1, 1, 9, 9), (0, 0, 4, 4)]


def test_a_box_no_face_can_fill_is_left_out_and_landmarks_must_be_five_points():
    """One empty box among a detector's faces ended the whole batch; MTCNN's own [2, 5] landmarks (xs; ys) were
    reshaped into other points; NaN landmarks gave NaN aligned faces."""
    images = torch.zeros(2, 3, 32, 32)
    detector = CallableDetector(lambda rgb: [(2, 3, 12, 14), (40, 40, 40, 41), (1, 1, float("nan"), 5)])
    with pytest.warns(UserWarning, match="a face detector returned a box no face can fill, left out"):
        faces = detector.detect(images)
    assert [[f.box for f in image] for image in faces] == [[(2, 3, 12, 14)]] * 2
    points = np.arange(10.0) + 5
    assert np.array_equal(Face((0, 0, 9, 9), landmarks=points).landmarks, points.reshape(5, 2))
    with pytest.raises(ValueError, match=r"Face.landmarks must be 5 \(x, y\) points, shape \(5, 2\), got shape"):
        Face((0, 0, 9, 9), landmarks=points.reshape(2, 5))
    # NaN landmarks: a face no alignment can use, dropped as a NaN box is (they stopped the training step, and the
    # message blamed their shape)
    with pytest.raises(UnusableBox, match=r"Face.landmarks must be finite, got \[\[nan"):
        Face((0, 0, 9, 9), landmarks=np.full((5, 2), np.nan))
    nan_points = CallableDetector(lambda rgb: [Face((2, 3, 12, 14), landmarks=points),
                                               {"box": (1, 1, 20, 20), "landmarks": np.full((5, 2), np.nan)}])
    with pytest.warns(UserWarning, match="must be finite"):
        assert [len(image) for image in nan_points.detect(torch.zeros(1, 3, 32, 32))] == [1]
    # landmarks collapsed to a point (or within 1e-7 px of one) have no similarity fit to the template: the
    # alignment raised for the whole batch, and a face-bank build stopped at that image on every rerun
    for collapsed in (np.full((5, 2), 4.0), np.full((5, 2), 4.0) + np.random.default_rng(0).normal(0, 1e-7, (5, 2))):
        with pytest.raises(UnusableBox, match="collapsed to a point"):
            Face((0, 0, 9, 9), landmarks=collapsed)
    shapes = CallableDetector(lambda rgb: [Face((2, 3, 12, 14), landmarks=points),
                                           {"box": (1, 1, 20, 20), "landmarks": np.full((5, 2), 4.0)}])
    with pytest.warns(UserWarning, match="collapsed to a point"):
        assert [len(image) for image in shapes.detect(torch.zeros(1, 3, 32, 32))] == [1]
    # 'none' last in a fallback list: the images taken whole are cropped as a classifier's training reads them
    # (no margin, the centred square of the shorter side), the others with the margin
    images = torch.zeros(2, 3, 64, 96)
    images[0] = 1.0
    regions = locate_faces(images, get_detector([CallableDetector(
        lambda rgb: [(10, 10, 30, 30)] if rgb[0, 0, 0] > 200 else []), "none"]), margin=0.5)
    assert regions.found.all()
    assert regions.crop_boxes.tolist() == [[5, 5, 35, 35], [16, 0, 80, 64]]  # the whole one: centred 64 x 64


def test_detection_input_and_spec_errors():
    with pytest.raises(ValueError, match="unknown face detector"):
        get_detector("retina")
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        to_uint8_rgb(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="x1 > x0"):
        Face((5, 5, 5, 9))
    with pytest.raises(ValueError, match="lists for"):
        CallableDetector(lambda x: [[]], batched=True).detect(torch.zeros(2, 3, 4, 4))


def test_insightface_adapter_passes_bgr_and_reads_bbox_kps(monkeypatch, tmp_path):
    (tmp_path / "models" / "buffalo_l").mkdir(parents=True)
    calls = {}

    class FakeFaceAnalysis:
        def __init__(self, name, root, allowed_modules, providers):
            calls["init"] = (name, root, allowed_modules)

        def prepare(self, ctx_id, det_size):
            calls["prepare"] = det_size

        def get(self, bgr):
            calls["pixel"] = bgr[0, 0].tolist()
            face = types.SimpleNamespace(bbox=np.array([4.0, 5.0, 20.0, 25.0]), det_score=0.93,
                                         kps=np.arange(10.0).reshape(5, 2))
            return [face]

    app = types.ModuleType("insightface.app")
    app.FaceAnalysis = FakeFaceAnalysis
    monkeypatch.setitem(sys.modules, "insightface", types.ModuleType("insightface"))
    monkeypatch.setitem(sys.modules, "insightface.app", app)
    image = torch.full((1, 3, 32, 32), -1.0)
    image[:, 0] = 1.0  # pure red in RGB
    faces = get_detector("insightface", root=str(tmp_path)).detect(image)
    assert calls["pixel"] == [0, 0, 255]  # BGR
    assert calls["init"] == ("buffalo_l", str(tmp_path), ["detection"])
    assert faces[0][0].box == (4.0, 5.0, 20.0, 25.0) and faces[0][0].landmarks.shape == (5, 2)
    with pytest.raises(FileNotFoundError, match="model pack not found"):
        get_detector("insightface", root=str(tmp_path / "missing"))


def test_mtcnn_adapter_reads_boxes_probs_landmarks(monkeypatch):
    class FakeMTCNN:
        def __init__(self, **options):
            pass

        def detect(self, rgb, landmarks):
            if rgb.mean() < 10:
                return None, None, None
            return np.array([[1.0, 2.0, 11.0, 12.0]]), np.array([0.99]), np.arange(10.0).reshape(1, 5, 2) + 2

    module = types.ModuleType("facenet_pytorch")
    module.MTCNN = FakeMTCNN
    monkeypatch.setitem(sys.modules, "facenet_pytorch", module)
    images = torch.full((2, 3, 16, 16), -1.0)
    images[1] = 1.0
    faces = get_detector("mtcnn").detect(images)
    assert faces[0] == [] and faces[1][0].box == (1.0, 2.0, 11.0, 12.0) and faces[1][0].score == 0.99


def test_largest_face_rule_prefers_the_larger_visible_part_over_a_larger_box_mostly_outside():
    """A big box mostly beyond the frame (unclipped area 4400, 400 inside) loses to a fully visible face of 900."""
    regions = select_largest([[Face((-100, 0, 10, 40), 0.9), Face((20, 20, 50, 50), 0.5)]], height=64, width=64)
    assert regions.boxes[0].tolist() == [20, 20, 50, 50] and regions.scores.tolist() == [0.5]


def test_a_face_box_wholly_outside_the_image_is_no_face():
    regions = select_largest([[Face((70, 10, 90, 30))], [Face((-30, -30, 0, 0))]], height=64, width=64)
    assert regions.found.tolist() == [False, False]
    assert regions.boxes.tolist() == [[0, 0, 64, 64]] * 2


def test_the_whole_image_detector_crops_a_non_square_image_as_classifier_training_reads_it(tmp_path):
    """A non-square face image (CelebA's aligned 178 x 218) taken whole: cropped to the centred square of its
    shorter side, as classifiers.data.load_face_image reads training folders; it was squared to the longer side,
    10 of 64 columns black padding the classifier never saw in training."""
    from PIL import Image

    from fastfair.classifiers.data import load_face_image
    from fastfair.faces.crop import crop_boxes

    images = torch.rand(1, 3, 20, 36) * 2 - 1  # H 20, W 36
    regions = locate_faces(images, "none")
    assert regions.boxes.tolist() == [[0, 0, 36, 20]]
    assert regions.crop_boxes.tolist() == [[8, 0, 28, 20]]  # the centred 20 x 20 square
    y, x = np.mgrid[0:218, 0:178]
    pixels = np.stack([x, y, (x + y) / 2], axis=-1).astype(np.uint8)  # smooth: resampling differs little
    Image.fromarray(pixels).save(tmp_path / "face.png")
    trained_on = load_face_image(str(tmp_path / "face.png"), 64)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].double() / 127.5 - 1
    judged = crop_boxes(image, locate_faces(image, "none").crop_boxes, 64, antialias=True)[0].float()
    assert (judged == -1).all(0).sum() == 0  # no padding
    assert (judged - trained_on).abs().max() < 0.05  # the same framing (the two resamplers round apart)


def test_a_detected_score_is_kept_from_a_five_tuple():
    detector = CallableDetector(lambda rgb: [(2, 2, 10, 12, 0.25)])
    (faces,) = detector(torch.zeros(1, 3, 16, 16))
    assert faces[0].box == (2, 2, 10, 12) and faces[0].score == 0.25
    assert locate_faces(torch.zeros(1, 3, 16, 16), detector).scores.tolist() == [0.25]


def test_landmarks_estimated_from_a_box_place_the_template_in_that_box():
    """Without detector landmarks, a box is read as the template's 112 x 112 crop frame (pixel centres mapped):
    the box (0, 0, 112, 112) gives the template itself, and a non-square box scales x and y apart."""
    from fastfair.faces.align import TEMPLATE_112

    regions = select_largest([[Face((0, 0, 112, 112))], [Face((10, 20, 66, 244))]], height=256, width=256)
    assert not regions.has_landmarks.any()
    torch.testing.assert_close(regions.landmarks[0], TEMPLATE_112, atol=1e-9, rtol=0)
    expected = torch.tensor([10.0, 20.0]) + (TEMPLATE_112 + 0.5) * torch.tensor([56 / 112, 224 / 112]) - 0.5
    torch.testing.assert_close(regions.landmarks[1], expected.double(), atol=1e-9, rtol=0)


def test_images_in_0_255_are_refused_while_overshoot_and_non_finite_values_pass():
    with pytest.raises(ValueError, match=r"in \[-1, 1\] .*values up to 255 in magnitude: 0\.\.255 pixels"):
        to_uint8_rgb(torch.full((1, 3, 4, 4), 255.0))
    overshoot = torch.tensor([-1.3, -1.0, 0.0, 1.0, 1.3]).view(1, 1, 1, 5).expand(1, 3, 2, 5)
    assert to_uint8_rgb(overshoot)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]  # a decoder's overshoot: clamped
    diverged = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    assert to_uint8_rgb(diverged)[0, 0, :, 0].tolist() == [128, 128, 128, 191]  # a diverged step's images pass


def test_a_detector_returning_no_list_is_named():
    """None (a detector that forgot its return) raised 'NoneType object is not iterable' at the first iteration."""
    for returned in (None, "face", {"box": (1, 1, 5, 5)}):
        with pytest.raises(ValueError, match=f"a face detector returned a {type(returned).__name__} for an image: "
                                             "expected a list of its faces"):
            CallableDetector(lambda rgb: returned).detect(torch.zeros(1, 3, 16, 16))
