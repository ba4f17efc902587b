"""Batch sampling helpers on top of MaskToImagePipeline (grids for `todsynth generator sample`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from todsynth.data.classes import ClassSpec
from todsynth.errors import ConfigError, DataError
from todsynth.generator.pipeline import MaskToImagePipeline, sample_seeds


def load_masks(
    path: str | Path,
    split: str,
    size: int,
    n: int | None = None,
    split_file: str | Path | None = None,
    crop: str = "resize",
):
    """Label maps [N, size, size] (by `crop`: resize of the short side or center crop, never distorted), prompts
    and ids of a dataset (label-only layouts welcome); with `split_file`, only its ids, all in the dataset."""
    from todsynth.generator.train import load_train_data

    data, classes = load_train_data(
        str(path), split, size, split_file=None if split_file is None else str(split_file), images=False, crop=crop
    )
    end = len(data.ids) if n is None else min(n, len(data.ids))
    return data.labels[:end], data.prompts[:end], data.ids[:end], classes


def check_mask_classes(masks: ClassSpec, generator: ClassSpec, path: str | Path) -> None:
    """Raise DataError unless the masks use the generator's classes (names and ignore index)."""
    from todsynth.data.classes import class_difference

    if tuple(masks.names) != tuple(generator.names) or masks.ignore_index != generator.ignore_index:
        raise DataError(
            f"mask classes {class_difference(masks.names, generator.names)} (ignore "
            f"{masks.ignore_index}) differ from the generator's "
            f"{class_difference(generator.names, masks.names)} (ignore {generator.ignore_index})",
            path=path,
            fix="use masks labelled with the classes the generator was trained on",
        )


def check_sample_settings(n: int, num_steps: int, guidance_scale: float, shift: float, batch_size: int) -> None:
    """Raise ConfigError for settings that cannot sample: counts below 1, non-finite guidance scale or shift."""
    for name, value in (("n", n), ("num_steps", num_steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}", fix=f"set {name} to 1 or more")
    if not math.isfinite(guidance_scale):
        raise ConfigError(
            f"guidance_scale must be a finite number, got {guidance_scale!r}", fix="set guidance_scale, e.g. 1.0"
        )
    if not (math.isfinite(shift) and shift > 0):
        raise ConfigError(f"shift must be a finite number > 0, got {shift!r}", fix="set shift, e.g. 1.0 or 3.0")


def sample_batched(
    pipe: MaskToImagePipeline,
    labels: torch.Tensor,
    prompts: list[str],
    ids: list[str],
    seed: int = 0,
    copy: int = 0,
    batch_size: int = 8,
    **kw,
) -> torch.Tensor:
    """Images for all labels, batch by batch; seeds from (seed, id, copy) so batching changes nothing."""
    seeds = sample_seeds(seed, ids, copy)
    out = []
    for s in range(0, len(ids), batch_size):
        sl = slice(s, s + batch_size)
        out.append(pipe(labels[sl], prompts[sl], seeds=seeds[sl], **kw))
    return torch.cat(out)


def sample_grid(
    model: str | Path,
    masks: str | Path,
    out: str | Path,
    split: str = "Train",
    n: int = 8,
    num_steps: int = 20,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    mixed_precision: str = "no",
) -> Path:
    """Sample n masks of a dataset and write out/samples.png (mask | generated per row); settings, the output
    folder (outside the masks and the model) and the masks' classes are checked before anything is written.
    Runs on accelerate's device (or `device`) in `mixed_precision`; prompts (and "") are encoded once into
    out/prompt_cache.safetensors."""
    from todsynth.generator.runtime import resolve_runtime
    from todsynth.synthesize import check_output_folder
    from todsynth.viz import save_mask_image_grid

    check_sample_settings(n, num_steps, guidance_scale, shift, batch_size)
    check_output_folder(out, {"masks dataset": masks, "generator folder": model})
    runtime = resolve_runtime(device, mixed_precision)
    pipe = MaskToImagePipeline.for_runtime(model, runtime)
    labels, prompts, ids, classes = load_masks(masks, split, pipe.image_size, n)
    check_mask_classes(classes, pipe.classes, masks)
    pipe.use_prompt_cache(Path(out) / "prompt_cache.safetensors", prompts)
    images = sample_batched(
        pipe,
        labels,
        prompts,
        ids,
        seed=seed,
        batch_size=batch_size,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        shift=shift,
    )
    path = Path(out) / "samples.png"
    save_mask_image_grid(path, labels, images, pipe.classes, normalisation=pipe.normalisation)
    return path
