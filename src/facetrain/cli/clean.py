"""Data-quality commands: ``clean subcenter|graph``, ``quality fit|score``, ``finetune-bn``, ``distill-dataset``."""

from __future__ import annotations

import json

import click

_FORMATS = click.Choice(["rec", "folder", "list"])


@click.group("clean")
def clean_group() -> None:
    """Clean a training dataset (sub-center ArcFace drop, graph filtering)."""


@clean_group.command("subcenter")
@click.argument("checkpoint")
@click.argument("data")
@click.option("--out", required=True, help="cleaned dataset (folder for rec/folder, file for list).")
@click.option(
    "--threshold-deg",
    type=float,
    default=75.0,
    show_default=True,
    help="keep images closer than this angle to their class's dominant sub-centre.",
)
@click.option("--format", "fmt", type=_FORMATS, default="rec", show_default=True)
@click.option("--report-dir", default=None, help="report folder (default: OUT_report).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default=None)
@click.option("--overwrite", is_flag=True)
def subcenter_cmd(checkpoint, data, out, threshold_deg, fmt, report_dir, batch_size, device, overwrite) -> None:
    """Drop the images of DATA far from their class's dominant sub-centre (CHECKPOINT trained with subcenter_k>1)."""
    from facetrain.clean.subcenter import clean_subcenter

    report, _ = clean_subcenter(
        checkpoint,
        data,
        out,
        threshold_deg=threshold_deg,
        fmt=fmt,
        report_dir=report_dir,
        batch_size=batch_size,
        device=device,
        overwrite=overwrite,
    )
    click.echo(
        f"kept {report.kept}/{report.images} images ({report.dropped} dropped), {report.classes_kept}/{report.classes} "
        f"classes; wrote {out}; report: {', '.join(report.report_files)}"
    )


@clean_group.command("graph")
@click.argument("source")
@click.argument("data", required=False)
@click.option("--out", required=True, help="output folder (clusters.csv, summary.json, clusters.png, cleaned).")
@click.option(
    "--mode",
    type=click.Choice(["identity", "cluster"]),
    default="identity",
    show_default=True,
    help="identity: keep each identity's main community; cluster: cluster an unlabeled collection.",
)
@click.option("--quality", default=None, help="per-image qualities (.npy or the CSV of 'quality score').")
@click.option("--threshold", type=float, default=0.5, show_default=True, help="edge if cosine >= this (no quality).")
@click.option(
    "--delta", type=float, default=0.1, show_default=True, help="quality-aware edge if cosine >= min(q_i, q_j) - delta."
)
@click.option("-k", "--neighbours", "k", type=int, default=30, show_default=True, help="k-NN (cluster mode).")
@click.option(
    "--method",
    type=click.Choice(["label_propagation", "leiden", "components"]),
    default="label_propagation",
    show_default=True,
)
@click.option("--format", "fmt", type=_FORMATS, default="rec", show_default=True)
@click.option("--no-dbscan", is_flag=True, help="skip the DBSCAN comparison (slow on large sets).")
@click.option("--no-plot", is_flag=True)
@click.option("--tsne", is_flag=True, help="t-SNE instead of PCA for the 2-D plot (slower).")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default=None)
@click.option("--overwrite", is_flag=True)
def graph_cmd(
    source,
    data,
    out,
    mode,
    quality,
    threshold,
    delta,
    k,
    method,
    fmt,
    no_dbscan,
    no_plot,
    tsne,
    batch_size,
    device,
    overwrite,
) -> None:
    """Graph clustering / filtering of SOURCE (embeddings .npy in DATA order, or a model that embeds DATA)."""
    from facetrain.clean.graph import clean_graph

    report = clean_graph(
        source,
        data,
        out,
        mode=mode,
        quality=quality,
        threshold=threshold,
        delta=delta,
        k=k,
        method=method,
        fmt=fmt,
        compare_dbscan=not no_dbscan,
        plot=not no_plot,
        tsne=tsne,
        batch_size=batch_size,
        device=device,
        overwrite=overwrite,
    )
    click.echo(
        f"{report.images} images: {report.clusters} clusters, {report.noise} noise; kept {report.kept}, "
        f"dropped {report.dropped}"
    )
    if report.dbscan:
        click.echo(f"vs DBSCAN: {json.dumps(report.dbscan)}")
    click.echo(f"wrote {', '.join(report.files)}")


@click.group("quality")
def quality_group() -> None:
    """Face-quality scores from BatchNorm statistics."""


@quality_group.command("fit")
@click.argument("checkpoint")
@click.argument("data")
@click.option("--out", required=True, help="quality model file (.json; no pickle).")
@click.option("--max-images", type=int, default=None, help="fit on a random subset of this size.")
@click.option("--max-iter", type=int, default=200, show_default=True, help="boosting iterations (trees).")
@click.option("--learning-rate", type=float, default=0.05, show_default=True)
@click.option("--max-leaf-nodes", type=int, default=31, show_default=True, help="hgb only.")
@click.option(
    "--regressor",
    type=click.Choice(["hgb", "catboost"]),
    default="hgb",
    show_default=True,
    help="scikit-learn HistGradientBoosting, or CatBoost (pip install catboost).",
)
@click.option("--depth", type=int, default=10, show_default=True, help="catboost tree depth.")
@click.option(
    "--features",
    "feature_set",
    type=click.Choice(["qaa+ratios", "qaa"]),
    default="qaa+ratios",
    show_default=True,
    help="BN statistics per layer: open_midas's var/mean of the channel variances, or those plus three ratios.",
)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--device", default=None)
@click.option("--seed", type=int, default=0, show_default=True)
def quality_fit_cmd(
    checkpoint,
    data,
    out,
    max_images,
    max_iter,
    learning_rate,
    max_leaf_nodes,
    regressor,
    depth,
    feature_set,
    batch_size,
    device,
    seed,
) -> None:
    """Fit a quality regressor: BN features of CHECKPOINT's backbone -> cosine to the class centre, on DATA (best:
    images of its identities that it did not train on)."""
    from facetrain.clean.quality import fit_quality

    report = fit_quality(
        checkpoint,
        data,
        out,
        max_images=max_images,
        batch_size=batch_size,
        device=device,
        seed=seed,
        max_iter=max_iter,
        learning_rate=learning_rate,
        max_leaf_nodes=max_leaf_nodes,
        regressor=regressor,
        depth=depth,
        feature_set=feature_set,
    )
    click.echo(
        f"wrote {out}: {report.trees} trees on {report.features} features from {report.images} images; "
        f"held-out RMSE {report.holdout_rmse:.4f}, Spearman {report.holdout_spearman:.3f}"
    )


@quality_group.command("score")
@click.argument("quality_model", metavar="QUALITY")
@click.argument("model")
@click.argument("data")
@click.option("--out", required=True, help="per-image scores: .csv, or .parquet (needs pyarrow).")
@click.option("--drop-below", type=float, default=None, help="write DATA without images scoring below this (0..100).")
@click.option("--filtered-out", default=None, help="where the filtered dataset goes (with --drop-below).")
@click.option("--format", "fmt", type=_FORMATS, default="rec", show_default=True)
@click.option("--eval-bin", multiple=True, help="held-out verification .bin: accuracy before/after dropping.")
@click.option("--drop-share", type=float, default=0.05, show_default=True, help="lowest-quality share dropped.")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--device", default=None)
@click.option("--overwrite", is_flag=True)
def quality_score_cmd(
    quality_model, model, data, out, drop_below, filtered_out, fmt, eval_bin, drop_share, batch_size, device, overwrite
) -> None:
    """Score every image of DATA with QUALITY (from 'quality fit') on MODEL's BN features."""
    from facetrain.clean.quality import quality_verification_bin, score_quality

    summary = score_quality(
        quality_model,
        model,
        data,
        out,
        drop_below=drop_below,
        filtered_out=filtered_out,
        fmt=fmt,
        batch_size=batch_size,
        device=device,
        overwrite=overwrite,
    )
    click.echo(f"wrote {out}: {summary['images']} images, mean quality {summary['mean_quality']:.1f}")
    if "dropped" in summary:
        click.echo(f"dropped {summary['dropped']} images below {drop_below}; wrote {summary['filtered_out']}")
    for path in eval_bin:
        res = quality_verification_bin(
            quality_model, model, path, drop_share=drop_share, batch_size=batch_size, device=device
        )
        click.echo(
            f"{path}: accuracy {res['accuracy_before']:.4f} on {res['pairs_before']} pairs -> "
            f"{res['accuracy_after']:.4f} on {res['pairs_after']} pairs after dropping the lowest {drop_share:.0%}"
        )


@click.command("finetune-bn")
@click.argument("model")
@click.argument("data")
@click.option("--out", required=True, help="output folder (step checkpoints, best.pt, table.json, bn_shift.png).")
@click.option("--steps", type=int, default=1000, show_default=True)
@click.option("--save-every", type=int, default=200, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--ood", default=None, help="folder of out-of-domain images (no faces).")
@click.option("--ood-share", type=float, default=0.05, show_default=True)
@click.option("--noise-share", type=float, default=0.05, show_default=True)
@click.option("--blur-share", type=float, default=0.0, show_default=True)
@click.option("--bin", "bins", multiple=True, help="verification .bin to evaluate every checkpoint on.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default=None)
def finetune_bn_cmd(
    model, data, out, steps, save_every, batch_size, ood, ood_share, noise_share, blur_share, bins, seed, device
) -> None:
    """Refresh MODEL's BatchNorm statistics on DATA mixed with off-domain images / noise / blur."""
    from pathlib import Path

    from facetrain.clean.bn_finetune import finetune_bn

    pairs = {Path(b).stem: b for b in bins}
    report = finetune_bn(
        model,
        data,
        out,
        steps=steps,
        save_every=save_every,
        batch_size=batch_size,
        ood=ood,
        ood_share=ood_share,
        noise_share=noise_share,
        blur_share=blur_share,
        eval_pairs=pairs,
        seed=seed,
        device=device,
    )
    names = list(pairs)
    click.echo("| step | " + " | ".join(names + ["mean"]) + " |")
    click.echo("|---" * (len(names) + 2) + "|")
    for row in report.rows:
        cells = [f"{row[n]:.4f}" for n in names] + ([f"{row['mean_accuracy']:.4f}"] if names else ["-"])
        click.echo(f"| {row['step']} | " + " | ".join(cells) + " |")
    click.echo(f"best: step {report.best_step} -> {report.best_path}")


@click.command("distill-dataset")
@click.argument("teacher")
@click.argument("data")
@click.option("--out", required=True, help="FILE.npy (sidecar FILE.json).")
@click.option("--fp16", is_flag=True, help="store float16.")
@click.option("--flip", is_flag=True, help="flip test: f(x) + f(flip x).")
@click.option("--no-normalize", is_flag=True, help="keep raw (unnormalized) embeddings.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--device", default=None)
@click.option("--overwrite", is_flag=True)
def distill_dataset_cmd(teacher, data, out, fp16, flip, no_normalize, batch_size, device, overwrite) -> None:
    """Write TEACHER's embedding of every DATA image (dataset index order) for distillation."""
    from facetrain.clean.distill_data import write_teacher_embeddings

    side = write_teacher_embeddings(
        teacher,
        data,
        out,
        fp16=fp16,
        flip=flip,
        normalize=not no_normalize,
        batch_size=batch_size,
        device=device,
        overwrite=overwrite,
    )
    click.echo(f"wrote {out}: {side['num_images']} x {side['embedding_size']} ({side['dtype']}) + sidecar .json")


COMMANDS = [clean_group, quality_group, finetune_bn_cmd, distill_dataset_cmd]
