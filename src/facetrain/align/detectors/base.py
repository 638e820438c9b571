"""The detector interface: ``Detector.detect(rgb) -> list[Face]``, with the shared post-processing done once.

A backend implements :meth:`Detector._forward` on an image that is already RGB uint8 and no larger than
``max_side``; it returns raw candidates. :meth:`Detector.detect` does the rest for every backend: input checks,
grey / RGBA to RGB, down-scaling of huge photos, the score threshold, non-maximum suppression, mapping boxes and
landmarks back to the photo's pixels, clipping boxes, and ordering faces by score.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face in photo pixel coordinates.

    Attributes:
        box: (4,) float32 ``x1, y1, x2, y2``.
        score: detector confidence in [0, 1].
        landmarks: (5, 2) float32 in the ArcFace template's order: eye on the image's left, eye on the image's right,
            nose tip, mouth corner on the image's left, mouth corner on the image's right.
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        """Box area in pixels."""
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))

    @property
    def center(self) -> np.ndarray:
        """(2,) box centre."""
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2], dtype=np.float32)


@dataclass(frozen=True)
class RawDetections:
    """Candidates a backend returns before the shared post-processing.

    Attributes:
        boxes: (K, 4) x1, y1, x2, y2 in the pixels of the image the backend saw.
        scores: (K,) confidences.
        landmarks: (K, 5, 2) already in the ArcFace order.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    @staticmethod
    def empty() -> RawDetections:
        return RawDetections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))


class Detector:
    """Base class of every face detector.

    Args:
        score_threshold: keep candidates scoring at least this.
        nms_threshold: IoU above which the lower-scoring of two boxes is dropped.
        max_side: photos whose longer side exceeds this (pixels) are shrunk for detection; boxes and landmarks are
            mapped back to the original pixels. ``None`` or 0 disables it.
    """

    name: str = "base"

    def __init__(self, *, score_threshold: float = 0.5, nms_threshold: float = 0.4, max_side: int | None = 1280):
        if not 0.0 <= score_threshold <= 1.0:
            raise ValueError(f"score_threshold must be in [0, 1], got {score_threshold}")
        if not 0.0 < nms_threshold <= 1.0:
            raise ValueError(f"nms_threshold must be in (0, 1], got {nms_threshold}")
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_side = int(max_side) if max_side else None

    def detect(self, image_rgb: np.ndarray) -> list[Face]:
        """Find faces in one photo.

        Args:
            image_rgb: (H, W, 3) uint8 RGB; (H, W) grey and (H, W, 4) RGBA are accepted too.

        Returns:
            Faces sorted by decreasing score (empty when there is none).
        """
        image = as_rgb_uint8(image_rgb)
        height, width = image.shape[:2]
        scale = 1.0
        if self.max_side and max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            small = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = cv2.resize(image, small, interpolation=cv2.INTER_AREA)
            # the exact per-axis factors, so points map back without rounding drift
            scale_xy = np.array([small[0] / width, small[1] / height], dtype=np.float64)
        else:
            scale_xy = np.ones(2, dtype=np.float64)
        raw = self._forward(np.ascontiguousarray(image))
        return self._postprocess(raw, scale_xy, (height, width))

    def _forward(self, image_rgb: np.ndarray) -> RawDetections:  # pragma: no cover - abstract
        raise NotImplementedError

    def _postprocess(self, raw: RawDetections, scale_xy: np.ndarray, shape_hw: tuple[int, int]) -> list[Face]:
        scores = np.asarray(raw.scores, dtype=np.float64).reshape(-1)
        boxes = np.asarray(raw.boxes, dtype=np.float64).reshape(-1, 4)
        landmarks = np.asarray(raw.landmarks, dtype=np.float64).reshape(-1, 5, 2)
        keep = np.flatnonzero((scores >= self.score_threshold) & np.isfinite(boxes).all(1) & np.isfinite(scores))
        keep = keep[nms(boxes[keep], scores[keep], self.nms_threshold)]
        height, width = shape_hw
        faces = []
        for i in keep:
            box = boxes[i] / np.tile(scale_xy, 2)
            box[[0, 2]] = box[[0, 2]].clip(0, width)
            box[[1, 3]] = box[[1, 3]].clip(0, height)
            if box[2] <= box[0] or box[3] <= box[1]:
                continue
            points = landmarks[i] / scale_xy
            faces.append(Face(box.astype(np.float32), float(scores[i]), points.astype(np.float32)))
        return faces

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(score_threshold={self.score_threshold}, nms_threshold={self.nms_threshold}, "
            f"max_side={self.max_side})"
        )


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression.

    Args:
        boxes: (K, 4) x1, y1, x2, y2.
        scores: (K,).
        iou_threshold: a box overlapping a kept, higher-scoring box by IoU > this is dropped.

    Returns:
        Indices of the kept boxes, highest score first.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    kept = []
    while order.size:
        i = order[0]
        kept.append(i)
        rest = order[1:]
        iw = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        ih = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = iw * ih
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(kept, dtype=np.int64)


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 view/copy of an RGB, grey (H, W) / (H, W, 1) or RGBA (H, W, 4) image.

    Raises:
        ValueError: not an image array, empty, or a dtype other than uint8.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a numpy image array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 image, got dtype {image.dtype}; load photos with facetrain.align.read_image"
        )
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        return image[:, :, :3]
    return image
