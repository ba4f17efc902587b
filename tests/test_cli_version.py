"""`todsynth --version` and `todsynth version` print the installed package's version."""

from __future__ import annotations

from importlib.metadata import version

import pytest
from typer.testing import CliRunner

from todsynth.cli.main import app


@pytest.mark.parametrize("args", [["--version"], ["version"], ["--version", "data", "--help"]])
def test_version_prints_the_installed_version(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == version("todsynth")
