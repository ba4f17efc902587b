"""Shared test fixtures: tiny image files and a small valid image/mask folder dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FOLDER_CLASSES = "names: [background, building, water]\nignore_index: 255\n"


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Write `array` as an image file (format from the suffix), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(path)
    return path


@pytest.fixture
def save_image() -> Callable[..., Path]:
    """`save_image(path, array, mode=None)`: write a tiny image file with PIL."""
    return _save


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    """A valid folder dataset: 4 RGB 8x8 images, masks with classes 0..2 and some ignore (255)."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for i in range(4):
        label = np.full((8, 8), i % 3, np.uint8)
        label[:2, :] = (i + 1) % 3
        label[-1, -1] = 255
        _save(root / "images" / f"tile{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        _save(root / "masks" / f"tile{i}.png", label)
    (root / "classes.yaml").write_text(FOLDER_CLASSES)
    return root
