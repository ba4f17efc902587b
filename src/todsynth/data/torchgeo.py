"""torchgeo interop: a torchgeo-style dataset as todsynth `Sample`s, for segmenter training and synthesis.

torchgeo datasets (e.g. `torchgeo.datasets.LoveDA`) return items `{"image": float CxHxW in 0..255, "mask": long
HxW}`, often with mask value 0 meaning no-data and classes from 1. `TorchGeoSamples` turns each item into a
`Sample` (HxWx3 uint8 image, HxW int64 label with no-data as the ignore index and the classes shifted to 0..C-1),
so it goes straight into `todsynth.segment.train.train_on_samples`; `mask_batch` gives the label maps and prompts
a generator pipeline or `crfm_sample` takes, and `write_folder` saves any samples as a folder dataset every
command and the experiment runner read. torchgeo itself is never imported here: any map-style dataset with such
items works, and torchgeo stays an optional extra (`pip install todsynth[torchgeo]`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from todsynth.data.classes import ClassSpec
from todsynth.data.prompts import PromptFn, build_prompt
from todsynth.data.sample import Sample
from todsynth.errors import ConfigError, DataError

KEYS_FIX = "pass image_key= / mask_key= naming the item's keys"


def _array(value: Any) -> np.ndarray:
    """A torch tensor or array-like as a numpy array (on the CPU)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


class TorchGeoSamples(Sequence[Sample]):
    """A map-style dataset of `{"image": CxHxW, "mask": HxW}` items as todsynth `Sample`s.

    Mask value `no_data` (default 0, torchgeo's LoveDA convention) becomes the ignore index; other values v
    become class v - `shift` (default 1 when no_data is 0, else 0). `bands` picks 1 or 3 of the image's channels
    (0-based, default: the image must have 1 or 3); `image_max` is the value that maps to 255 (values outside
    0..image_max are refused). Items without an image are label-only samples when `label_only` is set.
    """

    def __init__(
        self,
        dataset: Any,
        classes: ClassSpec | Sequence[str],
        *,
        no_data: int | None = 0,
        shift: int | None = None,
        bands: Sequence[int] | None = None,
        image_max: float = 255.0,
        image_key: str = "image",
        mask_key: str = "mask",
        ids: Sequence[str] | None = None,
        prompt_fn: PromptFn | None = None,
        label_only: bool = False,
        name: str | None = None,
    ):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ConfigError(
                f"expected a map-style dataset (with __getitem__ and __len__), got {type(dataset).__name__}",
                fix="pass e.g. torchgeo.datasets.LoveDA(root, split='train')",
            )
        self.classes = classes if isinstance(classes, ClassSpec) else ClassSpec(tuple(classes))
        if not (np.isfinite(image_max) and image_max > 0):
            raise ConfigError(f"image_max must be a finite number > 0, got {image_max!r}")
        if bands is not None and (len(bands) not in (1, 3) or any(int(b) < 0 for b in bands)):
            raise ConfigError(
                f"bands must list 1 or 3 channel indices (0-based), got {list(bands)}",
                fix="e.g. bands=(2, 1, 0) for the RGB of a BGR-ordered image",
            )
        self.dataset = dataset
        self.no_data = no_data
        self.shift = (1 if no_data == 0 else 0) if shift is None else int(shift)
        self.bands = None if bands is None else [int(b) for b in bands]
        self.image_max = float(image_max)
        self.image_key, self.mask_key = image_key, mask_key
        self.prompt_fn = prompt_fn
        self.label_only = label_only
        self.name = name or type(dataset).__name__
        self.root = getattr(dataset, "root", None)
        n = len(dataset)
        self.ids = [f"{i:05d}" for i in range(n)] if ids is None else [str(i) for i in ids]
        if len(self.ids) != n or len(set(self.ids)) != n:
            raise ConfigError(
                f"ids must give {n} distinct names (one per item), got {len(self.ids)} ({len(set(self.ids))} distinct)"
            )

    def __len__(self) -> int:
        return len(self.dataset)

    @overload
    def __getitem__(self, i: int) -> Sample: ...

    @overload
    def __getitem__(self, i: slice) -> list[Sample]: ...

    def __getitem__(self, i: int | slice) -> Sample | list[Sample]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        item = self.dataset[i]
        where = f"item {i} of {self.name}"
        if not isinstance(item, Mapping):
            raise DataError(
                f"{where} is a {type(item).__name__}, not a mapping of 'image' and 'mask'",
                path=self.root,
                fix="use a torchgeo-style dataset returning dicts",
            )
        if self.mask_key not in item:
            raise DataError(
                f"{where} has no {self.mask_key!r} (keys: {sorted(map(str, item))})",
                path=self.root,
                fix=f"{KEYS_FIX}; torchgeo test splits carry no masks: use train or val",
            )
        label = self._label(item[self.mask_key], where)
        image = None
        if self.image_key in item:
            image = self._image(item[self.image_key], where)
            if image.shape[:2] != label.shape:
                raise DataError(
                    f"{where}: image is {image.shape[0]}x{image.shape[1]} but the mask is "
                    f"{label.shape[0]}x{label.shape[1]}",
                    path=self.root,
                    fix="apply the same resize/crop to image and mask",
                )
        elif not self.label_only:
            raise DataError(
                f"{where} has no {self.image_key!r} (keys: {sorted(map(str, item))})",
                path=self.root,
                fix=f"{KEYS_FIX}, or label_only=True to use its masks only",
            )
        prompt = self.prompt_fn(label, self.classes) if self.prompt_fn else build_prompt(label, self.classes)
        return Sample(image=image, label=label, prompt=prompt, id=self.ids[i])

    def _label(self, value: Any, where: str) -> np.ndarray:
        """HxW int64 labels of a mask: no_data to the ignore index, other values shifted; others refused."""
        raw = _array(value)
        if raw.ndim == 3 and raw.shape[0] == 1:
            raw = raw[0]
        if raw.ndim != 2 or raw.dtype.kind not in "iub":
            raise DataError(
                f"{where}: mask is {raw.dtype} of shape {list(raw.shape)}; expected integer HxW class values",
                path=self.root,
                fix="pass the dataset's label masks (long HxW)",
            )
        raw = raw.astype(np.int64)
        ignore = raw == self.no_data if self.no_data is not None else np.zeros(raw.shape, bool)
        label = raw - self.shift
        bad = (~ignore) & ((label < 0) | (label >= self.classes.num_classes))
        if bad.any():
            values = np.unique(raw[bad])[:8].tolist()
            raise DataError(
                f"{where}: mask values {values} are not classes (no_data={self.no_data}, "
                f"shift={self.shift}: values {self.shift}..{self.shift + self.classes.num_classes - 1} "
                f"are the {self.classes.num_classes} classes)",
                path=self.root,
                fix="set no_data (None if every value is a class) and shift to match the dataset",
            )
        label[ignore] = self.classes.ignore_index
        return label

    def _image(self, value: Any, where: str) -> np.ndarray:
        """HxWx3 uint8 of a CxHxW (or HxW) image in 0..image_max."""
        x = _array(value)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3:
            raise DataError(
                f"{where}: image has shape {list(x.shape)}; expected CxHxW",
                path=self.root,
                fix="pass channel-first images (torchgeo's layout)",
            )
        if self.bands is not None:
            if max(self.bands) >= x.shape[0]:
                raise DataError(
                    f"{where}: bands {self.bands} but the image has {x.shape[0]} channel(s)",
                    path=self.root,
                    fix=f"pick channels 0..{x.shape[0] - 1}",
                )
            x = x[self.bands]
        if x.shape[0] not in (1, 3):
            raise DataError(
                f"{where}: image has {x.shape[0]} channels; the models take RGB (3) or grey (1)",
                path=self.root,
                fix="pass bands=(r, g, b) with 0-based channel indices",
            )
        x = x.astype(np.float64)
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > self.image_max:
            low, high = float(np.nanmin(x)), float(np.nanmax(x))
            raise DataError(
                f"{where}: image values span {low:g}..{high:g} (NaN: {bool(np.isnan(x).any())}), "
                f"outside 0..image_max = {self.image_max:g}",
                path=self.root,
                fix="pass image_max= the data's full-scale value (1.0 for 0-1 floats, e.g. 10000 for "
                "Sentinel-2 reflectance), or fill NaN first",
            )
        rgb = np.rint(x / self.image_max * 255.0).astype(np.uint8)
        return np.ascontiguousarray(
            np.repeat(rgb, 3, axis=0).transpose(1, 2, 0) if rgb.shape[0] == 1 else rgb.transpose(1, 2, 0)
        )


def mask_batch(samples: Sequence[Sample], size: int, indices: Sequence[int] | None = None):
    """(labels LongTensor NxSxS resized by nearest neighbour, prompts, ids) of samples: what a
    `MaskToImagePipeline` or `crfm_sample` is conditioned on."""
    import torch

    from todsynth.data.torchdata import resize_label

    if size < 1:
        raise ConfigError(f"size must be >= 1, got {size}")
    chosen = [samples[i] for i in (range(len(samples)) if indices is None else indices)]
    if not chosen:
        raise DataError("no masks to condition on", fix="pass a non-empty dataset or index list")
    labels = torch.stack([resize_label(torch.from_numpy(np.ascontiguousarray(s.label)), size) for s in chosen])
    return labels, [s.prompt for s in chosen], [s.id for s in chosen]


def write_folder(samples: Sequence[Sample], out: str | Path, classes: ClassSpec | None = None) -> Path:
    """Save samples as a folder dataset (images/, masks/ as PNG, classes.yaml); label-only samples write masks
    only. Every command (`synthesize`, `segment train`, `experiment` real_data/layouts_data) reads it."""
    import yaml
    from PIL import Image

    from todsynth.io import atomic_path, write_text

    classes = classes or getattr(samples, "classes", None)
    if classes is None:
        raise ConfigError("the samples carry no classes", fix="pass classes=ClassSpec(...)")
    if classes.ignore_index > 255 or classes.num_classes > 255:
        raise ConfigError(
            f"{classes.num_classes} classes with ignore index {classes.ignore_index} do not fit 8-bit PNG masks",
            fix="use at most 255 classes and an ignore index <= 255",
        )
    out = Path(out)
    if out.exists():
        raise DataError("the output folder already exists", path=out, fix="choose a new folder")
    partial = out.with_name(out.name + ".partial")  # written whole, then renamed: never a half dataset
    if partial.exists():
        shutil.rmtree(partial)
    for k in range(len(samples)):
        s = samples[k]
        name = f"{s.id.replace('/', '_')}.png"
        if s.image is not None:
            with atomic_path(partial / "images" / name) as tmp:
                Image.fromarray(s.image).save(tmp, format="PNG")
        with atomic_path(partial / "masks" / name) as tmp:
            Image.fromarray(s.label.astype(np.uint8)).save(tmp, format="PNG")
    write_text(partial / "classes.yaml", yaml.safe_dump(classes.to_dict(), sort_keys=False))
    partial.rename(out)
    return out
