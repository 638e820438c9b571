"""SCRFD (Guo et al. 2021, "Sample and Computation Redistribution for Efficient Face Detection") in the ONNX
format of InsightFace's model packs (``det_10g.onnx``, ``det_500m.onnx``), run by onnxruntime.

No SCRFD weights ship in any package this project may use, so pass ``model_path``. Decoding follows the public
description of those files:

* input ``(1, 3, H, W)``: the photo resized (aspect kept) into the top-left of an H x W canvas (zeros elsewhere),
  RGB, ``(x - 127.5) / 128``;
* outputs, in session order: one score map per stride, then one box map per stride, then one keypoint map per stride
  (9 outputs for strides 8/16/32 with 2 anchors per cell; 15 for strides 8..128 with 1 anchor);
  each row of a map belongs to one anchor, cells in row-major order, anchors of a cell consecutive;
* an anchor centre is ``(col * stride, row * stride)``; a box is ``centre -/+ distances * stride``
  (left, top, right, bottom) and keypoint k is ``centre + offset_k * stride``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from facetrain.errors import ModelError

from ._onnx import make_session
from .base import Detector, RawDetections

# number of outputs -> (strides, anchors per cell); only the layouts with keypoints are usable for alignment
LAYOUTS = {9: ((8, 16, 32), 2), 15: ((8, 16, 32, 64, 128), 1)}


class SCRFDDetector(Detector):
    """SCRFD with 5 keypoints (ONNX).

    Args:
        model_path: the SCRFD ``.onnx`` file (required).
        score_threshold: default 0.5 (InsightFace's).
        nms_threshold: default 0.4.
        input_size: (W, H) of the network input when the model's input shape is dynamic; default (640, 640).
        max_side: optional pre-shrink of huge photos (the network input is small anyway).
        num_threads: onnxruntime intra-op threads.
    """

    name = "scrfd"

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        score_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        input_size: tuple[int, int] = (640, 640),
        max_side: int | None = None,
        num_threads: int = 0,
    ):
        super().__init__(score_threshold=score_threshold, nms_threshold=nms_threshold, max_side=max_side)
        if model_path is None:
            raise ModelError(
                "the scrfd detector needs model_path (--model) = an SCRFD .onnx file (InsightFace det_*.onnx)"
            )
        self.model_path = str(model_path)
        self.session = make_session(Path(model_path), num_threads=num_threads, what="SCRFD")
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        shape = model_input.shape
        if isinstance(shape[2], int) and isinstance(shape[3], int):
            self.input_size = (int(shape[3]), int(shape[2]))
        else:
            self.input_size = (int(input_size[0]), int(input_size[1]))
        outputs = len(self.session.get_outputs())
        if outputs not in LAYOUTS:
            raise ModelError(
                f"SCRFD model {model_path} has {outputs} outputs; expected 9 or 15 (a model with keypoints)"
            )
        self.strides, self.anchors_per_cell = LAYOUTS[outputs]

    def _forward(self, image_rgb: np.ndarray) -> RawDetections:
        input_w, input_h = self.input_size
        height, width = image_rgb.shape[:2]
        scale = min(input_w / width, input_h / height)
        new_w, new_h = max(1, int(width * scale)), max(1, int(height * scale))
        canvas = np.zeros((input_h, input_w, 3), dtype=np.float32)
        canvas[:new_h, :new_w] = cv2.resize(image_rgb, (new_w, new_h)).astype(np.float32)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})
        boxes, scores, points = decode_outputs(outputs, self.strides, self.anchors_per_cell, (input_h, input_w))
        # scale back by the exact per-axis resize factors
        factor = np.array([new_w / width, new_h / height])
        return RawDetections(boxes / np.tile(factor, 2), scores, points / factor)


def anchor_centres(rows: int, cols: int, stride: int, anchors_per_cell: int) -> np.ndarray:
    """(rows * cols * anchors_per_cell, 2) anchor centres ``(col * stride, row * stride)``, row-major."""
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    centres = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64) * stride
    return np.repeat(centres, anchors_per_cell, axis=0)


def decode_outputs(
    outputs: list[np.ndarray], strides: tuple[int, ...], anchors_per_cell: int, input_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode SCRFD score / distance-box / keypoint maps into candidates in network-input pixels.

    Args:
        outputs: the session's outputs: ``len(strides)`` score maps ``(A, 1)``, then box maps ``(A, 4)``, then
            keypoint maps ``(A, 10)``; a leading batch dimension of 1 is allowed.
        strides: feature strides, e.g. (8, 16, 32).
        anchors_per_cell: anchors per feature-map cell.
        input_hw: network input (H, W).

    Returns:
        boxes (K, 4) x1, y1, x2, y2; scores (K,); landmarks (K, 5, 2).
    """
    levels = len(strides)
    all_boxes, all_scores, all_points = [], [], []
    for level, stride in enumerate(strides):
        scores = _unbatch(outputs[level]).reshape(-1)
        distances = _unbatch(outputs[level + levels]).reshape(-1, 4).astype(np.float64) * stride
        offsets = _unbatch(outputs[level + 2 * levels]).reshape(-1, 5, 2).astype(np.float64) * stride
        rows, cols = input_hw[0] // stride, input_hw[1] // stride
        centres = anchor_centres(rows, cols, stride, anchors_per_cell)
        if centres.shape[0] != scores.shape[0]:
            raise ModelError(
                f"SCRFD stride {stride}: {scores.shape[0]} anchors for a {input_hw[1]}x{input_hw[0]} input, expected "
                f"{centres.shape[0]}"
            )
        all_boxes.append(np.concatenate([centres - distances[:, :2], centres + distances[:, 2:]], axis=1))
        all_scores.append(scores.astype(np.float64))
        all_points.append(centres[:, None, :] + offsets)
    return np.concatenate(all_boxes), np.concatenate(all_scores), np.concatenate(all_points)


def _unbatch(array: np.ndarray) -> np.ndarray:
    return array[0] if array.ndim == 3 else array
