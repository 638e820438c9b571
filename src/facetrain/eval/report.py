"""Tables, JSON and Markdown reports with plots for verification results.

Plots use matplotlib's Agg backend, imported lazily (the ``report`` extra). Every output file is written to a
temporary name and renamed, so an interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import json
import os
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
from facetrain.fileio import atomic_write_bytes


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
    scores = 1.0 - result.distances / 2.0
    best = result.best_cosine_threshold
    imp, gen = scores[~result.issame], scores[result.issame]
    far_b = float(np.mean(imp > best)) if imp.size else 0.0
    tar_b = float(np.mean(gen > best)) if gen.size else 0.0
    points = [(far_b, tar_b, f"best-accuracy threshold (cos {best:.3f})")]
    if result.far > 0:
        points.append((result.far, result.val, f"VAL {100 * result.val:.2f}% @ FAR {result.far:.1e}"))
    plot_roc_scores(
        [("ROC (all pairs)", result.issame, scores)],
        path,
        points=points,
        title=f"ROC {title}  acc {100 * result.accuracy_mean:.2f}%",
    )


def plot_score_histogram(result: VerificationResult, path: str | os.PathLike, *, title: str = "") -> None:
    """Genuine / impostor cosine-score histograms with the best-accuracy threshold."""
    plot_score_hist(
        result.issame,
        1.0 - result.distances / 2.0,
        path,
        thresholds=[(result.best_cosine_threshold, f"threshold {result.best_cosine_threshold:.3f}")],
        title=f"scores {title}",
        xlabel="cosine similarity of flip-summed embeddings",
        density=False,
    )


def plot_roc_scores(
    curves: Sequence[tuple[str, np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    *,
    points: Sequence[tuple[float, float, str]] = (),
    far_lines: Sequence[tuple[float, str]] = (),
    title: str = "",
) -> None:
    """ROC curves from raw scores with FAR on a log axis, marked operating points and vertical FAR lines.

    Args:
        curves: ``(label, issame, scores)`` per curve; scores are similarities (higher = same).
        points: ``(far, tar, label)`` markers; a point with FAR 0 is drawn on the left edge of the axis.
        far_lines: ``(far, label)`` vertical dotted lines, e.g. a FAR target.
        title: axes title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    n_imp = max((max(int(np.count_nonzero(~np.asarray(lab, bool))), 1) for _, lab, _ in curves), default=1)
    left = 1.0 / n_imp / 2
    low = 1.0
    for i, (label, issame, scores) in enumerate(curves):
        # every point: dropping collinear ones would lose the flat first segment, which a log axis shows
        fpr, tpr, _ = roc_curve(issame, scores, drop_intermediate=False)
        fpr, tpr = _thin_roc(fpr, tpr)
        positive = fpr > 0
        if positive.any():
            ax.plot(fpr[positive], tpr[positive], lw=1.6, color=f"C{i}", label=label)
            low = min(low, float(tpr[positive].min()))
    for j, (far, tar, label) in enumerate(points):
        on_edge = far <= 0
        x = left if on_edge else far
        ax.plot(
            [x],
            [tar],
            "osD^v<>p*"[j % 9],
            color=f"C{(j + len(curves)) % 10}",
            ms=6,
            label=label + (" (FAR 0: at the left edge)" if on_edge else ""),
        )
        low = min(low, tar)
    for far, label in far_lines:
        ax.axvline(far, color="0.35", ls=":", lw=1.2, label=label)
    ax.set_xscale("log")
    ax.set_xlim(left, 1.0)
    ax.set_ylim(max(0.0, low - 0.02), 1.005)
    ax.set_xlabel("false accept rate (log)")
    ax.set_ylabel("true accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    _save(fig, path)


def plot_score_hist(
    issame: np.ndarray,
    scores: np.ndarray,
    path: str | os.PathLike,
    *,
    thresholds: Sequence[tuple[float, str]] = (),
    title: str = "",
    xlabel: str = "cosine similarity",
    density: bool = True,
) -> None:
    """Genuine / impostor score histograms with vertical threshold lines (the first solid black, the rest dotted).

    ``density=True`` normalizes each histogram to unit area, so that a few genuine pairs stay visible next to many
    impostors; the legends give the pair counts.
    """
    plt = _pyplot()
    issame = np.asarray(issame, bool)
    scores = np.asarray(scores, np.float64)
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=110)
    bins = np.linspace(min(-0.2, float(scores.min())), max(1.0, float(scores.max())), 61)
    ax.hist(
        scores[~issame], bins=bins, alpha=0.6, color="C1", density=density, label=f"impostor ({int((~issame).sum())})"
    )
    ax.hist(scores[issame], bins=bins, alpha=0.6, color="C0", density=density, label=f"genuine ({int(issame.sum())})")
    for k, (value, label) in enumerate(thresholds):
        style = {"color": "k", "ls": "--", "lw": 1.2} if k == 0 else {"color": f"C{k + 1}", "ls": ":", "lw": 1.3}
        ax.axvline(value, label=label, **style)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density" if density else "pairs")
    ax.set_title(title)
    ax.legend(fontsize=7)
    _save(fig, path)


# --------------------------------------------------------------------------------------------------------------------
# IJB, folder and calibration reports


def ijb_json(results: Sequence[IJBResult], *, model: dict[str, Any] | None = None) -> dict:
    """JSON-ready dict of ``eval ijb``: ``{"model": {...}, "results": [summary per mode]}``."""
    return {"model": model or {}, "results": [r.summary() for r in results]}


def folder_json(result: FolderResult, *, model: dict[str, Any] | None = None, data: str = "") -> dict:
    """JSON-ready dict of ``eval folder``: ``{"model": {...}, "data": root, "results": summary}``."""
    return {"model": model or {}, "data": str(data), "results": result.summary()}


def calibration_json(result: CalibrationResult, *, model: dict[str, Any] | None = None) -> dict:
    """JSON-ready dict of ``eval calibrate``: ``{"model": {...}, "results": summary}``."""
    return {"model": model or {}, "results": result.summary()}


def write_ijb_report(
    results: Sequence[IJBResult], out_dir: str | os.PathLike, *, model: dict[str, Any] | None = None
) -> Path:
    """Write ``report.md``, ``report.json`` (as ``--json``) and per mode ``roc_<target>_<mode>.png`` (ROC of the
    template pairs, log FAR, TAR@FAR points marked) and ``scores_<target>_<mode>.png`` (genuine/impostor template
    pair scores). Returns the path of report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model or {}
    target = results[0].target if results else "IJB"
    who = model.get("name") or Path(str(model.get("features", "model"))).name
    lines = [f"# {target} report: {who}", "", *_model_lines(model)]
    lines += [
        "",
        "InsightFace protocol: 1:1 TAR at the ROC point nearest each FAR (%), template-pair cosine scores; "
        "1:N rank-k and TPIR@FPIR per gallery when the lists exist.",
        "",
        format_ijb_table(results),
        "",
    ]
    for r in results:
        if r.scores is None or r.labels is None:
            continue
        name = _safe_name(f"{r.target}_{r.mode}")
        labels = np.asarray(r.labels, bool)
        fpr, tpr, _ = roc_curve(labels, r.scores)
        points, hidden = [], []
        for far, tar in r.tar_at_far.items():
            gap = np.abs(fpr - far)
            i = int(np.nonzero(gap == gap.min())[0][np.argmax(tpr[gap == gap.min()])])
            if fpr[i] > 0:
                points.append((float(fpr[i]), tar, f"TAR {100 * tar:.2f}% @ FAR {far:.0e}"))
            else:
                hidden.append(f"{far:.0e}")
        plot_roc_scores(
            [(f"{r.mode} ({r.n_pairs} pairs)", labels, r.scores)],
            out / f"roc_{name}.png",
            points=points,
            title=f"ROC {r.target} {r.mode}  AUC {100 * r.auc:.2f}%",
        )
        plot_score_hist(
            labels,
            r.scores,
            out / f"scores_{name}.png",
            title=f"template pair scores {r.target} {r.mode}",
            xlabel="cosine similarity of template features",
        )
        n_imp = int(np.count_nonzero(~labels))
        lines += [
            f"## {r.target} {r.mode}",
            "",
            f"{r.n_pairs} template pairs ({r.n_genuine} genuine, {n_imp} "
            f"impostor), {r.n_templates} templates, {r.n_images} images.",
            "",
        ]
        if hidden:
            lines += [
                f"FAR {', '.join(hidden)}: below one impostor pair in {n_imp}; the nearest ROC point has FAR 0 "
                "(not drawn on the log axis).",
                "",
            ]
        lines += [f"![ROC {r.mode}](roc_{name}.png) ![scores {r.mode}](scores_{name}.png)", ""]
    write_json(out / "report.json", ijb_json(results, model=model))
    report = out / "report.md"
    _atomic_write(report, "\n".join(lines).encode())
    return report


def write_folder_report(
    result: FolderResult, out_dir: str | os.PathLike, *, model: dict[str, Any] | None = None, data: str = ""
) -> Path:
    """Write ``report.md``, ``report.json`` (as ``--json``), ``roc.png`` (log FAR, TAR@FAR, EER and best-accuracy
    points) and ``scores.png`` (genuine/impostor histograms with the chosen thresholds). Returns report.md's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model or {}
    v = result.verification
    imp, gen = result.scores[~result.issame], result.scores[result.issame]
    best = v.best_cosine_threshold
    points = [(float(np.mean(imp > best)), float(np.mean(gen > best)), f"best-accuracy threshold (cos {best:.3f})")]
    thresholds = [(best, f"best-accuracy threshold {best:.3f}")]
    for far, op in result.operating_points.items():
        points.append((op.far, op.tar, f"TAR {100 * op.tar:.2f}% @ FAR {far:.0e} (cos {op.threshold:.3f})"))
        thresholds.append((op.threshold, f"FAR {far:.0e} threshold {op.threshold:.3f}"))
    points.append((result.eer, 1.0 - result.eer, f"EER {100 * result.eer:.2f}% (cos {result.eer_threshold:.3f})"))
    plot_roc_scores(
        [("ROC (folder pairs)", result.issame, result.scores)],
        out / "roc.png",
        points=points,
        title=f"ROC {Path(str(data)).name or 'folder'}  acc {100 * v.accuracy_mean:.2f}%",
    )
    plot_score_hist(
        result.issame,
        result.scores,
        out / "scores.png",
        thresholds=thresholds,
        title=f"pair scores {Path(str(data)).name or 'folder'}",
        xlabel="cosine similarity of flip-summed embeddings",
    )
    lines = [f"# Folder report: {model.get('name', 'model')}", "", *_model_lines(model)]
    if data:
        lines.append(f"- data: `{data}`")
    lines += ["", format_folder_table(result), "", "![ROC](roc.png) ![scores](scores.png)", ""]
    write_json(out / "report.json", folder_json(result, model=model, data=data))
    report = out / "report.md"
    _atomic_write(report, "\n".join(lines).encode())
    return report


def write_calibration_report(
    result: CalibrationResult, out_dir: str | os.PathLike, *, model: dict[str, Any] | None = None
) -> Path:
    """Write ``report.md``, ``report.json`` (as ``--json``), ``scores.png`` (histograms with the calibrated
    threshold) and ``roc.png`` (log FAR, the operating point and the FAR target). Returns report.md's path.

    The plots need the pair scores, which :func:`~facetrain.eval.calibrate.calibrate_scores` keeps on the result.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model or {}
    lines = [f"# Calibration report: {model.get('name', 'model')}", "", *_model_lines(model)]
    lines += ["", "```", format_calibration(result), "```", ""]
    if result.scores is not None and result.issame is not None:
        label = f"threshold {result.threshold:.4f} (FAR <= {result.far_target:g})"
        plot_score_hist(
            result.issame,
            result.scores,
            out / "scores.png",
            thresholds=[(result.threshold, label)],
            title=f"calibration pairs, FAR target {result.far_target:g}",
            xlabel="cosine similarity",
        )
        point = (
            result.far,
            result.tar,
            f"TAR {100 * result.tar:.2f}% @ FAR {result.far:.2g} (cos {result.threshold:.4f})",
        )
        plot_roc_scores(
            [("ROC (calibration pairs)", result.issame, result.scores)],
            out / "roc.png",
            points=[point],
            far_lines=[(result.far_target, f"FAR target {result.far_target:g}")],
            title=f"ROC {Path(result.source).name or 'calibration pairs'}",
        )
        lines += ["![scores](scores.png) ![ROC](roc.png)", ""]
    write_json(out / "report.json", calibration_json(result, model=model))
    report = out / "report.md"
    _atomic_write(report, "\n".join(lines).encode())
    return report


def _model_lines(model: Mapping[str, Any]) -> list[str]:
    return [f"- {key}: `{model[key]}`" for key in ("path", "identity", "embedding_size", "features") if key in model]


def _thin_roc(fpr: np.ndarray, tpr: np.ndarray, max_points: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``max_points`` ROC points for drawing: log-spaced in FAR plus evenly spaced, ends kept."""
    if fpr.size <= max_points:
        return fpr, tpr
    positive = fpr[fpr > 0]
    grid = np.geomspace(positive.min(), 1.0, max_points // 2) if positive.size else np.empty(0)
    idx = np.unique(
        np.r_[
            np.searchsorted(fpr, grid).clip(0, fpr.size - 1),
            np.linspace(0, fpr.size - 1, max_points // 2).astype(np.int64),
        ]
    )
    return fpr[idx], tpr[idx]


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
    atomic_write_bytes(path, data)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "dataset"
