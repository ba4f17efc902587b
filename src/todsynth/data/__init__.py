"""Datasets: readers, prompts, validation and few-shot splits (exports load on first use: light imports)."""

from __future__ import annotations

from todsynth._lazy import lazy_exports

_EXPORTS = {
    "Sample": "sample",
    "ClassSpec": "classes",
    "LOVEDA": "classes",
    "IGNORE_INDEX": "classes",
    "BaseDataset": "readers",
    "LoveDADataset": "readers",
    "FolderDataset": "readers",
    "JsonlDataset": "readers",
    "SubsetDataset": "readers",
    "open_dataset": "readers",
    "load_classes": "readers",
    "read_image": "readers",
    "build_prompt": "prompts",
    "CheckReport": "check",
    "check_dataset": "check",
    "validate_dataset": "check",
    "few_shot_split": "split",
    "write_split": "split",
    "read_split": "split",
    "class_presence": "split",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
