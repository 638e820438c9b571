"""10-fold pair verification, exactly InsightFace's protocol (recognition/arcface_torch/eval/verification.py).

Protocol (REFERENCE section 6), for N pairs whose embeddings are rows ``2i`` and ``2i+1``:

* embeddings are flip-summed then L2-normalized (:func:`flip_sum_normalize`): ``e = normalize(f(x) + f(flip x))``;
* distance ``d = ||e1 - e2||^2`` in ``[0, 4]``; a pair is predicted "same" iff ``d < threshold``
  (equivalent cosine rule: ``cos > 1 - threshold / 2``);
* accuracy: thresholds ``np.arange(0, 4, 0.01)``; ``n_folds`` contiguous folds without shuffling (scikit-learn
  ``KFold(shuffle=False)``: the first ``N % n_folds`` folds hold one extra pair); on each fold the threshold with the
  best accuracy on the other folds (first maximum, ``np.argmax``) is applied to the held-out fold; the result is
  ``mean`` and ``std`` (ddof 0) of the fold accuracies;
* VAL@FAR=1e-3: thresholds ``np.arange(0, 4, 0.001)``; on the training folds the threshold reaching the target FAR is
  interpolated linearly in (FAR, threshold); threshold 0 when the training FAR never reaches the target; VAL and FAR are
  measured on the held-out fold and averaged.

Interpolation: upstream calls ``scipy.interpolate.interp1d(far_train, thresholds, kind='slinear')``. ``far_train`` is
non-decreasing in the threshold and almost always has repeated values (a run of 0 at small thresholds); SciPy >= 1.9
rejects repeated x for ``slinear``. We use ``np.interp``, which equals that call wherever the FARs are distinct (same
straight line between neighbouring points; results may differ in the last ulp). On repeated FARs ``np.interp`` takes
the segment from the *last* threshold with the lower FAR to the *first* threshold with the higher FAR -- the same
segment older SciPy's linear B-spline uses -- and a target equal to a repeated FAR gives the *largest* threshold with
that FAR (the most permissive threshold that still meets the target).

Counting uses sorted distances and ``np.searchsorted(..., side='left')``, which counts ``d < threshold`` exactly like
upstream's ``np.less`` (distances are compared in float64, the grid's dtype), for all thresholds at once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facetrain.errors import DataError, EvalError

if TYPE_CHECKING:
    from facetrain.embed import BaseEmbedder

logger = logging.getLogger(__name__)

ACCURACY_THRESHOLDS_STEP = 0.01
VAL_THRESHOLDS_STEP = 0.001
DEFAULT_FAR_TARGET = 1e-3


@dataclass
class VerificationResult:
    """Outcome of :func:`evaluate`. Thresholds are squared L2 distances (``same`` iff ``d < threshold``).

    Attributes:
        accuracy_mean: mean of the fold accuracies (InsightFace's "Accuracy-Flip").
        accuracy_std: population std (ddof 0) of the fold accuracies.
        fold_accuracies: (n_folds,) accuracy of each held-out fold.
        thresholds: (n_folds,) distance threshold chosen on each fold's training part.
        cosine_thresholds: (n_folds,) the same thresholds as cosine similarity, ``cos = 1 - d / 2``.
        val: mean over folds of the true-accept rate at the interpolated FAR target threshold.
        val_std: population std of the per-fold VAL.
        far: mean over folds of the false-accept rate actually obtained on the held-out folds.
        far_target: the FAR target used for ``val`` (1e-3 upstream).
        tpr: (400,) true-positive rate at each accuracy-grid threshold, averaged over held-out folds.
        fpr: (400,) false-positive rate, same grid.
        roc_thresholds: (400,) the accuracy grid ``np.arange(0, 4, 0.01)``.
        best_threshold: distance threshold with the best accuracy on *all* pairs (first maximum on the grid), for
            deployment; not used by the 10-fold accuracy.
        best_cosine_threshold: ``1 - best_threshold / 2``.
        xnorm: mean L2 norm of the raw (unnormalized) embeddings over both flips, or None if not given.
        n_pairs: number of pairs N.
        distances: (N,) squared L2 distance of each pair (float64).
        issame: (N,) bool ground truth.
    """

    accuracy_mean: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    thresholds: np.ndarray
    cosine_thresholds: np.ndarray
    val: float
    val_std: float
    far: float
    far_target: float
    tpr: np.ndarray = field(repr=False)
    fpr: np.ndarray = field(repr=False)
    roc_thresholds: np.ndarray = field(repr=False)
    best_threshold: float
    best_cosine_threshold: float
    xnorm: float | None
    n_pairs: int
    distances: np.ndarray = field(repr=False)
    issame: np.ndarray = field(repr=False)

    def summary(self) -> dict:
        """Scalars only (JSON-ready): accuracy, VAL, thresholds, XNorm, pair counts."""
        return {
            "accuracy_mean": float(self.accuracy_mean),
            "accuracy_std": float(self.accuracy_std),
            "fold_accuracies": [float(a) for a in self.fold_accuracies],
            "thresholds": [float(t) for t in self.thresholds],
            "cosine_thresholds": [float(t) for t in self.cosine_thresholds],
            "val": float(self.val),
            "val_std": float(self.val_std),
            "far": float(self.far),
            "far_target": float(self.far_target),
            "best_threshold": float(self.best_threshold),
            "best_cosine_threshold": float(self.best_cosine_threshold),
            "xnorm": None if self.xnorm is None else float(self.xnorm),
            "n_pairs": int(self.n_pairs),
            "n_genuine": int(np.count_nonzero(self.issame)),
            "n_impostor": int(self.n_pairs - np.count_nonzero(self.issame)),
        }


def evaluate(
    embeddings: np.ndarray,
    issame: np.ndarray | Sequence[bool],
    n_folds: int = 10,
    *,
    raw: np.ndarray | Sequence[np.ndarray] | None = None,
    far_target: float = DEFAULT_FAR_TARGET,
) -> VerificationResult:
    """InsightFace 10-fold verification of pair embeddings.

    Args:
        embeddings: (2N, D) flip-summed, L2-normalized embeddings; pair i is rows 2i and 2i+1.
        issame: (N,) bool, True for a genuine pair.
        n_folds: number of contiguous folds (10 upstream); 1 means train = test = all pairs (upstream ``LFold``).
        raw: optional raw embeddings (2N, D), or a sequence of them (e.g. original and flipped), for XNorm.
        far_target: FAR at which VAL is reported (1e-3 upstream).

    Returns:
        VerificationResult.

    Raises:
        EvalError: on inconsistent shapes or fewer pairs than folds.
    """
    emb = np.asarray(embeddings)
    same = np.asarray(issame).astype(bool).reshape(-1)
    if emb.ndim != 2 or emb.shape[0] % 2:
        raise EvalError(f"verification embeddings must have shape (2N, D) with an even row count, got {emb.shape}")
    n_pairs = emb.shape[0] // 2
    if same.shape[0] != n_pairs:
        raise EvalError(
            f"verification has {emb.shape[0]} embeddings (= {n_pairs} pairs) but {same.shape[0]} issame labels"
        )
    if n_folds < 1 or n_pairs < n_folds:
        raise EvalError(
            f"verification needs at least n_folds={n_folds} pairs (and n_folds >= 1), got {n_pairs} pairs; "
            "use more pairs or fewer folds (--folds)"
        )
    if not np.all(np.isfinite(emb)):
        raise EvalError("verification embeddings contain NaN or Inf; check the model and its input")

    return evaluate_distances(pair_distances(emb), same, n_folds, far_target=far_target, xnorm=_xnorm(raw))


def evaluate_distances(
    distances: np.ndarray,
    issame: np.ndarray | Sequence[bool],
    n_folds: int = 10,
    *,
    far_target: float = DEFAULT_FAR_TARGET,
    xnorm: float | None = None,
) -> VerificationResult:
    """The protocol of :func:`evaluate` on precomputed squared L2 distances of normalized embeddings.

    Args:
        distances: (N,) squared L2 distances in [0, 4] (``2 - 2 cos``).
        issame: (N,) bool.
        n_folds: contiguous folds.
        far_target: FAR for VAL.
        xnorm: carried into the result.
    """
    distances = np.asarray(distances, np.float64).reshape(-1)
    same = np.asarray(issame).astype(bool).reshape(-1)
    n_pairs = distances.size
    if same.size != n_pairs:
        raise EvalError(f"verification has {n_pairs} distances but {same.size} issame labels")
    if n_folds < 1 or n_pairs < n_folds:
        raise EvalError(
            f"verification needs at least n_folds={n_folds} pairs (and n_folds >= 1), got {n_pairs} pairs; "
            "use more pairs or fewer folds (--folds)"
        )
    acc_grid = np.arange(0, 4, ACCURACY_THRESHOLDS_STEP)
    val_grid = np.arange(0, 4, VAL_THRESHOLDS_STEP)
    folds = kfold_splits(n_pairs, n_folds)

    fold_acc = np.zeros(n_folds)
    fold_thr = np.zeros(n_folds)
    tprs = np.zeros((n_folds, acc_grid.size))
    fprs = np.zeros((n_folds, acc_grid.size))
    vals = np.zeros(n_folds)
    fars = np.zeros(n_folds)
    for k, (train, test) in enumerate(folds):
        acc_train = _rates(distances[train], same[train], acc_grid)[2]
        best = acc_grid[int(np.argmax(acc_train))]
        fold_thr[k] = best
        tprs[k], fprs[k], _ = _rates(distances[test], same[test], acc_grid)
        fold_acc[k] = _accuracy(distances[test], same[test], best)

        far_train = _val_far(distances[train], same[train], val_grid)[1]
        if np.max(far_train) >= far_target:
            threshold = float(np.interp(far_target, far_train, val_grid))
        else:
            threshold = 0.0
        val_k, far_k = _val_far(distances[test], same[test], np.array([threshold]))
        vals[k], fars[k] = val_k[0], far_k[0]

    if np.isnan(vals).any() or np.isnan(fars).any():
        logger.warning("some folds have no genuine or no impostor pairs; their VAL/FAR are NaN and are left out")
    all_acc = _rates(distances, same, acc_grid)[2]
    best_all = float(acc_grid[int(np.argmax(all_acc))])
    return VerificationResult(
        accuracy_mean=float(np.mean(fold_acc)),
        accuracy_std=float(np.std(fold_acc)),
        fold_accuracies=fold_acc,
        thresholds=fold_thr,
        cosine_thresholds=1.0 - fold_thr / 2.0,
        val=float(np.nanmean(vals)) if not np.isnan(vals).all() else float("nan"),
        val_std=float(np.nanstd(vals)) if not np.isnan(vals).all() else float("nan"),
        far=float(np.nanmean(fars)) if not np.isnan(fars).all() else float("nan"),
        far_target=float(far_target),
        tpr=np.mean(tprs, 0),
        fpr=np.mean(fprs, 0),
        roc_thresholds=acc_grid,
        best_threshold=best_all,
        best_cosine_threshold=1.0 - best_all / 2.0,
        xnorm=xnorm,
        n_pairs=n_pairs,
        distances=distances,
        issame=same,
    )


def flip_sum_normalize(embeddings: np.ndarray, embeddings_flipped: np.ndarray | None = None) -> np.ndarray:
    """Flip test: ``normalize(f(x) + f(flip x))``; the raw embeddings are added before the L2 normalization.

    Args:
        embeddings: (B, D) raw embeddings of the images.
        embeddings_flipped: (B, D) raw embeddings of the horizontally flipped images, or None (no flip test).

    Returns:
        (B, D) L2-normalized rows in the input dtype (a zero row stays zero, like sklearn's ``normalize``).
    """
    total = np.asarray(embeddings)
    if embeddings_flipped is not None:
        flipped = np.asarray(embeddings_flipped)
        if flipped.shape != total.shape:
            raise EvalError(f"flipped embeddings have shape {flipped.shape}, expected {total.shape}")
        total = total + flipped
    norms = np.sqrt(np.einsum("ij,ij->i", total, total))
    norms[norms == 0] = 1.0
    return total / norms[:, None]


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """(N,) float64 squared L2 distance ``||e[2i] - e[2i+1]||^2`` computed in the embeddings' dtype, like upstream."""
    diff = np.subtract(embeddings[0::2], embeddings[1::2])
    return np.sum(np.square(diff), 1).astype(np.float64)


def kfold_splits(n: int, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Contiguous (train, test) index splits with scikit-learn ``KFold(shuffle=False)`` fold sizes.

    The first ``n % n_folds`` folds get ``n // n_folds + 1`` items, the rest ``n // n_folds``. ``n_folds == 1`` gives
    train = test = everything (upstream's ``LFold``).
    """
    indices = np.arange(n)
    if n_folds == 1:
        return [(indices, indices)]
    sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    sizes[: n % n_folds] += 1
    splits = []
    start = 0
    for size in sizes:
        test = indices[start : start + size]
        train = np.concatenate([indices[:start], indices[start + size :]])
        splits.append((train, test))
        start += size
    return splits


def _less_counts(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of values strictly below each threshold (``np.less`` semantics)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def _rates(distances: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, ...]:
    """(tpr, fpr, accuracy) at each threshold, upstream's ``calculate_accuracy`` (0 rate when a class is empty)."""
    genuine = np.sort(distances[same])
    impostor = np.sort(distances[~same])
    tp = _less_counts(genuine, thresholds)
    fp = _less_counts(impostor, thresholds)
    tn = impostor.size - fp
    tpr = tp / genuine.size if genuine.size else np.zeros(thresholds.size)
    fpr = fp / impostor.size if impostor.size else np.zeros(thresholds.size)
    acc = (tp + tn) / distances.size
    return tpr, fpr, acc


def _accuracy(distances: np.ndarray, same: np.ndarray, threshold: float) -> float:
    predicted = distances < threshold
    return float(np.count_nonzero(predicted == same)) / distances.size


def _val_far(distances: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(val, far) at each threshold, upstream's ``calculate_val_far``; NaN where a class is empty."""
    genuine = np.sort(distances[same])
    impostor = np.sort(distances[~same])
    ta = _less_counts(genuine, thresholds)
    fa = _less_counts(impostor, thresholds)
    val = ta / genuine.size if genuine.size else np.full(thresholds.size, np.nan)
    far = fa / impostor.size if impostor.size else np.full(thresholds.size, np.nan)
    return val, far


def _xnorm(raw: np.ndarray | Sequence[np.ndarray] | None) -> float | None:
    """Mean L2 norm of raw embedding rows over all given arrays (upstream's XNorm)."""
    if raw is None:
        return None
    arrays = [np.asarray(raw)] if isinstance(raw, np.ndarray) else [np.asarray(a) for a in raw]
    norms = np.concatenate([np.linalg.norm(a.reshape(a.shape[0], -1).astype(np.float64), axis=1) for a in arrays])
    return float(norms.mean()) if norms.size else None


# --------------------------------------------------------------------------------------------------------------------
# .bin files: decode + embed in streamed chunks


@dataclass
class PairEmbeddings:
    """Raw embeddings of a pair list (pair i = rows 2i, 2i+1) and of the flipped images.

    Attributes:
        raw: (2N, D) float32 embeddings of the images.
        raw_flipped: (2N, D) float32 embeddings of the horizontally flipped images, or None without flip test.
        issame: (N,) bool.
    """

    raw: np.ndarray
    raw_flipped: np.ndarray | None
    issame: np.ndarray

    def evaluate(self, n_folds: int = 10) -> VerificationResult:
        """Flip-sum, normalize and run :func:`evaluate` (XNorm over both views)."""
        views = (self.raw,) if self.raw_flipped is None else (self.raw, self.raw_flipped)
        return evaluate(flip_sum_normalize(*views), self.issame, n_folds, raw=views)


def verify_bin(
    embedder: BaseEmbedder, path: str | os.PathLike, *, n_folds: int = 10, flip: bool = True, progress: bool = False
) -> VerificationResult:
    """10-fold verification of a model on an InsightFace ``.bin`` pair file (flip test by default)."""
    return embed_bin(embedder, path, flip=flip, progress=progress).evaluate(n_folds)


def embed_bin(
    embedder: BaseEmbedder,
    path: str | os.PathLike,
    *,
    flip: bool = True,
    progress: bool = False,
    chunk_images: int | None = None,
) -> PairEmbeddings:
    """Embed every image of a ``.bin`` pair file, decoding in bounded chunks.

    Only the encoded bytes and one or two chunks of decoded images (``chunk_images``, default 4 batches) are held at
    a time; decoding of the next chunk (OpenCV, GIL released) overlaps the model running on the current one.

    Raises:
        DataError: unreadable file, odd image count, or ``issame`` length not matching the images.
    """
    path = Path(path)
    encoded, issame = _load_bin(path)
    if len(encoded) % 2:
        raise DataError(f"{path}: {len(encoded)} images is odd; a .bin holds 2 images per pair")
    if len(issame) != len(encoded) // 2:
        raise DataError(f"{path}: {len(encoded)} images make {len(encoded) // 2} pairs but issame has {len(issame)}")
    chunk = int(chunk_images or max(embedder.batch_size, 1) * 4)
    size = embedder.input_size
    raw, flipped = [], []
    from tqdm import tqdm

    bar = tqdm(total=len(encoded), desc=path.name, unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        for images in _prefetch(pool, _decode_chunks(encoded, chunk, path, size)):
            if flip:
                a, b = embedder.embed_flip(images)
                raw.append(a)
                flipped.append(b)
            else:
                raw.append(embedder.embed(images))
            bar.update(len(images))
    bar.close()
    return PairEmbeddings(
        raw=np.concatenate(raw) if raw else np.zeros((0, embedder.embedding_size), np.float32),
        raw_flipped=(np.concatenate(flipped) if flipped else None) if flip else None,
        issame=np.asarray(issame, bool),
    )


def _decode_chunks(encoded: list, chunk: int, path: Path, size: tuple[int, int] | None) -> Iterator:
    """Callables decoding consecutive chunks to (B, H, W, 3) uint8 RGB (resized to the model input if needed)."""
    for start in range(0, len(encoded), chunk):

        def job(start: int = start) -> np.ndarray:
            return _decode_many(encoded[start : start + chunk], start, path, size)

        yield job


def _prefetch(pool: ThreadPoolExecutor, jobs: Iterator) -> Iterator[np.ndarray]:
    """Run job i+1 in the pool while the caller consumes the result of job i."""
    pending = None
    for job in jobs:
        future = pool.submit(job)
        if pending is not None:
            yield pending.result()
        pending = future
    if pending is not None:
        yield pending.result()


def _decode_many(items: list, offset: int, path: Path, size: tuple[int, int] | None) -> np.ndarray:
    import cv2

    from facetrain.data.images import decode_image

    out = []
    for i, data in enumerate(items):
        img = (
            data
            if isinstance(data, np.ndarray) and data.ndim == 3
            else decode_image(data, where=f"{path} image {offset + i}")
        )
        if size is not None and img.shape[:2] != tuple(size):
            img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        out.append(img)
    return np.stack(out)


def _load_bin(path: Path) -> tuple[list, np.ndarray]:
    from facetrain.data.bins import load_bin_encoded

    if not path.is_file():
        raise DataError(f"verification file not found: {path}")
    return load_bin_encoded(path)
