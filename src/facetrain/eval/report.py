"""Tables, JSON and Markdown reports with plots for verification results.

Plots use matplotlib's Agg backend, imported lazily (the ``report`` extra). Every output file is written to a
temporary name and renamed, so an interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from facetrain.errors import require
from facetrain.eval.calibrate import CalibrationResult
from facetrain.eval.folder import FolderResult
from facetrain.eval.ijb import IJBResult
from facetrain.eval.roc import roc_curve
from facetrain.eval.verification import VerificationResult


def format_verification_table(results: Mapping[str, VerificationResult]) -> str:
    """A Markdown table, one row per dataset.

    Columns: pairs, 10-fold accuracy (mean ± std, %), VAL@FAR (%), the best threshold on all pairs as squared L2
    distance and as cosine similarity, and XNorm (mean raw embedding norm).
    """
    header = (
        "| dataset | pairs | accuracy (%) | VAL@FAR=1e-3 (%) | threshold (dist²) | threshold (cos) | XNorm |\n"
        "|---|---:|---:|---:|---:|---:|---:|"
    )
    rows = [header]
    for name, r in results.items():
        xnorm = "-" if r.xnorm is None else f"{r.xnorm:.3f}"
        rows.append(
            f"| {name} | {r.n_pairs} | {100 * r.accuracy_mean:.2f} ± {100 * r.accuracy_std:.2f} "
            f"| {100 * r.val:.2f} ± {100 * r.val_std:.2f} | {r.best_threshold:.2f} | {r.best_cosine_threshold:.3f} "
            f"| {xnorm} |"
        )
    return "\n".join(rows)


def format_ijb_table(results: Sequence[IJBResult]) -> str:
    """Markdown tables: TAR (%) at each FAR per mode, then 1:N rank-k and TPIR at FPIR per mode and gallery."""
    if not results:
        return ""
    fars = list(results[0].tar_at_far)
    lines = [
        "| target | mode | " + " | ".join(f"TAR@FAR={f:.0e}" for f in fars) + " | AUC |",
        "|---|---|" + "---:|" * (len(fars) + 1),
    ]
    for r in results:
        cells = " | ".join(f"{100 * r.tar_at_far[f]:.2f}" for f in fars)
        lines.append(f"| {r.target} | {r.mode} | {cells} | {100 * r.auc:.2f} |")
    ident = [(r, i) for r in results for i in r.identification]
    if ident:
        fpirs = list(ident[0][1].tpir_at_fpir)
        lines += [
            "",
            "| target | mode | gallery | top-1 | top-5 | top-10 | "
            + " | ".join(f"TPIR@FPIR={f:.0e}" for f in fpirs)
            + " |",
            "|---|---|---|---:|---:|---:|" + "---:|" * len(fpirs),
        ]
        for r, i in ident:
            cells = " | ".join(f"{100 * i.tpir_at_fpir[f]:.2f}" for f in fpirs)
            lines.append(
                f"| {r.target} | {r.mode} | {i.gallery} | {100 * i.top1:.2f} | {100 * i.top5:.2f} | "
                f"{100 * i.top10:.2f} | {cells} |"
            )
    return "\n".join(lines)


def format_folder_table(result: FolderResult) -> str:
    """Markdown summary of :class:`~facetrain.eval.folder.FolderResult`."""
    v = result.verification
    kind = "all pairs" if result.all_pairs else "balanced sample"
    lines = [
        f"{result.n_images} images, {result.n_identities} identities; {result.n_pairs} pairs ({kind}: "
        f"{result.n_genuine} genuine, {result.n_impostor} impostor)",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| 10-fold accuracy (%) | {100 * v.accuracy_mean:.2f} ± {100 * v.accuracy_std:.2f} |",
        f"| best-accuracy threshold (cos) | {v.best_cosine_threshold:.3f} |",
    ]
    for far, op in result.operating_points.items():
        flag = "" if op.n_impostor * far >= 1 else " (too few impostors)"
        lines.append(f"| TAR@FAR={far:.0e} (%) | {100 * op.tar:.2f} at cos {op.threshold:.3f}{flag} |")
    lines.append(f"| EER (%) | {100 * result.eer:.2f} at cos {result.eer_threshold:.3f} |")
    lines.append(f"| rank-1, leave-one-out (%) | {100 * result.rank1:.2f} ({result.n_probes} probes) |")
    if v.xnorm is not None:
        lines.append(f"| XNorm | {v.xnorm:.3f} |")
    return "\n".join(lines)


def format_calibration(result: CalibrationResult) -> str:
    """Human summary of a calibration: threshold, FAR and TAR with their intervals."""
    pct = int(round(100 * result.confidence))
    lines = [
        f"threshold (cosine) for FAR <= {result.far_target:g}: {result.threshold:.4f}",
        f"FAR on {result.n_impostor} impostor pairs: {result.far:.3g} ({result.false_accepts} accepted), "
        f"{pct}% interval [{result.far_interval[0]:.3g}, {result.far_interval[1]:.3g}]",
        f"TAR on {result.n_genuine} genuine pairs: {100 * result.tar:.2f}% ({result.true_accepts} accepted), "
        f"{pct}% interval [{100 * result.tar_interval[0]:.2f}%, {100 * result.tar_interval[1]:.2f}%]",
        f"squared L2 distance threshold: {2 - 2 * result.threshold:.4f} (same iff distance <= it)",
    ]
    if not result.reliable:
        lines.append(
            f"warning: {result.n_impostor} impostor pairs cannot measure FAR {result.far_target:g} "
            f"(need >= {int(np.ceil(1 / result.far_target))}); add identities"
        )
    return "\n".join(lines)


def verification_json(results: Mapping[str, VerificationResult], *, model: dict[str, Any] | None = None) -> dict:
    """JSON-ready dict: ``{"model": {...}, "results": {name: summary}}``."""
    return {"model": model or {}, "results": {name: r.summary() for name, r in results.items()}}


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    _atomic_write(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def write_verification_report(
    results: Mapping[str, VerificationResult], out_dir: str | os.PathLike, *, model: dict[str, Any] | None = None
) -> Path:
    """Write ``report.md``, ``report.json`` and per dataset ``roc_<name>.png`` and ``scores_<name>.png``.

    Returns:
        The path of report.md.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model or {}
    lines = [f"# Verification report: {model.get('name', 'model')}", ""]
    for key in ("path", "identity", "embedding_size"):
        if key in model:
            lines.append(f"- {key}: `{model[key]}`")
    lines += [
        "",
        "10-fold protocol of InsightFace (flip-summed, L2-normalized embeddings; squared L2 distance; thresholds "
        "chosen on 9 folds). Thresholds below are the best on all pairs; `cos = 1 - d/2`.",
        "",
        format_verification_table(results),
        "",
    ]
    for name, r in results.items():
        safe = _safe_name(name)
        plot_roc(r, out / f"roc_{safe}.png", title=name)
        plot_score_histogram(r, out / f"scores_{safe}.png", title=name)
        lines += [
            f"## {name}",
            "",
            f"fold accuracies (%): {', '.join(f'{100 * a:.2f}' for a in r.fold_accuracies)}",
            "",
            f"![ROC {name}](roc_{safe}.png) ![scores {name}](scores_{safe}.png)",
            "",
        ]
    write_json(out / "report.json", verification_json(results, model=model))
    report = out / "report.md"
    _atomic_write(report, "\n".join(lines).encode())
    return report


def plot_roc(result: VerificationResult, path: str | os.PathLike, *, title: str = "") -> None:
    """ROC of all pairs (cosine scores) with FAR on a log axis; marks VAL@FAR and the best-accuracy threshold."""
    plt = _pyplot()
    scores = 1.0 - result.distances / 2.0
    fpr, tpr, _ = roc_curve(result.issame, scores, drop_intermediate=False)
    n_imp = max(int(np.count_nonzero(~result.issame)), 1)
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    positive = fpr > 0
    ax.plot(fpr[positive], tpr[positive], lw=1.6, color="C0", label="ROC (all pairs)")
    best = result.best_cosine_threshold
    far_b = float(np.mean(scores[~result.issame] > best)) if n_imp else 0.0
    tar_b = float(np.mean(scores[result.issame] > best)) if result.issame.any() else 0.0
    if far_b > 0:
        ax.plot([far_b], [tar_b], "o", color="C3", label=f"best-accuracy threshold (cos {best:.3f})")
    if result.far > 0:
        ax.plot(
            [result.far], [result.val], "s", color="C2", label=f"VAL {100 * result.val:.2f}% @ FAR {result.far:.1e}"
        )
    ax.set_xscale("log")
    ax.set_xlim(1.0 / n_imp / 2, 1.0)
    ax.set_ylim(max(0.0, float(tpr[positive].min()) - 0.02) if positive.any() else 0.0, 1.005)
    ax.set_xlabel("false accept rate (log)")
    ax.set_ylabel("true accept rate")
    ax.set_title(f"ROC {title}  acc {100 * result.accuracy_mean:.2f}%")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, path)


def plot_score_histogram(result: VerificationResult, path: str | os.PathLike, *, title: str = "") -> None:
    """Genuine / impostor cosine-score histograms with the best-accuracy threshold."""
    plt = _pyplot()
    scores = 1.0 - result.distances / 2.0
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    bins = np.linspace(min(-0.2, float(scores.min())), 1.0, 61)
    ax.hist(scores[~result.issame], bins=bins, alpha=0.6, color="C1", label=f"impostor ({(~result.issame).sum()})")
    ax.hist(scores[result.issame], bins=bins, alpha=0.6, color="C0", label=f"genuine ({result.issame.sum()})")
    ax.axvline(
        result.best_cosine_threshold, color="k", ls="--", lw=1.2, label=f"threshold {result.best_cosine_threshold:.3f}"
    )
    ax.set_xlabel("cosine similarity of flip-summed embeddings")
    ax.set_ylabel("pairs")
    ax.set_title(f"scores {title}")
    ax.legend(fontsize=8)
    _save(fig, path)


def _pyplot():
    matplotlib = require("matplotlib", "report", "plots in evaluation reports")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    _atomic_write(Path(path), buf.getvalue())


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "dataset"
