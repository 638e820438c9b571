"""``facetrain data``: inspect, convert, verify and create face datasets.

Thin wrappers over :mod:`facetrain.data.convert`; every error a user can cause is a ``FacetrainError`` (one line,
exit 1). ``verify`` exits 1 when any record is bad, with the list on stdout.
"""

from __future__ import annotations

import os

import click

_DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@click.group("data")
def data() -> None:
    """Inspect, convert, verify and create datasets (RecordIO, image folders, verification .bin)."""


@data.command("info")
@click.argument("path", type=click.Path())
def info(path: str) -> None:
    """Format, image and identity counts, images per identity and image size of PATH."""
    from facetrain.data.convert import dataset_info

    found = dataset_info(path)
    h, w = found.image_size
    click.echo(f"path:          {found.path}")
    click.echo(f"format:        {found.format}" + (f" ({found.parts} parts)" if found.parts > 1 else ""))
    click.echo(f"images:        {found.images}")
    click.echo(f"identities:    {found.identities}")
    lo, mid, hi = found.min_per_identity, found.median_per_identity, found.max_per_identity
    click.echo(f"per identity:  min {lo}  median {mid:g}  max {hi}")
    click.echo(f"image size:    {h}x{w}")


@data.command("convert")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option(
    "--to",
    "to",
    type=click.Choice(["rec", "folder", "list"]),
    default="rec",
    show_default=True,
    help="Output kind: RecordIO folder, image folder, or MXNet .lst file (index, label, path).",
)
@click.option(
    "--shuffle/--no-shuffle",
    default=False,
    show_default=True,
    help="Full seeded shuffle of the record order (rec output), in bounded memory.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Shuffle seed.")
@click.option(
    "--parts",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Write N shards part-00000.rec/.idx ... (+ property) instead of train.rec.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=_DEFAULT_WORKERS,
    show_default=True,
    help="Decode-check processes (0 = in this process).",
)
@click.option(
    "--shuffle-memory",
    "shuffle_memory_mib",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="MiB of image data the shuffle may hold at once.",
)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--skip-bad", is_flag=True, help="Leave out unreadable images instead of stopping at the first one.")
def convert(
    src: str,
    dst: str,
    to: str,
    shuffle: bool,
    seed: int,
    parts: int,
    workers: int,
    shuffle_memory_mib: int,
    overwrite: bool,
    skip_bad: bool,
) -> None:
    """Convert SRC (rec folder, .rec, rec parts or image folder) to DST."""
    from facetrain.data.convert import convert_dataset

    report = convert_dataset(
        src,
        dst,
        to=to,
        shuffle=shuffle,
        seed=seed,
        parts=parts,
        workers=workers,
        overwrite=overwrite,
        on_bad="skip" if skip_bad else "raise",
        shuffle_memory=shuffle_memory_mib << 20,
    )
    what = f"{report.parts} parts" if report.parts > 1 else to
    order = f", shuffled (seed {seed}, {report.shuffle_buckets} buckets)" if report.shuffled else ""
    click.echo(
        f"wrote {report.images} images of {report.identities} identities to {report.dst} ({what}{order}) "
        f"in {report.seconds:.1f}s"
    )
    for bad in report.bad_records:
        click.echo(f"skipped: {bad}")


@data.command("verify")
@click.argument("path", type=click.Path())
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=_DEFAULT_WORKERS,
    show_default=True,
    help="Decode processes (0 = in this process).",
)
@click.option(
    "--skip-bad",
    is_flag=True,
    help="Exit 0 even when bad records are found (they are still listed), e.g. before training with it.",
)
def verify(path: str, workers: int, skip_bad: bool) -> None:
    """Decode every record of PATH; list every bad one (exit 1 if any, unless --skip-bad)."""
    from facetrain.data.convert import verify_dataset

    report = verify_dataset(path, workers=workers)
    for bad in report.bad_records:
        click.echo(f"bad: {bad}")
    click.echo(f"{report.records} records checked, {len(report.bad_records)} bad")
    if report.bad_records and not skip_bad:
        raise click.exceptions.Exit(1)


@data.command("make-bin")
@click.argument("src", type=click.Path())
@click.argument("dst", type=click.Path())
@click.option("--pairs", type=click.IntRange(min=1), required=True, help="Pairs of EACH kind (genuine, impostor).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
def make_bin_cmd(src: str, dst: str, pairs: int, seed: int, overwrite: bool) -> None:
    """Write a verification .bin DST with N genuine and N impostor pairs from SRC (held-out identities)."""
    from facetrain.data.convert import make_bin

    issame = make_bin(src, dst, num_pairs=pairs, seed=seed, overwrite=overwrite)
    click.echo(f"wrote {len(issame)} pairs ({int(issame.sum())} genuine) to {dst}")


@data.command("synth")
@click.argument("dst", type=click.Path())
@click.option("--identities", type=click.IntRange(min=1), required=True)
@click.option("--images-per-identity", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["rec", "folder", "bin"]), default="rec", show_default=True)
@click.option("--pairs", type=click.IntRange(min=2), default=600, show_default=True, help="Pairs for --format bin.")
@click.option("--image-size", type=click.IntRange(min=16), default=112, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
def synth(
    dst: str,
    identities: int,
    images_per_identity: int,
    fmt: str,
    pairs: int,
    image_size: int,
    seed: int,
    overwrite: bool,
) -> None:
    """Render a synthetic face dataset (rec, folder) or verification .bin (held-out identities) to DST."""
    from facetrain.data.convert import write_synthetic

    n = write_synthetic(
        dst,
        identities=identities,
        images_per_identity=images_per_identity,
        fmt=fmt,
        seed=seed,
        pairs=pairs,
        image_size=image_size,
        overwrite=overwrite,
    )
    click.echo(f"wrote {n} synthetic images to {dst}")


@data.command("preview-augment")
@click.argument("path", type=click.Path())
@click.option(
    "--preset",
    default="strong",
    show_default=True,
    help="Augmentation preset: none, flip, basic, strong or strong_mask.",
)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Output PNG grid.")
@click.option("--n", "n", type=click.IntRange(min=1), default=32, show_default=True, help="Number of samples.")
@click.option("--columns", type=click.IntRange(min=1), default=8, show_default=True, help="Tiles per row.")
@click.option("--image-size", type=click.IntRange(min=16), default=112, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the sample choice and augmentation.")
def preview_augment(path: str, preset: str, out: str, n: int, columns: int, image_size: int, seed: int) -> None:
    """Write a PNG grid of N augmented samples of the dataset at PATH, to check a preset by eye."""
    from facetrain.data.transforms import write_augment_preview

    written = write_augment_preview(path, out, preset=preset, n=n, seed=seed, columns=columns, image_size=image_size)
    click.echo(f"wrote {n} {preset} samples to {written}")


COMMANDS = [data]
