"""Text prompts built from a label map: the names of the classes it contains."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from todsynth.data.classes import ClassSpec

DEFAULT_TEMPLATE = "a satellite image of {classes}"
NO_CLASSES = "unlabelled land"

PromptFn = Callable[[np.ndarray, ClassSpec], str]


def present_classes(label: np.ndarray, classes: ClassSpec) -> list[int]:
    """Indices of the classes that occur in `label` (the ignore index excluded), in class order."""
    flat = np.asarray(label).ravel()
    flat = flat[(flat >= 0) & (flat < classes.num_classes)]
    counts = np.bincount(flat.astype(np.int64), minlength=classes.num_classes)
    return [int(c) for c in np.flatnonzero(counts)]


def build_prompt(label: np.ndarray, classes: ClassSpec, template: str = DEFAULT_TEMPLATE) -> str:
    """Fill `template`'s `{classes}` with the present class names ('_' read as a space), joined by ', '."""
    names = [classes.names[c].replace("_", " ") for c in present_classes(label, classes)]
    return template.format(classes=", ".join(names) if names else NO_CLASSES)
