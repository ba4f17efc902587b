"""Segmenter (stage c, and CRFM's guidance network): model, metrics, training (exports load on first use)."""

from __future__ import annotations

from todsynth._lazy import lazy_exports

_EXPORTS = {
    "Segmenter": "model",
    "SegmenterConfig": "model",
    "ARCHS": "model",
    "SegMetrics": "metrics",
    "ConfusionAccumulator": "metrics",
    "segmentation_metrics": "metrics",
    "SegmentTrainConfig": "train",
    "TrainOutcome": "train",
    "train_segmenter": "train",
    "train_on_samples": "train",
    "evaluate_segmenter": "train",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
