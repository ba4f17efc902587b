"""Batch sampling helpers on top of MaskToImagePipeline (grids for `todsynth generator sample`)."""

from __future__ import annotations

from pathlib import Path

import torch

from todsynth.generator.pipeline import MaskToImagePipeline, sample_seeds


def load_masks(path: str | Path, split: str, size: int, n: int | None = None):
    """Label maps [N, size, size], prompts and ids of a dataset (label-only layouts welcome)."""
    from todsynth.generator.train import load_train_data

    data, classes = load_train_data(str(path), split, size, images=False)
    end = len(data.ids) if n is None else min(n, len(data.ids))
    return data.labels[:end], data.prompts[:end], data.ids[:end], classes


def sample_batched(pipe: MaskToImagePipeline, labels: torch.Tensor, prompts: list[str], ids: list[str],
                   seed: int = 0, copy: int = 0, batch_size: int = 8, **kw) -> torch.Tensor:
    """Images for all labels, batch by batch; seeds from (seed, id, copy) so batching changes nothing."""
    seeds = sample_seeds(seed, ids, copy)
    out = []
    for s in range(0, len(ids), batch_size):
        sl = slice(s, s + batch_size)
        out.append(pipe(labels[sl], prompts[sl], seeds=seeds[sl], **kw))
    return torch.cat(out)


def sample_grid(model: str | Path, masks: str | Path, out: str | Path, split: str = "Train", n: int = 8,
                steps: int = 20, guidance: float = 1.0, shift: float = 1.0, seed: int = 0,
                batch_size: int = 8) -> Path:
    """Sample n masks of a dataset and write out/samples.png (mask | generated per row)."""
    from todsynth.viz import save_mask_image_grid

    pipe = MaskToImagePipeline.from_pretrained(model)
    labels, prompts, ids, _ = load_masks(masks, split, pipe.image_size, n)
    images = sample_batched(pipe, labels, prompts, ids, seed=seed, batch_size=batch_size, num_steps=steps,
                            guidance_scale=guidance, shift=shift)
    path = Path(out) / "samples.png"
    save_mask_image_grid(path, labels, images, pipe.classes)
    return path
