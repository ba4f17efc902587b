"""Entry point: `todsynth` with sub-commands per stage."""

from __future__ import annotations

import typer

from todsynth.cli.common import Friendly, SettingsCommand
from todsynth.cli.config import app as config_app
from todsynth.cli.data import app as data_app
from todsynth.cli.generator import app as generator_app
from todsynth.cli.run import demo, experiment
from todsynth.cli.segment import app as segment_app
from todsynth.cli.synth import synthesize

app = typer.Typer(
    name="todsynth",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    cls=Friendly,
)


def _print_version(value: bool) -> None:
    """`--version`: print the installed todsynth version and exit."""
    if value:
        from importlib.metadata import version

        typer.echo(version("todsynth"))
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the todsynth version and exit."
    ),
) -> None:
    """Task-oriented synthesis of remote-sensing segmentation training data."""


app.add_typer(data_app, name="data")
app.add_typer(segment_app, name="segment")
app.add_typer(generator_app, name="generator")
app.add_typer(config_app, name="config")
app.command(name="synthesize", cls=SettingsCommand)(synthesize)
app.command(name="demo")(demo)
app.command(name="experiment")(experiment)


@app.command()
def version() -> None:
    """Print the todsynth version."""
    _print_version(True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
