"""``facetrain config list`` and ``facetrain config show [PRESET] [KEY=VALUE]...``: browse presets, resolve configs."""

from __future__ import annotations

import click


@click.group("config")
def config_group() -> None:
    """List presets and print resolved run configs (defaults -> preset -> overrides)."""


@config_group.command("list")
def list_command() -> None:
    """List the bundled presets with their one-line descriptions."""
    from facetrain.config import list_presets

    presets = list_presets()
    width = max((len(name) for name in presets), default=0)
    for name, description in presets.items():
        click.echo(f"{name:<{width}}  {description}".rstrip())


@config_group.command("show")
@click.argument("args", nargs=-1, metavar="[PRESET] [KEY=VALUE]...")
@click.option("--help-keys", is_flag=True, help="Print every key with its resolved value, type and help text.")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), default=None, help="Also write the resolved YAML to this file."
)
def show_command(args: tuple[str, ...], help_keys: bool, output: str | None) -> None:
    """Print the resolved config of PRESET (a name from `config list` or a .yaml path) with KEY=VALUE overrides.

    Values are parsed as YAML, e.g.

    \b
      facetrain config show ms1mv3_r50 optim.lr=0.05 train.max_steps=100
      facetrain config show tiny_cpu 'data.val_bins=[a.bin, b.bin]' model.init_from=null
    """
    from facetrain.config import describe_keys, load_config, save_config

    preset, overrides = _split_args(args)
    config = load_config(preset, overrides)
    if help_keys:
        flat = _flatten(config.to_dict())
        for key, type_name, text in describe_keys():
            plain_type = type_name.replace("\\", "").replace("`", "")
            click.echo(f"{key} = {_inline(flat.get(key))}  ({plain_type}) {text}")
    else:
        click.echo(config.to_yaml(), nl=False)
    if output:
        path = save_config(config, output)
        click.echo(f"wrote {path}", err=True)


def _split_args(args: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """The first argument is the preset unless it looks like an override (contains '=')."""
    if args and "=" not in args[0]:
        return args[0], list(args[1:])
    return None, list(args)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key not in ("backbone_kwargs", "margin_kwargs"):
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _inline(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


COMMANDS = [config_group]
