"""SegTorchDataset: tensors, ignore index through resize, deterministic augmentation, real/synthetic mix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from todsynth.data.sample import Sample
from todsynth.data.torchdata import SegTorchDataset, mix_real_synthetic, resize_pair, set_epoch
from todsynth.errors import DataError

from segtest_helpers import make_samples


def test_item_types_and_range(samples):
    item = SegTorchDataset(samples)[0]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 32, 32)
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    assert item["label"].dtype == torch.int64 and item["label"].shape == (32, 32)
    assert torch.equal(item["label"], torch.from_numpy(samples[0].label))


@pytest.mark.parametrize("size", [20, 48, 64])
def test_resize_keeps_ignore_index_and_class_values(size):
    label = np.zeros((32, 32), dtype=np.int64)
    label[:, 16:] = 2
    label[8:24, 8:24] = 255
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    item = SegTorchDataset([Sample(image, label, "", "a")], size=size)[0]
    out = item["label"]
    assert out.shape == (size, size) and item["image"].shape == (3, size, size)
    assert set(out.unique().tolist()) == {0, 2, 255}
    share = float((out == 255).float().mean())
    assert share == pytest.approx(0.25, abs=0.05)


def test_resize_pair_is_nearest_for_labels():
    label = torch.tensor([[0, 255], [1, 2]])
    image = torch.rand(3, 2, 2)
    _, big = resize_pair(image, label, 4)
    assert torch.equal(big, label.repeat_interleave(2, 0).repeat_interleave(2, 1))


def test_augment_is_deterministic_and_moves_image_with_label(samples):
    ds = SegTorchDataset(samples, augment=True, seed=3)
    drawn = []
    for epoch in range(4):
        set_epoch(ds, epoch)
        item = ds[1]
        colour = item["image"].argmax(dim=0)
        # image colour encodes the class (green=0 -> channel 1, red=1 -> channel 0, blue=2 -> channel 2)
        assert torch.equal(torch.tensor([1, 0, 2])[item["label"]], colour)
        assert torch.equal(item["label"], ds[1]["label"])
        drawn.append(item["label"])
    assert any(not torch.equal(drawn[0], d) for d in drawn[1:])
    again = SegTorchDataset(samples, augment=True, seed=3)
    set_epoch(again, 3)
    assert torch.equal(again[1]["label"], drawn[3])


def test_non_square_augmentation_keeps_shape():
    label = np.zeros((16, 24), dtype=np.int64)
    ds = SegTorchDataset([Sample(np.zeros((16, 24, 3), np.uint8), label, "", "a")], augment=True)
    for epoch in range(6):
        ds.set_epoch(epoch)
        assert ds[0]["label"].shape == (16, 24)


def test_label_only_rejected():
    class LabelOnly(list):
        label_only = True

    with pytest.raises(DataError, match="labels only"):
        SegTorchDataset(LabelOnly())
    ds = SegTorchDataset([Sample(None, np.zeros((4, 4), np.int64), "", "x")])
    with pytest.raises(DataError, match="'x' has no image"):
        ds[0]


def test_mix_ratio_counts_and_is_deterministic():
    real = SegTorchDataset(make_samples(4, size=8))
    syn = SegTorchDataset(make_samples(10, size=8, seed=1))
    mix = mix_real_synthetic(real, syn, ratio=2.0, repeat_real=2, seed=5)
    assert len(mix) == 2 * 4 + 8
    same = mix_real_synthetic(real, syn, ratio=2.0, repeat_real=2, seed=5)
    assert mix.datasets[-1].indices == same.datasets[-1].indices
    assert len(mix_real_synthetic(real, syn, None)) == 14
    assert len(mix_real_synthetic(real, syn, 0.0)) == 4
    assert len(mix_real_synthetic(real, None, 3.0)) == 4
    with pytest.raises(DataError, match="only 10 exist"):
        mix_real_synthetic(real, syn, ratio=3.0)
    with pytest.raises(DataError):
        mix_real_synthetic(real, syn, ratio=float("nan"))


def test_set_epoch_reaches_synthetic_subset():
    real = SegTorchDataset(make_samples(2, size=8), augment=True)
    syn = SegTorchDataset(make_samples(4, size=8, seed=1), augment=True)
    mix = mix_real_synthetic(real, syn, ratio=1.0)
    mix.set_epoch(7)
    assert real.epoch == 7 and syn.epoch == 7
