"""Up-front dataset validation: read every file once, collect every problem, summarise the files and classes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from todsynth.data.classes import ClassSpec
from todsynth.data.rasters import RasterInfo
from todsynth.data.readers import BaseDataset, describe_image, open_dataset, size_mismatch, with_image_nodata
from todsynth.errors import DataError, DatasetProblems


@dataclass(frozen=True)
class ClassRow:
    """One class-table row: pixels of a class, their share of all mask pixels, images containing it."""

    name: str
    pixels: int
    share: float
    images: int


@dataclass
class RasterGroup:
    """Image or mask files of one sample type and band count: how many, value range per band, nodata pixels."""

    role: str
    dtype: str
    bands: int
    files: int = 0
    ranges: list[tuple[float, float] | None] = field(default_factory=list)
    nodata_pixels: int = 0
    pixels: int = 0

    @property
    def nodata_share(self) -> float:
        """Share of the group's pixels that are nodata."""
        return self.nodata_pixels / self.pixels if self.pixels else 0.0

    def add(self, info: RasterInfo) -> None:
        """Count one file of this group."""
        if not self.ranges:
            self.ranges = [None] * self.bands
        self.ranges = [
            b if a is None else a if b is None else (min(a[0], b[0]), max(a[1], b[1]))
            for a, b in zip(self.ranges, info.ranges, strict=False)
        ]  # a palette PNG: 1 band, 3 RGB ranges
        self.files += 1
        self.nodata_pixels += info.nodata_pixels
        self.pixels += info.height * info.width


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
    size_counts: Counter[tuple[int, int]] = field(default_factory=Counter)
    rasters: dict[tuple[str, str, int], RasterGroup] = field(default_factory=dict)
    min_size: int | None = None
    small: list[Path] = field(default_factory=list)

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
        return [
            ClassRow(name, self.pixel_counts[c], self.pixel_counts[c] / total, self.image_counts[c])
            for c, name in enumerate(self.classes.names)
        ]


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
    counts = counts[: classes.num_classes]  # values past the classes are not class pixels
    report.pixel_counts = [a + int(b) for a, b in zip(report.pixel_counts, counts, strict=True)]
    report.image_counts = [a + int(b > 0) for a, b in zip(report.image_counts, counts, strict=True)]
    report.ignore_pixels += int(ignore.sum())


def _describe(report: CheckReport, role: str, info: RasterInfo) -> None:
    """Add one file's sample type, bands, value ranges and nodata to the report's groups."""
    key = (role, info.dtype, info.bands)
    report.rasters.setdefault(key, RasterGroup(role, info.dtype, info.bands)).add(info)


def _check_item(ds: BaseDataset, i: int, report: CheckReport) -> None:
    """Read item `i`'s files once, recording problems, file descriptions, sizes and class statistics."""
    image_path, mask_path = ds.paths(i)
    read = _attempt(ds.load_label_info, i, report.problems)
    image = _attempt(ds.load_image_data, i, report.problems)
    if image is not None:
        _describe(report, "image", image[2])
    elif image_path is not None:
        info = describe_image(image_path)
        if info is not None:
            _describe(report, "image", info)
    if read is None:
        return
    label, mask_info = read
    _describe(report, "mask", mask_info)
    if image is not None and image_path is not None and image[0].shape[:2] != label.shape:
        report.problems.append(size_mismatch(image_path, mask_path, image[0].shape, label.shape))
        return
    if image is not None:
        label = with_image_nodata(label, image[1], ds.classes)
    size = (int(label.shape[0]), int(label.shape[1]))
    report.sizes.add(size)
    report.size_counts[size] += 1
    if report.min_size is not None and min(size) < report.min_size:
        report.small.append(image_path or mask_path)
    _count(label, ds.classes, report)


def check_dataset(
    source: str | Path | BaseDataset, split: str = "Train", *, size: int | None = None, **kw: Any
) -> CheckReport:
    """Open (if a path) and read every file of a dataset once; never raises for data problems.

    `size` is the working tile size: files smaller than size x size are listed in `report.small` (they would be
    upsampled), not counted as problems.
    """
    if size is not None and size < 1:
        raise DataError(f"working size must be >= 1, got {size}", fix="give a tile size >= 1, or leave it out")
    if isinstance(source, BaseDataset):
        ds = source
    else:
        try:
            ds = open_dataset(source, split=split, strict=False, **kw)
        except DataError as e:
            return CheckReport(root=Path(source), problems=list(getattr(e, "problems", [e])), min_size=size)
    c = ds.classes.num_classes
    report = CheckReport(
        root=ds.root,
        n_images=len(ds),
        label_only=ds.label_only,
        classes=ds.classes,
        pixel_counts=[0] * c,
        image_counts=[0] * c,
        problems=list(ds.problems),
        min_size=size,
    )
    for i in range(len(ds)):
        _check_item(ds, i, report)
    return report


def validate_dataset(source: str | Path | BaseDataset, split: str = "Train", **kw: Any) -> CheckReport:
    """`check_dataset`, raising DatasetProblems (every problem listed) unless the dataset is clean."""
    report = check_dataset(source, split=split, **kw)
    if report.problems:
        raise DatasetProblems(report.root, report.problems)
    return report


def open_checked(
    path: str | Path, split: str = "Train", split_file: str | Path | None = None, limit: int | None = None
) -> BaseDataset:
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
