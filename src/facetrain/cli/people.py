"""``facetrain people ...``: a face library of a photo collection (one SQLite file); see docs/people.md."""

from __future__ import annotations

import json

import click


@click.group("people")
def people() -> None:
    """Find, name and export the people in a photo collection (one SQLite library file)."""


@people.command("init")
@click.argument("library", type=click.Path(dir_okay=False))
@click.option(
    "--model",
    default=None,
    help="Recognition model: .onnx, checkpoint, or InsightFace pack folder (default: built-in SFace + YuNet).",
)
@click.option(
    "--detector", default=None, help="Detector name (retinaface, yunet, scrfd, mtcnn), NAME:PATH or an .onnx path."
)
@click.option("--threshold", type=float, default=None, help="Identification cosine threshold (default per model).")
def init_cmd(library: str, model: str | None, detector: str | None, threshold: float | None) -> None:
    """Create LIBRARY recording the detector and the recognition model (its weights' identity)."""
    from pathlib import Path

    from facetrain.people.builtin import check_models
    from facetrain.people.library import Library

    with Library.create(library, model=model, detector=detector, threshold=threshold) as lib:
        try:
            check_models(lib)
        except BaseException:
            lib.close()
            for suffix in ("", "-wal", "-shm"):
                Path(library + suffix).unlink(missing_ok=True)
            raise
        s = lib.settings()
        click.echo(
            f"created {library}: detector {s['detector']}, model {s['model_path']} ({s['model_identity']}, "
            f"{s['embedding_size']}-D), threshold {s['threshold']}"
        )


@people.command("scan")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--workers", type=click.IntRange(min=0), default=0, show_default=True, help="Decode/detect processes.")
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Photos per commit.")
@click.option("--no-prune", is_flag=True, help="Keep photos that disappeared from FOLDER.")
@click.option("--no-cluster", is_flag=True, help="Skip identification and clustering after the scan.")
@click.option("--no-videos", is_flag=True, help="Skip video files.")
@click.option("--video-interval", type=click.FloatRange(min=0.01), default=1.0, show_default=True, help="Seconds.")
def scan_cmd(
    library: str,
    folder: str,
    workers: int,
    batch: int,
    no_prune: bool,
    no_cluster: bool,
    no_videos: bool,
    video_interval: float,
) -> None:
    """Scan FOLDER incrementally (new/changed photos only), then identify and cluster the faces."""
    from facetrain.people.builtin import check_models
    from facetrain.people.cluster import cluster_unknown
    from facetrain.people.identify import identify
    from facetrain.people.library import Library
    from facetrain.people.scan import scan

    with Library(library) as lib:
        check_models(lib)
        s = scan(
            lib,
            folder,
            workers=workers,
            batch_photos=batch,
            prune=not no_prune,
            videos=not no_videos,
            video_interval=video_interval,
        )
        click.echo(
            f"{s.seen} photos: {s.processed} scanned ({s.photos_per_second:.1f} photos/s), {s.skipped} unchanged, "
            f"{s.moved} moved, {s.pruned} removed, {s.errors} unreadable; {s.faces} faces found"
        )
        for path in s.error_files[:20]:
            click.echo(f"  unreadable: {path}")
        if not no_cluster:
            ident = identify(lib)
            clusters = cluster_unknown(lib)
            click.echo(
                f"identified {ident['identified']}, unsure {ident['unsure']}, unknown {ident['unknown']}; "
                f"clusters: {clusters['new_clusters']} new, {clusters['clustered']} faces placed"
            )


@people.command("enroll")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.argument("name")
@click.argument("photos", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--face-index", type=click.IntRange(min=0), default=None, help="Which face of a group photo, 0 = leftmost."
)
def enroll_cmd(library: str, name: str, photos: tuple[str, ...], face_index: int | None) -> None:
    """Add reference faces of NAME from PHOTOS, then re-identify the library."""
    from facetrain.people.identify import enroll, identify
    from facetrain.people.library import Library

    with Library(library) as lib:
        for r in enroll(lib, name, list(photos), face_index=face_index):
            click.echo(f"{name}: face {r.face_id} of {r.photo} (size {r.size:.0f} px, sharpness {r.blur:.0f})")
            for warning in r.warnings:
                click.echo(f"  warning: {warning}")
        counts = identify(lib)
        click.echo(f"identified {counts['identified']}, unsure {counts['unsure']}, unknown {counts['unknown']}")


@people.command("cluster")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.option("--threshold", type=float, default=None, help="Neighbour cosine (default: the library's).")
@click.option("--min-faces", type=click.IntRange(min=1), default=None, help="Neighbours that make a core face.")
def cluster_cmd(library: str, threshold: float | None, min_faces: int | None) -> None:
    """Identify, then cluster the unknown faces incrementally (existing clusters never move)."""
    from facetrain.people.cluster import cluster_unknown
    from facetrain.people.identify import identify
    from facetrain.people.library import Library

    with Library(library) as lib, lib.writer():
        identify(lib)
        click.echo(json.dumps(cluster_unknown(lib, threshold=threshold, min_faces=min_faces)))


@people.command("threshold")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.argument("value", type=float, required=False)
@click.option("--calibration", type=click.Path(exists=True), help="JSON written by facetrain eval calibrate.")
@click.option("--unsure-margin", type=click.FloatRange(0, 1), default=None, help="Width of the 'unsure' band.")
def threshold_cmd(library: str, value: float | None, calibration: str | None, unsure_margin: float | None) -> None:
    """Show or set the identification threshold (then re-identify)."""
    from facetrain.people.identify import identify
    from facetrain.people.library import Library

    with Library(library) as lib:
        if unsure_margin is not None:
            lib.set("unsure_margin", unsure_margin)
        if value is not None or calibration is not None:
            lib.set_threshold(value, calibration=calibration)
            identify(lib)
        click.echo(f"threshold {lib.threshold} (unsure band {lib.threshold - lib.unsure_margin:.3f}..{lib.threshold})")


@people.command("list")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (counts, people, clusters).")
def list_cmd(library: str, as_json: bool) -> None:
    """People and unknown clusters."""
    from facetrain.people.cluster import cluster_summary
    from facetrain.people.identify import people_summary
    from facetrain.people.library import Library

    with Library(library) as lib:
        counts, people_rows, clusters = lib.counts(), people_summary(lib), cluster_summary(lib)
    if as_json:
        click.echo(json.dumps({"counts": counts, "people": people_rows, "clusters": clusters}))
        return
    click.echo(
        f"{counts['photos']} photos ({counts['photos_with_errors']} unreadable), {counts['faces']} faces, "
        f"{counts['people']} people ({counts['identified_faces']} faces identified), {counts['clusters']} clusters"
    )
    for p in people_rows:
        click.echo(f"{p['name']}: {p['faces']} faces in {p['photos']} photos")
    for c in clusters:
        click.echo(f"cluster {c['cluster']}: {c['faces']} faces in {c['photos']} photos (faces {c['face_ids']})")


@people.command("name")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.argument("cluster", type=int)
@click.argument("name")
def name_cmd(library: str, cluster: int, name: str) -> None:
    """Name an unknown CLUSTER as NAME."""
    from facetrain.people.identify import identify, name_cluster
    from facetrain.people.library import Library

    with Library(library) as lib:
        n = name_cluster(lib, cluster, name)
        identify(lib)
        click.echo(f"cluster {cluster}: {n} faces named {name!r}")


@people.command("merge")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.argument("source")
@click.argument("target")
def merge_cmd(library: str, source: str, target: str) -> None:
    """Merge SOURCE into TARGET (each a person name, or a cluster id in digits)."""
    from facetrain.people.identify import merge
    from facetrain.people.library import Library

    with Library(library) as lib:
        click.echo(f"merged {merge(lib, source, target)} faces of {source!r} into {target!r}")


@people.command("split")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.argument("faces", nargs=-1, required=True, type=int)
def split_cmd(library: str, faces: tuple[int, ...]) -> None:
    """Split FACES (ids) off their person / cluster into a new cluster."""
    from facetrain.people.identify import split
    from facetrain.people.library import Library

    with Library(library) as lib:
        click.echo(f"faces {list(faces)} are now cluster {split(lib, list(faces))}")


@people.command("not-face")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.argument("faces", nargs=-1, required=True, type=int)
def not_face_cmd(library: str, faces: tuple[int, ...]) -> None:
    """Mark detections FACES (ids) as not a face."""
    from facetrain.people.identify import mark_not_face
    from facetrain.people.library import Library

    with Library(library) as lib:
        for face in faces:
            mark_not_face(lib, face)
        click.echo(f"{len(faces)} detections marked as not a face")


@people.command("forget")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.argument("name")
def forget_cmd(library: str, name: str) -> None:
    """Remove NAME and the embeddings of all their faces."""
    from facetrain.people.identify import forget
    from facetrain.people.library import Library

    with Library(library) as lib:
        click.echo(f"forgot {name!r}: {forget(lib, name)} faces lost their embedding")


@people.command("who")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.argument("photo", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def who_cmd(library: str, photo: str, as_json: bool) -> None:
    """Who is in PHOTO (from the library, or analysed now if it is not in it)."""
    from facetrain.people.annotate import describe
    from facetrain.people.builtin import check_models
    from facetrain.people.identify import who
    from facetrain.people.library import Library
    from facetrain.people.video import is_video

    with Library(library) as lib:
        check_models(lib)
        faces = who(lib, photo)
    if as_json:
        click.echo(json.dumps(faces))
    else:
        click.echo(describe({"faces": faces, "kind": "video" if is_video(photo) else "photo"}))


@people.command("find")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.argument("name")
def find_cmd(library: str, name: str) -> None:
    """Photos showing NAME."""
    from facetrain.people.identify import find
    from facetrain.people.library import Library

    with Library(library) as lib:
        for path, sim in find(lib, name):
            click.echo(f"{path}\t{sim:.3f}")


@people.command("export")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["json", "csv", "xmp"]), default="json", show_default=True)
@click.option(
    "--out", type=click.Path(), default=None, help="Output file (json/csv) or folder (xmp; default: beside photos)."
)
def export_cmd(library: str, fmt: str, out: str | None) -> None:
    """Export faces, people and one-sentence descriptions as JSON, CSV or XMP sidecars (MWG regions)."""
    from facetrain.people.annotate import export
    from facetrain.people.library import Library

    with Library(library) as lib:
        written = export(lib, fmt, out)
    click.echo(f"wrote {len(written)} file(s)" + (f": {written[0]}" if len(written) == 1 else ""))


@people.command("caption")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--endpoint",
    default=None,
    help="Local vision-model server: Ollama (http://127.0.0.1:11434) or OpenAI-compatible (.../v1); else prompts.",
)
@click.option(
    "--api",
    type=click.Choice(["auto", "ollama", "openai"]),
    default="auto",
    show_default=True,
    help="Endpoint dialect: /api/generate or /v1/chat/completions (auto: openai when the URL has /v1).",
)
@click.option("--model", "model_name", default="llava", show_default=True, help="Model name on the server.")
@click.option("--out", type=click.Path(), default=None, help="Prompts file when there is no endpoint.")
@click.option("--overwrite", is_flag=True, help="Re-caption photos that have a caption.")
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds per request.")
def caption_cmd(
    library: str, endpoint: str | None, api: str, model_name: str, out: str | None, overwrite: bool, timeout: float
) -> None:
    """Caption photos with a local vision model, or write the prompts."""
    from facetrain.people.caption import caption
    from facetrain.people.library import Library

    with Library(library) as lib:
        stats = caption(
            lib, endpoint=endpoint, model=model_name, out=out, overwrite=overwrite, timeout=timeout, api=api
        )
    click.echo(json.dumps(stats))


@people.command("serve")
@click.argument("library", type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True)
def serve_cmd(library: str, host: str, port: int) -> None:
    """Serve the review page (people, unknown clusters, name/merge/split/not-a-face)."""
    from facetrain.people.web import make_server

    server = make_server(library, host, port)
    click.echo(f"review page: http://{host}:{server.server_port}/  (Ctrl-C to stop)")
    try:
        server.serve_forever()
    finally:
        server.server_close()


COMMANDS = [people]
