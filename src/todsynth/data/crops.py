"""Working-size views of a sample: a random or center crop, or a resize that never distorts the aspect ratio.

Training takes `random` crops by default: remote-sensing scenes and tiles are often larger than the working
size, and a crop keeps the ground sampling distance (a resize changes the scale of every object). A crop of
a sample already at the working size is the sample itself (no pixel changes, no RNG draws), so datasets
tiled to the working size train exactly as before. Samples smaller than the working size are refused in
`random` and `center` mode (never padded or upscaled behind the user's back); `resize` scales the short side
to the working size (bilinear image, nearest labels) and center-crops the long side, so a non-square image
keeps its aspect ratio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar, get_args

import numpy as np
import torch
import torch.nn.functional as F

from todsynth.errors import ConfigError, DataError

CropMode = Literal["random", "center", "resize"]
CROP_MODES: tuple[str, ...] = get_args(CropMode)
TRAIN_CROP = "random"  # the training default: keeps the ground sampling distance of every scene
CROP_STREAM = 0x63726F70  # 'crop': keeps crop draws apart from every other seeded stream
ImageOrNone = TypeVar("ImageOrNone", torch.Tensor, None)  # an image goes with its label; label-only data has none
SMALL_FIX = "use crop: resize (scales the short side to the working size), a smaller size, or remove the sample"


def check_crop_mode(mode: str, allowed: tuple[str, ...] = CROP_MODES) -> None:
    """Raise ConfigError unless `mode` is one of `allowed`."""
    if mode not in allowed:
        raise ConfigError(
            f"crop must be one of {list(allowed)}, got {mode!r}",
            fix="random (training default), center, or resize (short side to size, no distortion)",
        )


def crop_rng(seed: int, *key: int) -> np.random.Generator:
    """The RNG of one random crop, a pure function of (seed, *key): same in any worker or process layout."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(int(k) for k in key), CROP_STREAM])


def crop_offsets(h: int, w: int, size: int, mode: str, rng: np.random.Generator | None = None) -> tuple[int, int]:
    """Top-left corner of a size x size window in an h x w sample: uniform (`random`) or centred."""
    if mode == "random" and (h > size or w > size):
        if rng is None:
            raise ValueError("a random crop needs an rng")
        return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    return (h - size) // 2, (w - size) // 2


def _resize_short_side(image: ImageOrNone, label: torch.Tensor, size: int) -> tuple[ImageOrNone, torch.Tensor]:
    """Scale so the short side is `size` (bilinear image, nearest labels); the aspect ratio is kept."""
    h, w = label.shape[-2:]
    scale = size / min(h, w)
    hw = (size, max(size, round(w * scale))) if h <= w else (max(size, round(h * scale)), size)
    if (h, w) == hw:
        return image, label.long()
    if image is not None:
        image = F.interpolate(image[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0].clamp_(
            0.0, 1.0
        )
    label = F.interpolate(label[None, None].float(), size=hw, mode="nearest-exact")[0, 0].long()
    return image, label


def fit_pair(
    image: ImageOrNone,
    label: torch.Tensor,
    size: int,
    mode: str,
    rng: np.random.Generator | None = None,
    name: str = "sample",
    path: str | Path | None = None,
) -> tuple[ImageOrNone, torch.Tensor]:
    """A 3xHxW float image (or None) and its HxW label map brought to size x size by `mode` (see the module).

    `name` and `path` identify the sample in the error for one smaller than `size` in crop mode.
    """
    check_crop_mode(mode)
    h, w = label.shape[-2:]
    if mode == "resize":
        image, label = _resize_short_side(image, label, size)
        h, w = label.shape[-2:]
    elif h < size or w < size:
        raise DataError(
            f"{name} is {h}x{w}, smaller than the working size {size} (crop: {mode})", path=path, fix=SMALL_FIX
        )
    y, x = crop_offsets(h, w, size, mode, rng)
    if (h, w) != (size, size):
        label = label[..., y : y + size, x : x + size]
        image = None if image is None else image[..., y : y + size, x : x + size]
    return image, label.long()
