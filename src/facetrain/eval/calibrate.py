"""Calibrate a decision threshold on your own data: the cosine threshold for a target FAR, its TAR, and intervals.

``same`` iff ``cosine >= threshold``. The threshold is the lowest one whose false-accept rate on the impostor pairs
is <= the target (:func:`facetrain.eval.roc.threshold_at_far`). Intervals are exact binomial (Clopper & Pearson,
1934, "The use of confidence or fiducial limits illustrated in the case of the binomial", Biometrika 26(4)) for the
FAR and the TAR observed at that threshold: ``[B(a/2; k, n-k+1), B(1-a/2; k+1, n-k)]`` with ``B`` the beta quantile.
They treat pairs as independent; pairs that share images or identities are not, so the true uncertainty is larger
(read the interval as a lower bound on it). With fewer than ``1 / far`` impostor pairs the target cannot be measured
and the result says so.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facetrain.errors import EvalError
from facetrain.eval.roc import threshold_at_far

if TYPE_CHECKING:
    from facetrain.embed import BaseEmbedder


@dataclass
class CalibrationResult:
    """A calibrated threshold (cosine similarity) and what it gives on the calibration pairs."""

    far_target: float
    threshold: float
    far: float
    tar: float
    far_interval: tuple[float, float]
    tar_interval: tuple[float, float]
    confidence: float
    n_genuine: int
    n_impostor: int
    false_accepts: int
    true_accepts: int
    reliable: bool
    source: str
    scores: np.ndarray | None = field(default=None, repr=False, compare=False)  # (P,) cosine, for report plots
    issame: np.ndarray | None = field(default=None, repr=False, compare=False)

    def summary(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("scores", "issame")}
        out["far_interval"] = list(self.far_interval)
        out["tar_interval"] = list(self.tar_interval)
        return out


def calibrate_scores(
    issame: np.ndarray, scores: np.ndarray, *, far: float = 1e-4, confidence: float = 0.95, source: str = ""
) -> CalibrationResult:
    """Threshold, TAR and Clopper-Pearson intervals from pair similarity scores.

    Args:
        issame: (P,) bool.
        scores: (P,) cosine similarities.
        far: target false-accept rate.
        confidence: interval coverage, e.g. 0.95.
    """
    if not 0 < far < 1:
        raise EvalError(f"--far must be in (0, 1), got {far}")
    if not 0 < confidence < 1:
        raise EvalError(f"confidence must be in (0, 1), got {confidence}")
    op = threshold_at_far(issame, scores, far)
    alpha = 1.0 - confidence
    return CalibrationResult(
        far_target=float(far),
        threshold=float(op.threshold),
        far=op.far,
        tar=op.tar,
        far_interval=clopper_pearson(op.n_false_accepts, op.n_impostor, alpha),
        tar_interval=clopper_pearson(op.n_true_accepts, op.n_genuine, alpha),
        confidence=float(confidence),
        n_genuine=op.n_genuine,
        n_impostor=op.n_impostor,
        false_accepts=op.n_false_accepts,
        true_accepts=op.n_true_accepts,
        reliable=op.n_impostor * far >= 1.0,
        source=source,
        scores=np.asarray(scores),
        issame=np.asarray(issame).astype(bool),
    )


def calibrate(
    embedder: BaseEmbedder,
    data: str | os.PathLike,
    *,
    far: float = 1e-4,
    confidence: float = 0.95,
    max_pairs: int | None = 5_000_000,
    seed: int = 0,
    progress: bool = False,
) -> CalibrationResult:
    """Calibrate on a folder of identities (all pairs up to ``max_pairs``, else a sample) or on a ``.bin`` pair file."""
    path = Path(data)
    if path.is_dir():
        from facetrain.eval.folder import embed_folder, make_pairs, pair_sq_distances

        folder = embed_folder(embedder, path, progress=progress)
        pairs, _ = make_pairs(folder.labels, max_pairs=max_pairs, seed=seed)
        issame = folder.labels[pairs[:, 0]] == folder.labels[pairs[:, 1]]
        scores = 1.0 - pair_sq_distances(folder.embeddings, pairs) / 2.0
    else:
        from facetrain.eval.verification import embed_bin, flip_sum_normalize

        emb = embed_bin(embedder, path, progress=progress)
        normed = flip_sum_normalize(emb.raw, emb.raw_flipped)
        scores = np.einsum("ij,ij->i", normed[0::2].astype(np.float64), normed[1::2])
        issame = emb.issame
    return calibrate_scores(issame, scores, far=far, confidence=confidence, source=str(path))


def clopper_pearson(successes: int, trials: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided binomial interval for ``successes / trials`` at level ``1 - alpha``."""
    if trials <= 0:
        return (float("nan"), float("nan"))
    k, n = int(successes), int(trials)
    lower = 0.0 if k == 0 else beta_quantile(alpha / 2, k, n - k + 1)
    upper = 1.0 if k == n else beta_quantile(1 - alpha / 2, k + 1, n - k)
    return (lower, upper)


def beta_quantile(q: float, a: float, b: float) -> float:
    """x with ``I_x(a, b) = q`` (inverse regularized incomplete beta) by bisection on [0, 1] to ~1e-15."""
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if regularized_beta(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * max(hi, 1e-300):
            break
    return 0.5 * (lo + hi)


def regularized_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)``, the regularized incomplete beta function, by its continued fraction (modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c = 1.0
    d = 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((a + m2 - 1) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h
