"""Tiny in-memory data for the segment tests: blocky label maps, images whose colour encodes the class."""

from __future__ import annotations

import numpy as np

from todsynth.data.classes import ClassSpec
from todsynth.data.sample import Sample

CLASSES = ClassSpec(("background", "building", "water"))


def make_samples(n: int, size: int = 32, seed: int = 0, ignore_share: float = 0.0) -> list[Sample]:
    """Blocky random label maps; the image is a class colour plus noise; optional ignore pixels."""
    rng = np.random.default_rng(seed)
    colours = np.array([[40, 160, 40], [200, 60, 60], [30, 60, 200]])
    samples = []
    for i in range(n):
        label = np.kron(rng.integers(0, 3, (size // 8, size // 8)), np.ones((8, 8), dtype=np.int64))
        image = np.clip(colours[label] + rng.normal(0, 15, (size, size, 3)), 0, 255).astype(np.uint8)
        label = label.astype(np.int64)
        label[rng.random((size, size)) < ignore_share] = 255
        samples.append(Sample(image, label, "tile", f"t{seed}_{i}"))
    return samples
