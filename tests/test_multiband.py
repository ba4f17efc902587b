"""Multi-band data end to end (issue 11 items 2 and 3): 4-band uint16 GeoTIFFs → segmenter and pixel-space
generator with the stored normalisation → synthesis (plain and CRFM) writing 4-band uint16 GeoTIFFs that read
back like the source; a float32 dataset with nodata; data of other bands or scaling is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from todsynth.data.bands import Normalisation
from todsynth.data.check import check_dataset
from todsynth.data.readers import FolderDataset
from todsynth.errors import ConfigError, DataError

DATA_YAML = "bands: [3, 2, 1, 4]\nstretch: {percentiles: [2, 98]}\nrgb: [3, 2, 1]\n"
TINY_ENCODER = "tu-mobilenetv3_small_050"


def write_tif(path: Path, bands: np.ndarray, **profile) -> None:
    """Write a CxHxW array as a GeoTIFF with rasterio."""
    import rasterio
    from rasterio.transform import from_origin

    path.parent.mkdir(parents=True, exist_ok=True)
    c, h, w = bands.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=w,
        height=h,
        count=c,
        dtype=bands.dtype,
        crs="EPSG:32633",
        transform=from_origin(500000, 0, 10, 10),
        **profile,
    ) as dst:
        dst.write(bands)


def write_dataset(
    root: Path, dtype: str = "uint16", n: int = 6, nodata: float | None = None, data_yaml: str = DATA_YAML
) -> Path:
    """n 16 px tiles of 4 bands whose values follow 3 classes (stripes), index masks, classes.yaml, data.yaml."""
    rng = np.random.default_rng(0)
    for i in range(n):
        label = np.zeros((16, 16), np.uint8)
        label[:, 5 + i % 3 : 11] = 1
        label[10 + i % 4 :] = 2
        base = np.array([[800, 1500, 2500, 6000], [3000, 2800, 2600, 1200], [500, 900, 400, 300]], np.float64)
        bands = base[label].transpose(2, 0, 1) + rng.normal(0, 150, (4, 16, 16))
        if dtype == "float32":
            bands = (np.clip(bands, 0, 9000) / 10000).astype(np.float32)
        else:
            bands = np.clip(bands, 0, 9000).astype(np.uint16)
        profile = {}
        if nodata is not None:
            bands[:, :2, :3] = nodata
            profile["nodata"] = nodata
        write_tif(root / "images" / f"t{i}.tif", bands, **profile)
        write_tif(root / "masks" / f"t{i}.tif", label[None])
    (root / "classes.yaml").write_text("names: [field, water, road]\n")
    (root / "data.yaml").write_text(data_yaml)
    return root


def seg_cfg(data: Path, out: Path, **kw):
    from todsynth.segment.train import SegmentTrainConfig

    base = dict(
        data=str(data),
        out=str(out),
        arch="segformer",
        encoder=TINY_ENCODER,
        size=16,
        steps=2,
        batch_size=2,
        device="cpu",
        log_every=1,
        checkpoint_every=10,
    )
    return SegmentTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def four_band(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("mb") / "ds")


@pytest.fixture(scope="module")
def segmenter(four_band: Path, tmp_path_factory) -> Path:
    from todsynth.segment.train import train_segmenter

    out = tmp_path_factory.mktemp("seg") / "run"
    train_segmenter(seg_cfg(four_band, out))
    return out / "model"


@pytest.fixture(scope="module")
def generator(four_band: Path, tmp_path_factory) -> Path:
    from todsynth.generator.mmdit import MMDiTArch
    from todsynth.generator.train import GeneratorTrainConfig, train_generator

    out = tmp_path_factory.mktemp("gen") / "run"
    train_generator(
        GeneratorTrainConfig(
            data=str(four_band),
            out=str(out),
            size=16,
            steps=2,
            batch_size=2,
            model=MMDiTArch(num_layers=1, num_heads=2, head_dim=8),
            val_every=0,
            checkpoint_every=2,
            progress=False,
            warmup_steps=0,
            text_max_length=8,
        )
    )
    return out / "model"


def selected_pixels(root: Path) -> np.ndarray:
    """Every pixel of the dataset's images in the order data.yaml selects (3, 2, 1, 4) as N x 4 float64."""
    import rasterio

    rows = []
    for path in sorted((root / "images").glob("*.tif")):
        with rasterio.open(path) as src:
            rows.append(src.read()[[2, 1, 0, 3]].reshape(4, -1).T.astype(np.float64))
    return np.concatenate(rows)


def test_segmenter_trains_on_four_bands_and_stores_the_stretch(four_band: Path, segmenter: Path) -> None:
    """in_channels 4; the percentile stretch of the training split is stored in config.json and reused by eval."""
    from todsynth.segment.model import Segmenter
    from todsynth.segment.train import evaluate_segmenter

    config = json.loads((segmenter / "config.json").read_text())
    assert config["in_channels"] == 4
    stored = config["normalisation"]
    pixels = selected_pixels(four_band)
    assert stored["mode"] == "stretch" and stored["dtype"] == "uint16" and stored["rgb"] == [1, 2, 3]
    assert stored["low"] == pytest.approx(np.percentile(pixels, 2, axis=0).tolist())
    assert stored["high"] == pytest.approx(np.percentile(pixels, 98, axis=0).tolist())
    model = Segmenter.from_pretrained(segmenter)
    assert model.normalisation == Normalisation.from_dict(stored, "x")
    metrics = evaluate_segmenter(model, four_band, batch_size=4)
    assert np.isfinite(metrics.miou)
    # the stored statistics are applied, not ones fitted on the evaluated data: a subset with other
    # percentiles evaluates exactly like the model's own preprocessing of those samples
    from todsynth.data.torchdata import SegTorchDataset

    subset = FolderDataset(four_band)[:2]
    direct = SegTorchDataset(subset, normalisation=model.normalisation)
    assert evaluate_segmenter(model, subset, batch_size=2).miou == evaluate_segmenter(model, direct, batch_size=2).miou


@pytest.mark.parametrize(
    ("data_yaml", "words"),
    [
        ("bands: [3, 2, 1, 4]\nscale: [0, 10000]\n", "mode: data 'fixed' vs model 'stretch'"),
        (
            "bands: [3, 2, 1, 4]\nstretch: {percentiles: [1, 99]}\n",
            "percentiles: data [1.0, 99.0] vs model [2.0, 98.0]",
        ),
        ("bands: [3, 2, 1]\nstretch: {percentiles: [2, 98]}\n", "bands: data 3 vs model 4"),
    ],
)
def test_eval_refuses_data_whose_data_yaml_differs_from_the_stored_normalisation(
    four_band: Path, segmenter: Path, tmp_path: Path, data_yaml: str, words: str
) -> None:
    """Changing data.yaml after training (scaling, percentiles, band count) is refused, naming data.yaml."""
    from todsynth.segment.model import Segmenter
    from todsynth.segment.train import evaluate_segmenter

    copy = tmp_path / "ds"
    shutil.copytree(four_band, copy)
    (copy / "data.yaml").write_text(data_yaml)
    with pytest.raises(DataError) as info:
        evaluate_segmenter(Segmenter.from_pretrained(segmenter), copy)
    assert info.value.path == copy / "data.yaml" and words in str(info.value)
    assert str(segmenter / "config.json") in str(info.value)


def test_an_rgb_model_refuses_four_band_data(four_band: Path, tiny_segmenter_dir: Path) -> None:
    """A model saved before bands existed (8-bit RGB) refuses 4-band data instead of a shape error."""
    from todsynth.segment.model import Segmenter
    from todsynth.segment.train import evaluate_segmenter

    with pytest.raises(DataError, match="bands: data 4 vs model 3"):
        evaluate_segmenter(Segmenter.from_pretrained(tiny_segmenter_dir), four_band)


def test_generator_synthesizes_four_band_uint16_geotiffs(
    four_band: Path, generator: Path, segmenter: Path, tmp_path: Path
) -> None:
    """Plain and CRFM synthesis write 4-band uint16 GeoTIFFs and a data.yaml; the same reader reads them with the
    source's dtype and band count, and the segmenter evaluates them with its stored normalisation."""
    from todsynth.generator.pipeline import MaskToImagePipeline
    from todsynth.segment.model import Segmenter
    from todsynth.segment.train import evaluate_segmenter
    from todsynth.synthesize import build_synthesize_config, synthesize

    pipe = MaskToImagePipeline.from_pretrained(generator)
    assert pipe.transformer.config.in_channels == 4 and pipe.autoencoder.image_channels == 4
    assert pipe.normalisation == Segmenter.from_pretrained(segmenter).normalisation  # same split, same stretch
    for name, crfm in (("plain", 0), ("crfm", 1)):
        out = tmp_path / name
        values = dict(
            generator=str(generator), masks=str(four_band), out=str(out), num_steps=2, limit=2, **{"crfm.steps": crfm}
        )
        if crfm:
            values["segmenter"] = str(segmenter)
        result = synthesize(build_synthesize_config(values), progress=False)
        assert result.made == 2
        assert sorted(p.suffix for p in (out / "images").iterdir()) == [".tif", ".tif"]
        assert yaml.safe_load((out / "data.yaml").read_text()) == {
            "bands": [1, 2, 3, 4],
            "stretch": {"percentiles": [2.0, 98.0]},
            "rgb": [1, 2, 3],
        }
        assert check_dataset(out).ok
        ds = FolderDataset(out)
        sample = ds[0]
        assert sample.image.dtype == np.uint16 and sample.image.shape == (16, 16, 4)
        low, high = np.array(pipe.normalisation.low), np.array(pipe.normalisation.high)
        assert (sample.image >= np.ceil(low)).all() and (sample.image <= np.floor(high)).all()
        assert np.isfinite(evaluate_segmenter(Segmenter.from_pretrained(segmenter), out).miou)


def test_sample_grid_previews_the_rgb_bands(four_band: Path, generator: Path, tmp_path: Path) -> None:
    """`generator sample` grids show the `rgb:` bands of 4-band images as an 8-bit RGB PNG."""
    from PIL import Image

    from todsynth.generator.sample import sample_grid

    path = sample_grid(generator, four_band, tmp_path / "grid", n=2, num_steps=2)
    with Image.open(path) as im:
        assert im.mode == "RGB"


def test_float32_dataset_with_nodata_trains_and_evaluates(tmp_path: Path) -> None:
    """float32 reflectance with a nodata value and a fixed scale: nodata pixels are ignore in labels and 0 in
    the input; the model stores dtype float32 and the fixed ranges."""
    from todsynth.data.bands import image_tensor
    from todsynth.segment.model import Segmenter
    from todsynth.segment.train import evaluate_segmenter, train_segmenter

    root = write_dataset(tmp_path / "f32", "float32", n=4, nodata=-9999.0, data_yaml="scale: [0, 1]\n")
    sample = FolderDataset(root)[0]
    assert sample.image.dtype == np.float32 and sample.image.shape[-1] == 4
    assert (sample.label[:2, :3] == 255).all() and sample.nodata[:2, :3].all()
    tensor = image_tensor(sample.image, Normalisation("float32", (0.0,) * 4, (1.0,) * 4), sample.nodata)
    assert (tensor[:, :2, :3] == 0).all() and torch.equal(tensor[:, 5, 5], torch.from_numpy(sample.image[5, 5]))
    train_segmenter(seg_cfg(root, tmp_path / "seg"))
    model = Segmenter.from_pretrained(tmp_path / "seg" / "model")
    assert model.normalisation == Normalisation("float32", (0.0,) * 4, (1.0,) * 4)
    assert np.isfinite(evaluate_segmenter(model, root).miou)


def test_the_vae_refuses_four_bands() -> None:
    """SD3's VAE encodes RGB: more bands are a clear error, not a shape mismatch deep inside diffusers."""
    from todsynth.generator.autoencoder import load_autoencoder

    with pytest.raises(ConfigError, match="encodes 3-band RGB images, but the data has 4 band"):
        load_autoencoder("vae", path="unused", channels=4)
