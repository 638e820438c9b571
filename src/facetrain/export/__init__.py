"""Deployment: ONNX / TorchScript export, PyTorch-vs-onnxruntime parity, MFR rules, quantization.

``export_onnx`` writes the layout InsightFace's python package loads as a recognition model (REFERENCE section 8).
Nothing here imports onnx / onnxruntime at import time.
"""

from facetrain.export.check import Constraint, ParityReport, check_mfr, check_parity, load_faces, random_faces
from facetrain.export.onnx import (
    OnnxInfo,
    deployment_problems,
    export_onnx,
    file_sha256,
    inspect_onnx,
    load_model_for_export,
)
from facetrain.export.quantize import MODES, FaceCalibrationReader, ModelStats, compare_models, quantize
from facetrain.export.torchscript import export_torchscript, read_torchscript_metadata

__all__ = [
    "MODES",
    "Constraint",
    "FaceCalibrationReader",
    "ModelStats",
    "OnnxInfo",
    "ParityReport",
    "check_mfr",
    "check_parity",
    "compare_models",
    "deployment_problems",
    "export_onnx",
    "export_torchscript",
    "file_sha256",
    "inspect_onnx",
    "load_faces",
    "load_model_for_export",
    "quantize",
    "random_faces",
    "read_torchscript_metadata",
]
