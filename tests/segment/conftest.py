"""Fixtures for the segment tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from segtest_helpers import CLASSES, make_samples

from todsynth.data.classes import ClassSpec
from todsynth.data.sample import Sample


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run these tiny models on one thread: OpenMP barriers make 2 threads far slower on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def samples() -> list[Sample]:
    """Six 32x32 samples."""
    return make_samples(6)


@pytest.fixture
def classes() -> ClassSpec:
    """The three test classes."""
    return CLASSES
