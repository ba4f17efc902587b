"""Fixtures for the segment tests."""

from __future__ import annotations

import pytest

from todsynth.data.classes import ClassSpec
from todsynth.data.sample import Sample

from segtest_helpers import CLASSES, make_samples


@pytest.fixture
def samples() -> list[Sample]:
    """Six 32x32 samples."""
    return make_samples(6)


@pytest.fixture
def classes() -> ClassSpec:
    """The three test classes."""
    return CLASSES
