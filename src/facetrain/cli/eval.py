"""``facetrain eval``: verify (.bin 10-fold), ijb (IJB-B/C 1:1 and 1:N), folder (your own identities), calibrate."""

from __future__ import annotations

import sys
from pathlib import Path

import click

_MODEL_HELP = "model file: facetrain checkpoint, arcface_torch backbone.pth (with --backbone), TorchScript or .onnx"


def _model_options(fn):
    fn = click.option("--input-std", default=127.5, show_default=True, help="ONNX only: pixels / std after the mean.")(
        fn
    )
    fn = click.option(
        "--input-mean",
        default=127.5,
        show_default=True,
        help="ONNX only: subtracted from 0..255 pixels (0 with --input-std 1 for SFace-style models).",
    )(fn)
    fn = click.option("--batch-size", default=64, show_default=True, help="Images per forward pass.")(fn)
    fn = click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")(fn)
    fn = click.option("--backbone", default=None, help="Architecture of a plain state dict, e.g. r50.")(fn)
    return fn


def _open_model(model: str, backbone: str | None, device: str | None, batch_size: int, mean: float, std: float):
    from facetrain.embed import load_embedder

    return load_embedder(model, device=device, batch_size=batch_size, backbone=backbone, input_mean=mean, input_std=std)


def _model_info(embedder, model: str) -> dict:
    return {
        "name": embedder.name,
        "path": str(model),
        "identity": embedder.identity,
        "embedding_size": embedder.embedding_size,
    }


def _progress() -> bool:
    return sys.stderr.isatty()


@click.group("eval")
def eval_group() -> None:
    """Evaluate a model: .bin verification, IJB-B/C, a folder of identities, threshold calibration."""


@eval_group.command("verify")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option(
    "--bin",
    "bins",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False),
    help="A .bin pair file (lfw.bin, cfp_fp.bin, agedb_30.bin, ...); repeat for several.",
)
@_model_options
@click.option("--no-flip", is_flag=True, help="Skip the flip test (InsightFace always flips).")
@click.option("--folds", default=10, show_default=True, help="Number of contiguous folds.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="Write report.md/json + plots here.")
def verify_cmd(
    model, bins, batch_size, device, backbone, input_mean, input_std, no_flip, folds, json_out, report_dir
) -> None:
    """10-fold verification of MODEL on InsightFace .bin files (accuracy ± std, VAL@FAR=1e-3, thresholds, XNorm)."""
    from facetrain.eval.report import format_verification_table, verification_json, write_json
    from facetrain.eval.verification import verify_bin

    embedder = _open_model(model, backbone, device, batch_size, input_mean, input_std)
    results = {}
    for path in bins:
        name = Path(path).stem
        if name in results:
            name = str(path)
        results[name] = verify_bin(embedder, path, n_folds=folds, flip=not no_flip, progress=_progress())
    click.echo(format_verification_table(results))
    info = _model_info(embedder, model)
    if json_out:
        write_json(json_out, verification_json(results, model=info))
        click.echo(f"wrote {json_out}")
    if report_dir:
        from facetrain.eval.report import write_verification_report

        click.echo(f"wrote {write_verification_report(results, report_dir, model=info)}")


@eval_group.command("ijb")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--data", "data_dir", required=True, type=click.Path(file_okay=False), help="IJB folder with meta/ and loose_crop/."
)
@click.option("--target", default="IJBC", show_default=True, type=click.Choice(["IJBB", "IJBC"], case_sensitive=False))
@click.option(
    "--mode",
    "modes",
    multiple=True,
    default=["N1D1F1"],
    show_default=True,
    help="N?D?F?: N1 keeps feature norms, D1 weights by detector score, F1 adds the flip; repeatable.",
)
@_model_options
@click.option("--no-1n", "no_1n", is_flag=True, help="Skip 1:N identification even if its csv lists exist.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@click.option("--save-features", type=click.Path(dir_okay=False), help="Save the image features (.npz) here.")
@click.option("--from-features", type=click.Path(dir_okay=False), help="Score saved features instead of a model.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="Write report.md/json + plots here.")
def ijb_cmd(
    model,
    data_dir,
    target,
    modes,
    batch_size,
    device,
    backbone,
    input_mean,
    input_std,
    no_1n,
    json_out,
    save_features,
    from_features,
    report_dir,
) -> None:
    """IJB-B/C 1:1 verification (TAR at FAR 1e-6..1e-1) and 1:N identification of MODEL (InsightFace protocol)."""
    from facetrain.errors import EvalError
    from facetrain.eval.ijb import evaluate_ijb_modes
    from facetrain.eval.report import format_ijb_table, ijb_json, write_json

    if model is None and from_features is None:
        raise EvalError("facetrain eval ijb needs a MODEL or --from-features FILE")
    embedder = None if from_features else _open_model(model, backbone, device, batch_size, input_mean, input_std)
    results = evaluate_ijb_modes(
        data_dir,
        target=target,
        modes=list(modes),
        embedder=embedder,
        features=from_features,
        save_features=save_features,
        identification=not no_1n,
        progress=_progress(),
    )
    click.echo(format_ijb_table(results))
    info = _model_info(embedder, model) if embedder is not None else {"features": str(from_features)}
    if json_out:
        write_json(json_out, ijb_json(results, model=info))
        click.echo(f"wrote {json_out}")
    if save_features:
        click.echo(f"wrote {save_features}")
    if report_dir:
        from facetrain.eval.report import write_ijb_report

        click.echo(f"wrote {write_ijb_report(results, report_dir, model=info)}")


def _parse_pairs(value: str) -> int | None:
    from facetrain.errors import EvalError

    if value == "all":
        return None
    try:
        count = int(float(value))
    except ValueError:
        raise EvalError(f"--pairs must be 'all' or a number of pairs, got {value!r}") from None
    if count < 20:
        raise EvalError(f"--pairs must be at least 20, got {count}")
    return count


@eval_group.command("folder")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("root", type=click.Path(file_okay=False))
@_model_options
@click.option(
    "--pairs",
    default="1000000",
    show_default=True,
    help="'all', or N: all pairs if there are at most N, else a balanced sample of N.",
)
@click.option("--seed", default=0, show_default=True, help="Pair sampling and fold shuffling seed.")
@click.option(
    "--far",
    "fars",
    multiple=True,
    type=float,
    default=[1e-4, 1e-3, 1e-2],
    show_default=True,
    help="FAR targets for TAR@FAR (repeatable).",
)
@click.option("--hard-pairs-bin", type=click.Path(dir_okay=False), help="Write the hardest pairs as a .bin here.")
@click.option("--hard-pairs", default=100, show_default=True, help="Hardest genuine and impostor pairs to write.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="Write report.md/json + plots here.")
def folder_cmd(
    model,
    root,
    batch_size,
    device,
    backbone,
    input_mean,
    input_std,
    pairs,
    seed,
    fars,
    hard_pairs_bin,
    hard_pairs,
    json_out,
    report_dir,
) -> None:
    """Evaluate MODEL on ROOT/<identity>/<image> aligned faces: accuracy, TAR@FAR, EER, leave-one-out rank-1."""
    from facetrain.eval.folder import embed_folder, evaluate_folder_embeddings, write_hard_pairs_bin
    from facetrain.eval.report import folder_json, format_folder_table, write_json

    embedder = _open_model(model, backbone, device, batch_size, input_mean, input_std)
    folder = embed_folder(embedder, root, progress=_progress())
    result = evaluate_folder_embeddings(folder, max_pairs=_parse_pairs(pairs), seed=seed, fars=tuple(fars))
    click.echo(format_folder_table(result))
    if hard_pairs_bin:
        count = write_hard_pairs_bin(result, folder.paths, hard_pairs_bin, per_kind=hard_pairs)
        click.echo(f"wrote {count} hard pairs to {hard_pairs_bin}")
    info = _model_info(embedder, model)
    if json_out:
        write_json(json_out, folder_json(result, model=info, data=str(root)))
        click.echo(f"wrote {json_out}")
    if report_dir:
        from facetrain.eval.report import write_folder_report

        click.echo(f"wrote {write_folder_report(result, report_dir, model=info, data=str(root))}")


@eval_group.command("calibrate")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("data", type=click.Path())
@_model_options
@click.option("--far", default=1e-4, show_default=True, type=float, help="Target false-accept rate.")
@click.option("--confidence", default=0.95, show_default=True, type=float, help="Interval coverage.")
@click.option("--pairs", default="5000000", show_default=True, help="Folder data: 'all', or a cap on the pairs.")
@click.option("--seed", default=0, show_default=True, help="Pair sampling seed.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the result as JSON here.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), help="Write report.md/json + plots here.")
def calibrate_cmd(
    model, data, batch_size, device, backbone, input_mean, input_std, far, confidence, pairs, seed, json_out, report_dir
) -> None:
    """Cosine threshold of MODEL for a target FAR on DATA (identity folder or .bin), its TAR and exact intervals."""
    from facetrain.eval.calibrate import calibrate
    from facetrain.eval.report import calibration_json, format_calibration, write_json

    embedder = _open_model(model, backbone, device, batch_size, input_mean, input_std)
    result = calibrate(embedder, data, far=far, confidence=confidence, max_pairs=_parse_pairs(pairs), seed=seed,
                       progress=_progress())  # fmt: skip
    click.echo(format_calibration(result))
    info = _model_info(embedder, model)
    if json_out:
        write_json(json_out, calibration_json(result, model=info))
        click.echo(f"wrote {json_out}")
    if report_dir:
        from facetrain.eval.report import write_calibration_report

        click.echo(f"wrote {write_calibration_report(result, report_dir, model=info)}")


COMMANDS = [eval_group]
