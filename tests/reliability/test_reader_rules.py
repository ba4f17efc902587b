"""Reader rules and messages (docs/errors.md, "Reader rules and messages"): one root rule for every reader
(nothing whose real path leaves the dataset root is read), an accurate message for each kind of unusable file,
and a 1-sample dataset refused before `segment train` builds a model.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from todsynth.data.check import check_dataset
from todsynth.data.classes import ClassSpec
from todsynth.data.readers import ROOT_FIX, MaskCodec, load_classes, open_dataset, read_image
from todsynth.errors import DataError

from reliability_helpers import invoke

CLASSES = "names: [background, building, water]\n"


def _save(path: Path, array: np.ndarray) -> Path:
    """Write an array as an image file, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def folder(root: Path, n: int = 3) -> Path:
    """A valid 3-class folder dataset of `n` 8x8 tiles."""
    for i in range(n):
        _save(root / "images" / f"t{i}.png", np.full((8, 8, 3), 40 * i, np.uint8))
        _save(root / "masks" / f"t{i}.png", np.full((8, 8), i % 3, np.uint8))
    (root / "classes.yaml").write_text(CLASSES)
    return root


def problems_at(data: Path, path: Path) -> list[str]:
    """The texts of the problems `check_dataset` reports for `path`."""
    return [str(p) for p in check_dataset(data).problems if p.path == path]


def load_classes_text(tmp_path: Path) -> ClassSpec:
    """The 3-class ClassSpec of CLASSES."""
    (tmp_path / "classes.yaml").write_text(CLASSES)
    return load_classes(tmp_path / "classes.yaml")


def write_tiff(path: Path, array: np.ndarray, sample_format: int = 1) -> Path:
    """A valid uncompressed little-endian TIFF of an HxW or HxWxC array (any band count and sample type)."""
    array = array[..., None] if array.ndim == 2 else array
    h, w, c = array.shape
    pixels = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()
    shorts = {
        256: [w],
        257: [h],
        258: [array.dtype.itemsize * 8] * c,
        259: [1],
        262: [1],
        277: [c],
        278: [h],
        284: [1],
        339: [sample_format] * c,
    }
    tags = 2 + len(shorts)  # + StripOffsets (273), StripByteCounts (279) as LONGs
    after_ifd = 8 + 2 + 12 * tags + 4
    spilled = b"".join(struct.pack(f"<{len(v)}H", *v) for v in shorts.values() if len(v) > 2)
    entries, spill_at = {}, after_ifd
    for code, values in shorts.items():
        if len(values) > 2:  # more than two SHORTs do not fit the entry: they follow the IFD
            entries[code] = struct.pack("<HHII", code, 3, len(values), spill_at)
            spill_at += 2 * len(values)
        else:
            entries[code] = struct.pack("<HHI", code, 3, len(values)) + struct.pack(f"<{len(values)}H", *values).ljust(
                4, b"\0"
            )
    entries[273] = struct.pack("<HHII", 273, 4, 1, after_ifd + len(spilled))
    entries[279] = struct.pack("<HHII", 279, 4, 1, len(pixels))
    ifd = struct.pack("<H", tags) + b"".join(entries[k] for k in sorted(entries)) + b"\0" * 4
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + spilled + pixels)
    return path


# ---------------------------------------------------------------------------------------------
# One root rule for every reader.


@pytest.mark.parametrize("link", ["images_file", "masks_file", "images_folder", "masks_folder"])
def test_folder_links_out_of_the_root_are_refused(tmp_path: Path, link: str) -> None:
    """A file or sample folder linked to a place outside the root is a problem naming it; links inside are fine."""
    root = folder(tmp_path / "ds")
    outside = folder(tmp_path / "elsewhere")
    os.symlink(root / "images" / "t0.png", root / "images" / "t9.png")  # inside → inside: read as a sample
    os.symlink(root / "masks" / "t0.png", root / "masks" / "t9.png")
    role, kind = link.split("_")
    if kind == "file":
        at = root / role / "t1.png"
        at.unlink()
        os.symlink(outside / role / "t1.png", at)
    else:
        at = root / role
        os.rename(at, tmp_path / f"{role}_moved")
        os.symlink(outside / role, at)
    problems = problems_at(root, at)
    assert problems and all("points outside the dataset root" in p and ROOT_FIX in p for p in problems), problems
    assert str((outside / role / ("t1.png" if kind == "file" else "")).resolve()).rstrip("/") in problems[0]
    with pytest.raises(DataError, match="points outside the dataset root"):
        open_dataset(root)
    if kind == "file":
        assert check_dataset(root).n_images == 3  # t0, t2 and the inside link t9; t1 is not read from outside


def test_loveda_folder_linked_out_of_the_root_is_refused(tmp_path: Path) -> None:
    """LoveDA: an images_png folder that is a link out of the root is refused, naming the folder."""
    domain = tmp_path / "lv" / "Train" / "Urban"
    _save(domain / "masks_png" / "1.png", np.ones((8, 8), np.uint8))
    _save(tmp_path / "shared" / "1.png", np.zeros((8, 8, 3), np.uint8))
    os.symlink(tmp_path / "shared", domain / "images_png")
    problems = problems_at(tmp_path / "lv", domain / "images_png")
    assert problems and "images folder points outside the dataset root" in problems[0], problems
    assert ROOT_FIX in problems[0]


def test_index_links_out_of_the_root_get_the_same_rule(tmp_path: Path) -> None:
    """The JSONL reader applies the same rule and fix as the folder readers."""
    root = folder(tmp_path / "ds")
    _save(tmp_path / "outside.png", np.zeros((8, 8), np.uint8))
    os.symlink(tmp_path / "outside.png", root / "masks" / "link.png")
    index = root / "index.jsonl"
    index.write_text(
        '{"source": "masks/link.png", "target": "images/t0.png"}\n'
        '{"source": "masks/t1.png", "target": "images/t1.png"}\n'
    )
    problems = problems_at(index, index)
    assert len(problems) == 1 and "line 1 'source' path 'masks/link.png' points outside" in problems[0]
    assert ROOT_FIX in problems[0] and str((tmp_path / "outside.png").resolve()) in problems[0]


def test_dangling_link_is_a_problem_not_skipped(tmp_path: Path) -> None:
    """A link to a missing file is reported, not silently left out of the dataset."""
    root = folder(tmp_path / "ds")
    (root / "images" / "t1.png").unlink()
    os.symlink(root / "gone.png", root / "images" / "t1.png")
    problems = problems_at(root, root / "images" / "t1.png")
    assert problems and "link to a missing file" in problems[0], problems


# ---------------------------------------------------------------------------------------------
# One accurate message per kind of unusable file.


@pytest.mark.parametrize("side", [40, 50], ids=["over_the_limit_warning", "over_twice_the_limit_error"])
def test_images_over_the_pixel_limit_get_their_own_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli_app, side: int
) -> None:
    """Over PIL's pixel limit (a warning up to 2x, an error beyond) is refused alike, without PIL's raw text."""
    root = folder(tmp_path / "ds")
    big = _save(root / "images" / "t1.png", np.zeros((side, side, 3), np.uint8))
    _save(root / "masks" / "t1.png", np.zeros((side, side), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape
        problems = problems_at(root, big)
    assert problems and f"of {side * side:,} pixels exceeds PIL's pixel limit of 1,000" in problems[0], problems
    assert "cut it into tiles" in problems[0] and "corrupt" not in problems[0]
    result = invoke(cli_app, ["data", "check", str(root)])
    assert result.exit_code == 2 and "cut it into tiles" in result.output
    assert "DecompressionBomb" not in result.output and "decompression bomb DOS" not in result.output


@pytest.mark.parametrize(
    ("array", "sample_format", "words"),
    [
        (np.zeros((8, 8, 13), np.uint16), 1, {"image": "13-band uint16 image", "mask": "mask has 13 bands of uint16"}),
        (np.zeros((8, 8), np.float64), 3, {"image": "1-band float64 image", "mask": "floating-point values (float64)"}),
    ],
    ids=["13_band_uint16", "float64"],
)
@pytest.mark.parametrize("role", ["image", "mask"])
def test_valid_tiffs_pil_cannot_decode_are_not_called_corrupt(
    tmp_path: Path, array: np.ndarray, sample_format: int, words: dict, role: str
) -> None:
    """A valid TIFF PIL could not decode is now read with rasterio and refused for what it holds (issue 11),
    naming the setting to change; a broken header is still corrupt."""
    path = write_tiff(tmp_path / "x.tif", array, sample_format)
    read = read_image if role == "image" else MaskCodec(load_classes_text(tmp_path)).read
    with pytest.raises(DataError) as info:
        read(path)
    text = str(info.value)
    assert words[role] in text and "corrupt" not in text, text
    expected = "'scale: [low, high]'" if role == "image" else "single-channel PNGs"  # any band count is read
    assert expected in text, text
    path.write_bytes(b"II*\0" + bytes(range(40)))  # no complete TIFF header: still "corrupt"
    with pytest.raises(DataError, match="corrupt, truncated or not an image"):
        read(path)


def test_many_classes_with_the_default_ignore_index_suggest_a_free_value(tmp_path: Path) -> None:
    """300 classes collide with the default ignore index 255: say it is the default, suggest 65535."""
    path = tmp_path / "classes.yaml"
    path.write_text("names: [" + ", ".join(f"c{i}" for i in range(300)) + "]\n")
    with pytest.raises(DataError) as info:
        load_classes(path)
    text = str(info.value)
    assert "default ignore index 255" in text and "0..299" in text and "65535" in text, text
    assert "e.g. 255" not in text
    path.write_text("names: [" + ", ".join(f"c{i}" for i in range(300)) + "]\nignore_index: 7\n")
    with pytest.raises(DataError, match="e.g. 65535"):
        load_classes(path)


def test_yaml_booleans_as_class_names_are_explained(tmp_path: Path) -> None:
    """`names: [no, on, off]`: YAML reads booleans; the message says so and shows the quoting."""
    path = tmp_path / "classes.yaml"
    path.write_text("names: [no, on, off, water]\n")
    with pytest.raises(DataError) as info:
        load_classes(path)
    text = str(info.value)
    assert "booleans" in text and "[0, 1, 2]" in text and 'names: ["no", "on", "off"]' in text, text
    path.write_text("names: [1, ~, water]\n")
    with pytest.raises(DataError, match=r"\['int', 'NoneType'\], not strings"):
        load_classes(path)


def test_32_bit_mask_is_not_called_16_bit(tmp_path: Path) -> None:
    """A mode-I mask holding a non-class value names its real depth."""
    label = np.zeros((8, 8), np.int32)
    label[0, 0] = 70000
    path = tmp_path / "m.tif"
    Image.fromarray(label).save(path)
    assert Image.open(path).mode == "I"
    with pytest.raises(DataError) as info:
        MaskCodec(load_classes_text(tmp_path)).read(path)
    assert "in a 32-bit integer mask (int32)" in str(info.value) and "16-bit" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Training needs batches of more than one sample.


def test_segment_train_refuses_a_one_sample_dataset(cli_app, tmp_path: Path) -> None:
    """One image: refused up front naming the dataset (exit 2), not a BatchNorm traceback."""
    root = folder(tmp_path / "ds", n=1)
    out = tmp_path / "out"
    result = invoke(
        cli_app,
        [
            "segment",
            "train",
            str(root),
            "--out",
            str(out),
            "--arch",
            "segformer",
            "--encoder",
            "tu-mobilenetv3_small_050",
            "--size",
            "16",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 2, (result.exit_code, result.output[-2000:], result.exception)
    assert f"error: {root}: 1 training sample" in result.output and "add samples" in result.output
    assert "Traceback" not in result.output
    assert not out.exists() or not any(out.rglob("*.safetensors"))
