"""Fuzzing the dataset layer: whatever the bytes, lines, paths, class files or label values, only the project's
own errors (TodsynthError subclasses) escape `open_dataset`, `check_dataset`, `ds[i]` and `JsonlDataset`.

Hypothesis runs derandomized (the same examples every run) with bounded example counts.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from PIL import Image

from todsynth.data.check import check_dataset
from todsynth.data.readers import JsonlDataset, open_dataset
from todsynth.errors import TodsynthError

FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CLASSES = "names: [background, building, water]\n"


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per example (pytest's tmp_path is shared by all examples of a test)."""
    with tempfile.TemporaryDirectory(prefix="todsynth-fuzz-") as tmp:
        yield Path(tmp)


def exercise(path: Path, **kw) -> int:
    """Open, check and read every sample of a dataset; TodsynthErrors are expected, anything else fails.

    Returns how many samples were read without an error.
    """
    report = check_dataset(path, **kw)  # never raises for data problems
    assert report.ok or report.problems
    try:
        ds = open_dataset(path, **kw)
    except TodsynthError:
        return 0
    read = 0
    for i in range(len(ds)):
        try:
            sample = ds[i]
        except TodsynthError:
            continue
        assert sample.label.dtype == np.int64 and sample.label.ndim == 2
        valid = (sample.label >= 0) & (sample.label < ds.classes.num_classes)
        assert (valid | (sample.label == ds.classes.ignore_index)).all()
        read += 1
    return read


def encoded(array: np.ndarray, fmt: str) -> bytes:
    """An image file's bytes in `fmt` (PNG, JPEG, TIFF)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


VALID_FILES = [
    encoded(np.arange(64, dtype=np.uint8).reshape(8, 8) % 3, "PNG"),
    encoded(np.full((8, 8, 3), 120, np.uint8), "PNG"),
    encoded(np.full((8, 8, 3), 120, np.uint8), "JPEG"),
    encoded(np.arange(64, dtype=np.uint16).reshape(8, 8), "PNG"),
    encoded(np.zeros((8, 8, 4), np.uint8), "PNG"),
    encoded(np.zeros((8, 8), np.uint8), "TIFF"),
]


@st.composite
def file_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid image file with flipped bytes and/or cut short."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    data = bytearray(draw(st.sampled_from(VALID_FILES)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


def folder(root: Path, n: int = 2) -> Path:
    """A valid 3-class folder dataset of `n` 8x8 tiles."""
    for i in range(n):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(root / "images" / f"t{i}.png")
        Image.fromarray(np.full((8, 8), i % 3, np.uint8)).save(root / "masks" / f"t{i}.png")
    (root / "classes.yaml").write_text(CLASSES)
    return root


@FUZZ
@given(data=file_bytes(), role=st.sampled_from(["images", "masks"]), suffix=st.sampled_from([".png", ".jpg", ".tif"]))
def test_random_image_and_mask_files(data: bytes, role: str, suffix: str) -> None:
    """A folder dataset with one fuzzed image or mask file."""
    with scratch() as tmp:
        root = folder(tmp / "ds")
        (root / role / "t1.png").unlink()
        (root / role / f"t1{suffix}").write_bytes(data)
        assert exercise(root) >= 1  # the intact tile always reads


@FUZZ
@given(data=file_bytes(), suffix=st.sampled_from([".png", ".jpg"]))
def test_random_loveda_mask_files(data: bytes, suffix: str) -> None:
    """A LoveDA tree with one fuzzed mask file."""
    with scratch() as tmp:
        domain = tmp / "lv" / "Train" / "Urban"
        (domain / "images_png").mkdir(parents=True)
        (domain / "masks_png").mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(domain / "images_png" / "1.png")
        (domain / "masks_png" / f"1{suffix}").write_bytes(data)
        exercise(tmp / "lv")


LABEL_DTYPES = [np.uint8, np.uint16, np.int32, np.float32, np.bool_]


@FUZZ
@given(
    dtype=st.sampled_from(LABEL_DTYPES),
    values=st.lists(st.integers(-70000, 70000), min_size=1, max_size=6),
    fmt=st.sampled_from(["PNG", "TIFF"]),
    loveda=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_label_values(dtype: type, values: list[int], fmt: str, loveda: bool, seed: int) -> None:
    """Masks of any dtype holding any values: read as valid labels or refused with a DataError."""
    rng = np.random.default_rng(seed)
    label = rng.choice(np.array(values, dtype=np.int64), size=(8, 8)).astype(dtype)
    try:
        data = encoded(label, fmt)
    except (OSError, TypeError, ValueError, KeyError):
        assume(False)  # PIL cannot even write this array: not an input anyone can have
    with scratch() as tmp:
        if loveda:
            domain = tmp / "ds" / "Train" / "Rural"
            (domain / "masks_png").mkdir(parents=True)
            (domain / "masks_png" / f"x.{fmt.lower()}").write_bytes(data)
        else:
            (tmp / "ds" / "masks").mkdir(parents=True)
            (tmp / "ds" / "classes.yaml").write_text(CLASSES)
            (tmp / "ds" / "masks" / f"x.{fmt.lower()}").write_bytes(data)
        exercise(tmp / "ds")


PATHS = st.one_of(
    st.sampled_from(
        [
            "masks/t0.png",
            "images/t0.png",
            "./masks/t1.png",
            "masks//t1.png",
            "../outside.png",
            "/etc/passwd",
            "masks",
            "",
            ".",
            "..",
            "masks/link.png",
            "masks/t0.png/..",
            "~/x.png",
            "masks/\x00.png",
            "\ud800.png",
            "a" * 300,
            "masks/" + "b/" * 50 + "c.png",
            "C:\\masks\\t0.png",
        ]
    ),
    st.text(max_size=30),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | PATHS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
RECORDS = st.dictionaries(
    st.sampled_from(["source", "target", "prompt", "id", "index", "extra"]), st.one_of(PATHS, JSON_VALUES), max_size=5
)
LINES = st.one_of(RECORDS.map(json.dumps), JSON_VALUES.map(json.dumps), st.text(max_size=40))


@FUZZ
@given(lines=st.lists(LINES, max_size=6), classes=st.booleans())
def test_random_index_lines_and_paths(lines: list[str], classes: bool) -> None:
    """A JSONL index of random lines, objects and paths (escaping, absolute, NUL, surrogates, over-long)."""
    with scratch() as tmp:
        root = folder(tmp / "ds")
        (root / "classes.yaml").unlink()
        if classes:
            (root / "classes.yaml").write_text(CLASSES)
        (tmp / "outside.png").write_bytes(VALID_FILES[0])
        os.symlink(tmp / "outside.png", root / "masks" / "link.png")
        index = root / "index.jsonl"
        index.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
        exercise(index)
        for strict in (True, False):
            try:
                ds = JsonlDataset(index, strict=strict)
            except TodsynthError:
                continue
            for i in range(len(ds)):
                try:
                    ds[i]
                except TodsynthError:
                    pass
            assert all((root.resolve() in p.resolve().parents) for p in (it.mask for it in ds._items))


@FUZZ
@given(content=st.binary(max_size=200))
def test_random_index_bytes(content: bytes) -> None:
    """An index file of random bytes (invalid UTF-8 included)."""
    with scratch() as tmp:
        root = folder(tmp / "ds")
        (root / "index.jsonl").write_bytes(content)
        exercise(root / "index.jsonl")


YAML_SCALARS = st.none() | st.booleans() | st.integers(-5, 70000) | st.floats(allow_nan=True) | st.text(max_size=8)
YAML_VALUES = st.recursive(YAML_SCALARS, lambda inner: st.lists(inner, max_size=4), max_leaves=10)
CLASS_MAPPINGS = st.dictionaries(
    st.sampled_from(["names", "ignore_index", "palette", "colours", "1"]), YAML_VALUES, max_size=4
)
TRICKY_YAML = st.sampled_from(
    [
        "names: 2001-02-30\n",
        "names: [a, b]\nignore_index: 2001-02-30\n",
        "? [a, b]\n: c\n",
        "names: !!python/object:os.system x\n",
        "names: &a [*a]\n",
        "names: [a, b]\nignore_index: 0x10\n",
        "names: [a, b]\nignore_index: .nan\n",
        "[" * 200,
        "names: [a, a]\n",
        "names: []\n",
        "- names\n",
        "\xff\xfe",
    ]
)


@FUZZ
@given(
    content=st.one_of(
        CLASS_MAPPINGS.map(lambda d: yaml.safe_dump(d, allow_unicode=True)), st.text(max_size=60), TRICKY_YAML
    )
)
def test_random_classes_yaml(content: str) -> None:
    """classes.yaml holding random YAML: random keys, values of any type, timestamps, tags, anchors."""
    with scratch() as tmp:
        root = folder(tmp / "ds")
        (root / "classes.yaml").write_bytes(content.encode("utf-8", "surrogatepass"))
        exercise(root)


@pytest.mark.parametrize(
    "mode", ["1", "L", "P", "I", "I;16", "F", "LA", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"]
)
@pytest.mark.parametrize("role", ["images", "masks"])
def test_every_pil_mode_as_image_or_mask(tmp_path: Path, mode: str, role: str) -> None:
    """An image or mask in any PIL mode is read or refused with a DataError (TIFF holds every mode)."""
    root = folder(tmp_path / "ds")
    image = Image.new(mode, (8, 8))
    (root / role / "t1.png").unlink()
    try:
        image.save(root / role / "t1.tif")
    except (OSError, ValueError, KeyError):
        pytest.skip(f"PIL cannot write mode {mode} as TIFF")
    assert exercise(root) >= 1
