"""Few-shot splits: a seeded subset of sample ids that keeps every class present, stored as JSON."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from todsynth.data.prompts import present_classes
from todsynth.data.readers import BaseDataset
from todsynth.errors import ConfigError, DataError, TodsynthError
from todsynth.io import read_json, write_json


def split_size(total: int, n: int | None = None, fraction: float | None = None) -> int:
    """Number of samples to keep: `n`, or `fraction` of `total` rounded half up (at least 1)."""
    if (n is None) == (fraction is None):
        raise ConfigError("give exactly one of n or fraction")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= total:
            raise ConfigError(f"n must be an integer in 1..{total} (the dataset size), got {n!r}")
        return int(n)
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction!r}")
    return max(1, math.floor(fraction * total + 0.5))


def _cover_classes(presence: Sequence[frozenset[int]], order: Sequence[int], k: int) -> list[int]:
    """Greedy cover, rarest class first: per uncovered class, the sample adding the most uncovered classes."""
    frequency: dict[int, int] = {}
    for classes in presence:
        for c in classes:
            frequency[c] = frequency.get(c, 0) + 1
    covered: set[int] = set()
    chosen: list[int] = []
    for c in sorted(frequency, key=lambda c: (frequency[c], c)):
        if len(chosen) == k:
            break
        if c in covered:
            continue
        best = max((i for i in order if c in presence[i]), key=lambda i: len(presence[i] - covered))
        chosen.append(best)
        covered |= presence[best]
    return chosen


def class_presence(ds: BaseDataset) -> list[frozenset[int]]:
    """The set of classes present in each sample's label map (reads every mask once)."""
    return [frozenset(present_classes(ds.load_label(i), ds.classes)) for i in range(len(ds))]


def few_shot_split(
    ds: BaseDataset,
    n: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
    presence: Sequence[frozenset[int]] | None = None,
) -> list[str]:
    """Deterministic subset of ids (in dataset order): cover every class where possible, then fill at random.

    `presence` (from `class_presence`) saves re-reading the masks when the caller already has it.
    """
    k = split_size(len(ds), n, fraction)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    presence = class_presence(ds) if presence is None else presence
    if len(presence) != len(ds):
        raise ValueError(f"presence lists {len(presence)} samples but the dataset has {len(ds)}")
    order = [int(i) for i in np.random.default_rng(int(seed)).permutation(len(ds))]
    chosen = _cover_classes(presence, order, k)
    taken = set(chosen)
    chosen += [i for i in order if i not in taken][: k - len(chosen)]
    return [ds.ids[i] for i in sorted(chosen)]


def write_split(path: str | Path, ids: Sequence[str], meta: dict[str, Any] | None = None) -> None:
    """Write a split file: {"ids": [...], "n": len(ids), **meta} (e.g. seed, source)."""
    write_json(path, {"ids": list(ids), "n": len(ids), **(meta or {})})


def read_split(path: str | Path, ds: BaseDataset | None = None) -> list[str]:
    """Read a split file's ids; with `ds`, ids that are not in it are a DataError."""
    path = Path(path)
    try:
        data = read_json(path)
    except TodsynthError as e:
        raise DataError(e.problem, path=path, fix=e.fix) from None
    ids = data.get("ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataError('a split file must hold {"ids": [...]} with string ids', path=path)
    if len(set(ids)) != len(ids):
        raise DataError("the split file repeats ids", path=path, fix="regenerate it with 'todsynth data split'")
    if ds is not None:
        known = set(ds.ids)
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise DataError(
                f"{len(unknown)} id(s) are not in the dataset {ds.root}, e.g. {unknown[:5]}",
                path=path,
                fix="use the split made for this dataset, or regenerate it",
            )
    return ids
