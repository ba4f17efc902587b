"""Peak GPU memory of fine-tuning the SD3.5-medium triple model, per memory preset, estimated without a GPU.

Method: the model is built on the meta device (`build_on_meta`: real shapes, no memory) with the preset's
freezing/LoRA applied, and its parameters counted: weights (fp32, frozen ones in bf16 where the preset says so),
fp32 gradients of the trainable ones, optimizer state (AdamW: 8 bytes per trainable parameter, 8-bit: 2),
bf16 casts of the trainable weights that autocast keeps for a step (2 bytes each), EMA (4 bytes each).
Activations are measured, not modelled: one block of each kind (single/dual attention, last) is built at full
width on the CPU, run under bf16 autocast with saved-tensor hooks counting the bytes autograd keeps (each
storage once), at three small token counts; a linear fit in text and image tokens (attention through the fused
kernel, linear in tokens) is scaled to the real token counts. With gradient checkpointing only the block inputs
stay per block, plus one block's activations while it is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from todsynth.generator.mmdit import MaskControlMMDiT, MMDiTConfig

GIB = 2**30
SD35_TEXT_TOKENS = 333  # CLIP-L/G 77 + T5 256


def sd35_medium_config(**overrides) -> MMDiTConfig:
    """The SD3.5-medium transformer (diffusers config) with a triple mask stream on its VAE latent."""
    values = dict(
        in_channels=16,
        patch_size=2,
        sample_size=128,
        pos_embed_max_size=384,
        num_layers=24,
        num_heads=24,
        head_dim=64,
        joint_attention_dim=4096,
        pooled_projection_dim=2048,
        qk_norm=True,
        dual_attention_layers=tuple(range(13)),
        control="triple",
        mask_encoding="rgb",
        mask_downscale=8,
        mask_channels=16,
    )
    values.update(overrides)
    return MMDiTConfig(**values)


@dataclass
class ParameterCounts:
    """Parameters of a built model under a training setup: all, trainable, and frozen bytes as stored."""

    total: int
    trainable: int
    frozen_bytes: int


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Count (meta or real) parameters: total, trainable, and the bytes the frozen ones take in their dtype."""
    params = list(model.parameters())
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    return ParameterCounts(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), frozen)


def prepared_model(mcfg: MMDiTConfig, train_cfg, device: str = "meta") -> nn.Module:
    """The transformer as `train_generator` sets it up for `train_cfg` (freezing, LoRA, frozen dtype)."""
    from todsynth.checkpoint import build_on_meta
    from todsynth.generator.presets import cast_frozen
    from todsynth.generator.train import apply_freezing

    def build() -> nn.Module:
        model = MaskControlMMDiT(mcfg)
        apply_freezing(model, train_cfg)
        cast_frozen(model, train_cfg.frozen_dtype)
        return model

    return build_on_meta(build) if device == "meta" else build()


def saved_activation_bytes(module: nn.Module, *args: torch.Tensor) -> int:
    """Bytes of the tensors autograd saves for backward in `module(*args)` under bf16 autocast (each storage once;
    the parameters themselves excluded)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        module(*args)
    return sum(seen.values())


def block_activation_fit(mcfg: MMDiTConfig, train_cfg, dual: bool, last: bool) -> tuple[float, float]:
    """Activation bytes of one block ≈ b·text_tokens + c·image_tokens (as many mask tokens), measured at full width.

    The constant part of the fit (bf16 weight casts autocast keeps) is left out: `autocast_copies` counts it."""
    from todsynth.generator import mmdit

    cfg2 = replace(mcfg, num_layers=2, dual_attention_layers=(0, 1) if dual else ())
    block = prepared_model(cfg2, train_cfg, device="cpu").blocks[1 if last else 0]
    d = mcfg.hidden_size
    sizes, values = ((8, 16), (8, 64), (32, 16)), []
    limit, mmdit.MATMUL_ATTENTION_MAX = mmdit.MATMUL_ATTENTION_MAX, 0  # the fused kernel, as on a GPU
    try:
        for lt, ni in sizes:
            txt = torch.randn(1, lt, d, requires_grad=True)
            img, msk = torch.randn(1, ni, d, requires_grad=True), torch.randn(1, ni, d, requires_grad=True)
            values.append(saved_activation_bytes(block, txt, img, msk, torch.randn(1, d, requires_grad=True)))
    finally:
        mmdit.MATMUL_ATTENTION_MAX = limit
    per_image = (values[1] - values[0]) / (sizes[1][1] - sizes[0][1])
    per_text = (values[2] - values[0]) / (sizes[2][0] - sizes[0][0])
    return per_text, per_image


@dataclass
class MemoryEstimate:
    """Estimated peak GiB of one training process, by part."""

    preset: str
    total_parameters: int
    trainable_parameters: int
    weights: float
    gradients: float
    optimizer: float
    autocast_copies: float
    ema: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.autocast_copies + self.ema + self.activations


OPTIMIZER_BYTES = {"adamw": 8, "adamw_fused": 8, "adamw8bit": 2, "paged_adamw8bit": 2}


def estimate(
    preset: str,
    image_size: int = 512,
    batch_size: int = 1,
    mcfg: MMDiTConfig | None = None,
    text_tokens: int = SD35_TEXT_TOKENS,
    fits: dict | None = None,
) -> MemoryEstimate:
    """Estimate one process's peak memory for fine-tuning `mcfg` (default SD3.5-medium triple) under `preset`."""
    from todsynth.generator.presets import apply_preset
    from todsynth.generator.train import GeneratorTrainConfig

    mcfg = mcfg or sd35_medium_config()
    train_cfg = apply_preset(GeneratorTrainConfig(data="-", preset=preset))
    counts = count_parameters(prepared_model(mcfg, train_cfg))
    n = counts.trainable
    weights = counts.frozen_bytes + 4 * n
    image_tokens = (image_size // mcfg.mask_downscale // mcfg.patch_size) ** 2
    fits = {} if fits is None else fits  # one measurement per kind of block
    per_block = []
    for i in range(mcfg.num_layers):
        kind = (i in mcfg.dual_attention_layers, i == mcfg.num_layers - 1)
        if kind not in fits:
            fits[kind] = block_activation_fit(mcfg, train_cfg, *kind)
        per_text, per_image = fits[kind]
        per_block.append((per_text * text_tokens + per_image * image_tokens) * batch_size)
    if train_cfg.gradient_checkpointing:  # block inputs (bf16 text, image, mask tokens) + one block recomputed
        inputs = 2 * mcfg.hidden_size * (text_tokens + 2 * image_tokens) * batch_size
        activations = inputs * mcfg.num_layers + max(per_block)
    else:
        activations = sum(per_block)
    ema = 4 * n if train_cfg.ema_decay > 0 else 0
    return MemoryEstimate(
        preset,
        counts.total,
        n,
        weights / GIB,
        4 * n / GIB,
        OPTIMIZER_BYTES[train_cfg.optimizer] * n / GIB,
        2 * n / GIB if train_cfg.mixed_precision == "bf16" else 0.0,
        ema / GIB,
        activations / GIB,
    )


def table(image_size: int = 512, batch_size: int = 1) -> list[MemoryEstimate]:
    """Estimates of every preset (block activations measured once per preset)."""
    from todsynth.generator.presets import PRESETS

    return [estimate(name, image_size, batch_size) for name in PRESETS]
