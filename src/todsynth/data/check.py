"""Up-front dataset validation: read every file once, collect every problem, summarise the classes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from todsynth.data.classes import ClassSpec
from todsynth.data.readers import BaseDataset, open_dataset, size_mismatch
from todsynth.errors import DataError, DatasetProblems


@dataclass(frozen=True)
class ClassRow:
    """One class-table row: pixels of a class, their share of all mask pixels, images containing it."""

    name: str
    pixels: int
    share: float
    images: int


@dataclass
class CheckReport:
    """What `check_dataset` found: sample count, tile sizes, class statistics and problems."""

    root: Path
    n_images: int = 0
    label_only: bool = False
    sizes: set[tuple[int, int]] = field(default_factory=set)
    classes: ClassSpec | None = None
    pixel_counts: list[int] = field(default_factory=list)
    image_counts: list[int] = field(default_factory=list)
    ignore_pixels: int = 0
    problems: list[DataError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def total_pixels(self) -> int:
        """Mask pixels counted, ignore included."""
        return sum(self.pixel_counts) + self.ignore_pixels

    @property
    def ignore_share(self) -> float:
        """Share of mask pixels that are ignore / no-data."""
        return self.ignore_pixels / self.total_pixels if self.total_pixels else 0.0

    @property
    def class_table(self) -> list[ClassRow]:
        """Per-class pixel share (of all mask pixels) and number of images containing the class."""
        if self.classes is None:
            return []
        total = self.total_pixels or 1
        return [ClassRow(name, self.pixel_counts[c], self.pixel_counts[c] / total, self.image_counts[c])
                for c, name in enumerate(self.classes.names)]


def _attempt(load: Callable[[int], Any], i: int, problems: list[DataError]) -> Any:
    """Call `load(i)`; a DataError is recorded and None returned."""
    try:
        return load(i)
    except DataError as e:
        problems.append(e)
        return None


def _count(label: np.ndarray, classes: ClassSpec, report: CheckReport) -> None:
    """Add one label map to the class statistics."""
    ignore = label == classes.ignore_index
    counts = np.bincount(label[~ignore].ravel(), minlength=classes.num_classes)
    report.pixel_counts = [a + int(b) for a, b in zip(report.pixel_counts, counts)]
    report.image_counts = [a + int(b > 0) for a, b in zip(report.image_counts, counts)]
    report.ignore_pixels += int(ignore.sum())


def _check_item(ds: BaseDataset, i: int, report: CheckReport) -> None:
    """Read item `i`'s files once, recording problems and statistics."""
    label = _attempt(ds.load_label, i, report.problems)
    image = _attempt(ds.load_image, i, report.problems)
    if label is None:
        return
    if image is not None and image.shape[:2] != label.shape:
        image_path, mask_path = ds.paths(i)
        report.problems.append(size_mismatch(image_path, mask_path, image.shape, label.shape))
        return
    report.sizes.add((int(label.shape[0]), int(label.shape[1])))
    _count(label, ds.classes, report)


def check_dataset(source: str | Path | BaseDataset, split: str = "Train", **kw: Any) -> CheckReport:
    """Open (if a path) and read every file of a dataset once; never raises for data problems."""
    if isinstance(source, BaseDataset):
        ds = source
    else:
        try:
            ds = open_dataset(source, split=split, strict=False, **kw)
        except DataError as e:
            return CheckReport(root=Path(source), problems=list(getattr(e, "problems", [e])))
    c = ds.classes.num_classes
    report = CheckReport(root=ds.root, n_images=len(ds), label_only=ds.label_only, classes=ds.classes,
                         pixel_counts=[0] * c, image_counts=[0] * c, problems=list(ds.problems))
    for i in range(len(ds)):
        _check_item(ds, i, report)
    return report


def validate_dataset(source: str | Path | BaseDataset, split: str = "Train", **kw: Any) -> CheckReport:
    """`check_dataset`, raising DatasetProblems (every problem listed) unless the dataset is clean."""
    report = check_dataset(source, split=split, **kw)
    if report.problems:
        raise DatasetProblems(report.root, report.problems)
    return report


def open_checked(path: str | Path, split: str = "Train", split_file: str | Path | None = None,
                 limit: int | None = None) -> BaseDataset:
    """Open a dataset for training or scoring: restrict it to a split file's ids and/or its first `limit`
    samples, then validate every file of what is left (DatasetProblems lists them all)."""
    from todsynth.data.readers import SubsetDataset
    from todsynth.data.split import read_split

    ds = open_dataset(path, split=split)
    if split_file is not None:
        ds = SubsetDataset(ds, read_split(split_file, ds))
    if limit is not None and limit < len(ds):
        ds = SubsetDataset(ds, list(ds.ids)[:limit])
    validate_dataset(ds)
    return ds
