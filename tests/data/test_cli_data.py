"""`todsynth data` commands through typer's CliRunner: exit codes and messages that name files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from todsynth.cli import common
from todsynth.cli.data import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """Print on one line per message so long tmp paths are not folded."""
    monkeypatch.setattr(common.console, "width", 2000)
    monkeypatch.setattr(common.err_console, "width", 2000)


def test_toy_then_check_is_clean(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    result = runner.invoke(app, ["toy", str(out), "--n", "4", "--size", "16", "--seed", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["check", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 image/mask pair(s)" in result.output and "16x16" in result.output
    assert "agriculture" in result.output and "no problems found" in result.output


def test_toy_folder_layout_label_only(tmp_path: Path) -> None:
    out = tmp_path / "toy"
    args = ["toy", str(out), "--n", "2", "--size", "16", "--layout", "folder", "--label-only"]
    assert runner.invoke(app, args).exit_code == 0
    result = runner.invoke(app, ["check", str(out)])
    assert result.exit_code == 0 and "label-only" in result.output


def test_check_with_problems_exits_2_naming_files(folder_dataset: Path) -> None:
    bad = folder_dataset / "images" / "tile1.png"
    bad.write_bytes(bad.read_bytes()[:30])
    (folder_dataset / "masks" / "tile3.png").unlink()
    result = runner.invoke(app, ["check", str(folder_dataset)])
    assert result.exit_code == 2
    assert "2 problem(s)" in result.output and str(bad) in result.output
    assert str(folder_dataset / "images" / "tile3.png") in result.output


def test_check_of_unknown_layout_exits_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check", str(tmp_path)])
    assert result.exit_code == 2 and "accepted layouts" in result.output and "Traceback" not in result.output


def test_split_command_writes_a_split(folder_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "few.json"
    result = runner.invoke(app, ["split", str(folder_dataset), str(out), "--n", "2", "--seed", "5"])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["n"] == 2 and data["seed"] == 5 and len(data["ids"]) == 2
    assert "classes present" in result.output


def test_split_command_argument_errors_exit_2(folder_dataset: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["split", str(folder_dataset), str(tmp_path / "x.json")])
    assert result.exit_code == 2 and "exactly one of n or fraction" in result.output
    result = runner.invoke(app, ["split", str(folder_dataset), str(tmp_path / "x.json"), "--fraction", "2"])
    assert result.exit_code == 2 and not (tmp_path / "x.json").exists()


def test_cli_module_imports_no_numpy_or_pil() -> None:
    code = "import sys, todsynth.cli.data; print(sorted({'numpy', 'PIL'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
