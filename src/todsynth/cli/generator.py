"""`todsynth generator pretrain|train|sample`: thin layer over todsynth.generator."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from todsynth.cli.common import console, friendly

app = typer.Typer(help="Stage (a): pretrain a base on unlabeled images, train the mask-controlled MM-DiT, sample "
                  "from it.", no_args_is_help=True)


@app.command()
@friendly
def train(
    data: Optional[str] = typer.Argument(None, metavar="DATA", show_default=False,
                                         help="Dataset (LoveDA, folder or JSONL layout); required unless --config "
                                         "gives 'data'."),
    out: Optional[str] = typer.Option(None, show_default=False, help="Output folder (default runs/generator)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of GeneratorTrainConfig settings."),
    control: Optional[str] = typer.Option(None, help="triple | siamese | adapter | none"),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size."),
    size: Optional[int] = typer.Option(None, help="Training image size (pixels)."),
    sd3_path: Optional[str] = typer.Option(None, help="Initialise from a local diffusers SD3 transformer."),
    init: Optional[str] = typer.Option(None, help="Initialise text/image streams from a pretrained base "
                                       "(the --out folder of `generator pretrain`); the mask stream starts as a "
                                       "copy of its image stream."),
    mixed_precision: Optional[str] = typer.Option(None, help="no | bf16 | fp16"),
    resume: bool = typer.Option(False, "--resume", help="Continue from out/checkpoint; refused when there is none "
                                "(--set resume=auto continues only if one exists)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in --out (its model, "
                                   "results and checkpoint are removed)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Any setting as key=value (repeatable)."),
) -> None:
    """Train the generator with rectified-flow matching (multi-GPU: `accelerate launch -m todsynth.cli.main`)."""
    from todsynth.config import load_config, parse_overrides
    from todsynth.generator.train import GeneratorTrainConfig, train_generator

    overrides = dict(data=data, out=out, control=control, steps=steps, batch_size=batch_size, size=size,
                     sd3_path=sd3_path, init=init, mixed_precision=mixed_precision, resume=resume or None,
                     overwrite=overwrite or None)
    overrides.update(parse_overrides(set_))
    cfg = load_config(GeneratorTrainConfig, config, overrides)
    summary = train_generator(cfg)
    console.print(f"generator saved to {Path(cfg.out) / 'model'}; final loss {summary.final_loss:.4f}, "
                  f"{summary.wall_time_s:.1f} s")


@app.command()
@friendly
def pretrain(
    images: Optional[str] = typer.Argument(None, metavar="IMAGES", show_default=False,
                                           help="Unlabeled images: a folder of images, any dataset (masks ignored), "
                                           "or toy:N[:SEED] for N tiles of the embedded toy pool; required unless "
                                           "--config gives 'data'."),
    out: Optional[str] = typer.Option(None, show_default=False, help="Output folder; the base model is written to "
                                      "OUT/model (default runs/base)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of GeneratorTrainConfig settings."),
    captions: Optional[str] = typer.Option(None, help="JSON object {image id: caption}; other images get --prompt."),
    prompt: Optional[str] = typer.Option(None, help='Prompt of uncaptioned images (default "a satellite image").'),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps."),
    batch_size: Optional[int] = typer.Option(None, help="Global batch size."),
    size: Optional[int] = typer.Option(None, help="Training image size (pixels)."),
    mixed_precision: Optional[str] = typer.Option(None, help="no | bf16 | fp16"),
    resume: bool = typer.Option(False, "--resume", help="Continue from out/checkpoint; refused when there is none."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier run in --out (its model, results "
                                   "and checkpoint are removed)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Any setting as key=value (repeatable)."),
) -> None:
    """Pretrain a base (text + image streams, no masks) on unlabeled images; fine-tune with `train --init OUT`.

    Rectified flow as `generator train` (resumable; multi-GPU: `accelerate launch -m todsynth.cli.main`)."""
    from todsynth.config import load_config, parse_overrides
    from todsynth.generator.pretrain import pretrain_config, pretrain_generator
    from todsynth.generator.train import GeneratorTrainConfig

    # pretraining's defaults (text and image streams trained, out runs/base) yield to the YAML file and --set
    defaults = {k: v for k, v in vars(pretrain_config("", "runs/base")).items()
                if k in ("out", "control", "unlabeled", "train_text", "train_image", "train_mask")
                and k not in _yaml_keys(config)}
    overrides = dict(data=images, out=out, captions=captions, prompt=prompt, steps=steps, batch_size=batch_size,
                     size=size, mixed_precision=mixed_precision, resume=resume or None, overwrite=overwrite or None)
    overrides.update(parse_overrides(set_))
    cfg = load_config(GeneratorTrainConfig, config, {**defaults, **{k: v for k, v in overrides.items()
                                                                    if v is not None}})
    summary = pretrain_generator(cfg)
    console.print(f"base saved to {Path(cfg.out) / 'model'} (fine-tune: generator train DATA --init {cfg.out}); "
                  f"final loss {summary.final_loss:.4f}, {summary.wall_time_s:.1f} s")


@app.command()
@friendly
def sample(
    model: Path = typer.Argument(..., help="Generator folder (out/model of `generator train`)."),
    masks: str = typer.Argument(..., help="Dataset whose masks condition the images."),
    out: Path = typer.Argument(..., help="Output folder for grids."),
    split: str = typer.Option("Train", help="Split of a LoveDA layout."),
    n: int = typer.Option(8, help="How many masks."),
    steps: int = typer.Option(20, help="Euler steps."),
    guidance: float = typer.Option(1.0, help="Classifier-free guidance scale on the text."),
    shift: float = typer.Option(1.0, help="Sigma shift of the flow schedule (SD3 uses 3.0)."),
    seed: int = typer.Option(0, help="Global seed; each sample's seed derives from it and the mask id."),
    batch_size: int = typer.Option(8, help="Masks per forward pass (does not change the output)."),
    device: str = typer.Option("auto", help="auto (accelerate's choice: the GPU when there is one) | cpu | cuda:N."),
    mixed_precision: str = typer.Option("no", help="no | bf16 | fp16: autocast of transformer and decoder."),
) -> None:
    """Plain Euler flow sampling for masks of a dataset; writes mask | image grids."""
    from todsynth.generator.sample import sample_grid

    path = sample_grid(model, masks, out, split=split, n=n, steps=steps, guidance=guidance, shift=shift,
                       seed=seed, batch_size=batch_size, device=device, mixed_precision=mixed_precision)
    console.print(f"wrote {path}")


def _yaml_keys(config: Optional[Path]) -> set[str]:
    """Top-level keys of a YAML config file (empty when unreadable: load_config then reports why)."""
    if config is None:
        return set()
    import yaml

    try:
        loaded = yaml.safe_load(config.read_text())
    except (OSError, ValueError, yaml.YAMLError, RecursionError):
        return set()
    return set(loaded) if isinstance(loaded, dict) else set()
