"""`todsynth config show STAGE`: every setting of a stage with its type, default and help, as YAML for --config."""

from __future__ import annotations

from enum import Enum
from typing import Any

import typer

from todsynth.cli.common import Friendly, stage_defaults

app = typer.Typer(help="Show the settings of a stage.", no_args_is_help=True, cls=Friendly)


class StageName(str, Enum):
    """The stages whose settings `config show` prints."""

    generator_train = "generator-train"
    generator_pretrain = "generator-pretrain"
    segment_train = "segment-train"
    synthesize = "synthesize"
    experiment_cell = "experiment-cell"


def stage_config(stage: StageName) -> tuple[type, dict[str, Any]]:
    """The config class of `stage` and the defaults its command sets over the class's own."""
    if stage is StageName.segment_train:
        from todsynth.segment.train import SegmentTrainConfig

        return SegmentTrainConfig, {}
    if stage is StageName.synthesize:
        from todsynth.synthesize import SynthesizeConfig

        return SynthesizeConfig, {}
    if stage is StageName.experiment_cell:
        from todsynth.experiment import CellSettings

        return CellSettings, {}
    from todsynth.generator.pretrain import PRETRAIN_DEFAULTS
    from todsynth.generator.train import GeneratorTrainConfig

    return GeneratorTrainConfig, PRETRAIN_DEFAULTS if stage is StageName.generator_pretrain else {}


@app.command()
def show(stage: StageName = typer.Argument(..., help="The stage whose settings to print.")) -> None:
    """Print every setting of STAGE with its default, type and help (comments): a file for --config."""
    from todsynth.config import config_yaml

    cfg = stage_defaults(stage.value)
    typer.echo(f"# {(type(cfg).__doc__ or '').splitlines()[0]}\n" + config_yaml(cfg))
