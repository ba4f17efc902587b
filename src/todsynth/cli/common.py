"""Shared CLI plumbing: clear errors and a non-zero exit, the config-driven commands' options, and the lines
that end each command (where its outputs are, what to run next)."""

from __future__ import annotations

import functools
import inspect
import os
import shlex
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperCommand

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


def arg(path: object) -> str:
    """A path or value as a shell word, for the commands `finish` suggests."""
    return shlex.quote(str(path))


def finish(done: str, *next_commands: str) -> None:
    """End a command: what it wrote and where, then the command(s) to run next; printed by the main process only
    (RANK is set by `accelerate launch` and torchrun)."""
    if os.environ.get("RANK", "0") != "0":
        return
    console.print(done, markup=False, highlight=False, soft_wrap=True)
    for command in next_commands:
        console.print(f"next: {command}", markup=False, highlight=False, soft_wrap=True)


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


def stage_defaults(stage: str) -> Any:
    """The config of `stage` (a `config show` stage name) with its command's defaults and nothing given."""
    from todsynth.cli.config import StageName, stage_config
    from todsynth.config import load_config

    cls, defaults = stage_config(StageName(stage))
    return load_config(cls, None, None, defaults, check=False)


def _setting(cfg: Any, dotted: str) -> Any:
    """The value of the dotted setting `dotted` (model.control) of `cfg`."""
    return functools.reduce(getattr, dotted.split("."), cfg)


@dataclass
class Settings:
    """What a config-driven command was given: its stage, its setting options (None: not given), which of them
    are its positional arguments, --config, --set and --print-config."""

    context: typer.Context
    stage: str
    options: dict[str, Any]
    arguments: dict[str, str]
    config: Path | None
    overrides: list[str] | None
    print_config: bool

    def resolve(self) -> Any:
        """The stage's config: the command's defaults, the --config file, the options (None: not given), then
        --set; with --print-config, print it as `config show` does and exit. A positional argument that none of
        these gives is a usage error, as typer makes it for a required argument."""
        from todsynth.cli.config import StageName, stage_config
        from todsynth.config import config_yaml, load_config, parse_overrides

        cls, defaults = stage_config(StageName(self.stage))
        values = {k: str(v) if isinstance(v, Path) else v for k, v in self.options.items()}
        values.update(parse_overrides(self.overrides))
        cfg = load_config(cls, self.config, values, defaults, check=False)
        if self.print_config:
            typer.echo(config_yaml(cfg, stage_defaults(self.stage)))
            raise typer.Exit(0)
        missing = [n for n, dotted in self.arguments.items() if _setting(cfg, dotted) in (None, "")]
        if missing:
            shown = ", ".join(f"'{n.upper()}'" for n in missing)
            given = ", ".join(f"'{self.arguments[n]}'" for n in missing)
            self.context.fail(
                f"Missing argument{'s' if len(missing) > 1 else ''} {shown} (required unless --config gives {given})."
            )
        return load_config(cls, self.config, values, defaults)


class SettingsCommand(TyperCommand):
    """A config-driven command (`with_settings`) whose --help shows each setting's default, read from the stage's
    config when help is asked for (the configs import torch, which a plain start does not)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """Fill in the defaults, then typer's help; the defaults are set only here, as --help exits after it."""
        names: dict[str, str] = getattr(self.callback, "settings_names", {})
        if names:
            cfg = stage_defaults(self.callback.settings_stage)  # type: ignore[union-attr]
            for param in self.params:
                flag = getattr(param, "is_flag", False)
                value = _setting(cfg, names[param.name]) if param.name in names and not flag else None
                if value not in (None, ""):
                    param.default, param.show_default = value, True
        super().format_help(ctx, formatter)


def with_settings(
    *shared: str,
    stage: str,
    arguments: dict[str, str] | None = None,
    options: dict[str, tuple[type, str]] | None = None,
    names: dict[str, str] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of the config-driven command of `stage` (a `config show` stage name): its settings as CLI
    parameters, received as `settings` (a Settings); register it with `cls=SettingsCommand` to show defaults.

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
    settings = {n: names.get(n, n) for n in added}
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
                dotted: (given[n] or None) if n in ("resume", "overwrite") else given[n]
                for n, dotted in settings.items()
            }
            return fn(
                settings=Settings(
                    kwargs.pop("ctx"),
                    stage,
                    values,
                    {n: settings[n] for n in arguments},
                    given["config"],
                    given["set_"],
                    given["print_config"],
                ),
                **kwargs,
            )

        params = [*own, *extra, inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.settings_stage, command.settings_names = stage, settings  # type: ignore[attr-defined]
        return command

    return wrap
