"""Cut large scenes and their masks into size x size tiles: `todsynth data tile`.

Any layout the readers know (LoveDA, images/ + masks/ folder with classes.yaml, JSONL index) is written as a
folder dataset (images/, masks/, classes.yaml) plus tiles.json (where each tile came from). Tile ids are
`<scene id>_r<row>_c<col>` (grid row and column; ids that are not safe file names are sanitised as
everywhere else, see todsynth.filenames).

- Windows start every `stride` pixels; the last row and column are aligned to the scene's edge (they
  overlap their neighbour) so every pixel lands in a tile and nothing is padded.
- A pixel is valid when its label is not the ignore index and (GeoTIFF images) the image is not nodata
  there. Tiles with a valid share below `min_valid` are skipped and counted.
- GeoTIFF sources (.tif/.tiff, read with rasterio) give GeoTIFF tiles with the window's transform, the CRS,
  the dtype, bands and nodata of the scene; other images give PNG tiles (8-bit RGB, as the readers decode
  them). Masks are written as class indices (0..C-1, ignore index), GeoTIFF for GeoTIFF masks, else PNG.
- A scene smaller than `size` in either side is refused (named), before anything is written. The tiles
  are written into a hidden folder beside `out` that is renamed to `out` once complete, so an interrupted
  run leaves no half-written dataset.
"""

from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from todsynth.errors import ConfigError, DataError, DatasetProblems

GEOTIFF_SUFFIXES = (".tif", ".tiff")
TILES_FILE = "tiles.json"
CARRIED_FILES = ("data.yaml",)  # how to read the source's bands and values: true of its tiles too


@dataclass
class TileSummary:
    """What `tile_dataset` did: scenes read, tiles written and skipped, and where."""

    out: Path
    scenes: int = 0
    written: int = 0
    skipped: int = 0
    size: int = 0
    stride: int = 0
    min_valid: float = 0.0
    tiles: dict[str, dict] = field(default_factory=dict)


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """Window starts along one side: every `stride` pixels, the last aligned to the edge (nothing dropped)."""
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def _check_settings(size: int, stride: int, min_valid: float) -> None:
    """Raise ConfigError for a size, stride or min_valid that cannot tile."""
    if size < 1:
        raise ConfigError(f"size must be >= 1, got {size}", fix="give the tile side in pixels, e.g. --size 512")
    if not 1 <= stride <= size:
        raise ConfigError(
            f"stride must be between 1 and the size {size}, got {stride}",
            fix="a stride above the size would leave pixels out of every tile",
        )
    if not 0.0 <= min_valid <= 1.0:
        raise ConfigError(
            f"min_valid must be in [0, 1], got {min_valid}",
            fix="give the least share of valid (not ignore, not nodata) pixels a tile keeps",
        )


def _is_geotiff(path: Path | None) -> bool:
    """Whether a file is read (and its tiles written) with rasterio."""
    return path is not None and path.suffix.lower() in GEOTIFF_SUFFIXES


def _rasterio():
    """The rasterio module, or a DataError saying how to install it."""
    try:
        import rasterio
    except ImportError:
        raise DataError("GeoTIFF scenes need rasterio", fix="pip install rasterio") from None
    return rasterio


def _open_raster(path: Path):
    """Open a GeoTIFF with rasterio; an unreadable file is a DataError naming it."""
    rasterio = _rasterio()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            return rasterio.open(path)
    except rasterio.errors.RasterioError as e:
        raise DataError(f"cannot read the GeoTIFF: {e}", path=path, fix="re-export the file or remove it") from None


def _shape(path: Path, what: str) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels."""
    if _is_geotiff(path):
        with _open_raster(path) as src:
            return src.height, src.width
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except Exception as e:  # PIL signals bad files with many exception types
        raise DataError(f"cannot read the {what}: {e}", path=path, fix="re-export the file or remove it") from None


def _plan(ds, size: int) -> list[DataError]:
    """Every scene smaller than `size` or whose image and mask differ in size, as problems."""
    from todsynth.data.readers import size_mismatch

    problems = []
    for i in range(len(ds)):
        image, mask = ds.paths(i)
        try:
            shape = _shape(mask, "mask")
            if image is not None and _shape(image, "image") != shape:
                problems.append(size_mismatch(image, mask, _shape(image, "image"), shape))
                continue
        except DataError as e:
            problems.append(e)
            continue
        if min(shape) < size:
            problems.append(
                DataError(
                    f"scene '{ds.ids[i]}' is {shape[0]}x{shape[1]}, smaller than the tile size {size}",
                    path=image or mask,
                    fix="use a smaller --size, or remove the scene",
                )
            )
    return problems


def _georeferenced(src) -> bool:
    """Whether a raster carries a CRS or a non-identity transform worth copying into its tiles."""
    from affine import Affine

    return src.crs is not None or src.transform != Affine.identity()


def _write_geotiff(path: Path, data: np.ndarray, src, window, nodata=None) -> None:
    """Write bands [C, H, W] as a GeoTIFF with the window's transform and the CRS of `src` (if it has them)."""
    rasterio = _rasterio()
    profile = {
        "driver": "GTiff",
        "height": data.shape[1],
        "width": data.shape[2],
        "count": data.shape[0],
        "dtype": data.dtype.name,
        "nodata": nodata,
    }
    if _georeferenced(src):
        profile.update(crs=src.crs, transform=src.window_transform(window))
    compress = src.profile.get("compress")
    if compress:
        profile["compress"] = compress
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)


def _mask_dtype(classes) -> np.dtype:
    """The smallest unsigned dtype holding every class index and the ignore index."""
    top = max(classes.num_classes - 1, classes.ignore_index)
    return np.dtype(np.uint8) if top <= 255 else np.dtype(np.uint16)


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write an RGB uint8 or single-channel uint8/uint16 array as PNG."""
    from PIL import Image

    if array.dtype == np.uint16:
        Image.fromarray(array.astype(np.uint16), mode="I;16").save(path)
    else:
        Image.fromarray(array).save(path)


def _window(y: int, x: int, size: int):
    """The rasterio window of a tile."""
    from rasterio.windows import Window

    return Window(x, y, size, size)


class _Scene:
    """One scene's image and mask, opened for windowed reading and tile writing."""

    def __init__(self, ds, i: int):
        self.image_path, self.mask_path = ds.paths(i)
        self.label = ds.load_label(i)
        self.ignore = ds.classes.ignore_index
        self.mask_dtype = _mask_dtype(ds.classes)
        self.image_src = _open_raster(self.image_path) if _is_geotiff(self.image_path) else None
        self.mask_src = _open_raster(self.mask_path) if _is_geotiff(self.mask_path) else None
        self.rgb = None
        if self.image_path is not None and self.image_src is None:
            self.rgb = ds.load_image(i)

    def close(self) -> None:
        for src in (self.image_src, self.mask_src):
            if src is not None:
                src.close()

    def valid_share(self, y: int, x: int, size: int) -> float:
        """Share of pixels in the window that are labelled and (GeoTIFF images) not nodata."""
        valid = self.label[y : y + size, x : x + size] != self.ignore
        if self.image_src is not None:
            valid &= self.image_src.dataset_mask(window=_window(y, x, size)) > 0
        return float(valid.mean())

    def write(self, root: Path, tile_id: str, y: int, x: int, size: int) -> None:
        """Write the image and mask tiles of one window."""
        window = _window(y, x, size) if self.image_src is not None or self.mask_src is not None else None
        label = self.label[y : y + size, x : x + size].astype(self.mask_dtype)
        if self.mask_src is not None:
            _write_geotiff(root / "masks" / f"{tile_id}.tif", label[None], self.mask_src, window)
        else:
            _write_png(root / "masks" / f"{tile_id}.png", label)
        if self.image_src is not None:
            data = self.image_src.read(window=window)
            _write_geotiff(
                root / "images" / f"{tile_id}.tif", data, self.image_src, window, nodata=self.image_src.nodata
            )
        elif self.rgb is not None:
            _write_png(root / "images" / f"{tile_id}.png", np.ascontiguousarray(self.rgb[y : y + size, x : x + size]))


def _check_out(out: Path, src: Path) -> None:
    """Refuse an output folder that overlaps the source or already holds files."""
    from todsynth.synthesize import check_output_folder

    check_output_folder(out, {"source dataset": src})
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            "the output folder already exists and is not empty",
            path=out,
            fix="choose a new output folder, or remove this one",
        )


def tile_dataset(
    src: str | Path, out: str | Path, size: int, stride: int | None = None, min_valid: float = 0.5, split: str = "Train"
) -> TileSummary:
    """Cut every scene of `src` into size x size tiles (see the module docstring); returns what was done."""
    import yaml

    from todsynth.data.readers import open_dataset
    from todsynth.filenames import file_stem
    from todsynth.io import write_json

    src, out = Path(src), Path(out)
    stride = size if stride is None else stride
    _check_settings(size, stride, min_valid)
    _check_out(out, src)
    ds = open_dataset(src, split=split)
    problems = _plan(ds, size)
    if problems:
        raise DatasetProblems(ds.root, problems)
    summary = TileSummary(out, scenes=len(ds), size=size, stride=stride, min_valid=min_valid)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    try:
        (work / "masks").mkdir(parents=True)
        if not ds.label_only:
            (work / "images").mkdir()
        for i in range(len(ds)):
            _tile_scene(ds, i, work, summary, file_stem)
        if not summary.written:
            raise DataError(
                f"every one of the {summary.skipped} tiles has less than {min_valid:.0%} valid pixels",
                path=src,
                fix="lower --min-valid",
            )
        (work / "classes.yaml").write_text(yaml.safe_dump(ds.classes.to_dict(), sort_keys=False))
        for name in CARRIED_FILES:
            if (ds.root / name).is_file():
                shutil.copy2(ds.root / name, work / name)
        write_json(
            work / TILES_FILE,
            {
                "source": str(src),
                "size": size,
                "stride": stride,
                "min_valid": min_valid,
                "skipped": summary.skipped,
                "tiles": summary.tiles,
            },
        )
        if out.is_dir():
            out.rmdir()  # checked empty above
        os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return summary


def _tile_scene(ds, i: int, root: Path, summary: TileSummary, file_stem) -> None:
    """Write the kept tiles of scene `i`, counting the skipped ones."""
    scene = _Scene(ds, i)
    try:
        h, w = scene.label.shape
        for r, y in enumerate(tile_starts(h, summary.size, summary.stride)):
            for c, x in enumerate(tile_starts(w, summary.size, summary.stride)):
                if scene.valid_share(y, x, summary.size) < summary.min_valid:
                    summary.skipped += 1
                    continue
                tile_id = file_stem(f"{ds.ids[i]}_r{r}_c{c}")
                scene.write(root, tile_id, y, x, summary.size)
                summary.tiles[tile_id] = {"scene": ds.ids[i], "y": y, "x": x}
                summary.written += 1
    finally:
        scene.close()
