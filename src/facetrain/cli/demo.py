"""``facetrain demo``: train a small model on synthetic identities and show verification accuracy rising."""

from __future__ import annotations

import click


@click.command("demo")
@click.option(
    "--out",
    "out_dir",
    default="./facetrain_demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output folder (data/ with train.rec and synthetic_val.bin, run/ with checkpoint and metrics).",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=None,
    help="Optimizer steps (default: the demo_cpu preset's train.max_steps).",
)
@click.option("--quick", is_flag=True, help="A few dozen steps on few identities (a smoke test, still learns).")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Config override on top of the demo_cpu preset, e.g. --set optim.lr=0.05 (repeatable).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="CPU threads for torch; 1 is robust on busy machines, more is faster on an idle multi-core one.",
)
def demo(out_dir: str, steps: int | None, quick: bool, overrides: tuple[str, ...], threads: int) -> None:
    """Synthesize face identities, write a real train.rec + verification .bin, train, verify before/after.

    Runs offline on a CPU in about two minutes (2 cores).
    """
    from facetrain.engine.demo import run_demo

    result = run_demo(out_dir, steps=steps, quick=quick, overrides=overrides, threads=threads)
    rows = [
        ("verification accuracy, step 0", f"{result.accuracy_before:.4f}"),
        (f"verification accuracy, step {result.steps}", f"{result.accuracy_after:.4f}"),
        ("training images/s", f"{result.images_per_sec:.1f}"),
        ("training time", f"{result.train_seconds:.1f} s"),
        ("total time", f"{result.total_seconds:.1f} s"),
        ("final training loss", f"{result.final_loss:.3f}"),
    ]
    click.echo(
        f"\nfacetrain demo: {result.num_images} images of {result.num_identities} synthetic identities, "
        f"{result.val_pairs} verification pairs of held-out identities (10-fold)\n"
    )
    width = max(len(name) for name, _ in rows)
    click.echo(f"| {'':<{width}} | {'value':>10} |")
    click.echo(f"|{'-' * (width + 2)}|{'-' * 12}|")
    for name, value in rows:
        click.echo(f"| {name:<{width}} | {value:>10} |")
    click.echo("")
    click.echo(f"training data:  {result.rec_dir / 'train.rec'}")
    click.echo(f"val pairs:      {result.bin_path}")
    click.echo(f"checkpoint:     {result.checkpoint_path}")
    click.echo(f"metrics:        {result.metrics_path}")
    click.echo(f"config:         {result.config_path}")


COMMANDS = [demo]
