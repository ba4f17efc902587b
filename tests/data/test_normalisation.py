"""Normalisations (issue 11 item 2): exact percentile stretches, the 8-bit path unchanged, inverse scaling,
stored forms refused when malformed, conversion between models' normalisations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from todsynth.data.bands import Normalisation, convert, data_yaml, fit_normalisation, image_tensor, preview_rgb, to_raw
from todsynth.data.rasters import load_raster_spec
from todsynth.data.readers import FolderDataset
from todsynth.data.sample import Sample
from todsynth.errors import CheckpointError, DataError


def write_tif(path: Path, bands: np.ndarray, **profile) -> None:
    """Write a CxHxW array as a (not georeferenced) GeoTIFF."""
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    c, h, w = bands.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=bands.dtype, **profile) as dst:
        dst.write(bands)


def dataset(root: Path, images: list[np.ndarray], data_yaml_text: str, **profile) -> FolderDataset:
    """A folder dataset of the given CxHxW images (masks all class 0)."""
    for i, bands in enumerate(images):
        write_tif(root / "images" / f"t{i}.tif", bands, **profile)
        write_tif(root / "masks" / f"t{i}.tif", np.zeros((1, *bands.shape[1:]), np.uint8))
    (root / "classes.yaml").write_text("names: [a, b]\n")
    (root / "data.yaml").write_text(data_yaml_text)
    return FolderDataset(root)


@pytest.mark.parametrize("dtype", ["uint16", "int16", "float32"])
def test_stretch_is_the_exact_percentile_over_every_valid_pixel_of_the_split(tmp_path: Path, dtype: str) -> None:
    """Histogram (16-bit integers) and value (float) paths both equal numpy's percentiles over all valid pixels
    of all images, nodata left out; the selected band order is kept."""
    rng = np.random.default_rng(4)
    images = [rng.integers(-300 if dtype == "int16" else 0, 5000, (3, 9, 7)).astype(dtype) for _ in range(3)]
    for image in images:
        image[:, 0, :] = 7777  # nodata row
    ds = dataset(tmp_path / "ds", images, "bands: [2, 3]\nstretch: {percentiles: [2.5, 97]}\n", nodata=7777)
    norm = fit_normalisation(ds)
    pixels = np.concatenate([im[[1, 2], 1:].reshape(2, -1).T for im in images]).astype(np.float64)
    assert norm.mode == "stretch" and norm.dtype == dtype and norm.channels == 2
    assert norm.low == pytest.approx(tuple(np.percentile(pixels, 2.5, axis=0)))
    assert norm.high == pytest.approx(tuple(np.percentile(pixels, 97, axis=0)))
    tensor = image_tensor(ds[0].image, norm, ds[0].nodata)
    assert float(tensor.min()) == 0.0 and float(tensor.max()) == 1.0  # a stretch clips by definition
    assert (tensor[:, 0] == 0).all()  # nodata


def test_eight_bit_rgb_is_divided_by_255_exactly_as_before() -> None:
    """The 8-bit RGB path (toy data, PNGs, models saved before bands) gives the very tensor of the old code."""
    image = np.random.default_rng(0).integers(0, 256, (5, 6, 3)).astype(np.uint8)
    old = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0
    assert torch.equal(image_tensor(image), old)
    assert torch.equal(image_tensor(image, Normalisation.rgb8()), old)
    assert data_yaml(Normalisation.rgb8()) is None
    with pytest.raises(DataError, match="holds uint16 samples but the model input is scaled from uint8"):
        image_tensor(image.astype(np.uint16))


def test_fixed_scale_refuses_values_outside_and_inverts_exactly() -> None:
    """A fixed scale is never clipped silently; to_raw inverts image_tensor exactly for integer samples."""
    norm = Normalisation("uint16", (0.0, 100.0), (4000.0, 3000.0))
    raw = np.random.default_rng(1).integers(100, 3001, (4, 4, 2)).astype(np.uint16)
    assert np.array_equal(to_raw(image_tensor(raw, norm), norm), raw)
    raw[0, 0, 1] = 50
    with pytest.raises(DataError, match="1 value\\(s\\) outside the model's fixed scale"):
        image_tensor(raw, norm, what="sample 'x'")
    with pytest.raises(DataError, match="has 2 band\\(s\\) but the model input has 3"):
        image_tensor(raw, Normalisation("uint16", (0.0,) * 3, (1.0,) * 3))


def test_to_raw_keeps_float_values_within_the_scale() -> None:
    """Float32 write-back never leaves the fixed range through rounding (it would be refused on reading)."""
    norm = Normalisation("float32", (0.1,), (0.3,))
    raw = to_raw(torch.tensor([[[0.0, 1.0, 0.5]]]), norm)
    assert raw.dtype == np.float32 and raw.min() >= 0.1 and raw.max() <= 0.3


def test_synthetic_data_yaml_reads_back_as_the_source_settings(tmp_path: Path) -> None:
    """The data.yaml written beside synthetic files parses to the same scaling, in model band order."""
    norm = Normalisation("uint16", (0.0, 10.0, 5.0), (100.0, 200.0, 300.0), rgb=(3, 2, 1))
    path = tmp_path / "data.yaml"
    path.write_text(data_yaml(norm))
    spec = load_raster_spec(path)
    assert spec.bands == (1, 2, 3) and spec.rgb == (3, 2, 1)
    assert spec.scale == ((0.0, 100.0), (10.0, 200.0), (5.0, 300.0))


def test_previews_show_the_rgb_channels() -> None:
    """rgb (1-based channels) picks the preview bands; without it 4 bands show the first three."""
    image = torch.stack([torch.full((2, 2), v) for v in (0.0, 0.2, 0.6, 1.0)])
    four_bands = Normalisation("uint16", (0.0,) * 4, (1.0,) * 4, rgb=(4, 3, 1))
    assert tuple(preview_rgb(image, four_bands)[0, 0]) == (255, 153, 0)
    assert tuple(preview_rgb(image)[0, 0]) == (0, 51, 153)


def test_convert_between_models_goes_through_raw_values() -> None:
    """Equal normalisations pass the tensor itself; others map through raw values; other bands are refused."""
    a = Normalisation("uint16", (0.0,), (1000.0,))
    b = Normalisation("uint16", (500.0,), (1500.0,))
    x = torch.tensor([[[[0.75]]]])
    assert convert(x, a, a, "m") is x
    assert convert(x, a, b, "m").item() == pytest.approx(0.25)
    with pytest.raises(DataError, match="m takes 3 bands of uint8"):
        convert(x, a, None, "m")


@pytest.mark.parametrize(
    "stored",
    [
        {"dtype": "uint16", "low": [0], "high": [0]},
        {"dtype": "str", "low": [0], "high": [1]},
        {"dtype": "uint16", "low": [0, 1], "high": [2]},
        {"dtype": "uint16", "low": [0], "high": [1], "mode": "stretch"},
        {"dtype": "uint16", "low": [0], "high": [1], "rgb": [2]},
        {"dtype": "uint16", "low": [0], "high": [1], "gamma": 2},
    ],
)
def test_malformed_stored_normalisations_name_the_file(stored: dict) -> None:
    """A config.json / pipeline.json normalisation that cannot be right is a CheckpointError naming the file."""
    with pytest.raises(CheckpointError) as info:
        Normalisation.from_dict(stored, "m/config.json")
    assert str(info.value.path) == "m/config.json"


def test_plain_sample_lists_of_16_bit_need_a_scaling() -> None:
    """Samples handed in without a dataset (no data.yaml) must be 8-bit: nothing guesses a scale."""
    sample = Sample(np.zeros((4, 4, 3), np.uint16), np.zeros((4, 4), np.int64), "", "s")
    with pytest.raises(DataError, match="uint16 samples and no scaling is given"):
        fit_normalisation([sample])
    assert fit_normalisation([Sample(np.zeros((4, 4, 5), np.uint8), sample.label, "", "s")]).channels == 5
