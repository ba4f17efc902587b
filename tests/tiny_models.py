"""Tiny generators saved for tests: random weights, pixel space, 16 px, the bundled MiniLM text encoder."""

from __future__ import annotations

from pathlib import Path

# CLI options of a one-step 16-px segmenter / generator run (the CLI tests' smallest real runs)
TINY_SEG = ["--arch", "segformer", "--encoder", "tu-mobilenetv3_small_050", "--size", "16", "--steps", "1"]
TINY_SEG += ["--batch-size", "2", "--device", "cpu"]
TINY_GEN = ["--steps", "1", "--batch-size", "2", "--size", "16", "--set", "model.num_layers=1"]
TINY_GEN += ["--set", "model.num_heads=2", "--set", "model.head_dim=8", "--set", "val_every=0"]
TINY_GEN += ["--set", "text_max_length=8", "--set", "progress=false"]


def save_tiny_generator(path: Path, classes, num_layers: int = 2, head_dim: int = 16, jitter: float = 0.0) -> Path:
    """Build and save a 16-px MaskToImagePipeline for `classes`; `jitter` adds noise so outputs are not trivial."""
    import torch

    from todsynth.generator.autoencoder import PixelAutoencoder
    from todsynth.generator.mmdit import MaskControlMMDiT, MMDiTConfig
    from todsynth.generator.pipeline import MaskToImagePipeline
    from todsynth.generator.text import MiniLMTextEncoder

    torch.manual_seed(0)
    text = MiniLMTextEncoder(max_length=8)
    model = MaskControlMMDiT(
        MMDiTConfig(
            in_channels=3,
            patch_size=2,
            sample_size=16,
            pos_embed_max_size=16,
            num_layers=num_layers,
            num_heads=2,
            head_dim=head_dim,
            joint_attention_dim=text.token_dim,
            pooled_projection_dim=text.pooled_dim,
            num_classes=classes.num_classes,
            ignore_index=classes.ignore_index,
        )
    )
    if jitter:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * jitter)
    MaskToImagePipeline(model, PixelAutoencoder(), text, classes, image_size=16).save_pretrained(path)
    return path
