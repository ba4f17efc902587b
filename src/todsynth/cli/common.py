"""Shared CLI plumbing: clear errors and a non-zero exit, the config-driven commands' options, and the lines
that end each command (where its outputs are, what to run next)."""

from __future__ import annotations

import functools
import inspect
import os
import shlex
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

console = Console()
err_console = Console(stderr=True)


class Friendly(TyperGroup):
    """A command group whose commands' TodsynthErrors become 'error: <message>' on stderr and exit code 2, not a
    traceback."""

    def invoke(self, ctx: Any) -> Any:
        from rich.markup import escape

        from todsynth.errors import TodsynthError

        try:
            return super().invoke(ctx)
        except TodsynthError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


def arg(path: object) -> str:
    """A path or value as a shell word, for the commands `finish` suggests."""
    return shlex.quote(str(path))


RESUME = "the same command with --resume"  # the next step after a run ended by stop_after


def finish(done: str, *next_commands: str) -> None:
    """End a command: what it wrote and where, then the command(s) to run next; printed by the main process only
    (RANK is set by `accelerate launch` and torchrun)."""
    if os.environ.get("RANK", "0") != "0":
        return
    console.print(done, markup=False, highlight=False, soft_wrap=True)
    for command in next_commands:
        console.print(f"next: {command}", markup=False, highlight=False, soft_wrap=True)


# One option per concept across the config-driven commands, as (type, help); defaults: the stage's config.
SHARED: dict[str, tuple[type, str]] = {
    "steps": (int, "Optimizer steps."),
    "num_steps": (int, "Euler sampling steps."),
    "guidance_scale": (float, "Classifier-free guidance scale on the text."),
    "batch_size": (int, "Batch size (of all processes)."),
    "size": (int, "Working image side in pixels."),
    "seed": (int, "Seed of the run."),
    "device": (str, "auto (the GPU when there is one), cpu or cuda[:N]."),
    "resume": (bool, "Continue the run in --out from its checkpoint; refused when there is none."),
    "overwrite": (bool, "Replace an earlier run in --out (its model, results and checkpoint are removed)."),
}


def _option(name: str, tp: Any, text: str) -> Any:
    """The option --NAME of a setting: a flag for a bool (False: not given), else a value (None: not given)."""
    option = typer.Option(f"--{name.rstrip('_').replace('_', '-')}", help=text)
    return Annotated[bool, option] if tp is bool else Annotated[tp | None, option]


# --config, --set and --print-config of every config-driven command
FILE_OPTIONS: dict[str, tuple[Any, str]] = {
    "config": (Path, "YAML file of settings, nested or dotted keys (as `todsynth config show` prints)."),
    "set_": (list[str], "Any setting as key=value, dotted for nested ones (model.num_layers=6); repeatable."),
    "print_config": (bool, "Print the resolved settings as YAML (readable by --config) and exit."),
}


def stage_defaults(stage: str) -> Any:
    """The config of `stage` (a `config show` stage name) with its command's defaults and nothing given."""
    from todsynth.cli.config import StageName, stage_config
    from todsynth.config import load_config

    cls, defaults = stage_config(StageName(stage))
    return load_config(cls, None, None, defaults, check=False)


def _setting(cfg: Any, dotted: str) -> Any:
    """The value of the dotted setting `dotted` (model.control) of `cfg`."""
    return functools.reduce(getattr, dotted.split("."), cfg)


class SettingsCommand(TyperCommand):
    """A config-driven command (`with_settings`) whose --help shows each setting's default, read from the stage's
    config when help is asked for (the configs import torch, which a plain start does not)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        """Fill in the defaults, then typer's help; the defaults are set only here, as --help exits after it."""
        names: dict[str, str] = self.callback.settings_names  # type: ignore[union-attr]
        cfg = stage_defaults(self.callback.settings_stage)  # type: ignore[union-attr]
        for param in self.params:
            if param.name in names and not getattr(param, "is_flag", False):
                value = _setting(cfg, names[param.name])
                if value not in (None, ""):
                    param.default = value
        super().format_help(ctx, formatter)


def with_settings(
    stage: str,
    shared: tuple[str, ...] = (),
    arguments: dict[str, str] | None = None,
    options: dict[str, tuple[type, str]] | None = None,
    names: dict[str, str] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator of the config-driven command of `stage` (a `config show` stage name; register it with
    `cls=SettingsCommand`): `arguments` (name: help) positional, `options` (name: (type, help)) its own, `shared` those
    of SHARED, then --config, --set and --print-config; `names` maps a parameter to its dotted setting (control:
    model.control). The command gets `cfg`: its defaults, the --config file, the options, then --set; a positional
    argument that none of these gives is a usage error, as typer makes it for a required argument."""
    arguments, names = arguments or {}, names or {}
    added: dict[str, Any] = {
        n: Annotated[str | None, typer.Argument(metavar=n.upper(), help=text)] for n, text in arguments.items()
    }
    added.update({n: _option(n, *spec) for n, spec in {**(options or {}), **{n: SHARED[n] for n in shared}}.items()})
    settings = {n: names.get(n, n) for n in added}
    added.update({n: _option(n, *spec) for n, spec in FILE_OPTIONS.items()})

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(ctx: typer.Context, config: Path | None, set_: list[str] | None, print_config: bool, **kw: Any):
            from todsynth.cli.config import StageName, stage_config
            from todsynth.config import config_yaml, load_config, parse_overrides

            given = {dotted: kw.pop(n) for n, dotted in settings.items()}
            values = {k: None if v is False else v for k, v in given.items()}  # a flag left out: not given
            values.update(parse_overrides(set_))
            cls, defaults = stage_config(StageName(stage))
            cfg = load_config(cls, config, values, defaults, check=False)
            if print_config:
                typer.echo(config_yaml(cfg, stage_defaults(stage)))
                raise typer.Exit(0)
            missing = [n for n in arguments if _setting(cfg, settings[n]) in (None, "")]
            if missing:
                shown = ", ".join(f"'{n.upper()}'" for n in missing)
                keys = ", ".join(f"'{settings[n]}'" for n in missing)
                plural = "s" if len(missing) > 1 else ""
                ctx.fail(f"Missing argument{plural} {shown} (required unless --config gives {keys}).")
            return fn(load_config(cls, config, values, defaults), **kw)

        kw_only = inspect.Parameter.KEYWORD_ONLY
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "cfg"]
        extra = [
            inspect.Parameter(n, kw_only, annotation=tp, default=False if typing.get_args(tp)[0] is bool else None)
            for n, tp in added.items()
        ]
        params = [*own, *extra, inspect.Parameter("ctx", kw_only, annotation=typer.Context)]
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        command.settings_stage, command.settings_names = stage, settings  # type: ignore[attr-defined]
        return command

    return wrap
