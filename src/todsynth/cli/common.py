"""Shared CLI plumbing: turn the project's errors into a clear message and a non-zero exit."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)
C = TypeVar("C")


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: a TodsynthError becomes 'error: <message>' on stderr and exit code 2, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rich.markup import escape

        from todsynth.errors import TodsynthError

        try:
            return fn(*args, **kwargs)
        except TodsynthError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


# One option per concept, shared by the config-driven commands (defaults: `todsynth config show` or --print-config).
Steps = Annotated[Optional[int], typer.Option(show_default=False, help="Optimizer steps.")]
NumSteps = Annotated[Optional[int], typer.Option(show_default=False, help="Euler sampling steps.")]
GuidanceScale = Annotated[Optional[float], typer.Option(show_default=False, help="Classifier-free guidance scale "
                                                        "on the text.")]
BatchSize = Annotated[Optional[int], typer.Option(show_default=False, help="Batch size (of all processes).")]
Size = Annotated[Optional[int], typer.Option(show_default=False, help="Working image side in pixels.")]
Seed = Annotated[Optional[int], typer.Option(show_default=False, help="Seed of the run.")]
Device = Annotated[Optional[str], typer.Option(show_default=False, help="auto (the GPU when there is one), cpu or "
                                               "cuda[:N].")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint; refused "
                                      "when there is none.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an earlier run in --out (its model, results "
                                         "and checkpoint are removed).")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", show_default=False, help="YAML file of settings, "
                                                    "nested or dotted keys (as `todsynth config show` prints).")]
Overrides = Annotated[Optional[list[str]], typer.Option("--set", show_default=False, help="Any setting as key=value, "
                                                        "dotted for nested ones (model.num_layers=6); repeatable.")]
PrintConfig = Annotated[bool, typer.Option("--print-config", help="Print the resolved settings as YAML (readable "
                                           "by --config) and exit.")]


def resolve_config(cls: type[C], config: Optional[Path], options: dict[str, Any], overrides: Optional[list[str]],
                   print_config: bool, defaults: Optional[dict[str, Any]] = None) -> C:
    """The command's config: `defaults`, then the --config file, the command's options (None: not given) and
    --set; with --print-config, print it as `todsynth config show` does and exit."""
    from todsynth.config import config_yaml, load_config, parse_overrides

    values = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    values.update(parse_overrides(overrides))
    cfg = load_config(cls, config, values, defaults, check=not print_config)
    if print_config:
        typer.echo(config_yaml(cfg, load_config(cls, None, None, defaults, check=False)))
        raise typer.Exit(0)
    return cfg
