"""Dataset-level segmentation metrics from one confusion matrix accumulated over every evaluated pixel.

Rows of the confusion matrix are ground truth, columns predictions; pixels labelled with the ignore
index are skipped. A class absent from both ground truth and predictions has IoU NaN, and a class
absent from the ground truth has accuracy NaN; NaN entries are excluded from mIoU and mAcc.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from todsynth.data.classes import IGNORE_INDEX
from todsynth.errors import DataError


@dataclass
class SegMetrics:
    """Metrics derived from a dataset-level confusion matrix (int64, rows = ground truth)."""

    confusion: np.ndarray
    iou: np.ndarray
    acc: np.ndarray
    miou: float
    oa: float
    macc: float

    @classmethod
    def from_confusion(cls, confusion: np.ndarray | torch.Tensor) -> SegMetrics:
        """Compute IoU, accuracy, their NaN-excluding means and overall accuracy from counts."""
        cm = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.int64)
        tp = np.diag(cm).astype(np.float64)
        gt = cm.sum(axis=1).astype(np.float64)
        union = gt + cm.sum(axis=0) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt > 0, tp / gt, np.nan)
        total = cm.sum()
        return cls(cm, iou, acc, _nanmean(iou), float(tp.sum() / total) if total else math.nan, _nanmean(acc))

    def to_dict(self, class_names: Sequence[str] | None = None) -> dict:
        """JSON-ready dict: mIoU/OA/mAcc plus per-class IoU and accuracy by name (NaN becomes None)."""
        names = list(class_names) if class_names is not None else [str(i) for i in range(len(self.iou))]
        if len(names) != len(self.iou):
            raise ValueError(f"{len(names)} class names for {len(self.iou)} classes")
        return {
            "mIoU": _json_float(self.miou),
            "OA": _json_float(self.oa),
            "mAcc": _json_float(self.macc),
            "IoU": {n: _json_float(v) for n, v in zip(names, self.iou, strict=True)},
            "Acc": {n: _json_float(v) for n, v in zip(names, self.acc, strict=True)},
            "pixels": int(self.confusion.sum()),
            "note": "dataset-level confusion matrix; classes absent from GT and prediction are null "
            "and excluded from the means",
        }


class ConfusionAccumulator:
    """Accumulates one confusion matrix over batches (torchmetrics MulticlassConfusionMatrix)."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, device: torch.device | str = "cpu"):
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.metric = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False).to(device)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add predicted label maps (or N x C x H x W logits) against int64 targets."""
        if preds.dim() == target.dim() + 1:
            preds = preds.argmax(dim=1)
        target = target.long()
        bad = ((target < 0) | (target >= self.num_classes)) & (target != self.ignore_index)
        if bool(bad.any()):
            value = int(target[bad][0])
            raise DataError(
                f"label value {value} is outside 0..{self.num_classes - 1} and is not the "
                f"ignore index {self.ignore_index}",
                fix="check the dataset's classes file",
            )
        self.metric.update(preds.reshape(-1), target.reshape(-1))

    def compute(self) -> SegMetrics:
        """Metrics over everything accumulated so far."""
        return SegMetrics.from_confusion(self.metric.compute().long())

    def reset(self) -> None:
        """Start a new accumulation."""
        self.metric.reset()


def segmentation_metrics(
    preds: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> SegMetrics:
    """Metrics for one set of predictions (all pixels pooled into one confusion matrix)."""
    acc = ConfusionAccumulator(num_classes, ignore_index, preds.device)
    acc.update(preds, target)
    return acc.compute()


def _nanmean(values: np.ndarray) -> float:
    """Mean over non-NaN entries; NaN when there are none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def _json_float(value: float) -> float | None:
    """A float for JSON, with NaN as None."""
    return None if math.isnan(value) else float(value)
