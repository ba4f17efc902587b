"""`todsynth segment`: train a segmenter, evaluate a saved one."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from todsynth.cli.common import console, friendly

app = typer.Typer(help="Train and evaluate segmentation models (stage c).", no_args_is_help=True)


@app.command()
@friendly
def train(
    data: Optional[Path] = typer.Option(None, help="Training dataset (LoveDA root, image/mask folder or .jsonl)."),
    split: Optional[str] = typer.Option(None, help="Split of a LoveDA dataset (default Train)."),
    split_file: Optional[Path] = typer.Option(None, help="JSON split file ({\"ids\": [...]}) restricting the data."),
    synthetic: Optional[Path] = typer.Option(None, help="Synthetic dataset mixed into training."),
    synthetic_ratio: Optional[float] = typer.Option(None, help="Synthetic samples per real one (default all)."),
    val: Optional[Path] = typer.Option(None, help="Validation dataset, scored after training."),
    val_split: Optional[str] = typer.Option(None, help="Split of the validation dataset (default Val)."),
    arch: Optional[str] = typer.Option(None, help="unet, deeplabv3plus, segformer or fpn (default unet)."),
    encoder: Optional[str] = typer.Option(None, help="smp encoder name (default resnet18 / mit_b0)."),
    size: Optional[int] = typer.Option(None, help="Training tile size in pixels (default 512)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 10)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (overrides --epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Batch size (default 8)."),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate (default 5e-4)."),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay (default 0.01)."),
    schedule: Optional[str] = typer.Option(None, help="poly or cosine (default poly)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (default 0)."),
    num_workers: Optional[int] = typer.Option(None, help="Data loader workers (default 0)."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default runs/segment)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda (default auto)."),
    log_every: Optional[int] = typer.Option(None, help="Record the loss every N steps (default 10)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Save a resumable checkpoint every N steps "
                                                               "(default 200)."),
    mixed_precision: Optional[str] = typer.Option(None, help="no, fp16 or bf16 (default no)."),
    class_weights: Optional[str] = typer.Option(None, help="Loss weights per class from the training mix's "
                                                           "pixel counts: none, sqrt_inverse or inverse "
                                                           "(default none)."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file of settings."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a setting: key=value (repeatable)."),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint."),
    overwrite: bool = typer.Option(False, help="Replace an earlier run in --out (its model, results and "
                                               "checkpoint are removed)."),
) -> None:
    """Train a segmenter; writes OUT/model/, OUT/results.json and OUT/checkpoint/ (other settings: --set)."""
    from todsynth.config import load_config, parse_overrides
    from todsynth.segment.train import SegmentTrainConfig, train_segmenter

    options = {"data": data, "split": split, "split_file": split_file, "synthetic": synthetic,
               "synthetic_ratio": synthetic_ratio, "val": val, "val_split": val_split, "arch": arch,
               "encoder": encoder, "size": size, "epochs": epochs, "steps": steps, "batch_size": batch_size,
               "lr": lr, "weight_decay": weight_decay, "schedule": schedule, "seed": seed,
               "num_workers": num_workers, "out": out, "device": device, "log_every": log_every,
               "checkpoint_every": checkpoint_every, "mixed_precision": mixed_precision,
               "class_weights": class_weights, "overwrite": overwrite or None}
    overrides = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    overrides.update(parse_overrides(set_))
    cfg = load_config(SegmentTrainConfig, config, overrides)
    results = train_segmenter(cfg, resume=resume)
    if results.val is not None:
        console.print(_metrics_table(results.val, "validation"))
    console.print(f"model saved to [bold]{escape(results.model)}[/] ({results.steps} steps, "
                  f"{results.wall_time_s:.1f} s)", highlight=False)


@app.command("eval")
@friendly
def evaluate(
    model_dir: Path = typer.Argument(..., help="Folder written by training (OUT/model)."),
    data: Path = typer.Argument(..., help="Dataset to score."),
    split: str = typer.Option("Val", help="Split of a LoveDA root (other layouts have no splits)."),
    size: Optional[int] = typer.Option(None, help="Predict at this tile size (default: the size the model was "
                                                  "trained at; scores stay at native size)."),
    native: bool = typer.Option(False, "--native", help="Predict at each tile's own size instead."),
    batch_size: int = typer.Option(8, help="Batch size."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics to this JSON file."),
) -> None:
    """Score a saved segmenter on a dataset: per-class IoU, mIoU, OA, mAcc."""
    import torch

    from todsynth.data.readers import ignores_split
    from todsynth.io import write_json
    from todsynth.segment.model import Segmenter
    from todsynth.segment.train import check_device_choice, check_eval_split, evaluate_segmenter

    check_device_choice(device)
    check_eval_split(data, split)
    model = Segmenter.from_pretrained(model_dir)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    metrics = evaluate_segmenter(model, data, batch_size=batch_size, size=size, split=split, device=device,
                                 native=native)
    result = metrics.to_dict(model.config.class_names)
    console.print(_metrics_table(result, str(data) if ignores_split(data) else f"{data} ({split})"))
    if json_out is not None:
        write_json(json_out, {"model": str(model_dir), "data": str(data), "split": split, "metrics": result})
        console.print(f"metrics written to {escape(str(json_out))}", highlight=False)


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
