"""Raster files (GeoTIFF, 16-bit PNG) read with rasterio, and the explicit settings that make them 8-bit RGB.

Why rasterio and not tifffile: remote-sensing data is GeoTIFF, and rasterio (GDAL) is the field's reader. It
decodes every compression GeoTIFFs use (LZW, DEFLATE, ZSTD, JPEG, tiled or striped) without extra codec
packages, it reads the per-band nodata value and colour interpretation, it reads 16-bit PNGs with the same
code, and it keeps the georeferencing a later tiling step needs. tifffile would need imagecodecs for compressed
files and knows nothing of nodata.

A raster is decoded into its own sample type and band count (`Raster`), so a later change can hand multi-band
float arrays on; today the pipeline consumes HxWx3 uint8, so `to_rgb8` turns a raster into that only when the
data or `data.yaml` (`bands:`, `scale:`) says exactly how, and refuses, naming the file and the setting,
otherwise. Nothing is truncated, dropped or clipped silently.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from todsynth.errors import DataError

DATA_FILE = "data.yaml"
DATA_KEYS = ("bands", "scale")
DATA_EXAMPLE = "e.g. 'bands: [1, 2, 3]' (1-based band numbers) and 'scale: [0, 4000]' (maps 0..4000 to 0..255)"
RASTER_SUFFIXES = frozenset({".tif", ".tiff"})
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
PNG_GREY = 0
RGB_BANDS = 3


@dataclass(frozen=True)
class RasterSpec:
    """How image rasters become 8-bit RGB: which 1-based `bands` to use, and a fixed linear `scale` per band.

    `scale[k] = (low, high)` maps low..high of the k-th used band linearly onto 0..255; values outside are refused.
    """

    bands: tuple[int, ...] | None = None
    scale: tuple[tuple[float, float], ...] | None = None


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
        raise DataError(f"unknown key(s) {unknown} in the data settings file; known: {list(DATA_KEYS)}",
                        path=path, fix=f"remove or rename them, {DATA_EXAMPLE}")
    bands = _parse_bands(data.get("bands"), path)
    scale = _parse_scale(data.get("scale"), len(bands) if bands else None, path)
    return RasterSpec(bands, scale)


def _parse_bands(value: Any, path: Path) -> tuple[int, ...] | None:
    """The `bands:` setting: 1 or 3 band numbers, 1-based."""
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) in (1, RGB_BANDS) and all(
        isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in value)
    if not ok:
        raise DataError(f"'bands' must list 1 or 3 band numbers counted from 1, got {value!r}", path=path,
                        fix="e.g. 'bands: [1, 2, 3]' for the first three bands, or 'bands: [4, 3, 2]'")
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
    pairs = isinstance(value, list) and bool(value) and all(
        isinstance(p, list) and len(p) == 2 and all(_number(v) for v in p) for p in value)
    if not (pair or pairs):
        raise DataError(f"'scale' must be [low, high] or a list of [low, high] per band, got {value!r}",
                        path=path, fix=fix)
    result = ((float(value[0]), float(value[1])),) if pair else tuple((float(a), float(b)) for a, b in value)
    if any(low >= high for low, high in result):
        raise DataError(f"'scale' needs low < high, got {value!r}", path=path, fix=fix)
    if not pair and len(result) not in (1, n_bands or RGB_BANDS):
        raise DataError(f"'scale' gives {len(result)} ranges for {n_bands or RGB_BANDS} bands", path=path,
                        fix="give one [low, high] per band listed in 'bands', or a single [low, high]")
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
    return DataError(f"cannot read {what}: the file is corrupt, truncated or not an image "
                     f"({type(e).__name__}: {e})", path=path, fix="re-export the file or remove it")


def _pixel_limit(what: str, path: Path, pixels: int) -> DataError | None:
    """The decompression-bomb guard of the PIL reader (PIL.Image.MAX_IMAGE_PIXELS), applied to rasters too."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is None or pixels <= limit:
        return None
    return DataError(f"{what} of {pixels:,} pixels exceeds PIL's pixel limit of {limit:,} "
                     "(PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs)", path=path,
                     fix="cut it into tiles, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file")


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
        raise DataError(f"{what} holds {array.dtype} samples, not numbers todsynth reads", path=path,
                        fix="export it with integer or floating-point samples")
    nodata = _nodata_pixels(array, nodatavals)
    info = RasterInfo(str(array.dtype), array.shape[-1], array.shape[0], array.shape[1],
                      band_ranges(array, nodata), int(nodata.sum()))
    return Raster(array, nodata, colormap, colour_names, info)


def colormap_rgba(raster: Raster, path: Path) -> np.ndarray:
    """HxWx4 uint8 colours of a paletted raster through its colour map; an index beyond the map is refused."""
    indices = raster.array[..., 0].astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(raster.colormap)):
        raise DataError(f"palette indices {int(indices.min())}..{int(indices.max())} go beyond the file's colour map "
                        f"of {len(raster.colormap)} entries", path=path, fix="re-export the file with its full palette")
    return raster.colormap[indices]


def _span(info: RasterInfo) -> str:
    """The value range of all bands, in words."""
    found = [r for r in info.ranges if r is not None]
    if not found:
        return "no valid pixels"
    low, high = min(r[0] for r in found), max(r[1] for r in found)
    return f"values {low:g}..{high:g}"


def _selected(raster: Raster, spec: RasterSpec, path: Path) -> tuple[np.ndarray, list[str]]:
    """The bands `spec` selects (or all), and what the settings lack to make 8-bit RGB of the file."""
    info = raster.info
    lacking = []
    if spec.bands is not None:
        missing = [b for b in spec.bands if b > info.bands]
        if missing:
            raise DataError(f"'bands' in {DATA_FILE} asks for band(s) {missing} but the image has {info.bands}",
                            path=path, fix=f"list band numbers 1..{info.bands} in 'bands' in {DATA_FILE}")
        array = raster.array[..., [b - 1 for b in spec.bands]]
    else:
        array = raster.array
        if info.bands not in (1, RGB_BANDS):
            named = ", ".join(raster.colour_names)
            told = not set(raster.colour_names) & {"undefined", "gray"}
            lacking.append(f"select bands with 'bands: [1, 2, 3]' in {DATA_FILE}, counted from 1"
                           + (f" (this file's bands: {named})" if told else ""))
    if spec.scale is None and array.dtype != np.uint8:
        found = [r for r in info.ranges if r is not None]
        high = max((r[1] for r in found), default=0.0)
        if high <= 0:
            high = float(np.iinfo(array.dtype).max) if array.dtype.kind in "ui" else 1.0
        lacking.append(f"map values to 0..255 with 'scale: [low, high]' in {DATA_FILE}, e.g. 'scale: [0, {high:g}]'")
    return array, lacking


def _scaled(array: np.ndarray, nodata: np.ndarray, scale: tuple[tuple[float, float], ...],
            path: Path) -> np.ndarray:
    """Map each band's low..high linearly onto 0..255; a valid value outside low..high is refused, not clipped."""
    ranges = scale * array.shape[-1] if len(scale) == 1 else scale
    out = np.zeros(array.shape, np.uint8)
    valid = ~nodata
    for b, (low, high) in enumerate(ranges):
        band = array[..., b].astype(np.float64)
        outside = valid & ((band < low) | (band > high))
        if outside.any():
            values = band[valid]
            raise DataError(f"band {b + 1} used has {int(outside.sum())} pixel(s) outside 'scale' {low:g}..{high:g} "
                            f"(values {values.min():g}..{values.max():g}); they would be clipped", path=path,
                            fix=f"widen 'scale' in {DATA_FILE} to cover {values.min():g}..{values.max():g}")
        mapped = np.rint((band - low) / (high - low) * 255.0)
        out[..., b] = np.where(valid, mapped, 0).astype(np.uint8)
    return out


def to_rgb8(raster: Raster, spec: RasterSpec, path: Path) -> np.ndarray:
    """HxWx3 uint8 RGB of an image raster, exactly as the file and `spec` say; anything else is a DataError.

    Paletted rasters are expanded through their colour map, one band is repeated as grey, three bands are RGB;
    other band counts need `bands:`, other sample types need `scale:`. Nodata pixels become 0 (their labels
    become the ignore index in the dataset).
    """
    info = raster.info
    if raster.colormap is not None and spec.bands is None and spec.scale is None:
        return colormap_rgba(raster, path)[..., :RGB_BANDS].copy()
    array, lacking = _selected(raster, spec, path)
    if lacking:
        raise DataError(f"{info.bands}-band {info.dtype} image ({_span(info)}); todsynth reads 1- or 3-band "
                        "8-bit images unless data.yaml says which bands and how to scale them",
                        path=path, fix="; ".join(lacking) + ", or convert it to 8-bit RGB first")
    if spec.scale is not None:
        array = _scaled(array, raster.nodata, spec.scale, path)
    else:
        array = np.where(raster.nodata[..., None], 0, array).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, RGB_BANDS, axis=-1)
    return np.ascontiguousarray(array)
