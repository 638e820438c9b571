"""The command table: ``facetrain <command>``.

Each submodule of ``facetrain.cli`` (``data.py``, ``config.py``, ``demo.py``, ...) defines its click commands and lists
them in ``COMMANDS``; this file only assembles them and turns errors into exit codes:
0 ok, 1 :class:`~facetrain.errors.FacetrainError` (one line on stderr), 2 usage, 130 interrupted.
``FACETRAIN_DEBUG=1`` shows tracebacks. Heavy imports (torch, onnxruntime) happen inside commands, not here.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from facetrain import __version__
from facetrain.errors import FacetrainError

# One entry per submodule; a submodule lists its top-level click commands/groups in COMMANDS.
_COMMAND_MODULES = ("demo", "config", "data", "models", "train", "eval", "align", "export", "embed", "clean", "people")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="facetrain")
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def cli(verbose: bool) -> None:
    """facetrain: train, evaluate, clean and deploy face-recognition embedding models."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _register() -> None:
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(f"facetrain.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"facetrain.cli.{name}":
                continue  # that command family is not built yet
            raise
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point; exits the process with the documented exit codes."""
    debug = os.environ.get("FACETRAIN_DEBUG") == "1"
    try:
        rv = cli.main(args=argv, prog_name="facetrain", standalone_mode=False)
    except FacetrainError as exc:
        if debug:
            raise
        message = str(exc)
        # Messages that already name their kind ("config error: ...") are not prefixed twice.
        click.echo(message if message.split(":", 1)[0].endswith("error") else f"error: {message}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        if debug:
            raise
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    sys.exit(rv if isinstance(rv, int) else 0)
