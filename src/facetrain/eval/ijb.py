"""IJB-B / IJB-C 1:1 verification and 1:N identification (InsightFace ``eval_ijbc.py`` protocol).

Layout (the official release as InsightFace distributes it)::

    DIR/meta/<t>_face_tid_mid.txt        image name, template id, media id      (one line per image)
    DIR/meta/<t>_name_5pts_score.txt     image name, 10 landmark coords, faceness score (same order)
    DIR/meta/<t>_template_pair_label.txt template 1, template 2, label (1 genuine)
    DIR/meta/<t>_1N_gallery_G1.csv ...   1:N lists (IJB-C: G1, G2; IJB-B: S1, S2) and <t>_1N_probe_mixed.csv
    DIR/loose_crop/<image name>

with ``<t>`` = ``ijbc`` or ``ijbb``. Protocol (REFERENCE section 7):

* every image is aligned to the ArcFace template with its 5 landmarks (112x112) and embedded with its flip;
* mode ``N?D?F?``: F1 adds the two views (F0 keeps the first); N0 L2-normalizes each image feature (N1 keeps the
  norm as a quality weight); D1 multiplies by the faceness score;
* template pooling: within a template, images of one media are averaged, media features are summed, the sum is
  L2-normalized;
* 1:1: cosine of template features; ROC as scikit-learn's ``roc_curve``; TAR@FAR by the nearest ROC point;
* 1:N (keras insightface ``IJB_evals``' rule): gallery template features vs probe template features; rank-k accuracy
  of mated probes (rank = 1 + gallery templates scoring strictly higher than the best mated one); TPIR@FPIR: the
  threshold is the ``max(int(n * fpir) - 1, 0)``-th highest best score of the non-mated probes, and a mated probe
  counts when its mated score beats every non-mated gallery score and the threshold.

Scoring is vectorized and memory-bounded: template pairs are scored as blocks of a template Gram matrix (one GEMM per
block of first templates) when the pairs are dense in (first, second) templates, as IJB's enrollment x probe pairs
are, and by chunked row gathers otherwise.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from facetrain.errors import EvalError
from facetrain.eval.ijb_io import (
    IJBMeta,
    embed_ijb_images,
    load_features,
    normalize_target,
    read_1n_list,
    read_ijb_meta,
    save_image_features,
)
from facetrain.eval.roc import IJB_FAR_TARGETS, roc_curve, tar_at_far_nearest

if TYPE_CHECKING:
    from facetrain.embed import BaseEmbedder

logger = logging.getLogger(__name__)

__all__ = [
    "IJBMeta",
    "IJBMode",
    "IJBResult",
    "IdentificationResult",
    "evaluate_ijb",
    "evaluate_ijb_features",
    "evaluate_ijb_modes",
    "identification_metrics",
    "image_features",
    "pool_templates",
    "read_ijb_meta",
    "score_template_pairs",
]

GALLERIES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}
FPIR_TARGETS = (1e-2, 1e-1)
_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class IJBMode:
    """``N?D?F?`` flags: norm kept as quality weight (N1), detector score weighting (D1), flip sum (F1)."""

    norm_score: bool = True
    detector_score: bool = True
    flip: bool = True

    @classmethod
    def parse(cls, text: str) -> IJBMode:
        match = re.fullmatch(r"N([01])D([01])F([01])", text.strip().upper())
        if not match:
            raise EvalError(f"IJB mode must look like N1D1F1 (each flag 0 or 1), got {text!r}")
        return cls(*(flag == "1" for flag in match.groups()))

    def __str__(self) -> str:
        return f"N{int(self.norm_score)}D{int(self.detector_score)}F{int(self.flip)}"


@dataclass
class IdentificationResult:
    """1:N identification against one gallery."""

    gallery: str
    n_gallery_templates: int
    n_mated_probes: int
    n_nonmated_probes: int
    top1: float
    top5: float
    top10: float
    tpir_at_fpir: dict[float, float]
    thresholds: dict[float, float]


@dataclass
class IJBResult:
    """1:1 (and optionally 1:N) results.

    Attributes:
        tar_at_far: {FAR target: TAR} by the nearest ROC point.
        auc: area under the ROC (trapezoid on the full curve).
        identification: per gallery, when the 1:N lists are present.
    """

    target: str
    mode: str
    n_images: int
    n_templates: int
    n_pairs: int
    n_genuine: int
    tar_at_far: dict[float, float]
    auc: float
    identification: list[IdentificationResult] = field(default_factory=list)
    scores: np.ndarray | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)

    def summary(self) -> dict:
        return {
            "target": self.target,
            "mode": self.mode,
            "n_images": self.n_images,
            "n_templates": self.n_templates,
            "n_pairs": self.n_pairs,
            "n_genuine": self.n_genuine,
            "tar_at_far": {f"{k:g}": v for k, v in self.tar_at_far.items()},
            "auc": self.auc,
            "identification": [
                {
                    **{k: v for k, v in vars(r).items() if k not in ("tpir_at_fpir", "thresholds")},
                    "tpir_at_fpir": {f"{k:g}": v for k, v in r.tpir_at_fpir.items()},
                    "thresholds": {f"{k:g}": v for k, v in r.thresholds.items()},
                }
                for r in self.identification
            ],
        }


# --------------------------------------------------------------------------------------------------------------------
# top level


def evaluate_ijb(
    root: str | os.PathLike,
    *,
    target: str = "IJBC",
    mode: str | IJBMode = "N1D1F1",
    embedder: BaseEmbedder | None = None,
    features: str | os.PathLike | None = None,
    save_features: str | os.PathLike | None = None,
    identification: bool = True,
    progress: bool = False,
) -> IJBResult:
    """Run IJB-B/C 1:1 (and 1:N when its lists exist) from the dataset folder in one mode.

    Args:
        root: the IJB folder holding ``meta/`` and ``loose_crop/``.
        target: ``IJBB`` or ``IJBC``.
        mode: ``N?D?F?`` (default N1D1F1, InsightFace's default).
        embedder: model to embed the images (not needed with ``features``).
        features: image features saved earlier (``save_features``), instead of embedding.
        save_features: write the image features here (``.npz``), to re-score other modes without the model.
        identification: also run 1:N when the gallery/probe csv files are present.
        progress: tqdm progress while embedding.
    """
    return evaluate_ijb_modes(
        root,
        target=target,
        modes=[mode],
        embedder=embedder,
        features=features,
        save_features=save_features,
        identification=identification,
        progress=progress,
    )[0]


def evaluate_ijb_modes(
    root: str | os.PathLike,
    *,
    target: str = "IJBC",
    modes: list[str | IJBMode] | tuple = ("N1D1F1",),
    embedder: BaseEmbedder | None = None,
    features: str | os.PathLike | None = None,
    save_features: str | os.PathLike | None = None,
    identification: bool = True,
    progress: bool = False,
) -> list[IJBResult]:
    """Like :func:`evaluate_ijb` for several modes, embedding the images once."""
    target = normalize_target(target)
    parsed = [m if isinstance(m, IJBMode) else IJBMode.parse(m) for m in modes]
    meta = read_ijb_meta(root, target)
    if features is not None:
        img_feats = load_features(features, meta)
    elif embedder is not None:
        img_feats = embed_ijb_images(embedder, root, meta, progress=progress)
    else:
        raise EvalError("IJB evaluation needs a model or saved features (--from-features)")
    if save_features is not None:
        save_image_features(save_features, img_feats, meta)
    return [evaluate_ijb_features(img_feats, meta, mode=m, identification=identification) for m in parsed]


def evaluate_ijb_features(
    img_feats: np.ndarray, meta: IJBMeta, *, mode: str | IJBMode = "N1D1F1", identification: bool = True
) -> IJBResult:
    """1:1 (+ 1:N) from image features (n, 2D) = [f(x), f(flip x)] per image (InsightFace's saved layout)."""
    mode = mode if isinstance(mode, IJBMode) else IJBMode.parse(mode)
    feats = image_features(img_feats, meta.faceness, mode)
    template_ids, template_feats = pool_templates(feats, meta.templates, meta.medias)
    scores = score_template_pairs(template_feats, template_ids, meta.pair_t1, meta.pair_t2)
    fpr, tpr, _ = roc_curve(meta.pair_label, scores)
    result = IJBResult(
        target=meta.target,
        mode=str(mode),
        n_images=len(meta.names),
        n_templates=int(template_ids.size),
        n_pairs=int(scores.size),
        n_genuine=int(np.count_nonzero(meta.pair_label)),
        tar_at_far=tar_at_far_nearest(fpr, tpr, IJB_FAR_TARGETS),
        auc=float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr)),
        scores=scores,
        labels=meta.pair_label,
    )
    if identification and meta.meta_dir is not None:
        result.identification = identify_1n(template_feats, template_ids, meta.meta_dir, meta.target)
    return result


# --------------------------------------------------------------------------------------------------------------------
# features, pooling, scoring


def image_features(img_feats: np.ndarray, faceness: np.ndarray, mode: IJBMode) -> np.ndarray:
    """Per-image features for a mode: flip sum or first view, optional L2 normalization, optional faceness weight.

    Args:
        img_feats: (n, 2D) float, [f(x), f(flip x)] per row.
        faceness: (n,) detector scores.

    Returns:
        (n, D) float32.
    """
    if img_feats.ndim != 2 or img_feats.shape[1] % 2:
        raise EvalError(f"IJB image features must be (n, 2D) = [f(x), f(flip x)], got shape {img_feats.shape}")
    half = img_feats.shape[1] // 2
    feats = img_feats[:, :half] + img_feats[:, half:] if mode.flip else img_feats[:, :half].copy()
    feats = feats.astype(np.float32, copy=False)
    if not mode.norm_score:
        norms = np.sqrt(np.einsum("ij,ij->i", feats, feats))
        feats /= np.where(norms == 0, 1, norms)[:, None]
    if mode.detector_score:
        feats *= np.asarray(faceness, np.float32)[:, None]
    return feats


def pool_templates(
    feats: np.ndarray, templates: np.ndarray, medias: np.ndarray, *, chunk_groups: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """Template features: mean over each (template, media) group, sum over a template's medias, L2-normalized.

    Sums run in float64 over contiguous runs of the (template, media)-sorted order, ``chunk_groups`` media groups
    at a time (whole templates per chunk), so memory stays at ``chunk_groups x D x 8`` bytes beyond the output.

    Args:
        feats: (n, D) per-image features.
        templates: (n,) template id of each image.
        medias: (n,) media id of each image.

    Returns:
        (template_ids (T,) sorted unique, template_feats (T, D) float32 L2-normalized).
    """
    templates = np.asarray(templates, np.int64)
    medias = np.asarray(medias, np.int64)
    if feats.shape[0] != templates.size or templates.size != medias.size:
        raise EvalError(f"{feats.shape[0]} image features but {templates.size} template / {medias.size} media ids")
    order = np.lexsort((medias, templates))
    t_sorted, m_sorted = templates[order], medias[order]
    group_starts = np.nonzero(np.r_[True, (np.diff(t_sorted) != 0) | (np.diff(m_sorted) != 0)])[0]
    group_counts = np.diff(np.r_[group_starts, order.size])
    group_templates = t_sorted[group_starts]
    template_starts = np.nonzero(np.r_[True, np.diff(group_templates) != 0])[0]  # in group units
    template_counts = np.diff(np.r_[template_starts, group_starts.size])
    out = np.empty((template_starts.size, feats.shape[1]), np.float32)
    t = 0
    while t < template_starts.size:
        g0 = template_starts[t]
        t_end = max(int(np.searchsorted(template_starts, g0 + chunk_groups, side="right")), t + 1)
        g1 = template_starts[t_end] if t_end < template_starts.size else group_starts.size
        media = _segment_sums(feats, order, group_starts[g0:g1], group_counts[g0:g1])
        media /= group_counts[g0:g1, None]
        local = np.arange(g1 - g0)
        summed = _segment_sums(media, local, template_starts[t:t_end] - g0, template_counts[t:t_end])
        norms = np.linalg.norm(summed, axis=1)
        out[t:t_end] = summed / np.where(norms == 0, 1, norms)[:, None]
        t = t_end
    return group_templates[template_starts], out


def _segment_sums(values: np.ndarray, order: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(S, D) float64 sums of ``values[order[start : start + count]]`` per segment, in row order.

    One vectorized gather per position j inside the segments (as many passes as the longest segment), which is much
    faster than ``np.add.reduceat`` along axis 0 and adds each segment's rows in order like a plain loop.
    """
    out = values[order[starts]].astype(np.float64)
    for j in range(1, int(counts.max(initial=1))):
        active = np.nonzero(counts > j)[0]
        out[active] += values[order[starts[active] + j]]
    return out


def score_template_pairs(
    template_feats: np.ndarray, template_ids: np.ndarray, t1: np.ndarray, t2: np.ndarray, *, where: str = "pair list"
) -> np.ndarray:
    """(P,) float32 cosine of each template pair (features already L2-normalized).

    Raises:
        EvalError: a pair names a template that has no image.
    """
    r1 = _template_rows(template_ids, t1, where)
    r2 = _template_rows(template_ids, t2, where)
    u1, inv1 = _compact(r1, template_ids.size)
    u2, inv2 = _compact(r2, template_ids.size)
    out = np.empty(r1.size, np.float32)
    if u1.size * u2.size <= 8 * max(r1.size, 1):
        # dense: blocks of the Gram matrix between the templates used on each side
        f2t = np.ascontiguousarray(template_feats[u2].T)
        rows = max(1, _BLOCK_BYTES // (4 * max(u2.size, 1)))
        for lo in range(0, u1.size, rows):
            hi = min(lo + rows, u1.size)
            gram = template_feats[u1[lo:hi]] @ f2t
            if lo == 0 and hi == u1.size:
                out[:] = gram[inv1, inv2]
            else:
                idx = np.nonzero((inv1 >= lo) & (inv1 < hi))[0]
                out[idx] = gram[inv1[idx] - lo, inv2[idx]]
    else:
        step = max(1, _BLOCK_BYTES // (8 * template_feats.shape[1]))
        for lo in range(0, r1.size, step):
            a = template_feats[r1[lo : lo + step]]
            b = template_feats[r2[lo : lo + step]]
            out[lo : lo + step] = np.einsum("ij,ij->i", a, b)
    return out


def _compact(rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(used rows sorted, index of each entry among them), like ``np.unique(return_inverse=True)`` without a sort."""
    present = np.zeros(n, bool)
    present[rows] = True
    used = np.nonzero(present)[0]
    position = np.zeros(n, np.int64)
    position[used] = np.arange(used.size)
    return used, position[rows]


def _template_rows(template_ids: np.ndarray, ids: np.ndarray, where: str) -> np.ndarray:
    """Row of each id in the sorted ``template_ids`` (a lookup table when the ids are compact, else a binary search).

    Raises:
        EvalError: an id without a template, naming ``where`` and the (1-based) entry.
    """
    ids = np.asarray(ids, np.int64)
    lo, hi = (int(template_ids[0]), int(template_ids[-1])) if template_ids.size else (0, -1)
    if template_ids.size and hi - lo <= max(1 << 24, 8 * template_ids.size):
        table = np.full(hi - lo + 1, -1, np.int64)
        table[template_ids - lo] = np.arange(template_ids.size)
        inside = (ids >= lo) & (ids <= hi)
        rows = np.full(ids.size, -1, np.int64)
        rows[inside] = table[ids[inside] - lo]
        missing = rows < 0
    else:
        rows = np.minimum(np.searchsorted(template_ids, ids), max(template_ids.size - 1, 0))
        missing = template_ids[rows] != ids if template_ids.size else np.ones(ids.size, bool)
    if missing.any():
        first = int(np.argmax(missing))
        raise EvalError(
            f"{where} entry {first + 1} names template {ids[first]}, which has no image in the face list "
            f"({int(missing.sum())} such entries)"
        )
    return rows


# --------------------------------------------------------------------------------------------------------------------
# 1:N


def identify_1n(
    template_feats: np.ndarray, template_ids: np.ndarray, meta_dir: Path, target: str
) -> list[IdentificationResult]:
    """1:N identification for each gallery whose csv exists next to the probe csv; [] when the lists are absent."""
    prefix = target.lower()
    probe_path = meta_dir / f"{prefix}_1N_probe_mixed.csv"
    if not probe_path.is_file():
        return []
    probe_t, probe_s = read_1n_list(probe_path)
    results = []
    for gallery in GALLERIES[target]:
        path = meta_dir / f"{prefix}_1N_gallery_{gallery}.csv"
        if not path.is_file():
            continue
        gal_t, gal_s = read_1n_list(path)
        gal_feats = template_feats[_template_rows(template_ids, gal_t, str(path))]
        probe_feats = template_feats[_template_rows(template_ids, probe_t, str(probe_path))]
        results.append(identification_metrics(probe_feats, probe_s, gal_feats, gal_s, name=gallery))
    return results


def identification_metrics(
    probe_feats: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_subjects: np.ndarray,
    *,
    name: str = "gallery",
    fpir_targets=FPIR_TARGETS,
    chunk: int = 4096,
) -> IdentificationResult:
    """Rank-1/5/10 of mated probes and TPIR at FPIR (keras insightface rule), probes scored in chunks.

    Args:
        probe_feats: (Q, D) normalized probe template features.
        probe_subjects: (Q,) subject ids.
        gallery_feats: (G, D) normalized gallery template features.
        gallery_subjects: (G,) subject ids (several templates per subject allowed).
    """
    probe_subjects = np.asarray(probe_subjects)
    gallery_subjects = np.asarray(gallery_subjects)
    mated_score, best_nonmated, ranks, nonmated_best = [], [], [], []
    for lo in range(0, probe_feats.shape[0], chunk):
        sims = probe_feats[lo : lo + chunk] @ gallery_feats.T
        same = probe_subjects[lo : lo + chunk, None] == gallery_subjects[None, :]
        is_mated = same.any(1)
        pos = np.where(same, sims, -np.inf).max(1)
        neg = np.where(same, -np.inf, sims).max(1)
        rank = 1 + np.sum(sims > pos[:, None], axis=1)
        mated_score.append(pos[is_mated])
        best_nonmated.append(neg[is_mated])
        ranks.append(rank[is_mated])
        nonmated_best.append(sims[~is_mated].max(1) if (~is_mated).any() else np.zeros(0, sims.dtype))
    pos = np.concatenate(mated_score)
    neg = np.concatenate(best_nonmated)
    rank = np.concatenate(ranks)
    nonmated = np.sort(np.concatenate(nonmated_best))[::-1]
    if pos.size == 0:
        raise EvalError(f"1:N gallery {name}: no probe subject is enrolled in the gallery")
    tpir, thresholds = {}, {}
    correct = pos > neg
    for fpir in fpir_targets:
        if nonmated.size == 0:
            tpir[float(fpir)], thresholds[float(fpir)] = float("nan"), float("nan")
            continue
        thr = float(nonmated[max(int(nonmated.size * fpir) - 1, 0)])
        thresholds[float(fpir)] = thr
        tpir[float(fpir)] = float(np.count_nonzero(correct & (pos > thr)) / pos.size)
    return IdentificationResult(
        gallery=name,
        n_gallery_templates=int(gallery_feats.shape[0]),
        n_mated_probes=int(pos.size),
        n_nonmated_probes=int(nonmated.size),
        top1=float(np.mean(rank <= 1)),
        top5=float(np.mean(rank <= 5)),
        top10=float(np.mean(rank <= 10)),
        tpir_at_fpir=tpir,
        thresholds=thresholds,
    )
