"""Generator training data read from disk as it is needed, so the dataset never has to fit in memory.

`TrainSamples` reads one sample (image and mask) per item and brings it to the working size with the run's
crop mode (todsynth.data.crops). Items are keyed by (sample index, global micro-step, batch position): the
random crop of an item is a pure function of (seed, micro-step, position), like the per-sample RNG of
`train.step_generator`, so any number of DataLoader workers, a resumed run and a 2-process run all see
the same pixels. `StepBatches` yields the batches of `train.batch_indices` for a range of steps, in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

Key = tuple[int, int, int]  # (sample index, global micro-step, position in the global batch)


class TrainSamples(Dataset):
    """Samples of a validated dataset at size x size, read lazily: item `key` -> (index, image, label)."""

    def __init__(self, ds, size: int, crop: str, seed: int, images: bool = True, normalisation=None):
        from todsynth.data.crops import check_crop_mode

        check_crop_mode(crop)
        self.ds, self.size, self.crop, self.seed, self.images = ds, size, crop, seed, images
        self.normalisation = normalisation  # todsynth.data.bands.Normalisation; None: 8-bit RGB / 255

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: Key) -> tuple[int, Tensor | None, Tensor]:
        from todsynth.data.bands import image_tensor
        from todsynth.data.crops import crop_rng, fit_pair
        from todsynth.data.readers import with_image_nodata

        index, step, position = key
        label = self.ds.load_label(index)
        image = None
        if self.images:
            raw, nodata, _ = self.ds.load_image_data(index)
            label = with_image_nodata(label, nodata, self.ds.classes)
            image = image_tensor(raw, self.normalisation, nodata, f"sample '{self.ds.ids[index]}'")
        label = torch.from_numpy(label)
        rng = crop_rng(self.seed, step, position) if self.crop == "random" else None
        paths = self.ds.paths(index)
        image, label = fit_pair(
            image, label, self.size, self.crop, rng, name=f"sample '{self.ds.ids[index]}'", path=paths[0] or paths[1]
        )
        return index, image, label


class MemorySamples(Dataset):
    """Samples already in memory at the working size (unlabeled pretraining pools): item `key` -> its tensors."""

    def __init__(self, images: Tensor, labels: Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: Key) -> tuple[int, Tensor | None, Tensor]:
        index = key[0]
        return index, self.images[index], self.labels[index]


@dataclass
class StreamData:
    """A training set for the loop: the sample source, every prompt and id up front (for the prompt cache), and
    the image normalisation (None: 8-bit RGB / 255) the generator stores."""

    samples: Dataset
    prompts: list[str]
    ids: list[str]
    normalisation: Any = None


class StepBatches(Sampler):
    """This process's share of the global batch of each micro-step in [first, end), as lists of item keys."""

    def __init__(self, n: int, batch_size: int, seed: int, first: int, end: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.first, self.end, self.rank, self.world = first, end, rank, world

    def __len__(self) -> int:
        return max(self.end - self.first, 0)

    def __iter__(self) -> Iterator[list[Key]]:
        from todsynth.generator.train import batch_indices

        for step in range(self.first, self.end):
            local = batch_indices(step, self.n, self.batch_size, self.seed)[self.rank :: self.world]
            yield [(int(i), step, self.rank + self.world * j) for j, i in enumerate(local)]


def collate(items: list[tuple[int, Tensor | None, Tensor]]) -> tuple[list[int], Tensor | None, Tensor]:
    """Indices, stacked images (None for label-only items) and stacked labels of one batch."""
    indices = [i for i, _, _ in items]
    images = None if items[0][1] is None else torch.stack([im for _, im, _ in items])
    return indices, images, torch.stack([lab for _, _, lab in items])


def batch_loader(samples: Dataset, batches: StepBatches, num_workers: int = 0) -> DataLoader:
    """A DataLoader over `batches` with `num_workers` reader processes; the global torch RNG is not touched."""
    return DataLoader(
        samples,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )


def open_train_stream(
    path: str, split: str, size: int, crop: str, seed: int, split_file: str | None = None, images: bool = True
):
    """Validate a dataset (any reader) and return its StreamData and classes; only prompts stay in memory."""
    from todsynth.data.bands import fit_normalisation
    from todsynth.data.check import open_checked
    from todsynth.errors import DataError

    ds = open_checked(path, split, split_file or None)
    if images and ds.label_only:
        raise DataError("dataset has masks but no images; the generator needs image/mask pairs", path=path)
    norm = fit_normalisation(ds) if images else None
    prompts = [ds.prompt(i, ds.load_label(i)) for i in range(len(ds))]
    samples = TrainSamples(ds, size, crop, seed, images=images, normalisation=norm)
    return StreamData(samples, prompts, list(ds.ids), norm), ds.classes


def read_labels(samples: Dataset, indices: list[int], step: int = 0) -> Tensor:
    """Label maps of the given samples stacked (a fixed set, e.g. the validation masks)."""
    if not indices:
        return torch.empty(0, dtype=torch.long)
    return torch.stack([samples[(i, step, p)][2] for p, i in enumerate(indices)])
