"""``facetrain train``: train a face-recognition model from a preset plus dotted overrides (CPU, one GPU, torchrun)."""

from __future__ import annotations

import click


@click.command("train", context_settings={"ignore_unknown_options": False})
@click.option(
    "-c",
    "--config",
    "preset",
    default=None,
    metavar="PRESET",
    help="Preset name (see `facetrain config list`) or a YAML path; may also be the first argument.",
)
@click.argument("overrides", nargs=-1, metavar="[PRESET] [KEY=VALUE]...")
@click.option(
    "--resume",
    default=None,
    metavar="PATH|auto",
    help="Continue a run: a checkpoint.pt (or its folder), or auto = output.dir/checkpoint.pt when present.",
)
@click.option("--eval-at-start", is_flag=True, help="Also run verification before the first step.")
@click.option("--progress/--no-progress", default=None, help="tqdm bar on rank 0 (default: when stderr is a TTY).")
def train_command(
    preset: str | None, overrides: tuple[str, ...], resume: str | None, eval_at_start: bool, progress: bool | None
) -> None:
    """Train a backbone with a margin loss and Partial FC.

    \b
    Examples:
      facetrain train --config tiny_cpu train.max_steps=100
      facetrain train ms1mv3_r50 data.path=/data/ms1m-retinaface-t1 --resume auto
      torchrun --standalone --nproc_per_node 8 -m facetrain train glint360k_r100 loss.sample_rate=0.1
    """
    from facetrain.config import load_config
    from facetrain.engine import comm
    from facetrain.engine.trainer import train

    args = list(overrides)
    if preset is None and args and "=" not in args[0]:
        preset = args.pop(0)
    bad = [a for a in args if "=" not in a]
    if bad:
        raise click.UsageError(f"expected KEY=VALUE overrides, got {bad[0]!r}")
    config = load_config(preset, args)
    result = train(config, resume=resume, evaluate_at_start=eval_at_start, progress=progress)
    if not comm.is_main_process():
        return
    click.echo(
        f"trained {result.steps} steps on {result.num_images} images of {result.num_classes} identities "
        f"({result.images_per_sec:.1f} img/s, final loss {result.final_loss:.4f})"
    )
    for record in result.evaluations[-1:]:
        scores = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step")
        click.echo(f"verification at step {record['step']}: {scores}")
    click.echo(f"checkpoint: {result.checkpoint_path}")
    if result.best_path is not None:
        click.echo(f"best: {result.best_path}")
    click.echo(f"metrics: {result.metrics_path}")
    if (result.output_dir / "tb").is_dir():
        click.echo(f"tensorboard: tensorboard --logdir {result.output_dir / 'tb'}")
    if not result.completed:
        click.echo("stopped early (train.stop_after_steps); continue with --resume auto")


COMMANDS = [train_command]
