"""``facetrain embed MODEL INPUT --out FILE``: batch embedding, pipelined and resumable."""

from __future__ import annotations

import click


@click.command("embed")
@click.argument("model")
@click.argument("input_path", metavar="INPUT")
@click.option("--out", "out", required=True, help="output file: .npz, .npy (+ .ids.tsv) or .parquet.")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="decoder threads.")
@click.option("--shard-size", type=int, default=4096, show_default=True, help="items per resumable shard.")
@click.option("--detector", default=None, help="detect + align raw photos first (e.g. retinaface, yunet).")
@click.option("--skip-bad", is_flag=True, help="list and skip unreadable or wrongly sized images.")
@click.option("--restart", is_flag=True, help="discard the partial results of an earlier run.")
@click.option("--overwrite", is_flag=True, help="replace an existing output file.")
@click.option("--device", default=None, help="torch device for checkpoint/TorchScript models (default: cuda if any).")
@click.option("--threads", type=int, default=0, help="CPU threads for an ONNX model (0: every usable core).")
@click.option(
    "--streams",
    type=int,
    default=None,
    help="concurrent ONNX runs on CPU, each on its own batch (default: one per thread, up to 8).",
)
def embed_cmd(
    model,
    input_path,
    out,
    batch_size,
    workers,
    shard_size,
    detector,
    skip_bad,
    restart,
    overwrite,
    device,
    threads,
    streams,
) -> None:
    """Embed every face of INPUT (aligned folder, .rec, list file, or photos with --detector) with MODEL.

    MODEL: facetrain checkpoint, arcface_torch backbone.pth, TorchScript or ONNX. A re-run continues from
    OUT.partial/ after an interruption.
    """
    from facetrain.embed_batch import embed_to_file

    summary = embed_to_file(
        model,
        input_path,
        out,
        batch_size=batch_size,
        workers=workers,
        shard_size=shard_size,
        detector=detector,
        skip_bad=skip_bad,
        restart=restart,
        overwrite=overwrite,
        device=device,
        threads=threads,
        streams=streams,
    )
    resumed = f" ({summary.n_resumed} resumed)" if summary.n_resumed else ""
    click.echo(
        f"wrote {summary.out}: {summary.n_embeddings} embeddings of size {summary.embedding_size} from "
        f"{summary.n_items} items{resumed} in {summary.seconds:.1f} s ({summary.items_per_s:.1f} items/s)"
    )
    if summary.bad:
        click.echo(f"skipped {len(summary.bad)} bad images:")
        for line in summary.bad[:20]:
            click.echo(f"  {line}")
        if len(summary.bad) > 20:
            click.echo(f"  ... and {len(summary.bad) - 20} more")


COMMANDS = [embed_cmd]
