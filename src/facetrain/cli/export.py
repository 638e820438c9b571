"""``facetrain export onnx|torchscript|check|quantize``: deployable models and their checks."""

from __future__ import annotations

import click

from facetrain.errors import FacetrainError

_MODEL_HELP = "checkpoint, arcface_torch backbone.pth, TorchScript or ONNX file (omit with --backbone for random init)"


@click.group("export")
def export_group() -> None:
    """Export models to ONNX / TorchScript, check parity, quantize."""


def _model_options(fn):
    fn = click.option("--backbone", default=None, help="architecture name (random init when MODEL is omitted).")(fn)
    fn = click.option("--embedding-size", type=int, default=512, show_default=True, help="D for random init.")(fn)
    return fn


@export_group.command("onnx")
@click.argument("model", required=False)
@click.argument("out", required=False)
@_model_options
@click.option("--opset", type=int, default=17, show_default=True)
@click.option("--dynamo", is_flag=True, help="use the torch.export-based exporter (needs onnxscript).")
@click.option(
    "--prelu",
    type=click.Choice(["decomposed", "native"]),
    default="decomposed",
    show_default=True,
    help="PReLU as exact Relu + slope*Min(x,0) (faster on CPU onnxruntime) or as native PRelu nodes.",
)
def onnx_cmd(model, out, backbone, embedding_size, opset, dynamo, prelu) -> None:
    """Export MODEL to OUT.onnx (input 'data' (batch, 3, 112, 112) RGB (x-127.5)/127.5, one raw-embedding output)."""
    from facetrain.export import export_onnx, load_model_for_export

    model, out = _model_and_out(model, out, backbone, ".onnx")
    module, sha, name = load_model_for_export(model, backbone=backbone, embedding_size=embedding_size)
    info = export_onnx(module, out, opset=opset, source_sha256=sha, name=name, dynamo=dynamo, prelu=prelu)
    click.echo(
        f"wrote {info.path} ({info.size_bytes / 2**20:.1f} MB): input {info.input_name} {info.input_shape}, "
        f"embedding {info.metadata.get('facetrain.embedding_size')}, opset {info.opset}"
    )


@export_group.command("torchscript")
@click.argument("model", required=False)
@click.argument("out", required=False)
@_model_options
def torchscript_cmd(model, out, backbone, embedding_size) -> None:
    """Export MODEL to a traced TorchScript file OUT (loads with torch.jit.load)."""
    from facetrain.export import export_torchscript, load_model_for_export

    model, out = _model_and_out(model, out, backbone, ".pt")
    module, sha, name = load_model_for_export(model, backbone=backbone, embedding_size=embedding_size)
    path = export_torchscript(module, out, source_sha256=sha, name=name)
    click.echo(f"wrote {path}")


@export_group.command("check")
@click.argument("model", required=False)
@click.argument("onnx_path", metavar="OUT.onnx", required=False)
@_model_options
@click.option("--data", "data", default=None, help="aligned faces to compare on (folder, .rec or list file).")
@click.option("--bin", "bin_path", default=None, help="verification .bin: also compare 10-fold accuracy.")
@click.option("--limit", type=int, default=64, show_default=True, help="faces compared.")
@click.option("--track", type=click.Choice(["mfr"]), default=None, help="check a challenge's submission rules.")
@click.option("--min-cosine", type=float, default=0.9999, show_default=True)
def check_cmd(model, onnx_path, backbone, embedding_size, data, bin_path, limit, track, min_cosine) -> None:
    """Compare PyTorch MODEL with its ONNX export OUT.onnx on the same faces (and check --track rules)."""
    from facetrain.export import check_mfr, check_parity, load_faces, load_model_for_export

    model, onnx_path = _model_and_out(model, onnx_path, backbone, ".onnx")
    module, _sha, _name = load_model_for_export(model, backbone=backbone, embedding_size=embedding_size)
    faces, description = load_faces(data, bin_path=bin_path, limit=limit)
    report = check_parity(module, onnx_path, faces, faces=description, bin_path=bin_path)
    ok = report.passed(min_cosine)
    click.echo(f"faces: {report.faces}")
    click.echo(f"max |torch - onnx|: {report.max_abs_diff:.3g} (relative to max |torch|: {report.max_rel_diff:.3g})")
    click.echo(f"min cosine: {report.min_cosine:.7f} (mean {report.mean_cosine:.7f}) {'PASS' if ok else 'FAIL'}")
    if report.bin_path:
        click.echo(f"accuracy on {report.bin_path}: torch {report.torch_accuracy:.4%}, onnx {report.onnx_accuracy:.4%}")
    if track == "mfr":
        click.echo("| ICCV21-MFR rule | value | limit | result |\n|---|---|---|---|")
        rules = check_mfr(onnx_path)
        for rule in rules:
            click.echo(f"| {rule.name} | {rule.value} | {rule.limit} | {'pass' if rule.passed else 'FAIL'} |")
        click.echo(f"MFR: {sum(r.passed for r in rules)}/{len(rules)} rules pass")
    if not ok:
        raise FacetrainError(f"{onnx_path}: min cosine {report.min_cosine:.6f} < {min_cosine}; the export differs")


@export_group.command("quantize")
@click.argument("in_path", metavar="IN.onnx")
@click.argument("out_path", metavar="OUT.onnx")
@click.option("--mode", type=click.Choice(["dynamic", "static", "fp16"]), required=True)
@click.option("--calib", default=None, help="aligned faces for static calibration (folder, .rec or list file).")
@click.option("--calib-size", type=int, default=256, show_default=True, help="calibration faces used.")
@click.option("--bin", "bin_path", default=None, help="verification .bin: accuracy before and after.")
@click.option("--accuracy-budget", type=float, default=0.5, show_default=True, help="allowed loss, percentage points.")
@click.option("--allow-loss", is_flag=True, help="exit 0 even when the loss exceeds the budget.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="batch timed for latency.")
@click.option("--quantize-depthwise", is_flag=True, help="INT8 depthwise convs too (slower on x86 CPUs).")
@click.option(
    "--activations",
    type=click.Choice(["uint8", "int8"]),
    default="uint8",
    show_default=True,
    help="static mode's activation type (uint8: onnxruntime's fast x86 kernels).",
)
@click.option(
    "--prelu",
    type=click.Choice(["decomposed", "native"]),
    default="decomposed",
    show_default=True,
    help="rewrite PRelu as exact Relu + slope*Min(x,0) first (the Relu fuses into INT8 convs).",
)
def quantize_cmd(
    in_path,
    out_path,
    mode,
    calib,
    calib_size,
    bin_path,
    accuracy_budget,
    allow_loss,
    batch_size,
    quantize_depthwise,
    activations,
    prelu,
) -> None:
    """Quantize IN.onnx to OUT.onnx (INT8 dynamic/static, fp16) and print size, latency and accuracy before/after."""
    from facetrain.export import compare_models, load_faces, quantize

    calibration = None
    if mode == "static":
        if calib is None and bin_path is None:
            raise FacetrainError("--mode static needs --calib DIR of aligned faces (or --bin to calibrate on)")
        calibration, _ = load_faces(calib, bin_path=bin_path, limit=calib_size)
    quantize(
        in_path,
        out_path,
        mode=mode,
        calibration=calibration,
        quantize_depthwise=quantize_depthwise,
        activations=activations,
        prelu=prelu,
    )
    faces, description = load_faces(calib, bin_path=bin_path, limit=64)
    rows = compare_models([("fp32", in_path), (mode, out_path)], faces, bin_path=bin_path, batch_size=batch_size)
    click.echo(f"compared on {description}; latency: median CPU time of a batch of {batch_size}")
    click.echo("| model | size MB | latency ms | img/s | min cos vs fp32 | accuracy |\n|---|---|---|---|---|---|")
    for row in rows:
        acc = "-" if row.accuracy is None else f"{row.accuracy:.4%}"
        click.echo(
            f"| {row.label} | {row.size_mb:.2f} | {row.latency_ms:.1f} | {row.images_per_s:.1f} | "
            f"{row.min_cosine:.5f} | {acc} |"
        )
    if rows[0].accuracy is not None and rows[1].accuracy is not None:
        loss = (rows[0].accuracy - rows[1].accuracy) * 100.0
        if loss > accuracy_budget:
            message = f"{out_path}: {mode} loses {loss:.2f} points of accuracy (budget {accuracy_budget:g})"
            click.echo(f"WARNING: {message}", err=True)
            if not allow_loss:
                raise FacetrainError(message + "; pass --allow-loss to accept it")


def _model_and_out(model, out, backbone, suffix):
    """With --backbone, a single positional argument is OUT (random init); otherwise MODEL and OUT are required."""
    if out is None:
        if backbone is not None and model is not None:
            return None, model
        raise click.UsageError(f"give MODEL and OUT{suffix}, or --backbone NAME and OUT{suffix}")
    return model, out


COMMANDS = [export_group]
