"""Resumable training state as safetensors + JSON (no pickle anywhere): model, optimizer moments, EMA.

A checkpoint folder is written beside the old one and swapped in by rename, so a kill at any moment
leaves either the previous or the new checkpoint, never a half-written one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from todsynth.errors import CheckpointError
from todsynth.io import load_weights, read_json, save_weights, write_json

STATE_TENSORS = "state.safetensors"
STATE_INFO = "state.json"


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim.") -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat tensors named <prefix><param index>.<key>."""
    out = {}
    for idx, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{prefix}{idx}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                           prefix: str = "optim.") -> None:
    """Restore per-parameter optimizer state written by `optimizer_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(prefix):
            idx, key = name[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def save_checkpoint(directory: str | Path, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Write tensors + info into `directory` via a temp folder and rename."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(tmp / STATE_TENSORS, tensors)
    write_json(tmp / STATE_INFO, info)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)  # left over when a run was killed before removing it
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint folder; a missing or foreign one is a CheckpointError naming the file."""
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if not directory.exists() and old.exists():  # killed between the two renames
        old.rename(directory)
    info_path = directory / STATE_INFO
    if not info_path.is_file():
        raise CheckpointError("no checkpoint here", path=info_path, fix="start without --resume")
    info = read_json(info_path)
    if not isinstance(info, dict) or "step" not in info:
        raise CheckpointError("not a todsynth checkpoint (no step recorded)", path=info_path,
                              fix="point --out at the folder of the run you want to resume")
    return load_weights(directory / STATE_TENSORS), info


def config_differences(saved: dict, current: dict, ignore: set[str]) -> list[str]:
    """Settings that differ between a checkpoint's run and this one (keys in `ignore` may change)."""
    keys = sorted((set(saved) | set(current)) - ignore)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
