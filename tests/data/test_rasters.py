"""Rasters read with rasterio (issue 11): 16-bit, multi-band and float GeoTIFFs, nodata, data.yaml, data check."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from todsynth.data.bands import fit_normalisation, image_tensor
from todsynth.data.check import check_dataset
from todsynth.data.rasters import load_raster_spec
from todsynth.data.readers import FolderDataset, MaskCodec, load_classes, open_dataset, read_image
from todsynth.errors import DataError

CLASSES = "names: [background, building, water]\n"


def write_tif(path: Path, bands: np.ndarray, driver: str = "GTiff", **profile) -> Path:
    """Write a CxHxW array as a raster file with rasterio (a GeoTIFF by default)."""
    import rasterio
    from rasterio.transform import from_origin

    path.parent.mkdir(parents=True, exist_ok=True)
    c, h, w = bands.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PNGs carry no geotransform
        extra = {"crs": "EPSG:32633", "transform": from_origin(500000, 4000000, 0.5, 0.5)} if driver == "GTiff" else {}
        with rasterio.open(
            path, "w", driver=driver, width=w, height=h, count=c, dtype=bands.dtype, **extra, **profile
        ) as dst:
            dst.write(bands)
    return path


def tif_dataset(root: Path, images: list[np.ndarray], data_yaml: str | None = None, **profile) -> Path:
    """A folder dataset of GeoTIFF images (CxHxW each) with 8-bit index masks of class 1."""
    for i, bands in enumerate(images):
        write_tif(root / "images" / f"t{i}.tif", bands, **profile)
        write_tif(root / "masks" / f"t{i}.tif", np.ones((1, *bands.shape[1:]), np.uint8))
    (root / "classes.yaml").write_text(CLASSES)
    if data_yaml is not None:
        (root / "data.yaml").write_text(data_yaml)
    return root


def uint16_rgb(h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    """3xHxW uint16 values 0..3999 (the issue's 16-bit RGB TIFF)."""
    bands = np.random.default_rng(seed).integers(0, 4000, (3, h, w)).astype(np.uint16)
    bands[:, 0, 0] = (0, 3999, 2000)
    return bands


def test_sixteen_bit_rgb_tiff_is_refused_not_reduced_to_its_high_byte(tmp_path: Path) -> None:
    """Was read as its high byte (a black image) and 'no problems found'; now refused naming file and setting."""
    root = tif_dataset(tmp_path / "ds", [uint16_rgb()])
    report = check_dataset(root)
    assert len(report.problems) == 1, report.problems
    problem = report.problems[0]
    assert problem.path == root / "images" / "t0.tif"
    assert "3-band uint16 image (values 0..3999)" in str(problem) and "'scale: [low, high]' in data.yaml" in str(
        problem
    )
    with pytest.raises(DataError, match="uint16"):
        FolderDataset(root)[0]


def test_sixteen_bit_rgb_tiff_with_scale_reads_every_value(tmp_path: Path) -> None:
    """With 'scale: [0, 3999]' every 16-bit value is kept (not the high byte) and maps onto 0..1 as model input."""
    bands = uint16_rgb()
    root = tif_dataset(tmp_path / "ds", [bands], "scale: [0, 3999]\n")
    ds = FolderDataset(root)
    image = ds[0].image
    assert image.dtype == np.uint16 and np.array_equal(image, np.moveaxis(bands, 0, -1))
    tensor = image_tensor(image, fit_normalisation(ds))
    assert tensor[:, 0, 0].tolist() == [0.0, 1.0, pytest.approx(2000 / 3999)]


def test_sixteen_bit_rgb_png_is_not_truncated(tmp_path: Path) -> None:
    """PIL reads a 16-bit RGB PNG as its high byte without a word; it goes through rasterio and is refused."""
    path = write_tif(tmp_path / "x.png", uint16_rgb(), driver="PNG")
    with pytest.raises(DataError) as info:
        read_image(path)
    assert info.value.path == path and "3-band uint16" in str(info.value)
    assert read_image(path, load_raster_spec(_yaml(tmp_path, "scale: [0, 3999]\n")))[0, 0, 1] == 3999


def _yaml(tmp_path: Path, text: str) -> Path:
    """Write a data.yaml and return its path."""
    path = tmp_path / "data.yaml"
    path.write_text(text)
    return path


def test_four_band_8_bit_tiff_is_read_whole_not_cut_to_three(tmp_path: Path) -> None:
    """Band 4 was dropped without a word, then refused; now all four bands are read, or as 'bands:' selects."""
    bands = np.stack([np.full((8, 8), v, np.uint8) for v in (10, 20, 30, 40)])
    root = tif_dataset(tmp_path / "ds", [bands])
    assert tuple(FolderDataset(root)[0].image[3, 3]) == (10, 20, 30, 40)
    (root / "data.yaml").write_text("bands: [4, 3, 2]\n")
    assert tuple(FolderDataset(root)[0].image[3, 3]) == (40, 30, 20)


def test_four_band_uint16_geotiff_is_described_then_read_with_bands_and_scale(tmp_path: Path) -> None:
    """Was called 'corrupt'; now refused naming the scaling settings, and read with 'bands' + per-band 'scale'."""
    rng = np.random.default_rng(1)
    bands = rng.integers(0, 10000, (4, 8, 8)).astype(np.uint16)
    bands[:, 0, 0] = 10000
    root = tif_dataset(tmp_path / "ds", [bands])
    text = str(check_dataset(root).problems[0])
    assert "corrupt" not in text and "4-band uint16 image" in text
    assert "'scale: [low, high]'" in text and "'stretch: {percentiles: [2, 98]}'" in text
    (root / "data.yaml").write_text("bands: [1, 2, 4]\nscale: [[0, 10000], [0, 10000], [0, 20000]]\n")
    assert check_dataset(root).ok
    ds = FolderDataset(root)
    assert np.array_equal(ds[0].image, np.moveaxis(bands[[0, 1, 3]], 0, -1))
    tensor = image_tensor(ds[0].image, fit_normalisation(ds))
    assert tensor[:, 0, 0].tolist() == [1.0, 1.0, 0.5]
    assert torch.equal(tensor[1], torch.from_numpy(bands[1].astype(np.float32)) / 10000)


def test_float32_geotiff_with_nodata_labels_nodata_as_ignore(tmp_path: Path) -> None:
    """Float reflectance with nodata: scaled by 'scale', nodata pixels are 0 in the model input and ignore in labels."""
    bands = np.random.default_rng(2).random((3, 8, 8)).astype(np.float32)
    bands[:, :2, :] = -9999.0
    root = tif_dataset(tmp_path / "ds", [bands], "scale: [0, 1]\n", nodata=-9999.0)
    ds = FolderDataset(root)
    sample = ds[0]
    assert (sample.label[:2] == 255).all() and (sample.label[2:] == 1).all()
    assert sample.image.dtype == np.float32 and sample.nodata[:2].all() and not sample.nodata[2:].any()
    tensor = image_tensor(sample.image, fit_normalisation(ds), sample.nodata)
    assert (tensor[:, :2] == 0).all() and torch.equal(tensor[0, 2:], torch.from_numpy(bands[0, 2:]))
    report = check_dataset(root)
    assert report.ok, report.problems
    group = report.rasters[("image", "float32", 3)]
    assert group.nodata_share == pytest.approx(0.25) and report.ignore_share == pytest.approx(0.25)
    low, high = group.ranges[0]
    assert low >= 0 and high <= 1  # the nodata value is not counted in the range


def test_values_outside_scale_are_refused_not_clipped(tmp_path: Path) -> None:
    """A valid value outside 'scale' would be clipped: refused, naming the range that covers the data."""
    bands = np.full((3, 8, 8), 100, np.int16)
    bands[0, 0, 0] = -50
    root = tif_dataset(tmp_path / "ds", [bands], "scale: [0, 1000]\n")
    with pytest.raises(DataError) as info:
        FolderDataset(root)[0]
    assert "1 pixel(s) outside 'scale' 0..1000" in str(info.value) and "-50..100" in str(info.value)
    (root / "data.yaml").write_text("scale: [-100, 1000]\n")
    ds = FolderDataset(root)
    assert image_tensor(ds[0].image, fit_normalisation(ds))[0, 0, 0].item() == pytest.approx(50 / 1100)


def test_geotiff_mask_nodata_is_ignore_and_reported(tmp_path: Path) -> None:
    """A mask's nodata value (even one that is no class) becomes the ignore index; data check shows its share."""
    root = tif_dataset(tmp_path / "ds", [np.zeros((3, 8, 8), np.uint8)])
    mask = np.full((1, 8, 8), 2, np.uint8)
    mask[0, :4] = 99
    write_tif(root / "masks" / "t0.tif", mask, nodata=99)
    label = FolderDataset(root)[0].label
    assert (label[:4] == 255).all() and (label[4:] == 2).all()
    report = check_dataset(root)
    assert report.ok and report.rasters[("mask", "uint8", 1)].nodata_share == pytest.approx(0.5)
    assert MaskCodec(load_classes(root / "classes.yaml")).read(root / "masks" / "t0.tif")[0, 0] == 255


def test_multi_band_and_float_masks_are_refused(tmp_path: Path) -> None:
    """Masks are one band of class indices: two bands or floats are refused naming the file."""
    codec = MaskCodec(load_classes(_classes(tmp_path)))
    two = write_tif(tmp_path / "two.tif", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(DataError, match="mask has 2 bands of uint8"):
        codec.read(two)
    flt = write_tif(tmp_path / "f.tif", np.zeros((1, 8, 8), np.float32))
    with pytest.raises(DataError, match=r"floating-point values \(float32\)"):
        codec.read(flt)


def _classes(tmp_path: Path) -> Path:
    """A 3-class classes.yaml."""
    path = tmp_path / "classes.yaml"
    path.write_text(CLASSES)
    return path


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("bands: []\n", "distinct band numbers counted from 1"),
        ("bands: [0, 1, 2]\n", "distinct band numbers counted from 1"),
        ("bands: [1, 1]\n", "distinct band numbers counted from 1"),
        ("scale: [10, 10]\n", "low < high"),
        ("bands: [1, 2, 3]\nscale: [[0, 1], [0, 1]]\n", "2 ranges for 3 bands"),
        ("scale: high\n", "[low, high]"),
        ("bands: [1, 2, 3]\nstretch: 2\n", "'stretch' must be {percentiles: [low, high]}"),
        ("stretch: {percentiles: [98, 2]}\n", "0 <= low < high <= 100"),
        ("scale: [0, 1]\nstretch: {percentiles: [2, 98]}\n", "'scale' and 'stretch' are both given"),
        ("bands: [1, 2]\nrgb: [3, 2, 1]\n", "'rgb' shows band(s) [3]"),
        ("rgb: [1, 2]\n", "'rgb' must list 1 or 3 band numbers"),
        ("bands: [1, 2, 3]\nnormalize: 2\n", "unknown key(s) ['normalize']"),
    ],
)
def test_bad_data_yaml_names_the_file(tmp_path: Path, text: str, words: str) -> None:
    """data.yaml problems are DataErrors naming data.yaml, raised when the dataset opens."""
    root = tif_dataset(tmp_path / "ds", [uint16_rgb()], text)
    with pytest.raises(DataError) as info:
        FolderDataset(root)
    assert info.value.path == root / "data.yaml" and words in str(info.value)


def test_band_beyond_the_file_is_refused(tmp_path: Path) -> None:
    """'bands: [1, 2, 5]' on a 4-band file names the file and the band count."""
    root = tif_dataset(tmp_path / "ds", [np.zeros((4, 8, 8), np.uint8)], "bands: [1, 2, 5]\n")
    with pytest.raises(DataError, match=r"asks for band\(s\) \[5\] but the image has 4"):
        FolderDataset(root)[0]


def test_data_check_cli_describes_files_and_flags_small_tiles(tmp_path: Path) -> None:
    """`data check --size` prints dtype, bands, range per band, nodata share, the size distribution and small tiles."""
    from typer.testing import CliRunner

    from todsynth.cli.main import app

    images = [uint16_rgb(8, 8, 0), uint16_rgb(16, 16, 1), uint16_rgb(16, 16, 2)]
    root = tif_dataset(tmp_path / "ds", images, "scale: [0, 3999]\n", nodata=0)
    result = CliRunner().invoke(app, ["data", "check", str(root), "--size", "12"], terminal_width=200)
    out = result.output
    assert result.exit_code == 0, out
    assert "uint16" in out and "value range per band" in out and "1: 1..1" in out  # masks: all class 1
    share = 100 * sum(int((np.asarray(b) == 0).any(axis=0).sum()) for b in images) / (64 + 256 + 256)
    assert f"{share:.1f}%" in out  # image nodata: pixels where any band holds 0
    assert "8x8 (1), 16x16 (2)" in out
    assert "1 file(s) smaller than the working size 12x12" in out and "t0.tif" in out
    result = CliRunner().invoke(app, ["data", "check", str(root)], terminal_width=200)
    assert "smaller than" not in result.output


def test_open_dataset_reads_data_yaml_beside_a_jsonl_index(tmp_path: Path) -> None:
    """A JSONL index takes data.yaml from its folder, like classes.yaml."""
    import json

    root = tif_dataset(tmp_path / "ds", [uint16_rgb()], "scale: [0, 3999]\n")
    (root / "index.jsonl").write_text(json.dumps({"source": "masks/t0.tif", "target": "images/t0.tif"}) + "\n")
    assert open_dataset(root / "index.jsonl")[0].image[0, 0, 1] == 3999
