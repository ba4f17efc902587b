"""Training state under any accelerate layout (one process, DDP, FSDP): gathered on all ranks, kept as safetensors.

Model weights come from `accelerator.get_state_dict` (FSDP: the full state dict, gathered by every rank);
optimizer moments from torch's `get_optimizer_state_dict` (full, keyed by parameter name, so they do not depend
on how a layout flattens or shards parameters). Model-only snapshots (`checkpoints/step_N/`) are pruned to a limit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

OPTIM_PREFIX = "optim."
SNAPSHOTS = "checkpoints"


def is_fsdp(accelerator) -> bool:
    """Whether the prepared model is sharded (FSDP): then every rank takes part in gathering and in forward."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def model_state(accelerator, prepared: nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict, gathered through accelerate; call on all ranks (the main one gets it)."""
    return accelerator.get_state_dict(prepared)


def optimizer_state(prepared: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Full optimizer state as flat tensors optim.<param name>.<key> and its param groups; call on all ranks."""
    raw = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    full = get_optimizer_state_dict(prepared, raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tensors = {
        f"{OPTIM_PREFIX}{name}.{key}": (v if isinstance(v, torch.Tensor) else torch.tensor(v))
        for name, state in full.get("state", {}).items()
        for key, v in state.items()
    }
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in full.get("param_groups", [])]
    return tensors, groups


def load_optimizer_state(prepared: nn.Module, optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Restore what `optimizer_state` wrote, on every rank (each reads the full state and keeps its part)."""
    raw = getattr(optimizer, "optimizer", optimizer)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(OPTIM_PREFIX):
            param, key = name[len(OPTIM_PREFIX) :].rsplit(".", 1)
            state.setdefault(param, {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    set_optimizer_state_dict(
        prepared, raw, {"state": state, "param_groups": groups}, options=StateDictOptions(full_state_dict=True)
    )


def load_model_state(
    accelerator, prepared: nn.Module, model: nn.Module, state: dict[str, torch.Tensor], path: Path
) -> None:
    """Load a full state dict into the model on every rank (FSDP: each rank keeps its shard)."""
    if is_fsdp(accelerator):
        set_model_state_dict(prepared, state, options=StateDictOptions(full_state_dict=True))
        return
    from todsynth.generator.mmdit import load_state_strict

    load_state_strict(model, state, path)


def save_snapshot(root: Path, step: int, state: dict[str, torch.Tensor], config: dict, limit: int) -> Path:
    """Model-only weights of `step` in root/step_<step>/ (config.json + model.safetensors); keeps the newest `limit`."""
    from todsynth.generator.mmdit import CONFIG_NAME, WEIGHTS_NAME
    from todsynth.io import save_weights, write_json

    folder = root / f"step_{step:07d}"
    save_weights(folder / WEIGHTS_NAME, {k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})
    write_json(folder / CONFIG_NAME, config)
    if limit > 0:
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return folder


class ema_weights:
    """Context: EMA weights in the live (possibly sharded) parameters, restored on exit; no-op without EMA."""

    def __init__(self, params: list[nn.Parameter], ema):
        self.params, self.ema = params, ema

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.params)
        return False
