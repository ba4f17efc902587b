"""Memory presets: the estimator counts what the real model holds; the LoRA preset trains the right layers."""

from __future__ import annotations

import pytest
import torch

from todsynth.config import build_config
from todsynth.errors import ConfigError
from todsynth.generator.memory import (
    count_parameters,
    estimate,
    prepared_model,
    saved_activation_bytes,
    sd35_medium_config,
)
from todsynth.generator.mmdit import MaskControlMMDiT
from todsynth.generator.presets import PRESETS, apply_preset, cast_frozen, make_optimizer
from todsynth.generator.train import GeneratorTrainConfig, apply_freezing


def small_sd35(**kw):
    """SD3.5-medium's structure (dual attention in the first layers, q/k norm, RGB mask latent) at a CPU size."""
    return sd35_medium_config(
        num_layers=3,
        num_heads=2,
        head_dim=16,
        joint_attention_dim=40,
        pooled_projection_dim=24,
        dual_attention_layers=(0, 1),
        **kw,
    )


def preset_config(preset: str, **kw) -> GeneratorTrainConfig:
    return apply_preset(GeneratorTrainConfig(data="-", preset=preset, **kw))


def real_model(preset: str) -> MaskControlMMDiT:
    """The model `train_generator` would train under `preset`, built for real."""
    cfg = preset_config(preset)
    model = MaskControlMMDiT(small_sd35())
    apply_freezing(model, cfg)
    cast_frozen(model, cfg.frozen_dtype)
    return model


@pytest.mark.parametrize("preset", list(PRESETS))
def test_meta_counts_equal_the_built_model(preset):
    """Parameters, trainable parameters and frozen bytes of the meta build equal the real build's."""
    real = real_model(preset)
    meta = prepared_model(small_sd35(), preset_config(preset))
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    counts = count_parameters(meta)
    assert counts.total == sum(p.numel() for p in real.parameters())
    assert counts.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert counts.frozen_bytes == sum(p.numel() * p.element_size() for p in real.parameters() if not p.requires_grad)
    est = estimate(preset, image_size=64, mcfg=small_sd35(), text_tokens=8)
    assert est.trainable_parameters == counts.trainable
    assert est.gradients * 2**30 == 4 * counts.trainable
    assert est.activations > 0


def test_sd35_medium_size_matches_the_issue():
    """The full triple model: 3.45 B parameters, 2.45 B trainable with the text stream frozen."""
    counts = count_parameters(prepared_model(sd35_medium_config(), preset_config("full-80gb")))
    assert round(counts.total / 1e9, 2) == 3.45 and round(counts.trainable / 1e9, 2) == 2.45


def test_lora_preset_trains_mask_embed_and_adapts_dual_attention_and_adaln():
    model = real_model("lora-24gb")
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"mask_embed.weight", "mask_embed.bias"} <= trained
    for stream in ("image", "mask"):
        for layer in ("qkv", "out", "mlp.0", "mlp.2", "ada", "qkv2", "out2"):
            assert f"blocks.0.{stream}.{layer}.lora_A.default.weight" in trained, (stream, layer)
    assert not any(".text." in n for n in trained)
    assert all(n.startswith("mask_embed.") or ".lora_" in n for n in trained)
    assert {p.dtype for n, p in model.named_parameters() if n not in trained} == {torch.bfloat16}


def test_checkpointing_keeps_less_and_activations_grow_with_tokens():
    """Saved-tensor bytes grow with the token count; checkpointing lowers the estimated activations."""
    block = MaskControlMMDiT(small_sd35()).blocks[0]
    d = block.image.qkv.in_features

    def saved(n: int) -> int:
        x = [torch.randn(1, k, d, requires_grad=True) for k in (4, n, n)]
        return saved_activation_bytes(block, *x, torch.randn(1, d, requires_grad=True))

    assert saved(64) > saved(16) > 0
    full = estimate("full-80gb", image_size=128, mcfg=small_sd35(), text_tokens=8)
    plain = estimate("full-80gb", image_size=128, mcfg=small_sd35(), text_tokens=8)
    assert full.activations == plain.activations  # deterministic measurement
    no_ckpt = estimate_without_checkpointing(128)
    assert no_ckpt > full.activations


def estimate_without_checkpointing(size: int) -> float:
    from todsynth.generator import presets

    saved = presets.PRESETS["full-80gb"]
    presets.PRESETS["full-80gb"] = {**saved, "gradient_checkpointing": False}
    try:
        return estimate("full-80gb", image_size=size, mcfg=small_sd35(), text_tokens=8).activations
    finally:
        presets.PRESETS["full-80gb"] = saved


def test_presets_apply_in_one_place_and_explicit_settings_win():
    cfg = preset_config("lowmem-48gb")
    assert (cfg.mixed_precision, cfg.gradient_checkpointing, cfg.optimizer, cfg.frozen_dtype) == (
        "bf16",
        True,
        "adamw8bit",
        "bf16",
    )
    assert preset_config("lowmem-48gb", optimizer="paged_adamw8bit").optimizer == "paged_adamw8bit"
    with pytest.raises(ConfigError, match="preset"):
        build_config(GeneratorTrainConfig, {"data": "d", "preset": "huge"})
    with pytest.raises(ConfigError, match="mixed_precision=bf16"):
        GeneratorTrainConfig(data="d", frozen_dtype="bf16").validate()


def test_8bit_adamw_without_bitsandbytes_names_the_fix():
    try:
        import bitsandbytes  # noqa: F401

        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="bitsandbytes") as info:
        make_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(2))], 1e-4, 0.0)
    assert "pip install bitsandbytes" in str(info.value) and "optimizer=adamw" in str(info.value)
