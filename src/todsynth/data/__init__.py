"""Datasets: readers, prompts, validation and few-shot splits (exports load on first use: light imports)."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Sample": "sample",
    "ClassSpec": "classes", "LOVEDA": "classes", "IGNORE_INDEX": "classes",
    "BaseDataset": "readers", "LoveDADataset": "readers", "FolderDataset": "readers",
    "JsonlDataset": "readers", "SubsetDataset": "readers", "open_dataset": "readers",
    "load_classes": "readers", "read_image": "readers",
    "build_prompt": "prompts",
    "CheckReport": "check", "check_dataset": "check", "validate_dataset": "check",
    "few_shot_split": "split", "write_split": "split", "read_split": "split",
    "class_presence": "split",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import an exported name from its submodule on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
