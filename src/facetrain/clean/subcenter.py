"""Sub-center ArcFace dataset cleaning (Deng et al., "Sub-center ArcFace", ECCV 2020, drop procedure).

A model trained with K sub-centres per class (``subcenter_k``, rows ``c*K + k`` of ``class_centres``) gathers the clean
majority of a class around one *dominant* sub-centre while noisy images (label noise, wrong crops) go to the others.
For every class: assign each image to its nearest sub-centre, ``k_i = argmax_k cos(x_i, w_{c,k})``; the dominant
sub-centre is the one with the most assignments; keep image ``i`` iff ``angle(x_i, w_{c,dominant}) < threshold``
(75 degrees by default, ``cos 75 = 0.2588``). Classes left empty are dropped and labels re-indexed contiguously. Then
retrain plain ArcFace (K=1) on the cleaned set.

The dataset is streamed: images are embedded one batch at a time and only the ``(N, K)`` cosines are kept.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from facetrain.clean.common import (
    atomic_write_json,
    atomic_write_text,
    default_device,
    iter_image_batches,
    l2_normalize,
    load_training_checkpoint,
    progress_bar,
    pyplot,
    relabel,
    save_figure,
    write_subset,
)
from facetrain.errors import DataError, ModelError

log = logging.getLogger(__name__)

__all__ = ["SubcenterSelection", "SubcenterReport", "subcenter_cosines", "select_subcenter", "clean_subcenter"]


@dataclass
class SubcenterSelection:
    """Per-image outcome of the drop procedure.

    Attributes:
        assigned: (N,) nearest sub-centre of each image within its class.
        dominant: (C,) dominant sub-centre of each class (-1 for a class without images).
        cos_dominant: (N,) cosine between each image and its class's dominant sub-centre.
        keep: (N,) bool, ``cos_dominant > cos(threshold)``.
        counts: (C, K) images assigned to each sub-centre.
    """

    assigned: np.ndarray
    dominant: np.ndarray
    cos_dominant: np.ndarray
    keep: np.ndarray
    counts: np.ndarray

    @property
    def angles_deg(self) -> np.ndarray:
        """(N,) angle in degrees to the dominant sub-centre."""
        return np.degrees(np.arccos(np.clip(self.cos_dominant, -1.0, 1.0)))


@dataclass
class SubcenterReport:
    """Summary of :func:`clean_subcenter` (also written as ``summary.json``)."""

    checkpoint: str
    data: str
    out: str
    threshold_deg: float
    subcenter_k: int
    images: int
    kept: int
    dropped: int
    classes: int
    classes_kept: int
    classes_dropped: int
    report_files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def subcenter_cosines(embeddings: np.ndarray, labels: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Cosine of each image to the K sub-centres of its own class.

    Args:
        embeddings: (B, D) embeddings (any norm).
        labels: (B,) class of each image, in ``[0, C)``.
        centres: (C, K, D) sub-centres (any norm).

    Returns:
        (B, K) float32 cosines.
    """
    emb = l2_normalize(embeddings)
    cen = centres / np.maximum(np.linalg.norm(centres, axis=2, keepdims=True), 1e-12)
    return np.einsum("bd,bkd->bk", emb, cen[labels].astype(np.float32)).astype(np.float32)


def select_subcenter(
    cosines: np.ndarray, labels: np.ndarray, num_classes: int, *, threshold_deg: float = 75.0
) -> SubcenterSelection:
    """The drop rule on precomputed cosines.

    Args:
        cosines: (N, K) cosine of each image to its class's sub-centres (:func:`subcenter_cosines`).
        labels: (N,) classes in ``[0, num_classes)``.
        num_classes: C.
        threshold_deg: keep an image iff its angle to the dominant sub-centre is below this (degrees).

    Returns:
        A :class:`SubcenterSelection`.
    """
    if not 0.0 < threshold_deg <= 180.0:
        raise DataError(f"threshold_deg must be in (0, 180], got {threshold_deg}")
    cosines = np.asarray(cosines, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    n, k = cosines.shape
    assigned = cosines.argmax(axis=1)
    counts = np.bincount(labels * k + assigned, minlength=num_classes * k).reshape(num_classes, k)
    dominant = counts.argmax(axis=1)  # ties: the lowest sub-centre index
    dominant[counts.sum(axis=1) == 0] = -1
    cos_dom = cosines[np.arange(n), dominant[labels]]
    keep = cos_dom > math.cos(math.radians(threshold_deg))
    return SubcenterSelection(assigned, dominant, cos_dom, keep, counts)


def clean_subcenter(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    threshold_deg: float = 75.0,
    fmt: str = "rec",
    report_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[SubcenterReport, SubcenterSelection]:
    """Clean a dataset with a checkpoint trained with ``subcenter_k > 1`` (see the module docstring).

    Args:
        checkpoint: a training checkpoint holding ``class_centres`` (C*K, D) and ``subcenter_k``.
        data: the dataset the checkpoint was trained on (labels must match its classes).
        out: cleaned dataset (folder for ``rec``/``folder``, file for ``list``).
        threshold_deg: keep images closer than this angle (degrees) to the dominant sub-centre.
        fmt: ``"rec"``, ``"folder"`` or ``"list"``.
        report_dir: where ``per_class.csv``, ``summary.json`` and ``angles.png`` go (default ``<out>_report``).
        batch_size: images embedded at once.
        device: torch device (default CUDA when available).
        overwrite: replace existing outputs.
        progress: tqdm bar on a TTY.

    Returns:
        ``(report, selection)``.

    Raises:
        ModelError: checkpoint without class centres, or centres that do not match the embedding size.
        DataError: dataset labels outside the checkpoint's classes, or nothing kept.
    """
    from facetrain.data import open_dataset
    from facetrain.embed import TorchEmbedder
    from facetrain.models import load_backbone

    ckpt = load_training_checkpoint(checkpoint)
    k, c = ckpt["subcenter_k"], ckpt["num_classes"]
    if k < 2:
        log.warning("%s: subcenter_k=%d; with one centre per class only the angle threshold applies", checkpoint, k)
    centres = ckpt["class_centres"].reshape(c, k, -1)
    embedder = TorchEmbedder(load_backbone(checkpoint), device=default_device(device), batch_size=batch_size)
    if embedder.embedding_size != centres.shape[2]:
        raise ModelError(
            f"{checkpoint}: class_centres have {centres.shape[2]} dims but the backbone embeds "
            f"{embedder.embedding_size}"
        )
    dataset = open_dataset(data)
    labels = np.asarray(dataset.labels(), dtype=np.int64)
    if len(labels) == 0:
        raise DataError(f"{data}: the dataset has no image")
    if labels.min() < 0 or labels.max() >= c:
        raise DataError(
            f"{data}: labels span {labels.min()}..{labels.max()} but {checkpoint} has {c} classes; "
            "pass the dataset the checkpoint was trained on"
        )
    cosines = np.zeros((len(labels), k), np.float32)
    bar = progress_bar(len(labels), "subcenter", progress)
    try:
        for idx, images, batch_labels in iter_image_batches(dataset, batch_size):
            emb = embedder.embed(images)
            if not np.all(np.isfinite(emb)):
                raise ModelError(f"{checkpoint}: NaN/Inf embeddings for images {idx[0]}..{idx[-1]} of {data}")
            cosines[idx] = subcenter_cosines(emb, batch_labels, centres)
            bar.update(len(idx))
    finally:
        bar.close()
    selection = select_subcenter(cosines, labels, c, threshold_deg=threshold_deg)
    keep, new_labels, _ = relabel(selection.keep, labels)
    if len(keep) == 0:
        raise DataError(f"{data}: no image is within {threshold_deg} degrees of its dominant sub-centre")
    write_subset(data, out, keep, new_labels, fmt=fmt, overwrite=overwrite)

    report_dir = Path(report_dir) if report_dir is not None else Path(f"{out}_report")
    present = np.bincount(labels, minlength=c) > 0
    kept_classes = np.bincount(labels[selection.keep], minlength=c) > 0
    report = SubcenterReport(
        checkpoint=str(checkpoint),
        data=str(data),
        out=str(out),
        threshold_deg=float(threshold_deg),
        subcenter_k=k,
        images=len(labels),
        kept=int(selection.keep.sum()),
        dropped=int((~selection.keep).sum()),
        classes=int(present.sum()),
        classes_kept=int(kept_classes.sum()),
        classes_dropped=int((present & ~kept_classes).sum()),
    )
    report.report_files = write_subcenter_report(report_dir, report, selection, labels)
    return report, selection


def write_subcenter_report(
    report_dir: str | os.PathLike, report: SubcenterReport, selection: SubcenterSelection, labels: np.ndarray
) -> list[str]:
    """``per_class.csv`` (kept/dropped per class), ``dropped.csv`` (image index, label, angle), ``summary.json``,
    ``angles.png`` (histogram of the angle to the dominant sub-centre with the threshold)."""
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    c, k = selection.counts.shape
    total = np.bincount(labels, minlength=c)
    kept = np.bincount(labels[selection.keep], minlength=c)
    new_index = np.cumsum(kept > 0) - 1
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        ["class", "new_label", "images", "kept", "dropped", "dominant_subcenter"] + [f"n_k{j}" for j in range(k)]
    )
    for cls in np.flatnonzero(total):
        writer.writerow(
            [
                int(cls),
                int(new_index[cls]) if kept[cls] else -1,
                int(total[cls]),
                int(kept[cls]),
                int(total[cls] - kept[cls]),
                int(selection.dominant[cls]),
                *map(int, selection.counts[cls]),
            ]
        )
    files = [report_dir / "per_class.csv", report_dir / "dropped.csv", report_dir / "summary.json"]
    atomic_write_text(files[0], buf.getvalue())
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["index", "label", "angle_deg"])
    angles = selection.angles_deg
    for i in np.flatnonzero(~selection.keep):
        writer.writerow([int(i), int(labels[i]), f"{angles[i]:.2f}"])
    atomic_write_text(files[1], buf.getvalue())
    atomic_write_json(files[2], report.to_dict())
    try:
        plt = pyplot()
    except Exception as exc:  # matplotlib is an optional extra: the CSV/JSON report is complete without it
        log.warning("no angle histogram: %s", exc)
        return [str(f) for f in files]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(angles, bins=60, range=(0, 180), color="tab:blue")
    ax.axvline(report.threshold_deg, color="red", linestyle="--", label=f"threshold {report.threshold_deg:g} deg")
    ax.set_xlabel("angle to the dominant sub-centre (degrees)")
    ax.set_ylabel("images")
    ax.set_title(f"kept {report.kept} / {report.images} images")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, report_dir / "angles.png")
    files.append(report_dir / "angles.png")
    return [str(f) for f in files]
