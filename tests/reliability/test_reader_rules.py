"""Reader rules and messages (docs/errors.md, "Reader rules and messages"): one root rule for every reader
(nothing whose real path leaves the dataset root is read), an accurate message for each kind of unusable file,
and a 1-sample dataset refused before `segment train` builds a model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from todsynth.data.check import check_dataset
from todsynth.data.readers import ROOT_FIX, open_dataset
from todsynth.errors import DataError

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
    index.write_text('{"source": "masks/link.png", "target": "images/t0.png"}\n'
                     '{"source": "masks/t1.png", "target": "images/t1.png"}\n')
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
