"""`todsynth segment`: train a segmenter, evaluate a saved one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from todsynth.cli.common import RESUME, Friendly, SettingsCommand, arg, console, finish, with_settings

app = typer.Typer(help="Train and evaluate segmentation models (stage c).", no_args_is_help=True, cls=Friendly)


@app.command(cls=SettingsCommand)
@with_settings(
    "segment-train",
    ("size", "steps", "batch_size", "seed", "resume", "overwrite"),
    arguments={
        "data": "Training dataset (LoveDA root, image/mask folder or .jsonl); required unless --config gives 'data'."
    },
    options={
        "out": (str, "Output folder."),
        "split_file": (str, 'JSON split file ({"ids": [...]}) restricting the data.'),
        "synthetic": (str, "Synthetic dataset mixed into training."),
        "val": (str, "Validation dataset, scored after training."),
        "arch": (str, "unet, deeplabv3plus, segformer or fpn."),
        "encoder": (str, "smp encoder name (default resnet18 / mit_b0)."),
        "lr": (float, "AdamW learning rate."),
        "device": (str, "auto (the GPU when there is one), cpu or cuda (a numbered GPU: CUDA_VISIBLE_DEVICES)."),
    },
)
def train(cfg: Any) -> None:
    """Train a segmenter; writes OUT/model/, OUT/results.json and OUT/checkpoint/.

    Every other setting (epochs, schedule, class_weights, mixed_precision, ...) by --set or --config: `todsynth
    config show segment-train`."""
    from todsynth.segment.train import train_segmenter

    results = train_segmenter(cfg)
    if results.steps < results.total_steps:
        finish(f"stopped at step {results.steps} of {results.total_steps}; run folder {cfg.out}", RESUME)
        return
    if results.val is not None:
        console.print(_metrics_table(results.val, "validation"))
    model = arg(results.model)
    finish(
        f"model saved to {results.model} ({results.steps} steps, {results.wall_time_s:.1f} s)",
        f"todsynth segment eval {model} {arg(cfg.val or cfg.data)}",
        *([] if cfg.synthetic else [f"todsynth synthesize GENERATOR MASKS SYN --segmenter {model}"]),
    )


@app.command("eval")
def evaluate(
    model_dir: Path = typer.Argument(..., help="Folder written by training (OUT/model)."),
    data: Path = typer.Argument(..., help="Dataset to score."),
    split: str | None = typer.Option(
        None,
        help="Split of a LoveDA root: Val, or the root's only split when it has no Val (as `data toy` writes); "
        "other layouts have no splits.",
    ),
    size: int | None = typer.Option(
        None, help="Predict at this tile size (default: the size the model was trained at; scores stay at native size)."
    ),
    native: bool = typer.Option(False, "--native", help="Predict at each tile's own size instead."),
    batch_size: int = typer.Option(8, help="Batch size."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the metrics to this JSON file."),
) -> None:
    """Score a saved segmenter on a dataset: per-class IoU, mIoU, OA, mAcc."""
    import torch

    from todsynth.data.readers import ignores_split
    from todsynth.io import write_json
    from todsynth.segment.model import Segmenter
    from todsynth.segment.train import check_device_choice, check_eval_split, evaluate_segmenter

    check_device_choice(device)
    if json_out is not None:
        _check_writable_file(json_out)
    if split is not None:
        check_eval_split(data, split)
    split = split or _eval_split(data)
    model = Segmenter.from_pretrained(model_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics = evaluate_segmenter(
        model, data, batch_size=batch_size, size=size, split=split, device=device, native=native
    )
    result = metrics.to_dict(model.config.class_names)
    console.print(_metrics_table(result, str(data) if ignores_split(data) else f"{data} ({split})"))
    if json_out is not None:
        write_json(json_out, {"model": str(model_dir), "data": str(data), "split": split, "metrics": result})
    finish(
        f"metrics written to {json_out}" if json_out is not None else "metrics printed (--json FILE keeps them)",
        f"todsynth synthesize GENERATOR MASKS SYN --segmenter {arg(model_dir)}  (CRFM guided by this segmenter)",
    )


def _check_writable_file(path: Path) -> None:
    """Refuse, before any work, a --json path that is a folder or lies where no file can be created (tried)."""
    import tempfile

    from todsynth.errors import ConfigError

    folder = next(p for p in path.parents if p.exists())
    try:
        if path.is_dir():
            raise OSError
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        raise ConfigError(
            "cannot write the metrics file here", path=path, fix="give --json a file in a writable folder"
        ) from None


def _eval_split(data: Path) -> str:
    """The split `segment eval` scores by default: Val, or the only split of a LoveDA root without one, said in
    the output as it may be the training data."""
    from todsynth.data.readers import LOVEDA_SPLITS, ignores_split

    present = [] if ignores_split(data) else [s for s in LOVEDA_SPLITS if (data / s).is_dir()]
    if len(present) != 1 or present[0] == "Val":
        return "Val"
    console.print(
        f"{data} has no Val split: scoring its only split, {present[0]} (--split to choose)",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return present[0]


def _metrics_table(result: dict, title: str) -> Table:
    """A rich table of per-class IoU/accuracy followed by the summary metrics."""
    table = Table(title=f"Segmentation metrics: {escape(title)}")
    table.add_column("class")
    table.add_column("IoU", justify="right")
    table.add_column("Acc", justify="right")
    for name, iou in result["IoU"].items():
        table.add_row(escape(name), _pct(iou), _pct(result["Acc"][name]))
    table.add_section()
    table.add_row("[bold]mIoU[/]", _pct(result["mIoU"]), "")
    table.add_row("[bold]OA[/]", _pct(result["OA"]), "")
    table.add_row("[bold]mAcc[/]", _pct(result["mAcc"]), "")
    return table


def _pct(value: float | None) -> str:
    """A metric as a percentage, '-' when undefined."""
    return "-" if value is None else f"{100 * value:.2f}"
