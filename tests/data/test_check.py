"""Up-front validation: every bad-input case becomes a problem that names its file, never a traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from todsynth.data.check import CheckReport, check_dataset, validate_dataset
from todsynth.data.readers import FolderDataset
from todsynth.errors import DataError, DatasetProblems


def single_problem(report: CheckReport, path: Path, *words: str) -> DataError:
    """Assert the report holds exactly one problem, about `path`, naming it and mentioning `words`."""
    assert len(report.problems) == 1, [str(p) for p in report.problems]
    problem = report.problems[0]
    assert isinstance(problem, DataError)
    assert problem.path == path and path.name in str(problem)
    for word in words:
        assert word in str(problem)
    return problem


def truncate(path: Path) -> Path:
    """Cut a file to half its length."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_good_dataset_report(folder_dataset: Path) -> None:
    report = validate_dataset(folder_dataset)
    assert report.ok and report.n_images == 4 and report.sizes == {(8, 8)}
    assert report.ignore_pixels == 4 and report.total_pixels == 4 * 64
    table = {row.name: row for row in report.class_table}
    assert [row.images for row in report.class_table] == [3, 3, 2]
    assert sum(row.share for row in report.class_table) + report.ignore_share == pytest.approx(1.0)
    assert table["background"].pixels == 47 + 0 + 16 + 47


def test_truncated_png_image(folder_dataset: Path) -> None:
    bad = truncate(folder_dataset / "images" / "tile1.png")
    single_problem(check_dataset(folder_dataset), bad, "truncated")


def test_truncated_jpeg_image(folder_dataset: Path, save_image) -> None:
    (folder_dataset / "images" / "tile1.png").unlink()
    bad = save_image(folder_dataset / "images" / "tile1.jpg", np.zeros((8, 8, 3), np.uint8))
    truncate(bad)
    single_problem(check_dataset(folder_dataset), bad, "corrupt")


def test_unreadable_mask(folder_dataset: Path) -> None:
    bad = folder_dataset / "masks" / "tile2.png"
    bad.write_bytes(b"not a png at all")
    single_problem(check_dataset(folder_dataset), bad, "cannot read mask")


def test_colour_mask_without_palette(folder_dataset: Path, save_image) -> None:
    bad = save_image(folder_dataset / "masks" / "tile0.png", np.zeros((8, 8, 3), np.uint8))
    single_problem(check_dataset(folder_dataset), bad, "colour", "palette")


def test_rgba_mask_without_palette(folder_dataset: Path, save_image) -> None:
    bad = save_image(folder_dataset / "masks" / "tile0.png", np.zeros((8, 8, 4), np.uint8))
    single_problem(check_dataset(folder_dataset), bad, "RGBA")


def test_two_channel_mask(folder_dataset: Path, save_image) -> None:
    bad = save_image(folder_dataset / "masks" / "tile0.png", np.zeros((8, 8), np.uint8), mode="LA")
    single_problem(check_dataset(folder_dataset), bad, "not single-channel")


def test_float_mask(folder_dataset: Path, save_image) -> None:
    (folder_dataset / "masks" / "tile0.png").unlink()
    bad = save_image(folder_dataset / "masks" / "tile0.tif", np.zeros((8, 8), np.float32))
    single_problem(check_dataset(folder_dataset), bad, "floating-point")


def test_palette_colour_mask_with_unknown_colour(folder_dataset: Path, save_image) -> None:
    (folder_dataset / "classes.yaml").write_text(
        "names: [background, building, water]\npalette: [[0, 0, 0], [255, 0, 0], [0, 0, 255]]\n"
    )
    for i in range(4):
        save_image(folder_dataset / "masks" / f"tile{i}.png", np.zeros((8, 8, 3), np.uint8))
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[0, 0] = (1, 2, 3)
    bad = save_image(folder_dataset / "masks" / "tile3.png", colour)
    single_problem(check_dataset(folder_dataset), bad, "(1, 2, 3)")


def test_sixteen_bit_mask_values_above_255(folder_dataset: Path, save_image) -> None:
    label = np.zeros((8, 8), np.uint16)
    label[0, 0] = 300
    bad = save_image(folder_dataset / "masks" / "tile1.png", label)
    single_problem(check_dataset(folder_dataset), bad, "300", "16-bit")


def test_label_values_outside_the_classes(folder_dataset: Path, save_image) -> None:
    label = np.zeros((8, 8), np.uint8)
    label[3, 3] = 5
    bad = save_image(folder_dataset / "masks" / "tile3.png", label)
    single_problem(check_dataset(folder_dataset), bad, "[5]", "0..2")


def test_palette_mode_mask_index_outside_the_classes(folder_dataset: Path) -> None:
    from PIL import Image

    paletted = Image.new("P", (8, 8), color=9)
    paletted.putpalette([0, 0, 0] * 256)
    bad = folder_dataset / "masks" / "tile0.png"
    paletted.save(bad)
    single_problem(check_dataset(folder_dataset), bad, "[9]")


def test_loveda_mask_value_outside_the_classes(tmp_path: Path, save_image) -> None:
    split = tmp_path / "lv" / "Train" / "Urban"
    save_image(split / "images_png" / "1.png", np.zeros((8, 8, 3), np.uint8))
    bad = save_image(split / "masks_png" / "1.png", np.full((8, 8), 8, np.uint8))
    single_problem(check_dataset(tmp_path / "lv"), bad, "0 = no-data")


def test_image_mask_size_mismatch(folder_dataset: Path, save_image) -> None:
    bad = save_image(folder_dataset / "images" / "tile0.png", np.zeros((12, 8, 3), np.uint8))
    single_problem(check_dataset(folder_dataset), bad, "12x8", "8x8")
    with pytest.raises(DataError, match="12x8"):
        FolderDataset(folder_dataset)[0]


def test_image_without_mask(folder_dataset: Path) -> None:
    (folder_dataset / "masks" / "tile2.png").unlink()
    report = check_dataset(folder_dataset)
    single_problem(report, folder_dataset / "images" / "tile2.png", "no mask")
    assert report.n_images == 3


def test_mask_without_image(folder_dataset: Path) -> None:
    (folder_dataset / "images" / "tile2.png").unlink()
    single_problem(check_dataset(folder_dataset), folder_dataset / "masks" / "tile2.png", "no image")


def test_empty_dataset(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    (root / "masks").mkdir(parents=True)
    (root / "images").mkdir()
    (root / "classes.yaml").write_text("names: [a, b]\n")
    single_problem(check_dataset(root), root, "no samples")


def test_duplicate_ids(folder_dataset: Path, save_image) -> None:
    save_image(folder_dataset / "images" / "tile1.jpg", np.zeros((8, 8, 3), np.uint8))
    report = check_dataset(folder_dataset)
    single_problem(report, folder_dataset / "images" / "tile1.png", "duplicate id 'tile1'", "tile1.jpg")


def test_duplicate_ids_in_an_index(tmp_path: Path, save_image) -> None:
    save_image(tmp_path / "m.png", np.zeros((8, 8), np.uint8))
    index = tmp_path / "index.jsonl"
    lines = [{"source": "m.png"}, {"source": "./m.png", "id": "m"}]
    index.write_text("".join(json.dumps(line) + "\n" for line in lines))
    single_problem(check_dataset(index), index, "line 2", "duplicate id 'm'")


@pytest.mark.parametrize("escape", ["../outside.png", "absolute", "symlink"])
def test_index_path_escaping_the_root(tmp_path: Path, save_image, escape: str) -> None:
    outside = save_image(tmp_path / "outside.png", np.zeros((8, 8), np.uint8))
    root = tmp_path / "ds"
    save_image(root / "ok.png", np.zeros((8, 8), np.uint8))
    source = {"../outside.png": "../outside.png", "absolute": str(outside), "symlink": "link.png"}[escape]
    if escape == "symlink":
        os.symlink(outside, root / "link.png")
    index = root / "index.jsonl"
    index.write_text(json.dumps({"source": "ok.png"}) + "\n" + json.dumps({"source": source}) + "\n")
    single_problem(check_dataset(index), index, "outside the dataset root", source)


def test_index_bad_lines_and_missing_files(tmp_path: Path, save_image) -> None:
    save_image(tmp_path / "m.png", np.zeros((8, 8), np.uint8))
    index = tmp_path / "index.jsonl"
    index.write_text('{"source": "m.png"}\n{not json\n{"target": "x.png"}\n{"source": "gone.png"}\n')
    report = check_dataset(index)
    assert [p.path for p in report.problems] == [index, index, tmp_path / "gone.png"]
    assert "line 2" in str(report.problems[0]) and "line 3" in str(report.problems[1])
    assert "gone.png" in str(report.problems[2]) and report.n_images == 1


def test_unknown_key_in_classes_yaml(folder_dataset: Path) -> None:
    path = folder_dataset / "classes.yaml"
    path.write_text("names: [a, b, c]\ncolours: [[0, 0, 0]]\n")
    single_problem(check_dataset(folder_dataset), path, "unknown key", "colours")


@pytest.mark.parametrize(
    "text, words",
    [
        ("names: [a, b, c]\nignore_index: 1\n", "collides"),
        ("names: [a, b, c]\npalette: [[0, 0, 0]]\n", "1 colours for 3 classes"),
        ("names: a\n", "'names' must be a list"),
        ("names: [a, b, c]\nignore_index: [1\n", "cannot read classes file"),
    ],
)
def test_bad_values_in_classes_yaml(folder_dataset: Path, text: str, words: str) -> None:
    path = folder_dataset / "classes.yaml"
    path.write_text(text)
    single_problem(check_dataset(folder_dataset), path, words)


def test_missing_dataset_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    single_problem(check_dataset(tmp_path / "nowhere"), tmp_path / "nowhere", "not found")


def test_validate_raises_with_every_problem(folder_dataset: Path, save_image) -> None:
    truncate(folder_dataset / "masks" / "tile0.png")
    (folder_dataset / "images" / "tile3.png").unlink()
    save_image(folder_dataset / "masks" / "tile1.png", np.full((8, 8), 7, np.uint8))
    with pytest.raises(DatasetProblems) as info:
        validate_dataset(folder_dataset)
    assert len(info.value.problems) == 3 and info.value.path == folder_dataset
    for name in ("tile0.png", "tile1.png", "tile3.png"):
        assert name in str(info.value)


def test_loveda_colour_mask(tmp_path: Path, save_image) -> None:
    split = tmp_path / "lv" / "Train" / "Rural"
    save_image(split / "images_png" / "1.png", np.zeros((8, 8, 3), np.uint8))
    bad = save_image(split / "masks_png" / "1.png", np.ones((8, 8, 3), np.uint8))
    single_problem(check_dataset(tmp_path / "lv"), bad, "colour image (RGB)", "LoveDA")
