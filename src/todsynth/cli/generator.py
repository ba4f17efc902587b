"""`todsynth generator pretrain|train|sample`: thin layer over todsynth.generator."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from todsynth.cli.common import RESUME, Friendly, SettingsCommand, arg, finish, with_settings

if TYPE_CHECKING:
    from todsynth.generator.train import GeneratorResult, GeneratorTrainConfig

app = typer.Typer(
    help="Stage (a): pretrain a base on unlabeled images, train the mask-controlled MM-DiT, sample from it.",
    no_args_is_help=True,
    cls=Friendly,
)

# The shared options of both trainers.
TRAINING = ("steps", "batch_size", "size", "resume", "overwrite")


@app.command(cls=SettingsCommand)
@with_settings(
    "generator-train",
    TRAINING,
    names={"control": "model.control"},
    arguments={"data": "Dataset (LoveDA, folder or JSONL layout); required unless --config gives 'data'."},
    options={
        "out": (str, "Output folder."),
        "control": (str, "model.control: triple | siamese | adapter | none."),
        "init": (
            str,
            "Initialise text/image streams from a pretrained base (the --out folder of "
            "`generator pretrain`); the mask stream starts as a copy of its image stream.",
        ),
    },
)
def train(cfg: Any) -> None:
    """Train the generator with rectified-flow matching (multi-GPU: `accelerate launch -m todsynth.cli.main`).

    Every other setting (model size: --set model=sd3.5-medium, memory presets, ...): `todsynth config show
    generator-train`; --set resume=auto continues only if a checkpoint exists."""
    from todsynth.generator.train import train_generator

    summary = train_generator(cfg)
    model = Path(cfg.out) / "model"
    _finished(
        "generator",
        summary,
        cfg,
        f"todsynth generator sample {arg(model)} {arg(cfg.data)} SAMPLES",
        f"todsynth synthesize {arg(model)} MASKS SYN --segmenter SEG",
    )


def _finished(what: str, summary: GeneratorResult, cfg: GeneratorTrainConfig, *next_commands: str) -> None:
    """End a training command: the model and run folder and the next commands, or, after stop_after, the step
    it stopped at and how to continue."""
    loss = "" if summary.final_loss is None else f"; final loss {summary.final_loss:.4f}"
    if summary.steps < cfg.steps:
        done = f"stopped at step {summary.steps} of {cfg.steps}{loss}; run folder {cfg.out}"
        next_commands = (RESUME,)
    else:
        done = f"{what} saved to {summary.model}{loss}, {summary.wall_time_s:.1f} s; run folder {cfg.out} "
        done += "(config.json, metrics.jsonl, checkpoint/)"
    finish(done, *next_commands)


@app.command(cls=SettingsCommand)
@with_settings(
    "generator-pretrain",
    TRAINING,
    names={"images": "data"},
    arguments={
        "images": "Unlabeled images: a folder of images, any dataset (masks ignored), or toy:N[:SEED] for N tiles "
        "of the embedded toy pool; required unless --config gives 'data'."
    },
    options={
        "out": (str, "Output folder; the base model is written to OUT/model."),
        "captions": (str, "JSON object {image id: caption}; other images get --prompt."),
        "prompt": (str, 'Prompt of uncaptioned images (default "a satellite image").'),
    },
)
def pretrain(cfg: Any) -> None:
    """Pretrain a base (text + image streams, no masks) on unlabeled images; fine-tune with `train --init OUT`.

    Rectified flow as `generator train` (resumable; multi-GPU: `accelerate launch -m todsynth.cli.main`); every
    setting: `todsynth config show generator-pretrain`."""
    from todsynth.generator.pretrain import pretrain_generator

    summary = pretrain_generator(cfg)
    base = f"todsynth generator train DATA --init {arg(cfg.out)} --size {cfg.size}"
    _finished("base", summary, cfg, f"{base}  (model.* and text settings as the base's)")


@app.command()
def sample(
    model: Path = typer.Argument(..., help="Generator folder (out/model of `generator train`)."),
    masks: str = typer.Argument(..., help="Dataset whose masks condition the images."),
    out: Path = typer.Argument(..., help="Output folder for grids."),
    split: str = typer.Option("Train", help="Split of a LoveDA layout."),
    n: int = typer.Option(8, help="How many masks."),
    num_steps: int = typer.Option(20, help="Euler sampling steps."),
    guidance_scale: float = typer.Option(1.0, help="Classifier-free guidance scale on the text."),
    shift: float = typer.Option(1.0, help="Sigma shift of the flow schedule (SD3 uses 3.0)."),
    seed: int = typer.Option(0, help="Global seed; each sample's seed derives from it and the mask id."),
    batch_size: int = typer.Option(8, help="Masks per forward pass (does not change the output)."),
    device: str = typer.Option("auto", help="auto (accelerate's choice: the GPU when there is one) | cpu | cuda:N."),
    mixed_precision: str = typer.Option("no", help="no | bf16 | fp16: autocast of transformer and decoder."),
) -> None:
    """Plain Euler flow sampling for masks of a dataset; writes mask | image grids."""
    from todsynth.generator.sample import sample_grid

    path = sample_grid(
        model,
        masks,
        out,
        split=split,
        n=n,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        shift=shift,
        seed=seed,
        batch_size=batch_size,
        device=device,
        mixed_precision=mixed_precision,
    )
    finish(f"wrote {path}", f"todsynth synthesize {arg(model)} {arg(masks)} SYN --segmenter SEG")
