"""Few-shot splits: deterministic, class-covering, stored as JSON and read back with id checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from todsynth.data.readers import FolderDataset, SubsetDataset
from todsynth.data.split import class_presence, few_shot_split, read_split, split_size, write_split
from todsynth.errors import ConfigError, DataError


@pytest.fixture
def masks_only(tmp_path: Path, save_image) -> FolderDataset:
    """12 label-only masks: class 3 in s07 only, class 2 in s02 and s09, classes 0/1 everywhere."""
    root = tmp_path / "masks_only"
    for i in range(12):
        label = np.zeros((8, 8), np.uint8)
        label[:4] = 1
        label[0, 0] = {7: 3, 2: 2, 9: 2}.get(i, 0)
        save_image(root / "masks" / f"s{i:02d}.png", label)
    (root / "classes.yaml").write_text("names: [a, b, c, rare, absent]\n")
    return FolderDataset(root)


def test_split_is_deterministic_and_in_dataset_order(masks_only: FolderDataset) -> None:
    first = few_shot_split(masks_only, n=4, seed=3)
    assert first == few_shot_split(masks_only, n=4, seed=3)
    assert first == sorted(first) and len(set(first)) == 4
    assert len({tuple(few_shot_split(masks_only, n=4, seed=s)) for s in range(6)}) > 1


def test_split_covers_every_present_class(masks_only: FolderDataset) -> None:
    for seed in range(8):
        ids = few_shot_split(masks_only, n=2, seed=seed)
        assert "s07" in ids and ({"s02", "s09"} & set(ids))


def test_fraction_and_precomputed_presence(masks_only: FolderDataset) -> None:
    presence = class_presence(masks_only)
    assert presence[7] == frozenset({0, 1, 3}) and presence[0] == frozenset({0, 1})
    ids = few_shot_split(masks_only, fraction=0.25, seed=1, presence=presence)
    assert len(ids) == 3 and ids == few_shot_split(masks_only, fraction=0.25, seed=1)
    assert split_size(10, fraction=0.25) == 3 and split_size(10, fraction=0.01) == 1


@pytest.mark.parametrize(
    "kw", [{}, {"n": 2, "fraction": 0.5}, {"n": 0}, {"n": 13}, {"fraction": 1.5}, {"n": 2, "seed": -1}]
)
def test_bad_split_arguments(masks_only: FolderDataset, kw: dict) -> None:
    with pytest.raises(ConfigError):
        few_shot_split(masks_only, **kw)


def test_write_and_read_split(masks_only: FolderDataset, tmp_path: Path) -> None:
    path = tmp_path / "splits" / "few.json"
    ids = few_shot_split(masks_only, n=3)
    write_split(path, ids, {"seed": 0, "source": "masks_only"})
    assert json.loads(path.read_text()) == {"ids": ids, "n": 3, "seed": 0, "source": "masks_only"}
    assert read_split(path, masks_only) == ids
    assert SubsetDataset(masks_only, read_split(path)).ids == ids


def test_unknown_ids_in_a_split_file(masks_only: FolderDataset, tmp_path: Path) -> None:
    path = tmp_path / "few.json"
    write_split(path, ["s01", "zz"])
    with pytest.raises(DataError, match="zz") as info:
        read_split(path, masks_only)
    assert info.value.path == path and "few.json" in str(info.value)


@pytest.mark.parametrize("text", ["{broken", '{"ids": [1, 2]}', '["s01"]', '{"ids": ["s01", "s01"]}'])
def test_malformed_split_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_split(path)
    assert info.value.path == path
