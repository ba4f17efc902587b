"""Training state under any accelerate layout (one process, DDP, FSDP, DeepSpeed ZeRO-2).

Model weights come from `accelerator.get_state_dict` (FSDP: the full state dict, gathered by every rank);
optimizer moments from todsynth.checkpoint.optimizer_state (full, keyed by parameter name, so they do not depend
on how a layout flattens or shards parameters). Under DeepSpeed the engine owns accumulation, clipping, the
optimizer step and its ZeRO-partitioned state: the run's settings go into accelerate's DeepSpeed plugin, and the
engine's state is saved and loaded with `accelerator.save_state`/`load_state` (`deepspeed/step_N/`, referenced by
the run's checkpoint). Model-only snapshots (`checkpoints/step_N/`) are pruned to a limit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
)

ENGINE_STATES = "deepspeed"  # under DeepSpeed: the engine's own state per saved step, in the run folder


def process_group_kwargs() -> list:
    """Accelerator kwargs handlers for this launch: gloo under DeepSpeed without an accelerator device (there
    accelerate picks no backend, so every rank would count itself alone); none otherwise."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or torch.accelerator.is_available():
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")]


def deepspeed_settings(
    ds_config: Mapping[str, Any], grad_accum: int, grad_clip: float, batch_size: int, world: int, mixed_precision: str
) -> dict[str, Any]:
    """The DeepSpeed config entries a run sets from its own settings (accumulation, clipping, micro-batch); an
    accelerate config that says otherwise ("auto" takes ours), or ZeRO-3, or another precision is refused."""
    from todsynth.errors import ConfigError

    ours = {"gradient_accumulation_steps": grad_accum, "gradient_clipping": float(grad_clip)}
    fix = "remove the entry from deepspeed_config (it then takes the run's value) or make the two agree"
    for key, value in ours.items():
        given = ds_config.get(key, "auto")
        if given != "auto" and float(given) != value:
            name = "grad_accum" if key.startswith("gradient_acc") else "grad_clip"
            raise ConfigError(
                f"the accelerate DeepSpeed config sets {key}={given} but the run's {name} is {value:g}", fix=fix
            )
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ConfigError(
            "DeepSpeed ZeRO-3 shards the parameters, which validation, EMA and saving read whole here",
            fix="use configs/accelerate/deepspeed_zero2.yaml, or configs/accelerate/fsdp.yaml to shard",
        )
    engine = next((p for p in ("bf16", "fp16") if ds_config.get(p, {}).get("enabled") is True), "no")
    if engine != mixed_precision:
        raise ConfigError(
            f"the DeepSpeed engine runs in mixed precision {engine} but the run's mixed_precision is {mixed_precision}",
            fix=f"set mixed_precision={engine} or launch with --mixed_precision {mixed_precision}",
        )
    micro = batch_size // world
    return {**ours, "train_micro_batch_size_per_gpu": micro, "train_batch_size": micro * grad_accum * world}


def configure_deepspeed(accelerator, grad_accum: int, grad_clip: float, batch_size: int, mixed_precision: str) -> None:
    """Under DeepSpeed, put the run's settings into accelerate's DeepSpeed plugin; call before `prepare`."""
    if accelerator.state.deepspeed_plugin is not None:  # None unless accelerate runs DeepSpeed
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config.update(
            deepspeed_settings(config, grad_accum, grad_clip, batch_size, accelerator.num_processes, mixed_precision)
        )


def save_engine_state(accelerator, root: Path, step: int, keep: str | None) -> str:
    """The DeepSpeed engine's state (weights, partitioned optimizer, RNG) of `step` via `accelerator.save_state`
    on every rank; older states but `keep` (the committed one) removed. Returns its path relative to `root`."""
    name = f"{ENGINE_STATES}/step_{step:07d}"
    if accelerator.is_main_process:
        for old in (root / ENGINE_STATES).glob("step_*"):
            if old.name != Path(name).name and (keep is None or old.name != Path(keep).name):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(root / name))
    accelerator.wait_for_everyone()
    return name


def load_model_state(
    prepared: nn.Module, model: nn.Module, state: dict[str, torch.Tensor], path: Path, sharded: bool
) -> None:
    """Load a full state dict into the model on every rank (`sharded`, FSDP: each rank keeps its shard)."""
    if sharded:
        set_model_state_dict(prepared, state, options=StateDictOptions(full_state_dict=True))
        return
    from todsynth.generator.mmdit import load_state_strict

    load_state_strict(model, state, path)


def save_snapshot(root: Path, step: int, state: dict[str, torch.Tensor], config: dict, limit: int) -> None:
    """Model-only weights of `step` in root/step_<step>/ (config.json + model.safetensors); keeps the newest `limit`."""
    from todsynth.generator.mmdit import CONFIG_NAME, WEIGHTS_NAME
    from todsynth.io import save_weights, write_json

    folder = root / f"step_{step:07d}"
    save_weights(folder / WEIGHTS_NAME, {k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})
    write_json(folder / CONFIG_NAME, config)
    if limit > 0:
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-limit]:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def ema_weights(params: list[nn.Parameter], ema) -> Iterator[None]:
    """Context: EMA weights in the live (possibly sharded) parameters, restored on exit; no-op without EMA."""
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        yield
    finally:
        if ema is not None:
            ema.restore(params)
