"""pyproject's filterwarnings: a warning from todsynth code fails the test, one from a library does not."""

from __future__ import annotations

import warnings

import pytest


def _warn_from(module: str) -> None:
    """Issue a UserWarning as if raised at line 1 of `module` (what stacklevel attribution produces)."""
    warnings.warn_explicit("deprecated call", UserWarning, f"{module.replace('.', '/')}.py", 1, module=module)


@pytest.mark.parametrize("module", ["todsynth", "todsynth.generator.flow"])
def test_a_warning_from_todsynth_code_is_an_error(module):
    with pytest.raises(UserWarning, match="deprecated call"):
        _warn_from(module)


def test_a_warning_from_a_library_stays_a_warning():
    with pytest.warns(UserWarning, match="deprecated call"):
        _warn_from("somelib.module")
