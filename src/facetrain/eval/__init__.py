"""Evaluation: InsightFace 10-fold verification, IJB-B/C 1:1 and 1:N, your own identity folders, threshold calibration.

``evaluate`` / ``flip_sum_normalize`` / ``VerificationResult`` are imported eagerly (numpy only); the rest load on
first use.
"""

from __future__ import annotations

import importlib

from facetrain.eval.verification import (
    VerificationResult,
    evaluate,
    evaluate_distances,
    flip_sum_normalize,
    verify_bin,
)

_LAZY = {
    "evaluate_ijb": "facetrain.eval.ijb",
    "evaluate_ijb_modes": "facetrain.eval.ijb",
    "evaluate_ijb_features": "facetrain.eval.ijb",
    "IJBResult": "facetrain.eval.ijb",
    "evaluate_folder": "facetrain.eval.folder",
    "FolderResult": "facetrain.eval.folder",
    "calibrate": "facetrain.eval.calibrate",
    "calibrate_scores": "facetrain.eval.calibrate",
    "CalibrationResult": "facetrain.eval.calibrate",
    "write_verification_report": "facetrain.eval.report",
    "write_ijb_report": "facetrain.eval.report",
    "write_folder_report": "facetrain.eval.report",
    "write_calibration_report": "facetrain.eval.report",
    "format_verification_table": "facetrain.eval.report",
}

__all__ = ["VerificationResult", "evaluate", "evaluate_distances", "flip_sum_normalize", "verify_bin", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'facetrain.eval' has no attribute {name!r}")
