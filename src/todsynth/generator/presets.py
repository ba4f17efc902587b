"""Memory presets for fine-tuning the full SD3.5-medium triple model, and the optimizers they name.

A preset is a set of training settings applied in one place (`apply_preset`); estimated peak memory per preset:
`todsynth.generator.memory` (README "Memory presets").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from todsynth.errors import ConfigError

MemoryPreset = Literal["full-80gb", "lowmem-48gb", "lora-24gb"]
Optimizer = Literal["adamw", "adamw_fused", "adamw8bit", "paged_adamw8bit"]
# every preset: bf16 autocast over fp32 master weights, gradient checkpointing
_BF16 = {"mixed_precision": "bf16", "gradient_checkpointing": True}
PRESETS: dict[MemoryPreset, dict[str, Any]] = {
    # full fine-tuning of image + mask streams, fused AdamW
    "full-80gb": {**_BF16, "optimizer": "adamw_fused", "lora_rank": 0},
    # as full-80gb with 8-bit AdamW (bitsandbytes), bf16 weights for the frozen text stream and no EMA
    "lowmem-48gb": {**_BF16, "optimizer": "adamw8bit", "frozen_dtype": "bf16", "ema_decay": 0.0, "lora_rank": 0},
    # LoRA on every linear of the image and mask streams (dual attention and adaLN included), mask_embed in
    # full, frozen base weights in bf16
    "lora-24gb": {
        **_BF16,
        "optimizer": "adamw_fused",
        "lora_rank": 64,
        "frozen_dtype": "bf16",
        "ema_decay": 0.0,
        "train_text": False,
    },
}


def apply_preset(cfg):
    """`cfg` with its preset's settings, except those given a non-default value (explicit settings win)."""
    if not cfg.preset:
        return cfg
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    changes = {k: v for k, v in PRESETS[cfg.preset].items() if getattr(cfg, k) == defaults[k]}
    return dataclasses.replace(cfg, **changes)


def make_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.999) as `name` (an `Optimizer`) says: torch's (fused: adamw_fused) or bitsandbytes' 8-bit/paged."""
    if name in ("adamw", "adamw_fused"):
        return torch.optim.AdamW(
            params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay, fused=True if name == "adamw_fused" else None
        )
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            f"optimizer {name} needs bitsandbytes, which is not installed",
            fix="pip install bitsandbytes (needs a CUDA GPU), or set optimizer=adamw",
        ) from None
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)


def cast_frozen(model: nn.Module, dtype: str) -> None:
    """Store the parameters that do not train in `dtype` (bf16 halves the frozen text stream's memory)."""
    if dtype == "bf16":
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
