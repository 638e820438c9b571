"""``facetrain models list`` / ``facetrain models info NAME``: what backbones exist and what they cost."""

from __future__ import annotations

import click


@click.group("models")
def models_group() -> None:
    """Backbones: list them, inspect one."""


@models_group.command("list")
@click.option("--aliases", is_flag=True, help="Also list aliases (r50, mbf, ...) and arcface_torch variants.")
def list_cmd(aliases: bool) -> None:
    """List registered backbones with their parameter counts (at embedding size 512)."""
    from facetrain.models.info import backbone_summary
    from facetrain.models.registry import list_backbones

    click.echo(f"{'name':<24} {'params (M)':>10}")
    for name in list_backbones(include_aliases=aliases):
        summary = backbone_summary(name, flops=False)
        click.echo(f"{name:<24} {summary.params / 1e6:>10.2f}")


@models_group.command("info")
@click.argument("name")
@click.option("--embedding-size", default=512, show_default=True, help="D of the output embedding.")
@click.option("--no-flops", is_flag=True, help="Skip counting FLOPs (a forward pass at 1x3x112x112).")
def info_cmd(name: str, embedding_size: int, no_flops: bool) -> None:
    """Show one backbone: canonical name, parameters, FLOPs, embedding size, state-dict size."""
    from facetrain.models.info import backbone_summary

    s = backbone_summary(name, embedding_size=embedding_size, flops=not no_flops)
    click.echo(f"name            {s.name}")
    click.echo(f"class           {s.class_name}")
    click.echo(f"embedding size  {s.embedding_size}")
    click.echo(f"params          {s.params:,} ({s.params / 1e6:.2f} M)")
    click.echo(f"state-dict keys {s.state_keys}")
    if s.gflops is not None:
        click.echo(f"GFLOPs          {s.gflops:.3f} (1x3x112x112, multiply-add = 2 FLOPs)")


COMMANDS = [models_group]
