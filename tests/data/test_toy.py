"""Tests for the procedural toy land-cover generator (todsynth.data.toy)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import yaml
from PIL import Image

from todsynth.data.classes import ClassSpec
from todsynth.data.toy import (
    DOMAINS,
    TOY_CLASSES,
    generate_layout,
    render_image,
    toy_sample,
    write_toy_dataset,
)
from todsynth.errors import ConfigError, DataError

BACKGROUND, BUILDING, ROAD, WATER, BARREN, FOREST, AGRICULTURE = range(7)


@pytest.fixture(scope="module")
def tiles() -> list[tuple[np.ndarray, np.ndarray, str]]:
    """32 default tiles (16 urban, 16 rural), generated once for the statistical tests."""
    return [toy_sample(i) for i in range(32)]


def _fraction(tiles: list, domain: str, cls: int) -> float:
    """Share of pixels of class `cls` over all tiles of one domain."""
    labels = np.stack([lab for _, lab, d in tiles if d == domain])
    return float((labels == cls).mean())


def test_sample_shapes_dtypes_and_values(tiles) -> None:
    for image, label, domain in tiles[:4]:
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert label.shape == (64, 64) and label.dtype == np.int64
        assert label.min() >= 0 and label.max() <= 6
        assert domain in DOMAINS
        assert image.std() > 5


def test_domains_alternate_or_are_forced(tiles) -> None:
    assert [d for _, _, d in tiles[:4]] == ["urban", "rural", "urban", "rural"]
    assert toy_sample(1, domain="urban")[2] == "urban"


def test_same_seed_is_identical_and_other_seed_differs() -> None:
    a, b = toy_sample(3, size=48, seed=7), toy_sample(3, size=48, seed=7)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    c = toy_sample(3, size=48, seed=8)
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[1], toy_sample(5, size=48, seed=7)[1])


def test_sample_does_not_depend_on_dataset_size(tmp_path) -> None:
    small = write_toy_dataset(tmp_path / "small", n=2, size=32, seed=3, layout="folder", start=4)
    large = write_toy_dataset(tmp_path / "large", n=6, size=32, seed=3, layout="folder")
    for name in ("toy_00004.png", "toy_00005.png"):
        for sub in ("images", "masks"):
            assert np.array_equal(
                np.asarray(Image.open(small / sub / name)), np.asarray(Image.open(large / sub / name))
            )
    image, label, _ = toy_sample(5, size=32, seed=3)
    assert np.array_equal(np.asarray(Image.open(small / "images" / "toy_00005.png")), image)
    assert np.array_equal(np.asarray(Image.open(small / "masks" / "toy_00005.png")), label)


def test_generate_layout_is_seeded_and_in_range() -> None:
    for domain in DOMAINS:
        a = generate_layout(40, domain, np.random.default_rng(1))
        assert np.array_equal(a, generate_layout(40, domain, np.random.default_rng(1)))
        assert a.shape == (40, 40) and a.dtype == np.int64 and 0 <= a.min() and a.max() <= 6


def test_domains_differ_in_class_mix(tiles) -> None:
    assert _fraction(tiles, "urban", BUILDING) > 3 * _fraction(tiles, "rural", BUILDING)
    assert _fraction(tiles, "urban", ROAD) > _fraction(tiles, "rural", ROAD)
    assert _fraction(tiles, "rural", AGRICULTURE) > 3 * _fraction(tiles, "urban", AGRICULTURE)
    assert _fraction(tiles, "rural", FOREST) > _fraction(tiles, "urban", FOREST)
    assert 0 < _fraction(tiles, "rural", BUILDING) < 0.05


def test_every_class_is_present_over_32_tiles(tiles) -> None:
    labels = np.stack([lab for _, lab, _ in tiles])
    counts = np.bincount(labels.ravel(), minlength=7)
    assert (counts > 0.005 * labels.size).all(), counts
    tiles_with = [sum(bool((lab == c).any()) for _, lab, _ in tiles) for c in range(7)]
    assert min(tiles_with) >= 4, tiles_with


def test_class_colours_differ_but_overlap(tiles) -> None:
    pixels = np.concatenate([img.reshape(-1, 3) for img, _, _ in tiles]).astype(np.float64)
    labels = np.concatenate([lab.ravel() for _, lab, _ in tiles])
    means = np.stack([pixels[labels == c].mean(0) for c in range(7)])
    stds = np.stack([pixels[labels == c].std(0) for c in range(7)])
    assert np.abs(means[WATER] - means[FOREST]).max() > 10
    assert means[WATER][2] > means[FOREST][2]
    assert means[FOREST][1] < means[AGRICULTURE][1]
    assert (stds > 8).all()
    nearest = np.argmin(((pixels[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    accuracy = (nearest == labels).mean()
    assert 0.25 < accuracy < 0.75, accuracy


def _side_means(img: np.ndarray, top: int, bottom: int, width: int) -> np.ndarray:
    """Mean brightness of the four strips of `width` px just inside [top, bottom) on each side."""
    inner = slice(top + width, bottom - width)
    return np.array(
        [
            img[top : top + width, inner].mean(),
            img[bottom - width : bottom, inner].mean(),
            img[inner, top : top + width].mean(),
            img[inner, bottom - width : bottom].mean(),
        ]
    )


def test_roofs_are_lit_on_one_side_and_cast_shadows() -> None:
    empty = np.zeros((64, 64), np.int64)
    house = empty.copy()
    house[26:38, 26:38] = BUILDING
    for seed in range(6):
        with_house, without = (
            render_image(lab, "urban", np.random.default_rng(seed)).astype(float).mean(-1) for lab in (house, empty)
        )
        roof = _side_means(with_house, 26, 38, 3)
        assert roof.max() > 1.2 * roof.min(), roof
        ring = np.zeros_like(empty, bool)
        ring[22:42, 22:42] = True
        ring[26:38, 26:38] = False
        ratio = with_house[ring] / without[ring]
        assert np.quantile(ratio, 0.1) < 0.75 and np.median(ratio) > 0.9, np.quantile(ratio, [0.1, 0.5])


def test_other_regions_keep_their_texture_when_one_changes() -> None:
    label = np.full((32, 32), FOREST, np.int64)
    edited = label.copy()
    edited[:8] = WATER
    a, b = (render_image(lab, "rural", np.random.default_rng(4)).astype(float) for lab in (label, edited))
    assert np.abs(a[20:] - b[20:]).mean() < 4


def test_render_handles_ignore_and_arbitrary_masks(tiles) -> None:
    _, label, domain = tiles[0]
    flipped = np.ascontiguousarray(np.rot90(label)[:, ::-1])
    flipped[:5] = 255
    image = render_image(flipped, domain, np.random.default_rng(0))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    as_background = np.where(flipped == 255, BACKGROUND, flipped)
    assert np.array_equal(image, render_image(as_background, domain, np.random.default_rng(0)))
    odd = np.random.default_rng(1).integers(0, 7, (24, 40))
    assert render_image(odd, "rural", np.random.default_rng(2)).shape == (24, 40, 3)
    with pytest.raises(DataError):
        render_image(np.zeros((8,), np.int64), "urban", np.random.default_rng(0))
    with pytest.raises(ConfigError):
        render_image(label, "suburban", np.random.default_rng(0))


def test_large_tiles_work() -> None:
    image, label, _ = toy_sample(0, size=256)
    assert image.shape == (256, 256, 3) and label.shape == (256, 256)
    assert len(np.unique(label)) >= 3


def test_small_tiles_are_fast() -> None:
    toy_sample(100)
    start = time.perf_counter()
    for i in range(10):
        toy_sample(i, seed=11)
    assert (time.perf_counter() - start) / 10 < 0.15


def test_write_loveda_layout(tmp_path) -> None:
    root = write_toy_dataset(tmp_path / "loveda", n=3, size=32, seed=2, split="Val", nodata_fraction=1.0)
    assert root == tmp_path / "loveda"
    names = {"Urban": ["toy_00000.png", "toy_00002.png"], "Rural": ["toy_00001.png"]}
    for folder, expected in names.items():
        for sub in ("images_png", "masks_png"):
            assert sorted(p.name for p in (root / "Val" / folder / sub).iterdir()) == expected
    mask_image = Image.open(root / "Val" / "Rural" / "masks_png" / "toy_00001.png")
    assert mask_image.mode == "L"
    mask = np.asarray(mask_image)
    _, label, _ = toy_sample(1, size=32, seed=2)
    valid = mask > 0
    assert 0 < valid.sum() < valid.size
    assert np.array_equal(mask[valid], label[valid] + 1)
    image = np.asarray(Image.open(root / "Val" / "Rural" / "images_png" / "toy_00001.png"))
    assert image.shape == (32, 32, 3) and (image[~valid] == 0).all()


def test_write_folder_layout(tmp_path) -> None:
    root = write_toy_dataset(tmp_path / "f", n=2, size=16, layout="folder", start=10)
    assert sorted(p.name for p in (root / "images").iterdir()) == ["toy_00010.png", "toy_00011.png"]
    mask = np.asarray(Image.open(root / "masks" / "toy_00011.png"))
    assert np.array_equal(mask, toy_sample(11, size=16)[1])
    spec = ClassSpec.from_dict(yaml.safe_load((root / "classes.yaml").read_text()))
    assert spec == TOY_CLASSES


@pytest.mark.parametrize("layout", ["loveda", "folder"])
def test_label_only_writes_no_images(tmp_path, layout) -> None:
    root = write_toy_dataset(tmp_path, n=2, size=16, label_only=True, layout=layout)
    written = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert not any("image" in w for w in written)
    assert len([w for w in written if w.endswith(".png")]) == 2
    assert not [p for p in root.rglob(".*.tmp")]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n": 0},
        {"n": -1},
        {"n": 2.5},
        {"size": 8},
        {"size": 10**5},
        {"layout": "coco"},
        {"seed": -1},
        {"start": -3},
        {"split": ""},
        {"split": "a/b"},
        {"nodata_fraction": 1.5},
    ],
)
def test_bad_arguments_raise_config_error(tmp_path, kwargs) -> None:
    args = {"n": 1, "size": 16} | kwargs
    with pytest.raises(ConfigError):
        write_toy_dataset(tmp_path / "bad", **args)
    assert not (tmp_path / "bad").exists()


def test_bad_sample_arguments_raise_config_error() -> None:
    with pytest.raises(ConfigError):
        toy_sample(-1)
    with pytest.raises(ConfigError):
        toy_sample(0, domain="desert")
    with pytest.raises(ConfigError):
        generate_layout(15, "urban", np.random.default_rng(0))
