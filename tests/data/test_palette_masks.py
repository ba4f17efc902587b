"""Colour-coded masks as users have them (issue 11): paletted PNGs read by colour, ignore colours, 'classes:'."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from todsynth.data.check import check_dataset
from todsynth.data.classes import ClassSpec
from todsynth.data.readers import FolderDataset, load_classes
from todsynth.errors import DataError

# classes.yaml order: background black, building red, water blue
CLASSES = "names: [background, building, water]\npalette: [[0, 0, 0], [255, 0, 0], [0, 0, 255]]\n"
# the file's palette lists the same colours in another order, with grey added (index 0 = blue, 1 = grey, 2 = red,
# 3 = black)
FILE_PALETTE = [(0, 0, 255), (128, 128, 128), (255, 0, 0), (0, 0, 0)]


def paletted_mask(path: Path, indices: np.ndarray, palette: list[tuple[int, int, int]] = FILE_PALETTE) -> Path:
    """Save an HxW index array as a mode-P PNG with `palette`."""
    im = Image.fromarray(indices.astype(np.uint8), mode="P")
    im.putpalette([v for c in palette for v in c])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def dataset(root: Path, classes: str, indices: np.ndarray) -> Path:
    """A one-sample folder dataset with a paletted mask."""
    root.mkdir(parents=True)
    Image.fromarray(np.zeros((*indices.shape, 3), np.uint8)).save(_folder(root / "images") / "t0.png")
    paletted_mask(root / "masks" / "t0.png", indices)
    (root / "classes.yaml").write_text(classes)
    return root


def _folder(path: Path) -> Path:
    """Create a folder and return it."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_paletted_mask_in_another_palette_order_is_read_by_colour(tmp_path: Path) -> None:
    """Raw palette indices (0 = blue) disagree with classes.yaml (0 = black): labels follow the colours."""
    indices = np.array([[0, 2, 3, 0]] * 4, np.uint8)  # blue, red, black, blue
    root = dataset(tmp_path / "ds", CLASSES, indices)
    with Image.open(root / "masks" / "t0.png") as stored:
        assert stored.mode == "P"
    label = FolderDataset(root)[0].label
    assert np.array_equal(label, np.array([[2, 1, 0, 2]] * 4))
    report = check_dataset(root)
    assert report.ok and [row.pixels for row in report.class_table] == [4, 4, 8]


def test_ignore_colors_are_read_as_ignore(tmp_path: Path) -> None:
    """Grey and black declared in 'ignore_colors' become the ignore index; without it grey is refused."""
    indices = np.array([[0, 1, 2, 3]] * 4, np.uint8)  # blue, grey, red, black
    root = dataset(tmp_path / "ds", "names: [building, water]\npalette: [[255, 0, 0], [0, 0, 255]]\n", indices)
    problems = check_dataset(root).problems
    assert len(problems) == 1 and "(128, 128, 128)" in str(problems[0]) and "'ignore_colors'" in str(problems[0])
    (root / "classes.yaml").write_text(
        "names: [building, water]\npalette: [[255, 0, 0], [0, 0, 255]]\nignore_colors: [[128, 128, 128], [0, 0, 0]]\n"
    )
    label = FolderDataset(root)[0].label
    assert np.array_equal(label, np.array([[1, 255, 0, 255]] * 4))
    assert check_dataset(root).ignore_share == pytest.approx(0.5)


def test_transparent_palette_entry_is_ignore(tmp_path: Path) -> None:
    """A palette entry marked transparent (tRNS) is ignore, as transparent RGBA pixels are."""
    root = dataset(tmp_path / "ds", CLASSES, np.array([[0, 2]] * 2, np.uint8))
    im = Image.open(root / "masks" / "t0.png")
    im.load()
    im.save(root / "masks" / "t0.png", transparency=0)
    assert np.array_equal(FolderDataset(root)[0].label, np.array([[255, 1]] * 2))


def test_paletted_geotiff_mask_is_read_by_colour(tmp_path: Path) -> None:
    """A paletted GeoTIFF mask (colour map) goes through its colours as a paletted PNG does."""
    import rasterio

    root = dataset(tmp_path / "ds", CLASSES, np.zeros((4, 4), np.uint8))
    (root / "masks" / "t0.png").unlink()
    indices = np.array([[0, 2, 3, 3]] * 4, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(
            root / "masks" / "t0.tif", "w", driver="GTiff", width=4, height=4, count=1, dtype="uint8"
        ) as dst:
            dst.write(indices[None])
            dst.write_colormap(1, {i: (*c, 255) for i, c in enumerate(FILE_PALETTE)})
    assert np.array_equal(FolderDataset(root)[0].label, np.array([[2, 1, 0, 0]] * 4))


def test_classes_key_is_accepted_beside_names(tmp_path: Path) -> None:
    """'classes:' (mmseg, torchgeo) is the class list; giving both keys, or a mapping, says which to use."""
    path = tmp_path / "classes.yaml"
    path.write_text("classes: [background, building]\npalette: [[0, 0, 0], [255, 0, 0]]\n")
    assert load_classes(path).names == ("background", "building")
    path.write_text("names: [a, b]\nclasses: [a, b]\n")
    with pytest.raises(DataError, match="both 'names' and 'classes'") as info:
        load_classes(path)
    assert info.value.path == path
    path.write_text("classes: {0: background, 1: building}\n")
    with pytest.raises(DataError, match="'classes' is a mapping") as info:
        load_classes(path)
    assert "classes: [background, building]" in str(info.value)
    path.write_text("classes: [no, water]\n")
    with pytest.raises(DataError, match="'classes' entries \\[0\\]"):
        load_classes(path)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("names: [a, b]\nignore_colors: [[1, 2, 3]]\n", "no 'palette'"),
        ("names: [a, b]\npalette: [[0, 0, 0], [1, 1, 1]]\nignore_colors: [[1, 1, 1]]\n", "both in 'palette' and in"),
        ("names: [a, b]\npalette: [[0, 0, 0], [1, 1, 1]]\nignore_colors: [[9, 9]]\n", "[r, g, b] integer triples"),
        ("names: [a, b]\npalette: [[0, 0, 0], [1, 1, 1]]\nignore_colors: [[9, 9, 9], [9, 9, 9]]\n", "colour twice"),
    ],
)
def test_bad_ignore_colors_name_the_file(tmp_path: Path, text: str, words: str) -> None:
    """ignore_colors without a palette, overlapping it, malformed or repeated: a DataError naming classes.yaml."""
    path = tmp_path / "classes.yaml"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        load_classes(path)
    assert info.value.path == path and words in str(info.value), str(info.value)


def test_ignore_colors_round_trip_through_to_dict() -> None:
    """ClassSpec.to_dict keeps ignore_colors (and leaves the key out when there are none)."""
    spec = ClassSpec(("a", "b"), 255, ((0, 0, 0), (1, 1, 1)), ((9, 9, 9),))
    assert ClassSpec.from_dict(spec.to_dict()) == spec
    assert "ignore_colors" not in ClassSpec(("a",)).to_dict()
