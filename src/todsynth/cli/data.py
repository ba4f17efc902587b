"""`todsynth data`: make a toy dataset, check a dataset, write a few-shot split, cut scenes into tiles."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.table import Table

from todsynth.cli.common import Friendly, arg, console, finish

if TYPE_CHECKING:
    from todsynth.data.check import CheckReport

app = typer.Typer(help="Make, check, split and tile segmentation datasets.", no_args_is_help=True, cls=Friendly)


class Layout(str, Enum):
    """Dataset layouts the toy generator can write."""

    loveda = "loveda"
    folder = "folder"


@app.command()
def toy(
    out: Path = typer.Argument(..., help="Folder to write the dataset into."),
    n: int = typer.Option(16, "--n", help="Number of tiles."),
    size: int = typer.Option(64, "--size", help="Tile side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Dataset seed."),
    split: str = typer.Option("Train", "--split", help="Split folder name (LoveDA layout)."),
    label_only: bool = typer.Option(False, "--label-only", help="Write masks only."),
    layout: Layout = typer.Option(Layout.loveda, "--layout", help="LoveDA tree or images/ + masks/ folder."),
) -> None:
    """Write a procedural toy dataset (LoveDA classes) for tests and demos."""
    from todsynth.data.toy import write_toy_dataset
    from todsynth.errors import ConfigError

    parts = [out / split] if layout == Layout.loveda else [out / "images", out / "masks"]
    taken = next((p for p in parts if p.is_dir() and any(p.iterdir())), None)
    if taken is not None:  # new tiles would mix with (or overwrite) the tiles there
        raise ConfigError("the folder already holds tiles", path=taken, fix="write into a new folder or split")
    root = write_toy_dataset(out, n, size=size, seed=seed, split=split, label_only=label_only, layout=layout.value)
    finish(f"wrote {n} toy tile(s) to {root}", *_next_commands(root, label_only, f" --size {size}"))


def _next_commands(root: Path, label_only: bool, options: str = "") -> list[str]:
    """What to run on a dataset: synthesis when it has masks only, else training (with `options`)."""
    if label_only:
        return [f"todsynth synthesize GENERATOR {arg(root)} SYN --segmenter SEG"]
    return [f"todsynth {cmd} train {arg(root)}{options}" for cmd in ("segment", "generator")]


def _class_table(report: CheckReport) -> Table:
    """Rich table of per-class pixel share and image counts."""
    table = Table(title="classes")
    table.add_column("class")
    table.add_column("pixels", justify="right")
    table.add_column("images", justify="right")
    for row in report.class_table:
        table.add_row(escape(row.name), f"{100 * row.share:.1f}%", str(row.images))
    table.add_row("(ignore)", f"{100 * report.ignore_share:.1f}%", "")
    return table


def _range(r: tuple[float, float] | None) -> str:
    """One band's value range, or a dash when it has no valid pixel."""
    return "-" if r is None else f"{r[0]:g}..{r[1]:g}"


def _file_table(report: CheckReport) -> Table:
    """Rich table of the files read: sample type, band count, value range per band, nodata share."""
    table = Table(title="files")
    for column in ("files", "count", "dtype", "bands"):
        table.add_column(column, justify="right" if column in ("count", "bands") else "left")
    table.add_column("value range per band")
    table.add_column("nodata", justify="right")
    for group in sorted(report.rasters.values(), key=lambda g: (g.role, g.dtype, g.bands)):
        ranges = ", ".join(f"{b + 1}: {_range(r)}" for b, r in enumerate(group.ranges))
        table.add_row(
            f"{group.role}s",
            str(group.files),
            group.dtype,
            str(group.bands),
            ranges,
            f"{100 * group.nodata_share:.1f}%",
        )
    return table


def _print_sizes(report: CheckReport) -> None:
    """Print the size distribution and, with --size, the files smaller than the working size."""
    sizes = ", ".join(f"{h}x{w} ({n})" for (h, w), n in sorted(report.size_counts.items()))
    console.print(f"sizes: {sizes}", highlight=False)
    if report.small:
        shown = ", ".join(escape(str(p)) for p in report.small[:5])
        side = report.min_size
        console.print(
            f"[yellow]warning:[/] {len(report.small)} file(s) smaller than the working size {side}x{side} "
            f"(they are upsampled), e.g. {shown}",
            soft_wrap=True,
            highlight=False,
        )


def _print_report(report: CheckReport) -> None:
    """Print counts, files, sizes and the class table, then any problems with their files."""
    kind = "mask(s), label-only" if report.label_only else "image/mask pair(s)"
    found = f"{report.n_images} {kind}" if report.classes is not None else "could not be opened"
    console.print(f"{escape(str(report.root))}: {found}", soft_wrap=True, highlight=False)
    if report.rasters:
        console.print(_file_table(report))
    if report.size_counts:
        _print_sizes(report)
    if report.classes is not None and report.n_images:
        console.print(_class_table(report))
    if report.problems:
        console.print(f"[bold red]{len(report.problems)} problem(s):[/]")
        for problem in report.problems:
            console.print(f"  - {escape(str(problem))}", soft_wrap=True, highlight=False)
    else:
        console.print("[green]no problems found[/]")


@app.command()
def check(
    path: Path = typer.Argument(..., help="Dataset: LoveDA root, images/ + masks/ folder, or .jsonl index."),
    split: str = typer.Option("Train", "--split", help="Split folder (LoveDA layout)."),
    size: int | None = typer.Option(None, "--size", help="Working tile size: flag files smaller than this."),
) -> None:
    """Read every file once and report file types, value ranges, sizes, classes and problems (exit 2 if any)."""
    from todsynth.data.check import check_dataset

    report = check_dataset(path, split=split, size=size)
    _print_report(report)
    if report.problems:
        raise typer.Exit(2)
    ready = "masks only" if report.label_only else "ready to train on"
    side = min((min(s) for s in report.sizes), default=None)  # a working size every tile fits (512 at most)
    finish(f"{path}: {ready}", *_next_commands(path, report.label_only, f" --size {min(side, 512)}" if side else ""))


@app.command()
def split(
    path: Path = typer.Argument(..., help="Dataset to draw from."),
    out: Path = typer.Argument(..., help="Split file to write (.json)."),
    n: int | None = typer.Option(None, "--n", help="Number of samples to keep."),
    fraction: float | None = typer.Option(None, "--fraction", help="Share of samples to keep, in (0, 1]."),
    seed: int = typer.Option(0, "--seed", help="Selection seed."),
    data_split: str = typer.Option("Train", "--split", help="Split folder (LoveDA layout)."),
) -> None:
    """Write a seeded few-shot subset that keeps every class present where possible."""
    from todsynth.data.readers import open_dataset
    from todsynth.data.split import class_presence, few_shot_split, write_split

    ds = open_dataset(path, split=data_split)
    presence = class_presence(ds)
    ids = few_shot_split(ds, n=n, fraction=fraction, seed=seed, presence=presence)
    write_split(out, ids, {"seed": seed, "source": str(path)})
    chosen = set(ids)
    covered = set().union(*(p for id_, p in zip(ds.ids, presence, strict=True) if id_ in chosen))
    finish(
        f"wrote {len(ids)} of {len(ds)} ids to {out}; classes present: {len(covered)}/{ds.classes.num_classes}",
        f"todsynth segment train {arg(path)} --split-file {arg(out)}",
    )


@app.command()
def tile(
    src: Path = typer.Argument(
        ..., help="Dataset of scenes: LoveDA root, images/ + masks/ folder (PNG or GeoTIFF), or .jsonl index."
    ),
    out: Path = typer.Argument(..., help="New folder for the tiles (images/, masks/, classes.yaml, tiles.json)."),
    size: int = typer.Option(..., "--size", help="Tile side in pixels."),
    stride: int | None = typer.Option(
        None,
        "--stride",
        help="Pixels between tile starts (default: --size, no overlap); the last row and column meet the edge.",
    ),
    min_valid: float = typer.Option(
        0.5, "--min-valid", help="Skip tiles with a smaller share of valid (not ignore, not nodata) pixels."
    ),
    split: str = typer.Option("Train", "--split", help="Split folder (LoveDA layout)."),
) -> None:
    """Cut scenes and masks into tiles; GeoTIFF tiles keep their georeference."""
    from todsynth.data.tile import tile_dataset

    s = tile_dataset(src, out, size, stride=stride, min_valid=min_valid, split=split)
    finish(
        f"wrote {s.written} tile(s) of {s.size}x{s.size} (stride {s.stride}) from {s.scenes} scene(s) "
        f"to {s.out}; skipped {s.skipped} with less than {s.min_valid:.0%} valid pixels",
        f"todsynth data check {arg(s.out)}",
        f"todsynth segment train {arg(s.out)}",
    )
