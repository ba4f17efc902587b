"""Crop modes: random crops deterministic per key, identity at the working size, no distortion, small refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from todsynth.data.crops import crop_rng, fit_pair
from todsynth.data.readers import open_dataset
from todsynth.data.torchdata import SegTorchDataset
from todsynth.errors import ConfigError, DataError


def square_block(h: int, w: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A grey image and a label map, both with a side x side square of class 1 in the middle."""
    label = torch.zeros(h, w, dtype=torch.long)
    y, x = (h - side) // 2, (w - side) // 2
    label[y : y + side, x : x + side] = 1
    return label[None].expand(3, -1, -1).float() * 0.5, label


def block_extent(label: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) spanned by class 1."""
    rows, cols = torch.nonzero(label == 1, as_tuple=True)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def test_crop_of_a_sample_at_the_working_size_is_the_sample() -> None:
    image, label = torch.rand(3, 16, 16), torch.randint(0, 3, (16, 16))
    for mode in ("random", "center", "resize"):
        out_i, out_l = fit_pair(image, label, 16, mode, crop_rng(0, 5, 1))
        assert torch.equal(out_i, image) and torch.equal(out_l, label)


def test_random_crops_are_a_function_of_seed_and_key() -> None:
    image, label = torch.rand(3, 40, 56), torch.arange(40 * 56).reshape(40, 56)

    def corner(seed: int, step: int, pos: int) -> int:
        return int(fit_pair(image, label, 16, "random", crop_rng(seed, step, pos))[1][0, 0])

    assert corner(0, 3, 1) == corner(0, 3, 1)
    drawn = {corner(0, step, pos) for step in range(6) for pos in range(3)}
    assert len(drawn) > 10  # different windows for different keys
    i, lab = fit_pair(image, label, 16, "random", crop_rng(0, 3, 1))
    y, x = divmod(int(lab[0, 0]), 56)
    assert torch.equal(lab, label[y : y + 16, x : x + 16]) and torch.equal(i, image[:, y : y + 16, x : x + 16])


def test_center_crop_and_resize_never_distort_a_non_square_image() -> None:
    image, label = square_block(20, 40, 10)
    _, squashed_like = fit_pair(image, label, 16, "resize")
    assert block_extent(squashed_like) == (8, 8)  # scaled by 16/20 on both axes; squashing gave 8 x 4
    _, centred = fit_pair(image, label, 16, "center")
    assert block_extent(centred) == (10, 10)
    tall_i, tall_l = square_block(48, 24, 12)
    out_i, out_l = fit_pair(tall_i, tall_l, 16, "resize")
    assert out_i.shape == (3, 16, 16) and block_extent(out_l) == (8, 8)


def test_samples_smaller_than_the_working_size_are_refused_in_crop_modes() -> None:
    image, label = torch.rand(3, 12, 40), torch.zeros(12, 40, dtype=torch.long)
    for mode in ("random", "center"):
        with pytest.raises(DataError, match=r"sample 'x' is 12x40, smaller than the working size 16"):
            fit_pair(image, label, 16, mode, crop_rng(0), name="sample 'x'")
    out_i, out_l = fit_pair(image, label, 16, "resize")  # resize scales the short side up instead
    assert out_i.shape == (3, 16, 16) and out_l.shape == (16, 16)
    with pytest.raises(ConfigError, match="crop must be one of"):
        fit_pair(image, label, 16, "squash")


def test_segmenter_dataset_crops_at_random_per_seed_epoch_and_index(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": ["a", "b"]}))
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(root / "images" / f"t{k}.png")
        Image.fromarray(rng.integers(0, 2, (24, 40)).astype(np.uint8)).save(root / "masks" / f"t{k}.png")
    ds = open_dataset(root)
    a, b = SegTorchDataset(ds, size=16, crop="random", seed=1), SegTorchDataset(ds, size=16, crop="random", seed=1)
    assert all(torch.equal(a[i]["image"], b[i]["image"]) for i in range(3))
    first = a[0]["label"].clone()
    a.set_epoch(1)
    others = [a[0]["label"]] + [SegTorchDataset(ds, size=16, crop="random", seed=s)[0]["label"] for s in (2, 3)]
    assert any(not torch.equal(first, o) for o in others)
    full = torch.from_numpy(ds[0].label)
    windows = {(y, x) for y in range(9) for x in range(25) if torch.equal(full[y : y + 16, x : x + 16], first)}
    assert windows  # a crop, not a resize: labels are an exact window of the mask
    with pytest.raises(ConfigError):
        SegTorchDataset(ds, size=16, crop="squash")


def test_train_configs_default_to_random_crops_and_check_the_mode() -> None:
    from todsynth.generator.train import GeneratorTrainConfig
    from todsynth.segment.train import SegmentTrainConfig

    assert GeneratorTrainConfig().crop == "random" and SegmentTrainConfig().crop == "random"
    from todsynth.config import build_config

    with pytest.raises(ConfigError, match="'crop' must be one of"):
        build_config(GeneratorTrainConfig, {"data": "d", "crop": "squash"})
    with pytest.raises(ConfigError, match="'crop' must be one of"):
        build_config(SegmentTrainConfig, {"crop": "squash"})


def label_only_dataset(root: Path, h: int, w: int) -> Path:
    """A label-only folder dataset of one h x w mask holding a 10-px square block (classes a, b)."""
    (root / "masks").mkdir(parents=True)
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": ["a", "b"]}))
    _, label = square_block(h, w, 10)
    Image.fromarray(label.numpy().astype(np.uint8)).save(root / "masks" / "m.png")
    return root


def test_in_memory_masks_keep_the_aspect_ratio(tmp_path: Path) -> None:
    from todsynth.generator.train import load_train_data

    root = label_only_dataset(tmp_path / "ds", 20, 40)
    data, _ = load_train_data(str(root), "Train", 16, images=False)
    assert data.labels.shape == (1, 16, 16) and block_extent(data.labels[0]) == (8, 8)


def test_synthesis_masks_center_crop_or_resize_and_refuse_random(tmp_path: Path) -> None:
    from todsynth.generator.sample import load_masks
    from todsynth.synthesize import build_synthesize_config

    root = label_only_dataset(tmp_path / "ds", 40, 20)
    resized, _, _, _ = load_masks(root, "Train", 16)
    centred, _, _, _ = load_masks(root, "Train", 16, crop="center")
    assert block_extent(resized[0]) == (8, 8) and block_extent(centred[0]) == (10, 10)
    with pytest.raises(ConfigError, match="'crop' must be one of"):
        build_synthesize_config({"generator": "g", "masks": "m", "out": "o", "crop": "random"})
