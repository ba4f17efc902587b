"""`todsynth synthesize`: thin layer over todsynth.synthesize."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from todsynth.cli.common import console, friendly


@friendly
def synthesize(
    generator: Optional[str] = typer.Argument(None, help="Generator folder (out/model of `generator train`)."),
    masks: Optional[str] = typer.Argument(None, help="Masks to synthesize for: a dataset or a label-only folder."),
    out: Optional[str] = typer.Argument(None, help="Output folder (generic layout + manifest.jsonl)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML of SynthesizeConfig settings."),
    segmenter: Optional[str] = typer.Option(None, help="Guidance segmenter folder (needed for CRFM)."),
    copies: Optional[int] = typer.Option(None, help="Images per mask (and transform)."),
    crfm_steps: Optional[int] = typer.Option(None, help="CRFM rectified steps k (0 = plain sampling)."),
    num_steps: Optional[int] = typer.Option(None, help="Euler steps."),
    batch_size: Optional[int] = typer.Option(None, help="Samples per forward pass (output does not depend on it)."),
    seed: Optional[int] = typer.Option(None, help="Global seed."),
    device: Optional[str] = typer.Option(None, help="auto (accelerate's choice: the GPU when there is one) | cpu "
                                         "| cuda:N."),
    mixed_precision: Optional[str] = typer.Option(None, help="no | bf16 | fp16: autocast of transformer, "
                                                  "decoder and CRFM's segmenter pass."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Any setting as key=value; crfm_* for CRFM."),
) -> None:
    """Make synthetic image/label pairs with CRFM; resumable, and sharded under `accelerate launch`."""
    import yaml

    from todsynth.config import parse_overrides
    from todsynth.errors import ConfigError
    from todsynth.synthesize import build_synthesize_config, synthesize as run

    values: dict = {}
    if config is not None:
        try:
            loaded = yaml.safe_load(config.read_text())
        except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config: {e}", path=config, fix="give a readable YAML file") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError("expected a mapping of setting: value", path=config)
        values.update(loaded or {})
    cli = dict(generator=generator, masks=masks, out=out, segmenter=segmenter, copies=copies,
               crfm_steps=crfm_steps, num_steps=num_steps, batch_size=batch_size, seed=seed, device=device,
               mixed_precision=mixed_precision)
    values.update({k: v for k, v in cli.items() if v is not None})
    values.update(parse_overrides(set_))
    cfg = build_synthesize_config(values)
    from accelerate.state import PartialState

    state = PartialState()  # one process too: its device is accelerate's choice
    summary = run(cfg, accelerator=state)
    if state.is_main_process:
        done = f", {summary.already_done} already done" if summary.already_done else ""
        console.print(f"synthesized {summary.made} pairs ({summary.rejected} rejected{done}) into {cfg.out} "
                      f"in {summary.wall_time_s:.1f} s")
