"""Segmenter (stage c, and CRFM's guidance network): model, metrics, training (exports load on first use)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Segmenter": "model", "SegmenterConfig": "model", "ARCHS": "model",
    "SegMetrics": "metrics", "ConfusionAccumulator": "metrics", "segmentation_metrics": "metrics",
    "SegmentTrainConfig": "train", "TrainOutcome": "train", "train_segmenter": "train",
    "train_on_samples": "train", "evaluate_segmenter": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported name from its submodule on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
