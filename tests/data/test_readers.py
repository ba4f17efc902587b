"""Readers on tiny generated folders: LoveDA, image/mask folder, JSONL index, detection, subsets, prompts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from todsynth.data.classes import LOVEDA, ClassSpec
from todsynth.data.prompts import build_prompt, present_classes
from todsynth.data.readers import FolderDataset, JsonlDataset, LoveDADataset, SubsetDataset, load_classes, open_dataset
from todsynth.errors import DataError, DatasetProblems

RGB = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)


def make_loveda(root: Path, save_image, images: bool = True) -> Path:
    """Train/{Urban,Rural} with stem '1' in both domains; LoveDA mask values 0 (no-data), 1, 3, 7."""
    mask = np.array([[0, 1, 3, 7]] * 4, np.uint8).repeat(2, axis=0).repeat(2, axis=1)
    for domain in ("Urban", "Rural"):
        save_image(root / "Train" / domain / "masks_png" / "1.png", mask)
        save_image(root / "Train" / domain / "masks_png" / "10.png", np.ones((8, 8), np.uint8))
        if images:
            save_image(root / "Train" / domain / "images_png" / "1.png", RGB)
            save_image(root / "Train" / domain / "images_png" / "10.png", RGB)
    return root


def test_loveda_reader_maps_values_and_prefixes_ids(tmp_path: Path, save_image) -> None:
    ds = LoveDADataset(make_loveda(tmp_path / "lv", save_image))
    assert ds.ids == ["Urban/1", "Urban/10", "Rural/1", "Rural/10"]
    assert ds.classes == LOVEDA and not ds.label_only and len(ds) == 4
    sample = ds[0]
    assert sample.id == "Urban/1" and sample.image.dtype == np.uint8 and sample.image.shape == (8, 8, 3)
    assert sample.label.dtype == np.int64
    assert sorted(np.unique(sample.label).tolist()) == [0, 2, 6, 255]
    assert sample.prompt == "a satellite image of background, road, agriculture"
    image, mask = ds.paths(-1)
    assert image.name == "10.png" and mask.parent.name == "masks_png" and "Rural" in str(mask)
    assert [s.id for s in ds] == ds.ids
    with pytest.raises(IndexError):
        ds[4]


def test_loveda_split_with_masks_only_is_label_only(tmp_path: Path, save_image) -> None:
    ds = LoveDADataset(make_loveda(tmp_path / "lv", save_image, images=False))
    assert ds.label_only and len(ds) == 4
    assert ds[1].image is None and ds.paths(1)[0] is None
    assert np.all(ds[1].label == 0)


def test_loveda_missing_split_names_the_folder(tmp_path: Path, save_image) -> None:
    root = make_loveda(tmp_path / "lv", save_image)
    with pytest.raises(DataError, match="'Val'") as info:
        LoveDADataset(root, split="Val")
    assert info.value.path == root / "Val"


def test_folder_reader_converts_image_modes(folder_dataset: Path, save_image) -> None:
    rgba = np.dstack([RGB, np.full((8, 8), 7, np.uint8)])
    save_image(folder_dataset / "images" / "tile1.png", rgba)
    save_image(folder_dataset / "images" / "tile2.png", RGB[..., 0])
    (folder_dataset / "images" / "tile3.png").unlink()
    save_image(folder_dataset / "images" / "tile3.jpg", RGB)
    ds = FolderDataset(folder_dataset)
    assert ds.ids == ["tile0", "tile1", "tile2", "tile3"]
    assert ds.classes.names == ("background", "building", "water")
    assert np.array_equal(ds[1].image, RGB)
    assert np.array_equal(ds[2].image, np.repeat(RGB[..., :1], 3, axis=2))
    assert ds[3].image.shape == (8, 8, 3) and ds.paths(3)[0].suffix == ".jpg"
    assert ds[0].prompt == "a satellite image of background, building"
    assert ds[0].label[-1, -1] == 255


def test_folder_with_masks_only_is_label_only(folder_dataset: Path) -> None:
    for p in (folder_dataset / "images").iterdir():
        p.unlink()
    (folder_dataset / "images").rmdir()
    ds = FolderDataset(folder_dataset)
    assert ds.label_only and ds[0].image is None and len(ds) == 4


def test_folder_palette_masks_map_colours(folder_dataset: Path, save_image) -> None:
    (folder_dataset / "classes.yaml").write_text(
        "names: [background, building, water]\npalette: [[0, 0, 0], [255, 0, 0], [0, 0, 255]]\n"
    )
    colour = np.zeros((8, 8, 4), np.uint8)
    colour[..., 3] = 255
    colour[:4, :, 0] = 255
    colour[4:, :, 2] = 255
    colour[0, 0, 3] = 0
    save_image(folder_dataset / "masks" / "tile0.png", colour)
    label = FolderDataset(folder_dataset)[0].label
    assert label[0, 0] == 255 and label[1, 0] == 1 and label[5, 0] == 2


def test_palette_mode_mask_uses_index_values(folder_dataset: Path) -> None:
    from PIL import Image

    indices = np.array([[0, 1, 2, 255]] * 8, np.uint8).repeat(2, axis=1)
    paletted = Image.new("P", (8, 8))
    paletted.putdata(indices.ravel().tolist())
    paletted.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    paletted.save(folder_dataset / "masks" / "tile0.png")
    ds = FolderDataset(folder_dataset)
    with Image.open(ds.paths(0)[1]) as stored:
        assert stored.mode == "P"
    assert np.array_equal(ds[0].label, indices.astype(np.int64))


def test_sixteen_bit_mask_with_small_values_reads(folder_dataset: Path, save_image) -> None:
    save_image(folder_dataset / "masks" / "tile0.png", np.full((8, 8), 2, np.uint16))
    assert np.all(FolderDataset(folder_dataset)[0].label == 2)


def test_sixteen_bit_image_is_refused_naming_the_file(folder_dataset: Path, save_image) -> None:
    bad = save_image(folder_dataset / "images" / "tile0.png", np.full((8, 8), 4000, np.uint16))
    with pytest.raises(DataError, match="1-band uint16 image") as info:
        FolderDataset(folder_dataset)[0]
    assert info.value.path == bad and "8-bit RGB" in str(info.value) and "'scale: [low, high]'" in str(info.value)


def write_index(path: Path, lines: list[dict | str]) -> Path:
    """Write a JSONL index (dicts as JSON, strings verbatim)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def make_jsonl(root: Path, save_image, with_classes: bool = True) -> Path:
    """Two pairs under root/img and root/lbl; the first line carries a prompt."""
    for i in range(2):
        save_image(root / "img" / f"{i}.jpg", RGB)
        save_image(root / "lbl" / f"{i}.png", np.full((8, 8), i, np.uint8))
    if with_classes:
        (root / "classes.yaml").write_text("names: [field, forest_edge]\n")
    return write_index(
        root / "index.jsonl",
        [
            {"source": "lbl/0.png", "target": "img/0.jpg", "prompt": "a stored prompt"},
            "",
            {"source": "lbl/1.png", "target": "img/1.jpg"},
        ],
    )


def test_jsonl_reader_uses_stored_or_built_prompts(tmp_path: Path, save_image) -> None:
    ds = JsonlDataset(make_jsonl(tmp_path / "j", save_image))
    assert ds.ids == ["lbl/0", "lbl/1"] and ds.classes.names == ("field", "forest_edge")
    assert ds[0].prompt == "a stored prompt"
    assert ds[1].prompt == "a satellite image of forest edge"
    assert ds[1].image.shape == (8, 8, 3) and ds.root == tmp_path / "j"


def test_jsonl_prompt_fn_overrides_and_default_classes(tmp_path: Path, save_image) -> None:
    index = make_jsonl(tmp_path / "j", save_image, with_classes=False)
    ds = JsonlDataset(index, prompt_fn=lambda label, classes: f"{classes.names[int(label.max())]}!")
    assert ds.classes == LOVEDA
    assert [s.prompt for s in ds] == ["background!", "building!"]


def test_jsonl_ids_from_index_key_and_label_only(tmp_path: Path, save_image) -> None:
    save_image(tmp_path / "m.png", np.zeros((8, 8), np.uint8))
    ds = JsonlDataset(write_index(tmp_path / "x.jsonl", [{"source": "m.png", "index": 7}]))
    assert ds.ids == ["7"] and ds.label_only and ds[0].image is None


def test_jsonl_loveda_encoding(tmp_path: Path, save_image) -> None:
    save_image(tmp_path / "m.png", np.array([[0, 1], [2, 7]], np.uint8))
    ds = JsonlDataset(write_index(tmp_path / "x.jsonl", [{"source": "m.png"}]), encoding="loveda")
    assert ds[0].label.tolist() == [[255, 0], [1, 6]]


def test_open_dataset_detects_every_layout(tmp_path: Path, save_image, folder_dataset: Path) -> None:
    lv = make_loveda(tmp_path / "lv", save_image)
    assert isinstance(open_dataset(lv), LoveDADataset)
    assert open_dataset(lv / "Train").ids == LoveDADataset(lv).ids
    assert isinstance(open_dataset(folder_dataset), FolderDataset)
    assert isinstance(open_dataset(make_jsonl(tmp_path / "j", save_image)), JsonlDataset)
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="accepted layouts") as info:
        open_dataset(tmp_path / "other")
    assert info.value.path == tmp_path / "other"


def test_subset_and_slices(folder_dataset: Path) -> None:
    ds = FolderDataset(folder_dataset)
    sub = SubsetDataset(ds, ["tile3", "tile1"])
    assert sub.ids == ["tile3", "tile1"] and sub[0].id == "tile3" and sub.classes == ds.classes
    assert ds[1:3].ids == ["tile1", "tile2"]
    with pytest.raises(DataError, match="nope"):
        SubsetDataset(ds, ["tile0", "nope"])


def test_reading_a_corrupt_item_names_the_file(folder_dataset: Path) -> None:
    bad = folder_dataset / "images" / "tile2.png"
    bad.write_bytes(bad.read_bytes()[:40])
    ds = FolderDataset(folder_dataset)
    with pytest.raises(DataError, match="corrupt") as info:
        ds[2]
    assert info.value.path == bad and "tile2.png" in str(info.value)


def test_strict_constructor_lists_all_discovery_problems(folder_dataset: Path) -> None:
    (folder_dataset / "masks" / "tile0.png").unlink()
    (folder_dataset / "images" / "tile1.png").unlink()
    with pytest.raises(DatasetProblems) as info:
        FolderDataset(folder_dataset)
    assert len(info.value.problems) == 2 and "tile0.png" in str(info.value) and "tile1.png" in str(info.value)
    assert len(FolderDataset(folder_dataset, strict=False)) == 2


def test_load_classes_reads_palette(tmp_path: Path) -> None:
    path = tmp_path / "classes.yaml"
    path.write_text("names: [a, b]\nignore_index: 0\npalette: [[1, 2, 3], [4, 5, 6]]\n")
    with pytest.raises(DataError, match="collides"):
        load_classes(path)
    path.write_text("names: [a, b]\nignore_index: 9\npalette: [[1, 2, 3], [4, 5, 6]]\n")
    assert load_classes(path) == ClassSpec(("a", "b"), 9, ((1, 2, 3), (4, 5, 6)))


def test_build_prompt_lists_present_classes_in_order() -> None:
    classes = ClassSpec(("background", "low_vegetation", "water"))
    label = np.array([[2, 255], [1, 2]])
    assert present_classes(label, classes) == [1, 2]
    assert build_prompt(label, classes) == "a satellite image of low vegetation, water"
    custom = build_prompt(label, classes, template="{classes} seen from above")
    assert custom == "low vegetation, water seen from above"
    assert build_prompt(np.full((2, 2), 255), classes) == "a satellite image of unlabelled land"
