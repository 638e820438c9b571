"""Evaluate a model on your own identities: ``root/<identity>/<image>`` of aligned faces.

Pairs: every genuine and impostor pair when there are at most ``max_pairs`` of them, otherwise a balanced sample
(half genuine, half impostor, without replacement, seeded). Reported:

* 10-fold accuracy with InsightFace's protocol (:func:`facetrain.eval.verification.evaluate_distances`; the pairs
  are shuffled with the seed first, since its folds are contiguous);
* TAR at each FAR with the lowest cosine threshold whose FAR on these pairs is <= the target
  (:func:`facetrain.eval.roc.threshold_at_far`), and the equal error rate;
* rank-1 identification with leave-one-out galleries: each image of an identity with >= 2 images is a probe; the
  gallery holds one template per identity (the normalized sum of its normalized embeddings), the probe's own
  identity's template is rebuilt without the probe; identities with one image are distractors only. A probe is
  correct when its own template scores strictly highest.

Embeddings are flip-summed and L2-normalized (as in verification).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facetrain.errors import DataError, EvalError
from facetrain.eval.roc import OperatingPoint, equal_error_rate, threshold_at_far
from facetrain.eval.verification import VerificationResult, evaluate_distances, flip_sum_normalize

if TYPE_CHECKING:
    from facetrain.embed import BaseEmbedder

logger = logging.getLogger(__name__)

DEFAULT_FARS = (1e-4, 1e-3, 1e-2)
DEFAULT_MAX_PAIRS = 1_000_000


@dataclass
class FolderEmbeddings:
    """Normalized flip-summed embeddings of a folder of identities.

    Attributes:
        embeddings: (N, D) float32, L2-normalized.
        labels: (N,) int64 identity index.
        paths: N image paths.
        identities: identity folder names (index = label).
        xnorm: mean raw embedding norm over both views.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    paths: list[str]
    identities: list[str]
    xnorm: float


@dataclass
class FolderResult:
    """What :func:`evaluate_folder` measures (see the module docstring)."""

    n_images: int
    n_identities: int
    n_pairs: int
    n_genuine: int
    n_impostor: int
    all_pairs: bool
    verification: VerificationResult
    operating_points: dict[float, OperatingPoint]
    eer: float
    eer_threshold: float
    rank1: float
    n_probes: int
    pair_index: np.ndarray = field(repr=False)  # (P, 2) image indices
    scores: np.ndarray = field(repr=False)  # (P,) cosine
    issame: np.ndarray = field(repr=False)

    def summary(self) -> dict:
        return {
            "n_images": self.n_images,
            "n_identities": self.n_identities,
            "n_pairs": self.n_pairs,
            "n_genuine": self.n_genuine,
            "n_impostor": self.n_impostor,
            "all_pairs": self.all_pairs,
            "accuracy_mean": self.verification.accuracy_mean,
            "accuracy_std": self.verification.accuracy_std,
            "best_cosine_threshold": self.verification.best_cosine_threshold,
            "xnorm": self.verification.xnorm,
            "tar_at_far": {
                f"{far:g}": {"tar": op.tar, "far": op.far, "cosine_threshold": op.threshold}
                for far, op in self.operating_points.items()
            },
            "eer": self.eer,
            "eer_cosine_threshold": self.eer_threshold,
            "rank1": self.rank1,
            "n_probes": self.n_probes,
        }


def evaluate_folder(
    embedder: BaseEmbedder,
    root: str | os.PathLike,
    *,
    max_pairs: int | None = DEFAULT_MAX_PAIRS,
    seed: int = 0,
    fars: tuple[float, ...] = DEFAULT_FARS,
    n_folds: int = 10,
    progress: bool = False,
) -> FolderResult:
    """Embed ``root/<identity>/<image>`` and measure verification and identification (module docstring).

    Args:
        embedder: the model.
        root: folder of identity folders holding aligned faces.
        max_pairs: use all pairs up to this many, else a balanced sample of this many; None: always all pairs.
        seed: sampling and fold-shuffling seed.
        fars: FAR targets for TAR@FAR.
        n_folds: folds of the accuracy protocol.
    """
    folder = embed_folder(embedder, root, progress=progress)
    return evaluate_folder_embeddings(folder, max_pairs=max_pairs, seed=seed, fars=fars, n_folds=n_folds)


def evaluate_folder_embeddings(
    folder: FolderEmbeddings,
    *,
    max_pairs: int | None = DEFAULT_MAX_PAIRS,
    seed: int = 0,
    fars: tuple[float, ...] = DEFAULT_FARS,
    n_folds: int = 10,
) -> FolderResult:
    """:func:`evaluate_folder` on embeddings already computed."""
    emb, labels = folder.embeddings, folder.labels
    pairs, all_pairs = make_pairs(labels, max_pairs=max_pairs, seed=seed)
    issame = labels[pairs[:, 0]] == labels[pairs[:, 1]]
    if issame.all() or not issame.any():
        raise EvalError(f"{len(set(labels.tolist()))} identities give no genuine or no impostor pair; need >= 2 "
                        "identities and one with >= 2 images")  # fmt: skip
    distances = pair_sq_distances(emb, pairs)
    scores = (1.0 - distances / 2.0).astype(np.float32)
    verification = evaluate_distances(distances, issame, min(n_folds, len(pairs)), xnorm=folder.xnorm)
    points = {float(f): threshold_at_far(issame, scores, f) for f in fars}
    eer, eer_thr = equal_error_rate(issame, scores)
    rank1, n_probes = leave_one_out_rank1(emb, labels)
    return FolderResult(
        n_images=len(labels),
        n_identities=len(folder.identities),
        n_pairs=len(pairs),
        n_genuine=int(issame.sum()),
        n_impostor=int((~issame).sum()),
        all_pairs=all_pairs,
        verification=verification,
        operating_points=points,
        eer=eer,
        eer_threshold=eer_thr,
        rank1=rank1,
        n_probes=n_probes,
        pair_index=pairs,
        scores=scores,
        issame=issame,
    )


def embed_folder(
    embedder: BaseEmbedder, root: str | os.PathLike, *, progress: bool = False, chunk: int | None = None
) -> FolderEmbeddings:
    """Flip-summed normalized embeddings of every image of ``root/<identity>/<image>`` (decoding overlaps the model)."""
    import cv2
    from tqdm import tqdm

    from facetrain.data.folders import ImageFolderDataset

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"folder not found: {root}")
    dataset = ImageFolderDataset(root)
    n = len(dataset)
    if n == 0:
        raise DataError(f"{root}: no images; expected root/<identity>/<image>")
    size = embedder.input_size
    chunk = int(chunk or embedder.batch_size * 4)

    def load(lo: int) -> np.ndarray:
        images = []
        for i in range(lo, min(lo + chunk, n)):
            img = dataset[i][0]
            if size is not None and img.shape[:2] != tuple(size):
                img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_AREA)
            images.append(img)
        return np.stack(images)

    raw, flipped = [], []
    bar = tqdm(total=n, desc=root.name, unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=1) as pool:
        starts = list(range(0, n, chunk))
        pending = pool.submit(load, 0)
        for k in range(len(starts)):
            images = pending.result()
            if k + 1 < len(starts):
                pending = pool.submit(load, starts[k + 1])
            a, b = embedder.embed_flip(images)
            raw.append(a)
            flipped.append(b)
            bar.update(len(images))
    bar.close()
    raw_all, flipped_all = np.concatenate(raw), np.concatenate(flipped)
    norms = np.r_[np.linalg.norm(raw_all, axis=1), np.linalg.norm(flipped_all, axis=1)]
    names = sorted(dataset.label_map, key=dataset.label_map.get)
    return FolderEmbeddings(
        embeddings=flip_sum_normalize(raw_all, flipped_all).astype(np.float32),
        labels=dataset.labels(),
        paths=[p for p, _ in dataset.samples],
        identities=names,
        xnorm=float(norms.mean()),
    )


def make_pairs(labels: np.ndarray, *, max_pairs: int | None, seed: int = 0) -> tuple[np.ndarray, bool]:
    """(P, 2) image-index pairs (i < j), shuffled with ``seed``, and whether they are all pairs.

    All ``N (N - 1) / 2`` pairs when that is at most ``max_pairs`` (or ``max_pairs`` is None); otherwise
    ``max_pairs // 2`` genuine pairs (all of them if fewer) and as many impostor pairs, sampled without replacement.
    """
    labels = np.asarray(labels)
    n = labels.size
    total = n * (n - 1) // 2
    rng = np.random.default_rng(seed)
    if max_pairs is None or total <= max_pairs:
        i, j = np.triu_indices(n, 1)
        pairs = np.stack([i, j], 1)
        return pairs[rng.permutation(len(pairs))], True
    genuine = _genuine_pairs(labels)
    n_gen = min(len(genuine), max_pairs // 2)
    genuine = genuine[rng.choice(len(genuine), n_gen, replace=False)] if n_gen < len(genuine) else genuine
    n_imp = max_pairs - n_gen  # balanced, or more impostors when genuine pairs are few
    impostor = _sample_impostors(labels, n_imp, rng)
    pairs = np.concatenate([genuine, impostor])
    return pairs[rng.permutation(len(pairs))], False


def _genuine_pairs(labels: np.ndarray) -> np.ndarray:
    order = np.argsort(labels, kind="stable")
    bounds = np.r_[0, np.nonzero(np.diff(labels[order]))[0] + 1, labels.size]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi - lo >= 2:
            i, j = np.triu_indices(hi - lo, 1)
            idx = order[lo:hi]
            out.append(np.stack([np.minimum(idx[i], idx[j]), np.maximum(idx[i], idx[j])], 1))
    return np.concatenate(out) if out else np.zeros((0, 2), np.int64)


def _sample_impostors(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    n = labels.size
    found = np.zeros((0, 2), np.int64)
    for _ in range(100):
        need = count - len(found)
        if need <= 0:
            break
        cand = rng.integers(0, n, (2 * need + 16, 2))
        cand = np.sort(cand, 1)
        cand = cand[(cand[:, 0] != cand[:, 1]) & (labels[cand[:, 0]] != labels[cand[:, 1]])]
        found = np.unique(np.concatenate([found, cand]), axis=0)
    return found[rng.permutation(len(found))[:count]]


def pair_sq_distances(embeddings: np.ndarray, pairs: np.ndarray, *, chunk: int = 65536) -> np.ndarray:
    """(P,) float64 squared L2 distances of the embedding pairs, in chunks."""
    out = np.empty(len(pairs), np.float64)
    for lo in range(0, len(pairs), chunk):
        p = pairs[lo : lo + chunk]
        diff = embeddings[p[:, 0]] - embeddings[p[:, 1]]
        out[lo : lo + chunk] = np.einsum("ij,ij->i", diff, diff)
    return out


def leave_one_out_rank1(embeddings: np.ndarray, labels: np.ndarray, *, chunk: int = 2048) -> tuple[float, int]:
    """(rank-1 rate, number of probes) with leave-one-out identity templates (module docstring)."""
    labels = np.asarray(labels)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sums = np.zeros((classes.size, embeddings.shape[1]), np.float64)
    np.add.at(sums, inverse, embeddings.astype(np.float64))
    templates = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    probes = np.nonzero(counts[inverse] >= 2)[0]
    if probes.size == 0 or classes.size < 2:
        return float("nan"), 0
    correct = 0
    for lo in range(0, probes.size, chunk):
        idx = probes[lo : lo + chunk]
        e = embeddings[idx].astype(np.float64)
        sims = e @ templates.T
        own = sums[inverse[idx]] - e
        own_score = np.einsum("ij,ij->i", e, own) / np.maximum(np.linalg.norm(own, axis=1), 1e-12)
        sims[np.arange(idx.size), inverse[idx]] = -np.inf
        correct += int(np.count_nonzero(own_score > sims.max(1)))
    return correct / probes.size, int(probes.size)


def write_hard_pairs_bin(result: FolderResult, paths: list[str], out: str | os.PathLike, *, per_kind: int = 100) -> int:
    """Write the hardest pairs as a verification ``.bin``: the ``per_kind`` lowest-scoring genuine pairs and the
    ``per_kind`` highest-scoring impostor pairs, with the original encoded image bytes. Returns the pair count."""
    from facetrain.data.bins import write_bin

    gen = np.nonzero(result.issame)[0]
    imp = np.nonzero(~result.issame)[0]
    hard_gen = gen[np.argsort(result.scores[gen], kind="stable")[:per_kind]]
    hard_imp = imp[np.argsort(-result.scores[imp], kind="stable")[:per_kind]]
    chosen = np.r_[hard_gen, hard_imp]
    images, issame = [], []
    for k in chosen:
        a, b = result.pair_index[k]
        images += [Path(paths[a]).read_bytes(), Path(paths[b]).read_bytes()]
        issame.append(bool(result.issame[k]))
    write_bin(out, images, issame)
    return len(chosen)
