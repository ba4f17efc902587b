"""Dataset-level metrics: hand-computed confusion matrix, NaN handling, ignore index, no per-batch averaging."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from todsynth.errors import DataError
from todsynth.segment.metrics import ConfusionAccumulator, SegMetrics, segmentation_metrics

# 5 classes; the last target pixel is ignored; class 3 never occurs; class 4 is only predicted.
TARGET = torch.tensor([0, 0, 1, 1, 1, 2, 255])
PREDS = torch.tensor([0, 1, 1, 1, 4, 0, 2])
HAND_CM = np.array([[1, 1, 0, 0, 0], [0, 2, 0, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])


def test_confusion_and_metrics_match_hand_computation():
    m = segmentation_metrics(PREDS, TARGET, num_classes=5)
    assert m.confusion.dtype == np.int64
    np.testing.assert_array_equal(m.confusion, HAND_CM)
    np.testing.assert_allclose(m.iou, [1 / 3, 1 / 2, 0.0, np.nan, 0.0])
    np.testing.assert_allclose(m.acc, [1 / 2, 2 / 3, 0.0, np.nan, np.nan])
    assert m.miou == pytest.approx(5 / 24)
    assert m.oa == pytest.approx(1 / 2)
    assert m.macc == pytest.approx(7 / 18)


def test_logits_are_accepted_and_ignore_pixels_skipped():
    logits = torch.nn.functional.one_hot(PREDS, 5).float().T[None, :, :, None]
    m = segmentation_metrics(logits, TARGET[None, :, None], num_classes=5)
    np.testing.assert_array_equal(m.confusion, HAND_CM)
    assert m.confusion.sum() == 6


def test_dataset_level_differs_from_per_batch_mean():
    batches = [
        (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)),
        (torch.tensor([0, 1, 1, 1]), torch.tensor([1, 1, 1, 1])),
    ]
    acc = ConfusionAccumulator(2)
    per_batch = []
    for pred, target in batches:
        acc.update(pred, target)
        per_batch.append(segmentation_metrics(pred, target, 2).miou)
    dataset = acc.compute().miou
    assert dataset == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert np.mean(per_batch) == pytest.approx((1.0 + 3 / 8) / 2)
    assert not math.isclose(dataset, float(np.mean(per_batch)))


def test_to_dict_names_classes_and_turns_nan_into_none():
    d = SegMetrics.from_confusion(HAND_CM).to_dict(["a", "b", "c", "d", "e"])
    assert d["IoU"]["d"] is None and d["Acc"]["e"] is None
    assert d["IoU"]["b"] == pytest.approx(0.5)
    assert d["mIoU"] == pytest.approx(5 / 24) and d["pixels"] == 6
    with pytest.raises(ValueError):
        SegMetrics.from_confusion(HAND_CM).to_dict(["a"])


def test_empty_confusion_gives_nan():
    m = SegMetrics.from_confusion(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(m.miou) and math.isnan(m.oa) and math.isnan(m.macc)


def test_out_of_range_label_is_a_data_error():
    acc = ConfusionAccumulator(3)
    with pytest.raises(DataError, match="label value 7"):
        acc.update(torch.tensor([0, 1]), torch.tensor([7, 1]))


def test_reset_starts_over():
    acc = ConfusionAccumulator(5)
    acc.update(PREDS, TARGET)
    acc.reset()
    acc.update(torch.tensor([1]), torch.tensor([1]))
    assert acc.compute().confusion.sum() == 1
