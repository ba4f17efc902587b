"""Fixtures of the reliability tests: the uninterrupted, in-process reference of the synthesis setting."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reliability_helpers import SYNTH_SAMPLES, SYNTH_SETTINGS, file_bytes, synth_keep, torch_threads


@pytest.fixture(scope="module")
def cli_app():
    """The `todsynth` typer app, with a wide console so errors stay on one line however long the paths."""
    from todsynth.cli import common
    from todsynth.cli.main import app

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common.console, "width", 2000)
        mp.setattr(common.err_console, "width", 2000)
        yield app


@pytest.fixture(scope="session")
def synth_reference(tiny_generator_dir: Path, toy_masks_16: Path, tmp_path_factory) -> dict[str, bytes]:
    """The files of one uninterrupted single-process synthesis with SYNTH_SETTINGS (run in-process)."""
    from todsynth.config import parse_overrides
    from todsynth.synthesize import build_synthesize_config, synthesize

    out = tmp_path_factory.mktemp("synth_ref") / "out"
    values = {
        "generator": str(tiny_generator_dir),
        "masks": str(toy_masks_16),
        "out": str(out),
        **parse_overrides([f"{k}={v}" for k, v in SYNTH_SETTINGS.items()]),
    }
    with torch_threads(1):
        summary = synthesize(build_synthesize_config(values), progress=False)
    assert summary.made == SYNTH_SAMPLES == summary.in_manifest
    return file_bytes(out, synth_keep)


@pytest.fixture
def gen(tiny_generator_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny saved generator (trained size 16, patch 2, position table 16) that a test may edit."""
    return Path(shutil.copytree(tiny_generator_dir, tmp_path / "gen"))


@pytest.fixture
def seg(tiny_segmenter_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny saved segmenter (7 classes) that a test may edit."""
    return Path(shutil.copytree(tiny_segmenter_dir, tmp_path / "seg"))
