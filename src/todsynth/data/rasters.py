"""Raster files (GeoTIFF, 16-bit PNG) read with rasterio, and the data.yaml settings that say which bands to use
and how to scale them.

Why rasterio and not tifffile: remote-sensing data is GeoTIFF, and rasterio (GDAL) is the field's reader. It
decodes every compression GeoTIFFs use (LZW, DEFLATE, ZSTD, JPEG, tiled or striped) without extra codec
packages, it reads the per-band nodata value and colour interpretation, it reads 16-bit PNGs with the same
code, and it keeps the georeferencing a later tiling step needs. tifffile would need imagecodecs for compressed
files and knows nothing of nodata.

A raster is decoded into its own sample type and band count (`Raster`); `select_bands` hands on the bands
`data.yaml` selects (`bands:`, any count) in their own dtype, after checking that the file can be scaled as
`data.yaml` says (`scale:` ranges hold every valid value; other dtypes than uint8 need `scale:` or `stretch:`).
Scaling to [0, 1] happens where images become tensors (`todsynth.data.bands`), with the statistics a model
stores. Nothing is truncated, dropped or clipped silently.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from todsynth.errors import ConfigError, DataError

DATA_FILE = "data.yaml"
DATA_KEYS = ("bands", "scale", "stretch", "rgb")
DATA_EXAMPLE = (
    "e.g. 'bands: [3, 2, 1, 4]' (1-based band numbers), 'scale: [0, 4000]' (maps 0..4000 to 0..1) or "
    "'stretch: {percentiles: [2, 98]}', and 'rgb: [3, 2, 1]' (bands shown in previews)"
)
RASTER_SUFFIXES = frozenset({".tif", ".tiff"})
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
PNG_GREY = 0
RGB_BANDS = 3
PIXEL_LIMIT_ENV = "TODSYNTH_MAX_IMAGE_PIXELS"


@dataclass(frozen=True)
class RasterSpec:
    """The data.yaml settings: which 1-based `bands` to use, a fixed linear `scale` or a percentile `stretch`
    per band, and the `rgb` bands of previews.

    `scale[k] = (low, high)` maps low..high of the k-th used band linearly onto 0..1; values outside are refused.
    `stretch = (p_low, p_high)` maps the band's p_low..p_high percentiles over the training split onto 0..1 and
    clips what lies outside (by definition). `rgb` holds 1 or 3 band numbers (counted like `bands`).
    """

    bands: tuple[int, ...] | None = None
    scale: tuple[tuple[float, float], ...] | None = None
    stretch: tuple[float, float] | None = None
    rgb: tuple[int, ...] | None = None


@dataclass(frozen=True)
class RasterInfo:
    """What one file holds, for `data check`: sample type, band count, size, value range per band, nodata pixels.

    `ranges[b]` is (min, max) over the valid pixels of band b, or None when the band has no valid pixel.
    """

    dtype: str
    bands: int
    height: int
    width: int
    ranges: tuple[tuple[float, float] | None, ...]
    nodata_pixels: int


@dataclass(frozen=True)
class Raster:
    """A decoded raster: HxWxC samples in their own dtype, HxW nodata pixels, a colour map (paletted), its info."""

    array: np.ndarray
    nodata: np.ndarray
    colormap: np.ndarray | None
    colour_names: tuple[str, ...]
    info: RasterInfo


def load_raster_spec(path: str | Path) -> RasterSpec:
    """Read a data.yaml (`bands`, `scale`); no file means no settings; unknown keys and bad values are DataErrors."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return RasterSpec()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:
        raise DataError(f"cannot read the data settings file: {e}", path=path, fix=DATA_EXAMPLE) from None
    if data is None:
        return RasterSpec()
    if not isinstance(data, dict):
        raise DataError("data settings file must be a mapping", path=path, fix=DATA_EXAMPLE)
    unknown = sorted(str(k) for k in set(data) - set(DATA_KEYS))
    if unknown:
        raise DataError(
            f"unknown key(s) {unknown} in the data settings file; known: {list(DATA_KEYS)}",
            path=path,
            fix=f"remove or rename them, {DATA_EXAMPLE}",
        )
    bands = _parse_bands(data.get("bands"), path)
    scale = _parse_scale(data.get("scale"), len(bands) if bands else None, path)
    stretch = _parse_stretch(data.get("stretch"), path)
    if scale is not None and stretch is not None:
        raise DataError(
            "'scale' and 'stretch' are both given; a band is scaled one way",
            path=path,
            fix="keep 'scale: [low, high]' (fixed) or 'stretch: {percentiles: [2, 98]}', not both",
        )
    return RasterSpec(bands, scale, stretch, _parse_rgb(data.get("rgb"), bands, path))


def _band_numbers(value: Any) -> bool:
    """Whether a YAML value is a non-empty list of band numbers (integers >= 1)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in value)
    )


def _parse_bands(value: Any, path: Path) -> tuple[int, ...] | None:
    """The `bands:` setting: any number of distinct band numbers, 1-based, in the order the model gets them."""
    if value is None:
        return None
    if not _band_numbers(value) or len(set(value)) != len(value):
        raise DataError(
            f"'bands' must list distinct band numbers counted from 1, got {value!r}",
            path=path,
            fix="e.g. 'bands: [1, 2, 3]' for the first three bands, or 'bands: [3, 2, 1, 4]'",
        )
    return tuple(value)


def _parse_stretch(value: Any, path: Path) -> tuple[float, float] | None:
    """The `stretch:` setting: {percentiles: [low, high]} with 0 <= low < high <= 100."""
    if value is None:
        return None
    fix = "e.g. 'stretch: {percentiles: [2, 98]}'"
    pair = value.get("percentiles") if isinstance(value, dict) and set(value) == {"percentiles"} else None
    if not (isinstance(pair, list) and len(pair) == 2 and all(_number(v) for v in pair)):
        raise DataError(f"'stretch' must be {{percentiles: [low, high]}}, got {value!r}", path=path, fix=fix)
    low, high = float(pair[0]), float(pair[1])
    if not 0 <= low < high <= 100:
        raise DataError(f"'stretch' percentiles need 0 <= low < high <= 100, got {pair!r}", path=path, fix=fix)
    return low, high


def _parse_rgb(value: Any, bands: tuple[int, ...] | None, path: Path) -> tuple[int, ...] | None:
    """The `rgb:` setting: 1 or 3 band numbers shown in previews, each among `bands` when that is given."""
    if value is None:
        return None
    if not _band_numbers(value) or len(value) not in (1, RGB_BANDS):
        raise DataError(
            f"'rgb' must list 1 or 3 band numbers counted from 1, got {value!r}",
            path=path,
            fix="e.g. 'rgb: [3, 2, 1]' (red, green, blue bands of the file)",
        )
    missing = [] if bands is None else [b for b in value if b not in bands]
    if missing:
        raise DataError(
            f"'rgb' shows band(s) {missing} that 'bands' {list(bands or ())} does not select",
            path=path,
            fix="list in 'rgb' only bands that 'bands' selects",
        )
    return tuple(value)


def _number(v: Any) -> bool:
    """Whether a YAML value is a finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _parse_scale(value: Any, n_bands: int | None, path: Path) -> tuple[tuple[float, float], ...] | None:
    """The `scale:` setting: one [low, high] for every band, or one pair per selected band."""
    if value is None:
        return None
    fix = "e.g. 'scale: [0, 4000]' for all bands, or 'scale: [[0, 3000], [0, 3500], [0, 4000]]' per band"
    pair = isinstance(value, list) and len(value) == 2 and all(_number(v) for v in value)
    pairs = (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(p, list) and len(p) == 2 and all(_number(v) for v in p) for p in value)
    )
    if not (pair or pairs):
        raise DataError(
            f"'scale' must be [low, high] or a list of [low, high] per band, got {value!r}", path=path, fix=fix
        )
    result = ((float(value[0]), float(value[1])),) if pair else tuple((float(a), float(b)) for a, b in value)
    if any(low >= high for low, high in result):
        raise DataError(f"'scale' needs low < high, got {value!r}", path=path, fix=fix)
    if not pair and n_bands is not None and len(result) not in (1, n_bands):
        raise DataError(
            f"'scale' gives {len(result)} ranges for {n_bands} bands",
            path=path,
            fix="give one [low, high] per band listed in 'bands', or a single [low, high]",
        )
    return result


def is_raster_file(path: Path, role: str) -> bool:
    """Whether rasterio reads this file: TIFFs (by suffix or content) always; 16-bit PNGs as images, and 16-bit
    colour PNGs as masks.

    PIL reduces a 16-bit RGB PNG to its high byte without a word; 16-bit grey PNG masks PIL reads exactly.
    """
    if path.suffix.lower() in RASTER_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(26)
    except OSError:
        return False
    if head[:4] in TIFF_MAGIC:  # a TIFF under another suffix: PIL would read a 16-bit one as its high byte
        return True
    if len(head) < 26 or not head.startswith(PNG_MAGIC) or head[12:16] != b"IHDR" or head[24] != 16:
        return False
    return role == "image" or head[25] != PNG_GREY


def unreadable(what: str, path: Path, e: Exception) -> DataError:
    """The error for a file that cannot be decoded."""
    return DataError(
        f"cannot read {what}: the file is corrupt, truncated or not an image ({type(e).__name__}: {e})",
        path=path,
        fix="re-export the file or remove it",
    )


def pixel_limit() -> int | None:
    """The readers' pixel limit: PIL.Image.MAX_IMAGE_PIXELS, first set from the environment variable
    TODSYNTH_MAX_IMAGE_PIXELS when it is given (the way to raise it from the command line)."""
    from PIL import Image

    value = os.environ.get(PIXEL_LIMIT_ENV, "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(
                f"the environment variable {PIXEL_LIMIT_ENV}={value!r} is not a pixel count >= 1",
                fix=f"set it to a whole number of pixels, e.g. {PIXEL_LIMIT_ENV}=200000000, or unset it",
            )
        Image.MAX_IMAGE_PIXELS = int(value)
    return Image.MAX_IMAGE_PIXELS


def too_many_pixels(what: str, path: Path, pixels: int | None) -> DataError:
    """The error for a file over the pixel limit: how to raise it for a trusted file (then `data tile` can cut it)."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    size = "" if pixels is None else f" of {pixels:,} pixels"
    needed = f"{pixels}" if pixels is not None else "<pixels>"
    return DataError(
        f"{what}{size} exceeds PIL's pixel limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS, a guard "
        "against decompression bombs)",
        path=path,
        fix=f"if you trust the file, raise the limit with the environment variable "
        f"{PIXEL_LIMIT_ENV}={needed}; with it, `todsynth data tile` can cut it into tiles",
    )


def _pixel_limit(what: str, path: Path, pixels: int) -> DataError | None:
    """The decompression-bomb guard of the PIL reader (PIL.Image.MAX_IMAGE_PIXELS), applied to rasters too."""
    limit = pixel_limit()
    if limit is None or pixels <= limit:
        return None
    return too_many_pixels(what, path, pixels)


def band_ranges(array: np.ndarray, nodata: np.ndarray) -> tuple[tuple[float, float] | None, ...]:
    """(min, max) per band of an HxWxC array over the pixels that are not nodata."""
    valid = array[~nodata]
    if valid.size == 0:
        return tuple(None for _ in range(array.shape[-1]))
    return tuple((float(valid[:, b].min()), float(valid[:, b].max())) for b in range(array.shape[-1]))


def _nodata_pixels(array: np.ndarray, nodatavals: tuple[float | None, ...]) -> np.ndarray:
    """HxW pixels where any band holds its nodata value (or NaN): such a pixel has no full measurement."""
    nodata = np.zeros(array.shape[:2], bool)
    for b, value in enumerate(nodatavals):
        band = array[..., b]
        if np.issubdtype(band.dtype, np.floating):
            nodata |= np.isnan(band)
        if value is not None and not np.isnan(value):
            nodata |= band == value
    return nodata


def read_raster(path: Path, what: str) -> Raster:
    """Decode a raster file with rasterio in its own sample type and band count; failures name the file."""
    import rasterio
    from rasterio.enums import ColorInterp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotGeoreferencedWarning: plain TIFFs and PNGs carry no geotransform
        try:
            with rasterio.Env(GDAL_PAM_ENABLED="NO"), rasterio.open(path) as src:
                too_big = _pixel_limit(what, path, src.width * src.height)
                if too_big is not None:
                    raise too_big
                array = np.moveaxis(src.read(), 0, -1)
                nodatavals = tuple(src.nodatavals)
                colour_names = tuple(c.name for c in src.colorinterp)
                colormap = None
                if src.count == 1 and src.colorinterp[0] == ColorInterp.palette:
                    entries = src.colormap(1)
                    colormap = np.zeros((max(256, max(entries, default=0) + 1), 4), np.uint8)
                    for index, rgba in entries.items():
                        colormap[index] = rgba
        except DataError:
            raise
        except FileNotFoundError:
            raise DataError(f"{what} file not found", path=path) from None
        except Exception as e:  # rasterio signals bad files with RasterioIOError and CPLE_* errors
            raise unreadable(what, path, e) from None
    if array.dtype.kind not in "uif":
        raise DataError(
            f"{what} holds {array.dtype} samples, not numbers todsynth reads",
            path=path,
            fix="export it with integer or floating-point samples",
        )
    nodata = _nodata_pixels(array, nodatavals)
    info = RasterInfo(
        str(array.dtype), array.shape[-1], array.shape[0], array.shape[1], band_ranges(array, nodata), int(nodata.sum())
    )
    return Raster(array, nodata, colormap, colour_names, info)


def colormap_rgba(array: np.ndarray, colormap: np.ndarray, path: Path) -> np.ndarray:
    """HxWx4 uint8 colours of a paletted raster's samples through its colour map; an index beyond it is refused."""
    indices = array[..., 0].astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(colormap)):
        raise DataError(
            f"palette indices {int(indices.min())}..{int(indices.max())} go beyond the file's colour map "
            f"of {len(colormap)} entries",
            path=path,
            fix="re-export the file with its full palette",
        )
    return colormap[indices]


def _span(info: RasterInfo) -> str:
    """The value range of all bands, in words."""
    found = [r for r in info.ranges if r is not None]
    if not found:
        return "no valid pixels"
    low, high = min(r[0] for r in found), max(r[1] for r in found)
    return f"values {low:g}..{high:g}"


def _chosen(raster: Raster, spec: RasterSpec, path: Path) -> np.ndarray:
    """The bands `spec` selects, in its order; without `bands:` every band of the file (one band as grey RGB)."""
    info = raster.info
    if spec.bands is None:
        return np.repeat(raster.array, RGB_BANDS, axis=-1) if info.bands == 1 else raster.array
    missing = [b for b in spec.bands if b > info.bands]
    if missing:
        raise DataError(
            f"'bands' in {DATA_FILE} asks for band(s) {missing} but the image has {info.bands}",
            path=path,
            fix=f"list band numbers 1..{info.bands} in 'bands' in {DATA_FILE}",
        )
    return raster.array[..., [b - 1 for b in spec.bands]]


def check_scale(
    array: np.ndarray, nodata: np.ndarray | None, scale: tuple[tuple[float, float], ...], path: Path
) -> None:
    """Refuse valid values outside a band's fixed `scale` range (they would be clipped), naming file and setting."""
    if len(scale) not in (1, array.shape[-1]):
        raise DataError(
            f"'scale' in {DATA_FILE} gives {len(scale)} ranges but the image uses {array.shape[-1]} bands",
            path=path,
            fix="give one [low, high] per band used, or a single [low, high]",
        )
    ranges = scale * array.shape[-1] if len(scale) == 1 else scale
    valid = np.ones(array.shape[:2], bool) if nodata is None else ~nodata
    for b, (low, high) in enumerate(ranges):
        band = array[..., b].astype(np.float64)
        outside = valid & ((band < low) | (band > high))
        if outside.any():
            values = band[valid]
            raise DataError(
                f"band {b + 1} used has {int(outside.sum())} pixel(s) outside 'scale' {low:g}..{high:g} "
                f"(values {values.min():g}..{values.max():g}); they would be clipped",
                path=path,
                fix=f"widen 'scale' in {DATA_FILE} to cover {values.min():g}..{values.max():g}",
            )


def select_bands(raster: Raster, spec: RasterSpec, path: Path) -> np.ndarray:
    """HxWxC samples of an image raster in its own dtype: the bands `spec` selects (any count), checked against
    the scaling `spec` states; anything it cannot scale is a DataError naming the file and the setting.

    Paletted rasters are expanded through their colour map (8-bit RGB); without `bands:` every band is used in
    file order, and one band is repeated as grey RGB (as 8-bit grey PNGs are). uint8 needs no scaling (/255);
    other sample types need `scale:` or `stretch:`. Nodata pixels keep their raw values (the caller gets the
    nodata map; they become 0 in the model input and the ignore index in labels).
    """
    info = raster.info
    if raster.colormap is not None and spec.bands is None and spec.scale is None and spec.stretch is None:
        return colormap_rgba(raster.array, raster.colormap, path)[..., :RGB_BANDS].copy()
    array = _chosen(raster, spec, path)
    if spec.scale is None and spec.stretch is None and array.dtype != np.uint8:
        found = [r for r in info.ranges if r is not None]
        high = max((r[1] for r in found), default=0.0)
        if high <= 0:
            high = float(np.iinfo(array.dtype).max) if array.dtype.kind in "ui" else 1.0
        raise DataError(
            f"{info.bands}-band {info.dtype} image ({_span(info)}); todsynth scales samples other than "
            "uint8 only as data.yaml says",
            path=path,
            fix=f"map values to 0..1 with 'scale: [low, high]' in {DATA_FILE}, "
            f"e.g. 'scale: [0, {high:g}]', "
            "or with 'stretch: {percentiles: [2, 98]}' (computed over the training split), "
            "or convert it to 8-bit RGB first",
        )
    if spec.scale is not None:
        check_scale(array, raster.nodata, spec.scale, path)
    return np.ascontiguousarray(array)
