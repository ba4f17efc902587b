"""LoRA on chosen streams of the MM-DiT through peft (base weights frozen, adapters trained)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

LORA_LAYERS = ("qkv", "out", "mlp.0", "mlp.2", "ada", "qkv2", "out2")  # joint + SD3.5 dual attention, MLP, adaLN


def lora_target_regex(streams: Sequence[str]) -> str:
    """peft target_modules regex (matched in full) for every linear of the given streams' blocks."""
    layers = "|".join(s.replace(".", r"\.") for s in LORA_LAYERS)
    return rf"blocks\.\d+\.({'|'.join(streams)})\.({layers})"


def add_lora(model: nn.Module, rank: int, streams: Sequence[str], alpha: float | None = None) -> nn.Module:
    """Inject LoRA adapters (in place) into `streams`; only adapter weights stay trainable."""
    from peft import LoraConfig, inject_adapter_in_model

    if not streams:
        raise ValueError("LoRA needs at least one trained stream")
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, target_modules=lora_target_regex(streams), init_lora_weights=True
    )
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, model)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model
