"""Bands and normalisation: how a sample's raw bands become model input in [0, 1], and back.

A `Normalisation` maps channel k linearly: x' = (x − low[k]) / (high[k] − low[k]). Its ranges come from
data.yaml: fixed (`scale:`, or 0..255 for uint8 without settings) or a percentile `stretch:` computed once over
the training split (`fit_normalisation`). Models store it (segmenter config.json, generator pipeline.json) and
every later use (eval, synthesis, CRFM) applies the stored one: a dataset whose data.yaml states another
scaling, band count or sample type is refused (`check_normalisation`), so a model never sees differently scaled
data than it was trained on. `image_tensor` is the one place a sample's raw image becomes a model tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from todsynth.data.rasters import DATA_FILE, RGB_BANDS, RasterSpec
from todsynth.data.readers import BaseDataset, JsonlDataset
from todsynth.errors import CheckpointError, DataError

MODES = ("fixed", "stretch")
RGB8 = "uint8"
RESAVE = "save the model again, or fix the setting"


@dataclass(frozen=True)
class Normalisation:
    """Per-channel linear scaling of raw samples of `dtype` onto [0, 1]; stored with every trained model.

    `mode` "fixed": low..high as data.yaml's `scale:` (or 0..255 for uint8), values outside are refused;
    "stretch": low..high are the `percentiles` of each band over the training split, values outside are clipped.
    `rgb` holds the 1-based channel numbers shown in previews (None: the default, see `preview_channels`).
    """

    dtype: str
    low: tuple[float, ...]
    high: tuple[float, ...]
    mode: str = "fixed"
    percentiles: tuple[float, float] | None = None
    rgb: tuple[int, ...] | None = None

    @classmethod
    def rgb8(cls) -> Normalisation:
        """8-bit RGB divided by 255: the toy data, PNG/JPEG datasets and models saved before normalisations."""
        return cls(RGB8, (0.0,) * RGB_BANDS, (255.0,) * RGB_BANDS)

    @property
    def channels(self) -> int:
        """Number of model input channels (bands)."""
        return len(self.low)

    @property
    def is_rgb8(self) -> bool:
        """Whether this is plain 8-bit RGB / 255 (written as PNG, converted exactly as before bands existed)."""
        return self == Normalisation.rgb8()

    def settings(self) -> dict[str, Any]:
        """What data.yaml decides (statistics left out): compared between a dataset and a model."""
        ranges = None if self.mode == "stretch" else [list(r) for r in zip(self.low, self.high, strict=True)]
        return {
            "bands": self.channels,
            "dtype": self.dtype,
            "mode": self.mode,
            "scale": ranges,
            "percentiles": None if self.percentiles is None else list(self.percentiles),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Any, path: str | Path) -> Normalisation:
        """Read a stored normalisation; anything malformed is a CheckpointError naming `path`."""

        def bad(why: str) -> CheckpointError:
            return CheckpointError(f"'normalisation' {why}", path=path, fix=RESAVE)

        keys = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(d, dict) or not {"dtype", "low", "high"} <= set(d) <= keys:
            raise bad(f"must be a mapping with dtype, low, high (and mode, percentiles, rgb), got {d!r}")
        try:
            dtype = np.dtype(d["dtype"])
        except TypeError:
            raise bad(f"names an unknown sample type {d['dtype']!r}") from None
        if dtype.kind not in "uif":
            raise bad(f"names a sample type that is not numeric: {dtype}")
        low, high = d["low"], d["high"]
        numbers = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
            for v in [*(low if isinstance(low, list) else [None]), *(high if isinstance(high, list) else [None])]
        )
        if not (numbers and len(low) == len(high) >= 1 and all(a < b for a, b in zip(low, high, strict=True))):
            raise bad(f"needs equally long lists of finite numbers low < high, got low={low!r}, high={high!r}")
        mode, percentiles, rgb = d.get("mode", "fixed"), d.get("percentiles"), d.get("rgb")
        if mode not in MODES or (mode == "stretch") != (percentiles is not None):
            raise bad(f"mode must be one of {list(MODES)} (stretch with percentiles), got {mode!r}, {percentiles!r}")
        if percentiles is not None and not (isinstance(percentiles, list) and len(percentiles) == 2):
            raise bad(f"percentiles must be [low, high], got {percentiles!r}")
        if rgb is not None and not (
            isinstance(rgb, list)
            and len(rgb) in (1, RGB_BANDS)
            and all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= len(low) for c in rgb)
        ):
            raise bad(f"rgb must list 1 or 3 channel numbers 1..{len(low)}, got {rgb!r}")
        return cls(
            str(dtype),
            tuple(float(v) for v in low),
            tuple(float(v) for v in high),
            mode,
            None if percentiles is None else (float(percentiles[0]), float(percentiles[1])),
            None if rgb is None else tuple(rgb),
        )


def stored_normalisation(d: dict[str, Any] | None, path: str | Path) -> Normalisation:
    """The normalisation a model file stores; none stored (models saved before bands) means 8-bit RGB / 255."""
    return Normalisation.rgb8() if d is None else Normalisation.from_dict(d, path)


def _spec(samples: Any) -> RasterSpec:
    """The data.yaml settings of a dataset (plain sample lists have none)."""
    return getattr(samples, "raster", None) or RasterSpec()


def _where(samples: Any) -> Path | None:
    """The data.yaml of a dataset, or its root, for messages."""
    root = getattr(samples, "root", None)
    if root is None:
        return None
    return (samples.index_file.parent if isinstance(samples, JsonlDataset) else Path(root)) / DATA_FILE


def _image(samples: Sequence[Any], i: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(raw image, nodata, id) of sample `i`, reading only the image file when the dataset allows."""
    if isinstance(samples, BaseDataset):
        data = samples.load_image_data(i)
        if data is not None:  # None: a label-only item, refused below
            image, nodata, _ = data
            return image, nodata, samples.ids[i]
    sample = samples[i]
    if sample.image is None:
        raise DataError(f"sample '{sample.id}' has no image", fix="use a dataset with images")
    return sample.image, sample.nodata, sample.id


def _rgb_channels(spec: RasterSpec) -> tuple[int, ...] | None:
    """data.yaml's `rgb:` band numbers as 1-based channel numbers of the model input."""
    if spec.rgb is None:
        return None
    return spec.rgb if spec.bands is None else tuple(spec.bands.index(b) + 1 for b in spec.rgb)


def dataset_settings(samples: Sequence[Any]) -> Normalisation:
    """The normalisation data.yaml states for a dataset, without statistics (a stretch gets placeholder ranges).

    Band count and sample type come from the first image."""
    if getattr(samples, "label_only", False) or len(samples) == 0:
        raise DataError(
            "the dataset has no images to take bands from",
            path=getattr(samples, "root", None),
            fix="use a dataset with images",
        )
    spec = _spec(samples)
    image, _, _ = _image(samples, 0)
    channels, dtype = image.shape[-1], str(image.dtype)
    rgb = _rgb_channels(spec)
    if spec.stretch is not None:
        return Normalisation(dtype, (0.0,) * channels, (1.0,) * channels, "stretch", spec.stretch, rgb)
    if spec.scale is not None:
        ranges = spec.scale * channels if len(spec.scale) == 1 else spec.scale
        if len(ranges) != channels:
            raise DataError(
                f"'scale' gives {len(spec.scale)} ranges for {channels} bands",
                path=_where(samples),
                fix="give one [low, high] per band used, or a single [low, high]",
            )
        return Normalisation(dtype, tuple(r[0] for r in ranges), tuple(r[1] for r in ranges), "fixed", None, rgb)
    if dtype != RGB8:  # readers refuse this; plain sample lists arrive here
        raise DataError(
            f"images hold {dtype} samples and no scaling is given",
            path=_where(samples),
            fix="give 'scale' or 'stretch' in data.yaml, or 8-bit images",
        )
    return Normalisation(dtype, (0.0,) * channels, (255.0,) * channels, "fixed", None, rgb)


def fit_normalisation(samples: Sequence[Any]) -> Normalisation:
    """The normalisation of a training set: data.yaml's settings, with a `stretch` computed over every valid pixel
    of every image (exact percentiles, numpy's 'linear' definition)."""
    settings = dataset_settings(samples)
    if settings.percentiles is None:  # mode "fixed": nothing to measure
        return settings
    gather = _Percentiles(settings.channels)
    for i in range(len(samples)):
        image, nodata, sample_id = _image(samples, i)
        _check_channels(image, settings, f"sample '{sample_id}'")
        gather.add(image if nodata is None else image[~nodata])
    low, high = gather.result(settings.percentiles, _where(samples))
    return dataclasses.replace(settings, low=low, high=high)


class _Percentiles:
    """Exact per-band percentiles over many images: a histogram for 8/16-bit integers, all values otherwise."""

    def __init__(self, channels: int):
        self.channels = channels
        self.counts: list[np.ndarray] | None = None
        self.values: list[list[np.ndarray]] = [[] for _ in range(channels)]
        self.offset = 0

    def add(self, pixels: np.ndarray) -> None:
        """Add valid pixels (...xC)."""
        pixels = pixels.reshape(-1, self.channels)
        if pixels.dtype.kind in "ui" and pixels.dtype.itemsize <= 2:
            self.offset = -int(np.iinfo(pixels.dtype).min)
            size = int(np.iinfo(pixels.dtype).max) + self.offset + 1
            if self.counts is None:
                self.counts = [np.zeros(size, np.int64) for _ in range(self.channels)]
            for b in range(self.channels):
                self.counts[b] += np.bincount(pixels[:, b].astype(np.int64) + self.offset, minlength=size)
        else:
            for b in range(self.channels):
                self.values[b].append(pixels[:, b].astype(np.float64))

    def result(self, q: tuple[float, float], where: Path | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(low, high) per band at percentiles q; a band without valid pixels or of one value is refused."""
        low, high = [], []
        for b in range(self.channels):
            if self.counts is not None:
                a, z = (_hist_percentile(self.counts[b], p) - self.offset for p in q)
            else:
                values = np.concatenate(self.values[b]) if self.values[b] else np.empty(0)
                if values.size == 0:
                    a = z = float("nan")
                else:
                    a, z = (float(v) for v in np.percentile(values, q))
            if not (np.isfinite(a) and np.isfinite(z) and a < z):
                raise DataError(
                    f"band {b + 1} has no spread between its {q[0]:g} and {q[1]:g} percentiles over the "
                    f"training images ({a:g}..{z:g}), so a stretch cannot scale it",
                    path=where,
                    fix="use 'scale: [low, high]' for it, wider percentiles, or other bands",
                )
            low.append(float(a))
            high.append(float(z))
        return tuple(low), tuple(high)


def _hist_percentile(counts: np.ndarray, q: float) -> float:
    """The q-th percentile of the values a histogram counts (values = bin indices), as numpy's 'linear'."""
    n = int(counts.sum())
    if n == 0:
        return float("nan")
    position = q / 100 * (n - 1)
    cumulative = np.cumsum(counts)
    below, above = int(np.floor(position)), int(np.ceil(position))
    a = int(np.searchsorted(cumulative, below, side="right"))
    z = int(np.searchsorted(cumulative, above, side="right"))
    return a + (z - a) * (position - below)


def check_normalisation(samples: Sequence[Any], norm: Normalisation, model: str | Path | None) -> None:
    """Refuse a dataset whose data.yaml states other scaling, band count or sample type than a model's stored
    normalisation; `model` names the model file. A stretch's statistics are always the model's."""
    own = dataset_settings(samples).settings()
    stored = norm.settings()
    diffs = [f"{k}: data {own[k]!r} vs model {stored[k]!r}" for k in own if own[k] != stored[k]]
    if diffs:
        model = f" ({model})" if model else ""
        raise DataError(
            f"the data's bands or scaling differ from the normalisation of the model{model}: {'; '.join(diffs)}",
            path=_where(samples) or getattr(samples, "root", None),
            fix=f"use data with the model's settings in {DATA_FILE} ({describe(norm)}), or train a model on this data",
        )


def describe(norm: Normalisation) -> str:
    """The data.yaml-like words for a normalisation, e.g. '4 bands of uint16, scale [[0, 10000], ...]'."""
    what = f"{norm.channels} band{'s' if norm.channels != 1 else ''} of {norm.dtype}"
    if norm.percentiles is not None:  # mode "stretch"
        return f"{what}, stretch percentiles {list(norm.percentiles)}"
    if norm.is_rgb8 or (norm.dtype == RGB8 and set(norm.low) == {0.0} and set(norm.high) == {255.0}):
        return f"{what}, no scaling (/255)"
    return f"{what}, scale {[[a, b] for a, b in zip(norm.low, norm.high, strict=True)]}"


def _check_channels(image: np.ndarray, norm: Normalisation, what: str) -> None:
    """Refuse an image whose band count is not the normalisation's."""
    if image.ndim != 3 or image.shape[-1] != norm.channels:
        bands = image.shape[-1] if image.ndim == 3 else 1
        raise DataError(
            f"{what} has {bands} band(s) but the model input has {norm.channels}",
            fix=f"give every image the same bands ('bands:' in {DATA_FILE})",
        )


def image_tensor(
    image: np.ndarray, norm: Normalisation | None = None, nodata: np.ndarray | None = None, what: str = "image"
) -> Tensor:
    """A raw HxWxC image as the model's float32 CxHxW input in [0, 1] by `norm` (None: 8-bit RGB / 255).

    8-bit RGB is divided by 255 exactly as before bands existed. Fixed ranges refuse values outside them (the
    readers already refuse them naming the file); a stretch clips. Nodata pixels become 0.
    """
    norm = norm or Normalisation.rgb8()
    _check_channels(image, norm, what)
    if str(image.dtype) != norm.dtype:
        raise DataError(
            f"{what} holds {image.dtype} samples but the model input is scaled from {norm.dtype}",
            fix=f"use data with the model's sample type and {DATA_FILE}",
        )
    if norm.is_rgb8:
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    else:
        raw = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        low = torch.tensor(norm.low, dtype=torch.float32).view(-1, 1, 1)
        span = torch.tensor(norm.high, dtype=torch.float32).view(-1, 1, 1) - low
        tensor = (raw - low) / span
        if norm.mode == "stretch":
            tensor = tensor.clamp(0.0, 1.0)
        else:
            valid = torch.ones(image.shape[:2], dtype=torch.bool) if nodata is None else ~torch.from_numpy(nodata)
            outside = ((tensor < 0) | (tensor > 1)) & valid
            if bool(outside.any()):
                raise DataError(
                    f"{what} has {int(outside.sum())} value(s) outside the model's fixed scale ({describe(norm)})",
                    fix=f"use data within the model's 'scale' in {DATA_FILE}",
                )
    if nodata is not None:
        tensor = tensor.masked_fill(torch.from_numpy(nodata)[None], 0.0)
    return tensor.contiguous()


def to_raw(image: Tensor, norm: Normalisation) -> np.ndarray:
    """A model image CxHxW in [0, 1] as HxWxC raw samples of `norm.dtype`: the inverse scaling, rounded to the
    nearest integer for integer types and kept within the band's range (fixed `scale` and the type's limits)."""
    x = image.detach().cpu().double().clamp(0, 1).permute(1, 2, 0).numpy()
    low, high = np.array(norm.low), np.array(norm.high)
    raw = x * (high - low) + low
    dtype = np.dtype(norm.dtype)
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        return np.clip(np.rint(raw), np.maximum(np.ceil(low), info.min), np.minimum(np.floor(high), info.max)).astype(
            dtype
        )
    out = raw.astype(dtype)
    wide = out.astype(np.float64)
    out = np.where(wide > high, np.nextafter(out, dtype.type(-np.inf)), out)
    return np.where(wide < low, np.nextafter(out, dtype.type(np.inf)), out).astype(dtype)


def preview_channels(norm: Normalisation | None, channels: int) -> list[int]:
    """0-based channels shown as RGB: `rgb:` if stored, else all of 3, the first three of more, the first as grey."""
    if norm is not None and norm.rgb is not None:
        picked = [c - 1 for c in norm.rgb]
    elif channels >= RGB_BANDS:
        picked = list(range(RGB_BANDS))
    else:
        picked = [0]
    return picked * RGB_BANDS if len(picked) == 1 else picked


def preview_rgb(image: Tensor, norm: Normalisation | None = None) -> np.ndarray:
    """HxWx3 uint8 preview of a model image CxHxW in [0, 1] (its `rgb:` channels), for grids and reports."""
    arr = image.detach().cpu().float()[preview_channels(norm, image.shape[0])].permute(1, 2, 0).numpy()
    return (np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8)


def convert(images: Tensor, source: Normalisation | None, target: Normalisation | None, what: str) -> Tensor:
    """Model images of one normalisation (a generator's) in another's [0, 1] (a segmenter's): through the raw
    values, differentiably, clipped to [0, 1]; equal normalisations pass the tensor through unchanged.

    Models of other band counts or sample types cannot share images: a DataError naming `what`."""
    source, target = source or Normalisation.rgb8(), target or Normalisation.rgb8()
    if (source.low, source.high) == (target.low, target.high) and source.dtype == target.dtype:
        return images
    if source.channels != target.channels or source.dtype != target.dtype:
        raise DataError(
            f"{what} takes {describe(target)}, but the images are {describe(source)}",
            fix="use models trained on data with the same bands and sample type",
        )
    shape = (1, -1, 1, 1)
    s_low, s_high = (
        torch.tensor(v, dtype=images.dtype, device=images.device).view(shape) for v in (source.low, source.high)
    )
    t_low, t_high = (
        torch.tensor(v, dtype=images.dtype, device=images.device).view(shape) for v in (target.low, target.high)
    )
    return ((images * (s_high - s_low) + s_low - t_low) / (t_high - t_low)).clamp(0, 1)


def data_yaml(norm: Normalisation) -> str | None:
    """The data.yaml of a synthetic set written as `to_raw` files of `norm` (bands in model order), so it reads
    back as its source; None for 8-bit RGB (PNG files need no settings)."""
    import yaml

    if norm.is_rgb8:
        return None
    settings: dict[str, Any] = {"bands": list(range(1, norm.channels + 1))}
    if norm.percentiles is not None:  # mode "stretch"
        settings["stretch"] = {"percentiles": list(norm.percentiles)}
    elif norm.dtype != RGB8 or set(norm.low) != {0.0} or set(norm.high) != {255.0}:
        settings["scale"] = [[a, b] for a, b in zip(norm.low, norm.high, strict=True)]
    if norm.rgb is not None:
        settings["rgb"] = list(norm.rgb)
    return yaml.safe_dump(settings, sort_keys=False, default_flow_style=None)


def write_geotiff(path: str | Path, array: np.ndarray) -> None:
    """Write HxWxC samples as a (DEFLATE-compressed, not georeferenced) GeoTIFF, atomically."""
    import warnings

    import rasterio

    from todsynth.io import atomic_path

    h, w, c = array.shape
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning: synthetic tiles have no geotransform
        with (
            rasterio.Env(GDAL_PAM_ENABLED="NO"),
            rasterio.open(
                tmp, "w", driver="GTiff", width=w, height=h, count=c, dtype=array.dtype, compress="deflate"
            ) as dst,
        ):
            dst.write(np.moveaxis(array, -1, 0))
