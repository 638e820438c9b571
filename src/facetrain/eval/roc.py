"""ROC curves and operating points shared by the IJB, folder and calibration evaluations.

``roc_curve`` reproduces scikit-learn's ``roc_curve(labels, scores)`` (default ``drop_intermediate=True``), which is
what InsightFace's ``eval_ijbc.py`` calls, so that the nearest-point TAR@FAR rule picks the same ROC point.
Scores are similarities: a higher score means "more likely the same person".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from facetrain.errors import EvalError

IJB_FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def roc_curve(labels: np.ndarray, scores: np.ndarray, *, drop_intermediate: bool = True):
    """(fpr, tpr, thresholds), ascending FPR, first point (0, 0) at threshold +inf (scikit-learn semantics).

    Args:
        labels: (N,) bool/0-1, True for genuine.
        scores: (N,) similarity scores.
        drop_intermediate: drop collinear points as scikit-learn does by default.
    """
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores).reshape(-1)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if labels.size != scores.size or labels.size == 0:
        raise EvalError(f"ROC needs as many labels as scores (> 0), got {labels.size} and {scores.size}")
    # Counts at each distinct score, highest first: everything >= t, and genuine >= t from the (few) sorted
    # genuine scores. Same numbers as scikit-learn's cumulative sums over a stable argsort, several times faster.
    descending = np.sort(scores)[::-1]
    ends = np.r_[np.nonzero(np.diff(descending))[0], labels.size - 1]
    thresholds = descending[ends]
    genuine = np.sort(scores[labels])
    tps = genuine.size - np.searchsorted(genuine, thresholds, side="left")
    fps = ends + 1 - tps
    if drop_intermediate and tps.size > 2:
        keep = np.nonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def tar_at_far_nearest(fpr: np.ndarray, tpr: np.ndarray, far_targets=IJB_FAR_TARGETS) -> dict[float, float]:
    """InsightFace's IJB rule: the ROC point with the smallest ``|fpr - target|``; ties go to the largest TPR."""
    out = {}
    for target in far_targets:
        gap = np.abs(fpr - target)
        candidates = np.nonzero(gap == gap.min())[0]
        out[float(target)] = float(tpr[candidates].max())
    return out


@dataclass
class OperatingPoint:
    """A threshold on similarity scores and what it gives: ``same`` iff ``score >= threshold``."""

    threshold: float
    far: float
    tar: float
    n_false_accepts: int
    n_impostor: int
    n_true_accepts: int
    n_genuine: int


def threshold_at_far(labels: np.ndarray, scores: np.ndarray, far: float) -> OperatingPoint:
    """The lowest similarity threshold whose false-accept rate on these pairs does not exceed ``far``.

    ``same`` iff ``score >= threshold``. At most ``floor(far * n_impostor)`` impostors may be accepted, so the
    threshold is placed just above (next float up) the impostor score of that rank; with ties at that score fewer
    are accepted. When every impostor may be accepted, the threshold is the lowest impostor score.

    Args:
        labels: (N,) bool, True for genuine pairs.
        scores: (N,) similarity scores.
        far: target false-accept rate in [0, 1].
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    impostor = np.sort(scores[~labels])[::-1]
    genuine = scores[labels]
    if impostor.size == 0 or genuine.size == 0:
        raise EvalError("a FAR threshold needs both genuine and impostor pairs")
    allowed = int(np.floor(far * impostor.size + 1e-9))
    if allowed >= impostor.size:
        threshold = float(impostor[-1])
    else:
        # accept the `allowed` highest impostors at most: threshold just above the next one
        threshold = float(np.nextafter(impostor[allowed], np.inf))
    fa = int(np.count_nonzero(impostor >= threshold))
    ta = int(np.count_nonzero(genuine >= threshold))
    return OperatingPoint(threshold, fa / impostor.size, ta / genuine.size, fa, impostor.size, ta, genuine.size)


def equal_error_rate(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(EER, threshold): the ROC point where FAR = 1 - TAR, linearly interpolated between neighbouring points."""
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1 - tpr
    diff = fpr - fnr  # increasing from -1 to +1
    i = int(np.searchsorted(diff, 0.0))
    if i == 0:
        return float(fpr[0]), float(thr[1] if thr.size > 1 else thr[0])
    d0, d1 = diff[i - 1], diff[i]
    w = 0.0 if d1 == d0 else -d0 / (d1 - d0)
    eer = fpr[i - 1] + w * (fpr[i] - fpr[i - 1])
    t0 = thr[i - 1] if np.isfinite(thr[i - 1]) else thr[i]
    return float(eer), float(t0 + w * (thr[i] - t0))
