"""YuNet (Wu et al. 2023, "YuNet: A tiny millisecond-level face detector"), OpenCV zoo ONNX, run by
``cv2.FaceDetectorYN``.

``FaceDetectorYN.detect`` takes BGR uint8 and returns rows ``x, y, w, h, 5 x (x, y), score``; the landmark order
(right eye of the subject = image-left eye, left eye, nose tip, right and left mouth corners of the subject) is
already the ArcFace template's order in image terms. The int8 block-quantised build gives a false positive at
score 0.66 on one asset photo, so the default threshold is 0.75 (keep it >= 0.7).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from facetrain.errors import ModelError

from .base import Detector, RawDetections


class YuNetDetector(Detector):
    """YuNet via ``cv2.FaceDetectorYN``.

    Args:
        model_path: the YuNet ``.onnx`` file (required; no weights are built in).
        score_threshold: default 0.75.
        nms_threshold: default 0.3 (OpenCV zoo's).
        max_side: photos are shrunk to this longer side for detection (default 1280).
        top_k: candidates kept before NMS.
    """

    name = "yunet"

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        score_threshold: float = 0.75,
        nms_threshold: float = 0.3,
        max_side: int | None = 1280,
        top_k: int = 5000,
    ):
        super().__init__(score_threshold=score_threshold, nms_threshold=nms_threshold, max_side=max_side)
        if model_path is None:
            raise ModelError("the yunet detector needs model_path (--model) = a YuNet .onnx file (OpenCV zoo format)")
        path = Path(model_path)
        if not path.is_file():
            raise ModelError(f"YuNet model file not found: {path}")
        self.model_path = str(path)
        try:
            self._yunet = cv2.FaceDetectorYN.create(
                str(path), "", (320, 320), float(score_threshold), float(nms_threshold), int(top_k)
            )
        except cv2.error as exc:
            raise ModelError(f"OpenCV cannot load YuNet model {path}: {str(exc).strip().splitlines()[-1]}") from exc

    def _forward(self, image_rgb: np.ndarray) -> RawDetections:
        height, width = image_rgb.shape[:2]
        self._yunet.setInputSize((width, height))
        _, rows = self._yunet.detect(np.ascontiguousarray(image_rgb[:, :, ::-1]))
        if rows is None or len(rows) == 0:
            return RawDetections.empty()
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, 15)
        boxes = np.concatenate([rows[:, :2], rows[:, :2] + rows[:, 2:4]], axis=1)
        return RawDetections(boxes, rows[:, 14], rows[:, 4:14].reshape(-1, 5, 2))

    def __getstate__(self):  # cv2 detectors cannot be pickled; rebuild in the new process
        raise TypeError("YuNetDetector cannot be pickled; build it in each worker with build_detector")
