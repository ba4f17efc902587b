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


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny test models run fastest on one thread: OpenMP barriers make 2 threads far slower on a busy box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


@pytest.fixture(scope="session")
def toy_masks_16(tmp_path_factory) -> Path:
    """A small embedded toy dataset (LoveDA layout, 16 px, 6 tiles)."""
    from todsynth.data.toy import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("toy16") / "toy", n=6, size=16, seed=5)


@pytest.fixture(scope="session")
def tiny_generator_dir(tmp_path_factory) -> Path:
    """A saved generator (random weights, pixel space, 16 px, bundled MiniLM text encoder)."""
    from todsynth.data.classes import LOVEDA

    from tiny_models import save_tiny_generator

    return save_tiny_generator(tmp_path_factory.mktemp("gen") / "generator", LOVEDA, jitter=0.05)


@pytest.fixture(scope="session")
def tiny_segmenter_dir(tmp_path_factory) -> Path:
    """A saved 7-class segmenter with random weights (a small SegFormer-style model, 0.7M parameters)."""
    import torch

    from todsynth.segment.model import Segmenter, SegmenterConfig

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("seg") / "segmenter"
    config = SegmenterConfig(arch="segformer", encoder="tu-mobilenetv3_small_050", num_classes=7)
    Segmenter(config).save_pretrained(path)
    return path
