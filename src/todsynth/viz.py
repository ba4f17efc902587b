"""Figures: colourised masks, image grids, loss curves, per-class bar charts (matplotlib, written atomically)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from todsynth.data.classes import ClassSpec


def colorize(label: np.ndarray, classes: ClassSpec) -> np.ndarray:
    """Label map [H, W] -> RGB uint8 with the class palette (ignore = black)."""
    palette = np.array(classes.palette or _default_palette(classes.num_classes), dtype=np.uint8)
    out = np.zeros((*label.shape, 3), dtype=np.uint8)
    valid = (label >= 0) & (label < classes.num_classes)
    out[valid] = palette[label[valid]]
    return out


def _default_palette(n: int) -> list[tuple[int, int, int]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(n)]


def to_uint8(image) -> np.ndarray:
    """Tensor [3, H, W] in [0, 1] or array [H, W, 3] -> uint8 [H, W, 3]."""
    arr = image.detach().cpu().float().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)
    return arr


def save_png(path: str | Path, array: np.ndarray) -> None:
    """Write an RGB/grey uint8 array as PNG, atomically."""
    from PIL import Image

    from todsynth.io import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def tile_rows(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, scale: int = 1) -> np.ndarray:
    """Arrange equal-size RGB tiles in a grid (rows of columns) with white padding."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = tile
    if scale > 1:
        grid = grid.repeat(scale, 0).repeat(scale, 1)
    return grid


def save_mask_image_grid(
    path: str | Path, labels, images, classes: ClassSpec, scale: int = 2, normalisation=None
) -> None:
    """One row per sample: colourised mask | generated image (its `rgb:` bands when a normalisation is given)."""
    from todsynth.data.bands import preview_rgb

    show = to_uint8 if normalisation is None else (lambda img: preview_rgb(img, normalisation))
    rows = [
        [colorize(np.asarray(lab.cpu() if hasattr(lab, "cpu") else lab), classes), show(img)]
        for lab, img in zip(labels, images, strict=True)
    ]
    save_png(path, tile_rows(rows, scale=scale))


def _save_figure(fig, path: str | Path) -> None:
    from todsynth.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")


def plot_curves(
    path: str | Path,
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str = "step",
    ylabel: str = "",
    log_y: bool = False,
) -> None:
    """Line plot of named (x, y) curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, (x, y) in curves.items():
        ax.plot(x, y, label=name, lw=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    _save_figure(fig, path)
    plt.close(fig)


def plot_class_bars(
    path: str | Path, class_names: Sequence[str], series: dict[str, Sequence[float]], ylabel: str = "IoU"
) -> None:
    """Grouped bar chart: one group per class, one bar per series (e.g. real only vs + synthetic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, len(class_names) * 0.9), 3.2))
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(class_names))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, np.nan_to_num(np.asarray(values, dtype=float)), width, label=name)
    ax.set_xticks(x, class_names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    _save_figure(fig, path)
    plt.close(fig)
