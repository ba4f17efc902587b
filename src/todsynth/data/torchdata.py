"""Torch views of `Sample` sequences: tensors, resizing that keeps the ignore index, flips/rotations, mixing."""

from __future__ import annotations

from collections.abc import Sequence, Sized

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset, Subset

from todsynth.data.bands import Normalisation, image_tensor
from todsynth.data.sample import Sample
from todsynth.errors import DataError


class SegTorchDataset(Dataset):
    """Items `{"image": float32 CxHxW in [0,1], "label": int64 HxW}`, optionally brought to `size` and augmented.

    Images become tensors by `normalisation` (None: 8-bit RGB / 255), see `todsynth.data.bands.image_tensor`.
    `crop` (todsynth.data.crops) takes a random or center size x size window, or resizes the short side
    (bilinear image, nearest labels, so the ignore index survives) without distorting the aspect ratio.
    Random crops and augmentation (flips, 90 degree rotations) are pure functions of (seed, epoch, index).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        size: int | None = None,
        augment: bool = False,
        seed: int = 0,
        crop: str = "resize",
        normalisation: Normalisation | None = None,
    ):
        from todsynth.data.crops import check_crop_mode

        check_crop_mode(crop)
        if getattr(samples, "label_only", False):
            raise DataError(
                "this dataset has labels only (no images), so a segmenter cannot train on it",
                path=getattr(samples, "root", None),
                fix="use a dataset with images",
            )
        if size is not None and size <= 0:
            raise DataError(f"resize target must be positive, got {size}")
        self.samples = samples
        self.size = size
        self.crop = crop
        self.augment = augment
        self.seed = seed
        self.normalisation = normalisation
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw for this epoch."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        if sample.image is None:
            raise DataError(
                f"sample '{sample.id}' has no image (label-only data cannot train a segmenter)",
                fix="use a dataset with images",
            )
        image = image_tensor(sample.image, self.normalisation, sample.nodata, f"sample '{sample.id}'")
        label = torch.from_numpy(np.ascontiguousarray(sample.label)).long()
        if self.size is not None:
            from todsynth.data.crops import crop_rng, fit_pair

            rng = crop_rng(self.seed, self.epoch, index) if self.crop == "random" else None
            image, label = fit_pair(image, label, self.size, self.crop, rng, name=f"sample '{sample.id}'")
        if self.augment:
            image, label = self._augment(image, label, index)
        return {"image": image.contiguous(), "label": label.contiguous()}

    def _augment(self, image: torch.Tensor, label: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the (seed, epoch, index)-determined flip and rotation to image and label alike."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        square = image.shape[-1] == image.shape[-2]
        quarter_turns = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
        if rng.integers(2):
            image, label = image.flip(-1), label.flip(-1)
        if quarter_turns:
            image = torch.rot90(image, quarter_turns, dims=(-2, -1))
            label = torch.rot90(label, quarter_turns, dims=(-2, -1))
        return image, label


def resize_pair(image: torch.Tensor, label: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize a CxHxW image (bilinear) and HxW label (nearest, values untouched) to size x size."""
    if image.shape[-2:] == (size, size) and label.shape[-2:] == (size, size):
        return image, label
    image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[
        0
    ].clamp_(0.0, 1.0)
    return image, resize_label(label, size)


def resize_label(label: torch.Tensor, size: int) -> torch.Tensor:
    """Resize an HxW label map to size x size by nearest neighbour: values (and 255) stay untouched."""
    if label.shape[-2:] == (size, size):
        return label.long()
    return F.interpolate(label[None, None].float(), size=(size, size), mode="nearest-exact")[0, 0].long()


class MixedDataset(ConcatDataset):
    """Real and synthetic datasets concatenated; `set_epoch` reaches every part."""

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to every dataset inside (through Subsets)."""
        for ds in self.datasets:
            set_epoch(ds, epoch)


def set_epoch(dataset: Dataset, epoch: int) -> None:
    """Call `set_epoch` on a dataset, looking through Subset/ConcatDataset wrappers."""
    if isinstance(dataset, Subset):
        set_epoch(dataset.dataset, epoch)
    elif isinstance(dataset, ConcatDataset):
        for ds in dataset.datasets:
            set_epoch(ds, epoch)
    elif hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)


def synthetic_indices(n_real: int, n_synthetic: int, ratio: float | None, seed: int = 0) -> list[int]:
    """Indices of the synthetic samples to use: round(ratio * n_real) of them, a seeded sorted subsample."""
    if ratio is None:
        return list(range(n_synthetic))
    if not np.isfinite(ratio) or ratio < 0:
        raise DataError(f"synthetic ratio must be a finite number >= 0, got {ratio}")
    wanted = int(round(ratio * n_real))
    if wanted > n_synthetic:
        raise DataError(
            f"ratio {ratio} needs {wanted} synthetic samples for {n_real} real ones, but only {n_synthetic} exist",
            fix="lower the ratio or synthesize more samples",
        )
    chosen = np.random.default_rng(seed).permutation(n_synthetic)[:wanted]
    return sorted(int(i) for i in chosen)


def mix_real_synthetic(
    real: Dataset, synthetic: Dataset | None, ratio: float | None, repeat_real: int = 1, seed: int = 0
) -> MixedDataset:
    """Training mix: `real` repeated `repeat_real` times plus `ratio` synthetic samples per real one (None: all)."""
    if repeat_real < 1:
        raise DataError(f"repeat_real must be >= 1, got {repeat_real}")
    if not isinstance(real, Sized) or not isinstance(synthetic, (Sized, type(None))):
        raise DataError("training datasets must have a length: give them a __len__")
    parts: list[Dataset] = [real] * repeat_real
    if synthetic is not None:
        indices = synthetic_indices(len(real), len(synthetic), ratio, seed)
        if indices:
            parts.append(Subset(synthetic, indices))
    return MixedDataset(parts)
