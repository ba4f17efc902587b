"""Dataset readers (LoveDA, image/mask folder, JSONL index): lazy `Sequence[Sample]`s over found files."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, overload

import numpy as np

from todsynth.data.classes import LOVEDA, ClassSpec
from todsynth.data.prompts import PromptFn, build_prompt
from todsynth.data.rasters import (
    DATA_FILE,
    RGB_BANDS,
    Raster,
    RasterInfo,
    RasterSpec,
    band_ranges,
    colormap_rgba,
    is_raster_file,
    load_raster_spec,
    pixel_limit,
    read_raster,
    select_bands,
    too_many_pixels,
    unreadable,
)
from todsynth.data.sample import Sample
from todsynth.errors import DataError, DatasetProblems

if TYPE_CHECKING:
    from PIL.Image import Image

MaskEncoding = Literal["index", "loveda"]
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
LOVEDA_DOMAINS = ("Urban", "Rural")
LOVEDA_SPLITS = ("Train", "Val", "Test")
CLASSES_FILE = "classes.yaml"
CLASSES_KEYS = ("names", "classes", "ignore_index", "palette", "ignore_colors")
INDEX_MODES = frozenset({"1", "L", "P", "I;16", "I;16L", "I;16B", "I;16N", "I"})
COLOUR_MODES = frozenset({"RGB", "RGBA"})
HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
LAYOUTS = (
    "accepted layouts: a LoveDA root (<root>/Train/{Urban,Rural}/{images_png,masks_png}), "
    "a folder with images/, masks/ and classes.yaml (masks/ only: label-only), or a .jsonl index"
)
CLASSES_EXAMPLE = (
    "e.g. 'names: [background, building, road]' (or 'classes: [...]') with optional "
    "'ignore_index: 255', 'palette' and 'ignore_colors'"
)
ROOT_FIX = "copy the file into the dataset, or point the dataset at the real folder"
MASK_DEPTHS = {"I;16": "16-bit", "I;16L": "16-bit", "I;16B": "16-bit", "I;16N": "16-bit", "I": "32-bit integer"}
PALETTED_MODES = frozenset({"P", "PA"})
MASK_FIX = "save masks as single-channel PNGs of class indices (mode L or P)"


def escapes_root(path: Path, root: Path, what: str, at: Path | None = None) -> DataError | None:
    """The one root rule of every reader: a DataError if `path` resolves outside `root` (via '..', an absolute
    path or a symlink), else None; a dataset is the files under its root, so links out of it are refused.

    `at` is the file the error names (default `path`). Resolving may raise OSError, RuntimeError (a symlink loop)
    or ValueError (a NUL byte); the caller reports those.
    """
    target = path.resolve()
    if target.is_relative_to(root.resolve()):
        return None
    return DataError(f"{what} points outside the dataset root {root} (to {target})", path=at or path, fix=ROOT_FIX)


def _too_many_pixels(what: str, path: Path, e: Exception) -> DataError:
    """The error for a file over PIL's decompression-bomb pixel limit (warning or error alike)."""
    found = re.search(r"\((\d+) pixels\)", str(e))
    return too_many_pixels(what, path, int(found.group(1)) if found else None)


def _open_loaded(path: Path, what: str) -> Image:
    """Open and fully decode one file with PIL; any failure becomes a DataError naming the file.

    PIL's decompression-bomb warning is raised as an error, so every image over the pixel limit is refused
    with one clear message instead of a raw warning.
    """
    from PIL import Image

    pixel_limit()
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except FileNotFoundError:
            raise DataError(f"{what} file not found", path=path) from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _too_many_pixels(what, path, e) from None
        except Exception as e:  # PIL signals bad files with OSError, SyntaxError, ValueError, zlib/struct errors
            raise unreadable(what, path, e) from None
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            im.close()
            raise _too_many_pixels(what, path, e) from None
        except Exception as e:
            im.close()
            raise unreadable(what, path, e) from None
    return im


def _image_array(im: Image, path: Path) -> np.ndarray:
    """8-bit RGB pixels of an image: alpha dropped, grey and palette expanded, high bit depths refused."""
    if im.mode in HIGH_BIT_MODES:
        raise DataError(
            f"image has mode '{im.mode}' (16/32-bit); todsynth reads 8-bit images",
            path=path,
            fix="convert it to 8-bit RGB first (e.g. with a percentile stretch)",
        )
    return np.array(im.convert("RGB"), dtype=np.uint8)


def _pil_info(im: Image, array: np.ndarray) -> RasterInfo:
    """RasterInfo of a PIL-decoded file: its own band count, value ranges of the (8-bit) array it was read as."""
    pixels = array if array.ndim == 3 else array[..., None]
    ranges = band_ranges(pixels, np.zeros(pixels.shape[:2], bool))
    dtype = "uint8" if im.mode not in HIGH_BIT_MODES else str(np.array(im).dtype)
    return RasterInfo(dtype, len(im.getbands()), pixels.shape[0], pixels.shape[1], ranges, 0)


def read_image_data(
    path: str | Path, spec: RasterSpec | None = None
) -> tuple[np.ndarray, np.ndarray | None, RasterInfo]:
    """(HxWxC samples, HxW nodata pixels or None, what the file holds) of an image file.

    TIFFs and 16-bit PNGs are read with rasterio: the bands `spec` (data.yaml) selects, in their own dtype
    (`select_bands`); 8-bit PNG/JPEG with PIL as HxWx3 uint8 RGB. Datasets label nodata pixels with the
    ignore index; the model input sets them to 0 (`todsynth.data.bands.image_tensor`).
    """
    path = Path(path)
    spec = spec or RasterSpec()
    if is_raster_file(path, "image"):
        raster = read_raster(path, "image")
        return select_bands(raster, spec, path), raster.nodata if raster.info.nodata_pixels else None, raster.info
    with _open_loaded(path, "image") as im:
        rgb = _image_array(im, path)
        raw = np.array(im) if im.mode in ("L", "LA", "RGB", "RGBA") else rgb
        return rgb, None, _pil_info(im, raw)


def describe_image(path: str | Path) -> RasterInfo | None:
    """What an image file holds (sample type, bands, value ranges, nodata) even when it cannot be read as RGB;
    None when it cannot be decoded at all. `data check` uses it to describe refused files."""
    path = Path(path)
    try:
        if is_raster_file(path, "image"):
            return read_raster(path, "image").info
        with _open_loaded(path, "image") as im:
            raw = (
                np.array(im)
                if im.mode in ("L", "LA", "RGB", "RGBA") + tuple(HIGH_BIT_MODES)
                else np.array(im.convert("RGB"))
            )
            return _pil_info(im, raw)
    except DataError:
        return None


def read_image(path: str | Path, spec: RasterSpec | None = None) -> np.ndarray:
    """Read an image file as HxWxC samples: 8-bit RGB, or a raster's bands as data.yaml's `spec` selects them."""
    return read_image_data(path, spec)[0]


def _colour_codes(rgb: np.ndarray) -> np.ndarray:
    """Pack HxWx3 (or Nx3) colours into one int64 per pixel."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def _colour_label(pixels: np.ndarray, classes: ClassSpec, path: Path) -> np.ndarray:
    """Map an RGB(A) mask to classes by palette; transparent pixels and `ignore_colors` are ignore, unknown
    colours an error."""
    palette = _colour_codes(np.array(classes.palette))
    order = np.argsort(palette)
    codes = _colour_codes(pixels[..., :3])
    pos = np.clip(np.searchsorted(palette[order], codes), 0, len(palette) - 1)
    found = palette[order][pos] == codes
    transparent = pixels[..., 3] == 0 if pixels.shape[-1] == 4 else np.zeros(codes.shape, bool)
    if classes.ignore_colors:
        transparent |= np.isin(codes, _colour_codes(np.array(classes.ignore_colors)))
    unknown = ~found & ~transparent
    if unknown.any():
        shown = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in np.unique(codes[unknown])[:5].tolist()]
        raise DataError(
            f"mask has {int(unknown.sum())} pixel(s) in colours not in the palette, e.g. {shown}",
            path=path,
            fix="add the colours to 'palette' (classes) or 'ignore_colors' (unlabelled) "
            "in classes.yaml, or repaint the mask",
        )
    label = order[pos].astype(np.int64)
    label[transparent] = classes.ignore_index
    return label


@dataclass(frozen=True)
class MaskCodec:
    """How mask pixels become labels: class indices ('index') or LoveDA's label+1, 0 = no-data ('loveda')."""

    classes: ClassSpec
    encoding: MaskEncoding = "index"

    def __post_init__(self) -> None:
        if self.encoding not in get_args(MaskEncoding):
            raise ValueError(f"mask encoding must be one of {get_args(MaskEncoding)}, got {self.encoding!r}")

    @property
    def palette(self) -> tuple[tuple[int, int, int], ...] | None:
        """The palette for colour masks, or None when colour masks are refused (LoveDA masks are values)."""
        return self.classes.palette if self.encoding == "index" else None

    def read(self, path: str | Path) -> np.ndarray:
        """Read a mask file as an HxW int64 label map (0..C-1 or the ignore index)."""
        return self.read_info(path)[0]

    def read_info(self, path: str | Path) -> tuple[np.ndarray, RasterInfo]:
        """(HxW int64 label map, what the file holds) of a mask; rasters' nodata pixels become the ignore index."""
        path = Path(path)
        if is_raster_file(path, "mask"):
            raster = read_raster(path, "mask")
            return self._raster_label(raster, path), raster.info
        with _open_loaded(path, "mask") as im:
            label = self._label(im, path)
            raw = (
                np.array(im) if im.mode not in PALETTED_MODES or self.palette is None else np.array(im.convert("RGBA"))
            )
            return label, _pil_info(im, raw)

    def _label(self, im: Image, path: Path) -> np.ndarray:
        """Label map of an opened mask, by its PIL mode; paletted masks go through their colours when the
        classes have a palette (their raw indices need not follow the class order)."""
        if im.mode in PALETTED_MODES and self.palette is not None:
            return _colour_label(np.array(im.convert("RGBA")), self.classes, path)
        if im.mode in COLOUR_MODES and self.palette is not None:
            return _colour_label(np.array(im), self.classes, path)
        if im.mode not in INDEX_MODES:
            raise DataError(self._mode_problem(im.mode), path=path, fix=MASK_FIX)
        raw = np.array(im).astype(np.int64)
        depth = f"{MASK_DEPTHS[im.mode]} mask (mode {im.mode})" if im.mode in MASK_DEPTHS else None
        self._check_values(raw, path, depth)
        return self._labels_of(raw)

    def _labels_of(self, raw: np.ndarray) -> np.ndarray:
        """Labels of checked raw mask values (LoveDA: value 0 is no-data, others are label + 1)."""
        if self.encoding == "loveda":
            return np.where(raw == 0, self.classes.ignore_index, raw - 1)
        return raw

    def _raster_label(self, raster: Raster, path: Path) -> np.ndarray:
        """Label map of a mask read with rasterio: one band of integers (or a paletted band); nodata is ignore."""
        info = raster.info
        if raster.colormap is not None and self.palette is not None:
            return _colour_label(colormap_rgba(raster.array, raster.colormap, path), self.classes, path)
        rgba = info.bands == RGB_BANDS + 1 and raster.colour_names[-1] == "alpha"
        if (info.bands == RGB_BANDS or rgba) and self.palette is not None and info.dtype == "uint8":
            label = _colour_label(raster.array, self.classes, path)
        elif info.bands != 1:
            raise DataError(
                f"mask has {info.bands} bands of {info.dtype} samples; masks hold one band of class "
                "indices (or 8-bit RGB colours with a palette)",
                path=path,
                fix=MASK_FIX,
            )
        elif np.dtype(info.dtype).kind == "f":
            raise DataError(
                f"mask holds floating-point values ({info.dtype}), not class indices", path=path, fix=MASK_FIX
            )
        else:
            raw = raster.array[..., 0].astype(np.int64)
            kind = "integer" if np.dtype(info.dtype).kind == "i" else "unsigned integer"
            self._check_values(
                np.where(raster.nodata, 0, raw),
                path,
                f"{np.dtype(info.dtype).itemsize * 8}-bit {kind} mask ({info.dtype})",
            )
            label = self._labels_of(raw)
        return np.where(raster.nodata, self.classes.ignore_index, label)

    def _mode_problem(self, mode: str) -> str:
        """Why a mask of this PIL mode cannot be read."""
        if mode in COLOUR_MODES and self.encoding == "loveda":
            return f"mask is a colour image ({mode}); LoveDA masks hold single-channel values 0..7"
        if mode in COLOUR_MODES:
            return f"mask is a colour image ({mode}) but the classes have no palette to map colours to labels"
        if mode == "F":
            return "mask holds floating-point values, not class indices"
        return f"mask is not single-channel (mode {mode})"

    def _check_values(self, raw: np.ndarray, path: Path, depth: str | None) -> None:
        """Raise DataError if raw mask values are neither classes nor the ignore/no-data value."""
        top = self.classes.num_classes - (0 if self.encoding == "loveda" else 1)
        if raw.size == 0 or (raw.min() >= 0 and raw.max() <= top):
            return
        bad = raw[(raw < 0) | (raw > top)]
        if self.encoding == "index":
            bad = bad[bad != self.classes.ignore_index]
        if bad.size == 0:
            return
        values = np.unique(bad)
        depth = f" in a {depth}" if depth else ""
        lossy = path.suffix.lower() in (".jpg", ".jpeg")
        fix = (
            "save masks as PNG: JPEG compression changes label values"
            if lossy
            else "fix the mask, or the class list in classes.yaml"
        )
        raise DataError(
            f"mask values {values[:8].tolist()}{depth} are not classes ({self._valid_values()})", path=path, fix=fix
        )

    def _valid_values(self) -> str:
        """The valid raw values, in words."""
        n = self.classes.num_classes
        if self.encoding == "loveda":
            return f"LoveDA masks hold 0 = no-data and 1..{n} for the {n} classes"
        return f"valid: 0..{n - 1} for {n} classes, {self.classes.ignore_index} = ignore"


@dataclass(frozen=True)
class Item:
    """One discovered sample: its id, mask file, image file (None when label-only) and stored prompt."""

    id: str
    mask: Path
    image: Path | None = None
    prompt: str | None = None


def with_image_nodata(label: np.ndarray, nodata: np.ndarray | None, classes: ClassSpec) -> np.ndarray:
    """The label map with the image's nodata pixels set to the ignore index: nothing was measured there."""
    if nodata is None:
        return label
    return np.where(nodata, classes.ignore_index, label)


def size_mismatch(image: Path, mask: Path, image_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> DataError:
    """The error for an image and mask of different sizes."""
    return DataError(
        f"image is {image_shape[0]}x{image_shape[1]} but its mask {mask} is {mask_shape[0]}x{mask_shape[1]}",
        path=image,
        fix="resize or re-export one of them",
    )


class BaseDataset(Sequence[Sample]):
    """Shared behaviour: a discovered list of items, each loaded lazily into a Sample."""

    def __init__(
        self,
        root: str | Path,
        classes: ClassSpec,
        items: Iterable[Item],
        *,
        label_only: bool,
        codec: MaskCodec,
        prompt_fn: PromptFn | None = None,
        problems: Iterable[DataError] = (),
        strict: bool = True,
        raster: RasterSpec | None = None,
    ):
        self.root = Path(root)
        self.classes = classes
        self.raster = raster or RasterSpec()
        self.label_only = label_only
        self.codec = codec
        self.prompt_fn = prompt_fn
        self._items = list(items)
        self.ids = [item.id for item in self._items]
        self.problems = list(problems)
        if not self._items:
            self.problems.append(DataError("no samples found", path=self.root, fix=LAYOUTS))
        if strict and self.problems:
            raise DatasetProblems(self.root, self.problems)

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, i: int) -> Sample: ...

    @overload
    def __getitem__(self, i: slice) -> SubsetDataset: ...

    def __getitem__(self, i: int | slice) -> Sample | SubsetDataset:
        if isinstance(i, slice):
            return SubsetDataset(self, self.ids[i])
        item = self.item(i)
        label = self.codec.read(item.mask)
        image = nodata = None
        if item.image is not None:
            image, nodata, _ = read_image_data(item.image, self.raster)
            if image.shape[:2] != label.shape:
                raise size_mismatch(item.image, item.mask, image.shape, label.shape)
            label = with_image_nodata(label, nodata, self.classes)
        return Sample(image, label, self.prompt(i, label), item.id, nodata)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, n={len(self)}, label_only={self.label_only})"

    def item(self, i: int) -> Item:
        """The discovered item at position `i` (negative counts from the end)."""
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"dataset indices must be integers or slices, not {type(i).__name__}")
        n = len(self._items)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} samples")
        return self._items[int(i)]

    def paths(self, i: int) -> tuple[Path | None, Path]:
        """(image file or None, mask file) of item `i`."""
        item = self.item(i)
        return item.image, item.mask

    def load_label(self, i: int) -> np.ndarray:
        """The HxW int64 label map of item `i`."""
        return self.codec.read(self.item(i).mask)

    def load_label_info(self, i: int) -> tuple[np.ndarray, RasterInfo]:
        """(HxW int64 label map, mask file description) of item `i`."""
        return self.codec.read_info(self.item(i).mask)

    def load_image(self, i: int) -> np.ndarray | None:
        """The HxWxC image samples of item `i` (see `read_image`), or None in label-only datasets."""
        image = self.item(i).image
        return None if image is None else read_image(image, self.raster)

    def load_image_data(self, i: int) -> tuple[np.ndarray, np.ndarray | None, RasterInfo] | None:
        """(HxWxC samples, nodata pixels or None, file description) of item `i`'s image, or None if label-only."""
        image = self.item(i).image
        return None if image is None else read_image_data(image, self.raster)

    def prompt(self, i: int, label: np.ndarray) -> str:
        """Prompt of item `i`: `prompt_fn` if given, else the stored prompt, else one built from `label`."""
        if self.prompt_fn is not None:
            return self.prompt_fn(label, self.classes)
        return self.item(i).prompt or build_prompt(label, self.classes)


class SubsetDataset(BaseDataset):
    """The samples of another dataset with the given ids, in that order."""

    def __init__(self, ds: BaseDataset, ids: Iterable[str]):
        ids = list(ids)
        position = {id_: k for k, id_ in enumerate(ds.ids)}
        unknown = [i for i in ids if i not in position]
        if unknown:
            raise DataError(
                f"{len(unknown)} id(s) are not in the dataset, e.g. {unknown[:5]}",
                path=ds.root,
                fix="use a split made for this dataset",
            )
        if len(set(ids)) != len(ids):
            raise DataError("the id list repeats ids", path=ds.root)
        if not ids:
            raise DataError("the id list is empty", path=ds.root)
        super().__init__(
            ds.root,
            ds.classes,
            [ds.item(position[i]) for i in ids],
            label_only=ds.label_only,
            codec=ds.codec,
            prompt_fn=ds.prompt_fn,
            raster=ds.raster,
        )
        self.parent = ds


def _natural_key(name: str) -> list[Any]:
    """Sort key that orders '2' before '10'."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _listed_file(path: Path, root: Path, what: str, problems: list[DataError]) -> bool:
    """Whether a listed entry is a usable file under `root`; links out of the root or to nothing are problems."""
    try:
        escape = escapes_root(path, root, what)
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        problems.append(DataError(f"{what} cannot be resolved ({e})", path=path, fix="fix or remove the link"))
        return False
    if escape is not None:
        problems.append(escape)
        return False
    if path.is_symlink() and not path.exists():
        problems.append(DataError(f"{what} is a link to a missing file", path=path, fix="fix or remove the link"))
        return False
    return path.is_file()


def _files_by_stem(
    folder: Path, root: Path, what: str, problems: list[DataError], refused: set[str] | None = None
) -> dict[str, Path]:
    """Image files of `folder` by stem; a second file with the same stem is a duplicate-id problem. Stems of files
    refused with a problem of their own (a link out of the root or to nothing) are added to `refused`."""
    try:
        entries = sorted(folder.iterdir(), key=lambda p: _natural_key(p.name))
    except OSError as e:
        raise DataError(f"cannot list the folder: {e.strerror}", path=folder) from None
    found: dict[str, Path] = {}
    for path in entries:
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        before = len(problems)
        if not _listed_file(path, root, what, problems):
            if refused is not None and len(problems) > before:
                refused.add(path.stem)
            continue
        if path.stem in found:
            problems.append(
                DataError(
                    f"duplicate id '{path.stem}' (also {found[path.stem].name})", path=path, fix="keep one file per id"
                )
            )
            continue
        found[path.stem] = path
    return found


def _folder_problem(folder: Path, root: Path, what: str) -> DataError | None:
    """Why a sample folder cannot be listed: missing, or outside the dataset root; None if it can."""
    if not folder.is_dir():
        return DataError(f"{what} folder is missing", path=folder, fix=LAYOUTS)
    try:
        return escapes_root(folder, root, f"{what} folder")
    except (OSError, RuntimeError) as e:
        return DataError(f"{what} folder cannot be resolved ({e})", path=folder, fix="fix or remove the link")


def _pair_folders(
    root: Path, image_dir: Path | None, mask_dir: Path, prefix: str = ""
) -> tuple[list[Item], list[DataError]]:
    """Match images to masks by stem; unmatched files, missing folders and links out of `root` are problems."""
    problems: list[DataError] = []
    trouble = _folder_problem(mask_dir, root, "masks")
    if trouble is not None:
        return [], [trouble]
    refused: set[str] = set()  # a file refused on its own is not also reported as its partner's missing half
    masks = _files_by_stem(mask_dir, root, "mask", problems, refused)
    if image_dir is None:
        return [Item(prefix + stem, mask) for stem, mask in masks.items()], problems
    trouble = _folder_problem(image_dir, root, "images")
    if trouble is not None:
        return [], problems + [trouble]
    images = _files_by_stem(image_dir, root, "image", problems, refused)
    problems += [
        DataError("image has no mask", path=path, fix=f"add its mask to {mask_dir} or remove it")
        for stem, path in images.items()
        if stem not in masks and stem not in refused
    ]
    problems += [
        DataError("mask has no image", path=path, fix=f"add its image to {image_dir} or remove it")
        for stem, path in masks.items()
        if stem not in images and stem not in refused
    ]
    items = [Item(prefix + stem, masks[stem], path) for stem, path in images.items() if stem in masks]
    return items, problems


def load_classes(path: str | Path) -> ClassSpec:
    """Read a classes.yaml (names or classes, ignore_index, palette, ignore_colors); unknown keys and bad values
    are DataErrors."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("classes file not found", path=path, fix=f"write one, {CLASSES_EXAMPLE}") from None
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:  # ValueError: bad dates, bad UTF-8
        raise DataError(f"cannot read classes file: {e}", path=path, fix=CLASSES_EXAMPLE) from None
    if not isinstance(data, dict):
        raise DataError("classes file must be a mapping", path=path, fix=CLASSES_EXAMPLE)
    unknown = sorted(str(k) for k in set(data) - set(CLASSES_KEYS))
    if unknown:
        raise DataError(
            f"unknown key(s) {unknown} in classes file; known: {list(CLASSES_KEYS)}",
            path=path,
            fix=f"remove or rename them, {CLASSES_EXAMPLE}",
        )
    classes = ClassSpec.from_dict(data, path=path)
    if classes.palette is not None and len(set(classes.palette)) != len(classes.palette):
        raise DataError("'palette' lists a colour twice", path=path, fix="give every class its own colour")
    return classes


class LoveDADataset(BaseDataset):
    """LoveDA: root/{split}/{Urban,Rural}/{images_png,masks_png}; mask 0 = no-data, 1..7 = classes 0..6."""

    def __init__(
        self,
        root: str | Path,
        split: str = "Train",
        domains: Sequence[str] = LOVEDA_DOMAINS,
        prompt_fn: PromptFn | None = None,
        *,
        strict: bool = True,
        raster: RasterSpec | None = None,
    ):
        root = Path(root)
        split_dir = root / split
        if not split_dir.is_dir():
            splits = [s for s in LOVEDA_SPLITS if (root / s).is_dir()]
            raise DataError(f"no '{split}' split folder (found: {splits or 'none'})", path=split_dir, fix=LAYOUTS)
        present = [d for d in domains if (split_dir / d).is_dir()]
        if not present:
            raise DataError(f"no {' or '.join(domains)} folder in the split", path=split_dir, fix=LAYOUTS)
        label_only = not any((split_dir / d / "images_png").is_dir() for d in present)
        items: list[Item] = []
        problems: list[DataError] = []
        for d in present:
            image_dir = None if label_only else split_dir / d / "images_png"
            found, trouble = _pair_folders(root, image_dir, split_dir / d / "masks_png", prefix=f"{d}/")
            items += found
            problems += trouble
        super().__init__(
            root,
            LOVEDA,
            items,
            label_only=label_only,
            codec=MaskCodec(LOVEDA, "loveda"),
            prompt_fn=prompt_fn,
            problems=problems,
            strict=strict,
            raster=raster or load_raster_spec(root / DATA_FILE),
        )
        self.split = split
        self.domains = tuple(present)


class FolderDataset(BaseDataset):
    """root/images + root/masks matched by stem, classes from root/classes.yaml, raster settings from
    root/data.yaml (optional); masks only → label-only."""

    def __init__(
        self,
        root: str | Path,
        prompt_fn: PromptFn | None = None,
        *,
        classes: ClassSpec | None = None,
        strict: bool = True,
        raster: RasterSpec | None = None,
    ):
        root = Path(root)
        if not root.is_dir():
            raise DataError("dataset folder not found", path=root)
        classes = classes or load_classes(root / CLASSES_FILE)
        label_only = not (root / "images").is_dir()
        items, problems = _pair_folders(root, None if label_only else root / "images", root / "masks")
        super().__init__(
            root,
            classes,
            items,
            label_only=label_only,
            codec=MaskCodec(classes),
            prompt_fn=prompt_fn,
            problems=problems,
            strict=strict,
            raster=raster or load_raster_spec(root / DATA_FILE),
        )


def _index_path(root: Path, value: Any, where: str, index: Path, problems: list[DataError]) -> Path | None:
    """Resolve one path of the index under `root`; escaping the root or a missing file is a problem."""
    if not isinstance(value, str) or not value:
        problems.append(DataError(f"{where} must be a non-empty path string", path=index))
        return None
    path = Path(value) if Path(value).is_absolute() else root / value
    try:  # NUL bytes, lone surrogates and over-long names make the OS calls raise
        escape = escapes_root(path, root, f"{where} path '{value}'", at=index)
        found = escape is None and path.is_file()
    except (OSError, RuntimeError, ValueError) as e:
        problems.append(
            DataError(
                f"{where} path {value!r} cannot be resolved ({e})",
                path=index,
                fix="write a valid relative path under the dataset root",
            )
        )
        return None
    if escape is not None:
        problems.append(escape)
        return None
    if not found:
        problems.append(
            DataError(
                f"file listed in {where} of {index.name} not found",
                path=path,
                fix=f"fix the path in {index.name} or add the file",
            )
        )
        return None
    return path


def _index_records(index: Path, problems: list[DataError]) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL index; bad lines are problems."""
    try:
        lines = index.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError("index file not found", path=index) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the index: {e}", path=index) from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(
                DataError(f"line {n}: not valid JSON ({e.msg})", path=index, fix="write one JSON object per line")
            )
            continue
        if not isinstance(record, dict) or "source" not in record:
            problems.append(DataError(f"line {n}: expected an object with a 'source' (mask) path", path=index))
            continue
        records.append((n, record))
    return records


def _index_item(
    root: Path, index: Path, n: int, record: dict, label_only: bool, problems: list[DataError]
) -> Item | None:
    """The Item of one index line, or None (with problems recorded)."""
    before = len(problems)
    mask = _index_path(root, record["source"], f"line {n} 'source'", index, problems)
    image = None
    if not label_only:
        image = _index_path(root, record.get("target"), f"line {n} 'target'", index, problems)
    prompt = record.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        problems.append(DataError(f"line {n}: 'prompt' must be a string", path=index))
    if len(problems) > before or mask is None:
        return None
    default_id = str(Path(record["source"]).with_suffix(""))
    return Item(str(record.get("id", record.get("index", default_id))), mask, image, prompt or None)


def _index_items(
    root: Path, index: Path, records: list[tuple[int, dict]], label_only: bool, problems: list[DataError]
) -> list[Item]:
    """Items of all index lines; a repeated id is a problem and its line is skipped."""
    items: list[Item] = []
    first_line: dict[str, int] = {}
    for n, record in records:
        item = _index_item(root, index, n, record, label_only, problems)
        if item is not None and item.id in first_line:
            first = first_line[item.id]
            problems.append(
                DataError(
                    f"line {n}: duplicate id '{item.id}' (first on line {first})",
                    path=index,
                    fix="give every line its own id and files",
                )
            )
        elif item is not None:
            first_line[item.id] = n
            items.append(item)
    return items


class JsonlDataset(BaseDataset):
    """The reference index: one JSON per line, {"source": mask, "target": image, "prompt": ...}, under `root`.

    No "target" on any line makes a label-only dataset. A stored prompt is used unless `prompt_fn` is given.
    Ids come from an "id" or "index" key, else the mask path without suffix. Classes: `classes`, else a
    classes.yaml next to the index, else LoveDA's.
    """

    def __init__(
        self,
        index: str | Path,
        root: str | Path | None = None,
        classes: ClassSpec | None = None,
        prompt_fn: PromptFn | None = None,
        *,
        encoding: MaskEncoding = "index",
        strict: bool = True,
        raster: RasterSpec | None = None,
    ):
        index = Path(index)
        root = index.parent if root is None else Path(root)
        problems: list[DataError] = []
        records = _index_records(index, problems)
        if classes is None:
            beside = index.parent / CLASSES_FILE
            classes = load_classes(beside) if beside.is_file() else LOVEDA
        label_only = bool(records) and not any("target" in r for _, r in records)
        items = _index_items(root, index, records, label_only, problems)
        super().__init__(
            root,
            classes,
            items,
            label_only=label_only,
            codec=MaskCodec(classes, encoding),
            prompt_fn=prompt_fn,
            problems=problems,
            strict=strict,
            raster=raster or load_raster_spec(index.parent / DATA_FILE),
        )
        self.index_file = index  # not `index`: that is Sequence.index, a method


def _loveda_split_dir(path: Path) -> bool:
    """Whether `path` holds LoveDA domain folders (Urban/Rural)."""
    return any((path / d).is_dir() for d in LOVEDA_DOMAINS)


def ignores_split(path: str | Path) -> bool:
    """Whether `open_dataset` reads `path` without a split: a .jsonl index, a folder dataset or a LoveDA split
    folder (only a LoveDA root has splits); False for a LoveDA root or a path it cannot open."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".jsonl"
    if not path.is_dir():
        return False
    if (path / CLASSES_FILE).is_file() or (path / "masks").is_dir():
        return True
    return _loveda_split_dir(path) and not any(_loveda_split_dir(path / s) for s in LOVEDA_SPLITS)


def open_dataset(path: str | Path, split: str = "Train", **kw: Any) -> BaseDataset:
    """Open a dataset by its layout: .jsonl index, image/mask folder, LoveDA root or LoveDA split folder."""
    path = Path(path)
    if not path.exists():
        raise DataError("dataset path not found", path=path, fix=LAYOUTS)
    if path.is_file() and path.suffix.lower() == ".jsonl":
        return JsonlDataset(path, **kw)
    if path.is_dir() and ((path / CLASSES_FILE).is_file() or (path / "masks").is_dir()):
        return FolderDataset(path, **kw)
    if path.is_dir() and any(_loveda_split_dir(path / s) for s in {split, *LOVEDA_SPLITS}):
        return LoveDADataset(path, split, **kw)
    if path.is_dir() and _loveda_split_dir(path):
        return LoveDADataset(path.parent, path.name, **kw)
    raise DataError("not a dataset in a known layout", path=path, fix=LAYOUTS)
