"""Shared CLI plumbing: turn the project's errors into a clear message and a non-zero exit."""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

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
Steps = Annotated[int | None, typer.Option(show_default=False, help="Optimizer steps.")]
NumSteps = Annotated[int | None, typer.Option(show_default=False, help="Euler sampling steps.")]
GuidanceScale = Annotated[
    float | None, typer.Option(show_default=False, help="Classifier-free guidance scale on the text.")
]
BatchSize = Annotated[int | None, typer.Option(show_default=False, help="Batch size (of all processes).")]
Size = Annotated[int | None, typer.Option(show_default=False, help="Working image side in pixels.")]
Seed = Annotated[int | None, typer.Option(show_default=False, help="Seed of the run.")]
Device = Annotated[
    str | None, typer.Option(show_default=False, help="auto (the GPU when there is one), cpu or cuda[:N].")
]
Resume = Annotated[
    bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint; refused when there is none.")
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace an earlier run in --out (its model, results and checkpoint are removed)."
    ),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        show_default=False,
        help="YAML file of settings, nested or dotted keys (as `todsynth config show` prints).",
    ),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        show_default=False,
        help="Any setting as key=value, dotted for nested ones (model.num_layers=6); repeatable.",
    ),
]
PrintConfig = Annotated[
    bool, typer.Option("--print-config", help="Print the resolved settings as YAML (readable by --config) and exit.")
]
SHARED = {
    "steps": Steps,
    "num_steps": NumSteps,
    "guidance_scale": GuidanceScale,
    "batch_size": BatchSize,
    "size": Size,
    "seed": Seed,
    "device": Device,
    "resume": Resume,
    "overwrite": Overwrite,
}
FILE_OPTIONS = {"config": ConfigFile, "set_": Overrides, "print_config": PrintConfig}


@dataclass
class Settings:
    """What a config-driven command was given: its setting options (None: not given), --config, --set and
    --print-config."""

    options: dict[str, Any]
    config: Path | None
    overrides: list[str] | None
    print_config: bool

    def resolve(self, cls: type[C], defaults: dict[str, Any] | None = None) -> C:
        """The config: `defaults`, the --config file, the options (None: not given), then --set; with
        --print-config, print it as `config show` does and exit."""
        from todsynth.config import config_yaml, load_config, parse_overrides

        values = {k: str(v) if isinstance(v, Path) else v for k, v in self.options.items()}
        values.update(parse_overrides(self.overrides))
        cfg = load_config(cls, self.config, values, defaults, check=not self.print_config)
        if self.print_config:
            typer.echo(config_yaml(cfg, load_config(cls, None, None, defaults, check=False)))
            raise typer.Exit(0)
        return cfg


def with_settings(
    *shared: str,
    arguments: dict[str, str] | None = None,
    options: dict[str, tuple[type, str]] | None = None,
    names: dict[str, str] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of a config-driven command: its settings as CLI parameters, received as `settings` (a Settings).

    `arguments` (name: help) are positional, `options` (name: (type, help)) the command's own options, `shared`
    the options of SHARED (one spelling per concept across commands), then --config, --set, --print-config.
    `names` maps a parameter to its dotted setting (control: model.control); others are the setting itself."""
    arguments, options, names = arguments or {}, options or {}, names or {}
    added: dict[str, Any] = {
        n: Annotated[str | None, typer.Argument(metavar=n.upper(), show_default=False, help=text)]
        for n, text in arguments.items()
    }
    added.update(
        {
            n: Annotated[tp | None, typer.Option(show_default=False, help=text)]  # type: ignore[valid-type]
            for n, (tp, text) in options.items()
        }
    )
    added.update({n: SHARED[n] for n in shared})
    settings = list(added)
    added.update(FILE_OPTIONS)

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "settings"]
        extra = [
            inspect.Parameter(
                n,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=tp,
                default=False if typing.get_args(tp)[0] is bool else None,
            )
            for n, tp in added.items()
        ]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            given = {n: kwargs.pop(n) for n in added}
            values = {
                names.get(n, n): (given[n] or None) if n in ("resume", "overwrite") else given[n] for n in settings
            }
            return fn(settings=Settings(values, given["config"], given["set_"], given["print_config"]), **kwargs)

        params = own + extra
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return wrap
