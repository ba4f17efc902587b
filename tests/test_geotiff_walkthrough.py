"""README "Your own GeoTIFF scenes, end to end": the walkthrough's command chain through the CLI, on tiny
georeferenced scenes written here — scenes -> data check -> data tile -> data split -> segment train ->
generator train -> synthesize (plain and CRFM) -> synthetic GeoTIFFs read back in the scenes' dtype and bands ->
segment train --synthetic -> segment eval on a held-out scene. The README runs the same commands at 64 px with
the budgets it names; here they run at 32 px with its quick-try flags (and fewer steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from todsynth.cli import common

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402

NAMES = ["background", "building", "road", "water", "vegetation"]
PALETTE = [[255, 255, 255], [255, 0, 0], [255, 255, 0], [0, 0, 255], [0, 255, 0]]
DATA_YAML = "bands: [3, 2, 1, 4]\nstretch: {percentiles: [2, 98]}\nrgb: [3, 2, 1]\n"
# mean reflectance of each class in the files' band order (B, G, R, NIR)
SPECTRA = np.array(
    [
        [900, 1100, 1300, 2500],
        [1800, 1900, 2100, 2300],
        [1400, 1450, 1500, 1700],
        [1200, 900, 500, 200],
        [400, 800, 500, 4500],
    ],
    np.float64,
)
H, W, SIZE = 64, 96, 32
CRS = "EPSG:32633"
SEG_TINY = ["--arch", "segformer", "--encoder", "tu-mobilenetv3_small_050", "--steps", "4", "--batch-size", "4"]
GEN_TINY = [
    "--steps",
    "2",
    "--batch-size",
    "4",
    "--set",
    "model.num_layers=1",
    "--set",
    "model.num_heads=2",
    "--set",
    "model.head_dim=8",
    "--set",
    "text_max_length=8",
    "--set",
    "val_every=0",
]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """One line per message, so long tmp paths are not folded."""
    monkeypatch.setattr(common.console, "width", 2000)
    monkeypatch.setattr(common.err_console, "width", 2000)


def write_scenes(root: Path, seeds: list[int]) -> None:
    """4-band uint16 scenes (0..10000, UTM, nodata 0 in a left strip as at a swath edge) and uint8 GeoTIFF masks
    (nodata 255 = ignore under the strip), classes.yaml with a palette, data.yaml with bands, stretch and rgb."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text(yaml.safe_dump({"names": NAMES, "ignore_index": 255, "palette": PALETTE}))
    (root / "data.yaml").write_text(DATA_YAML)
    yy, xx = np.mgrid[:H, :W]
    for s in seeds:
        rng = np.random.default_rng(s)
        label = np.zeros((H, W), np.uint8)
        label[:, W // 2 :] = 4
        for _ in range(3):
            y, x = rng.integers(0, H - 12), rng.integers(0, W - 12)
            label[y : y + 10, x : x + 10] = 1
        road = rng.integers(8, H - 8)
        label[road : road + 4] = 2
        cy, cx = rng.integers(16, H - 16), rng.integers(16, W - 16)
        label[(yy - cy) ** 2 + (xx - cx) ** 2 < 100] = 3
        image = np.clip(SPECTRA[label].transpose(2, 0, 1) + rng.normal(0, 150, (4, H, W)), 1, 10000).astype(np.uint16)
        image[:, :, :8] = 0
        label[:, :8] = 255
        profile = dict(
            driver="GTiff",
            height=H,
            width=W,
            crs=CRS,
            transform=from_origin(500000.0 + 2000 * s, 4600000.0, 10.0, 10.0),
        )
        with rasterio.open(root / "images" / f"scene{s}.tif", "w", count=4, dtype="uint16", nodata=0, **profile) as dst:
            dst.write(image)
        with rasterio.open(root / "masks" / f"scene{s}.tif", "w", count=1, dtype="uint8", nodata=255, **profile) as dst:
            dst.write(label[None])


def todsynth(*args: str | Path) -> str:
    """Run one CLI command in-process; fail with its output unless it exits 0."""
    from todsynth.cli.main import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, f"todsynth {' '.join(map(str, args))} exited {result.exit_code}:\n{result.output}"
    return result.output


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_geotiff_scenes_to_synthetic_geotiffs_and_a_test_score(tmp_path: Path, monkeypatch) -> None:
    from todsynth.cli.main import app
    from todsynth.data.readers import open_dataset

    monkeypatch.chdir(tmp_path)  # relative paths, as a user types them
    write_scenes(Path("scenes"), [0, 1, 2])
    write_scenes(Path("scenes-test"), [3])

    # 2. check, tile, split
    assert "no problems found" in todsynth("data", "check", "scenes")
    assert "wrote 18 tile(s) of 32x32" in todsynth("data", "tile", "scenes", "tiles", "--size", SIZE)
    todsynth("data", "tile", "scenes-test", "tiles-test", "--size", SIZE)
    assert "no problems found" in todsynth("data", "check", "tiles", "--size", SIZE)
    with rasterio.open("tiles/images/scene1_r1_c2.tif") as tile, rasterio.open("scenes/images/scene1.tif") as scene:
        assert (tile.count, tile.dtypes[0], tile.nodata, tile.crs) == (4, "uint16", 0, scene.crs)
        assert tile.transform == scene.window_transform(((32, 64), (64, 96)))  # rows 32.., columns 64..
        np.testing.assert_array_equal(tile.read(), scene.read()[:, 32:64, 64:96])
    assert yaml.safe_load(Path("tiles/data.yaml").read_text()) == yaml.safe_load(DATA_YAML)
    todsynth("data", "split", "tiles", "split.json", "--n", "8", "--seed", "0")
    assert len(json.loads(Path("split.json").read_text())["ids"]) == 8

    # 3. guidance segmenter, generator, plain and CRFM synthesis
    todsynth("segment", "train", "tiles", "--split-file", "split.json", "--out", "runs/seg", "--size", SIZE, *SEG_TINY)
    todsynth(
        "generator",
        "train",
        "tiles",
        "--out",
        "runs/gen",
        "--size",
        SIZE,
        "--control",
        "adapter",
        "--set",
        "split_file=split.json",
        *GEN_TINY,
    )
    seg_norm = json.loads(Path("runs/seg/model/config.json").read_text())["normalisation"]
    gen_norm = json.loads(Path("runs/gen/model/pipeline.json").read_text())["normalisation"]
    assert seg_norm == gen_norm and seg_norm["dtype"] == "uint16" and len(seg_norm["low"]) == 4

    # CRFM is the default: plain sampling is asked for with --crfm-steps 0 (the README says so)
    refused = CliRunner().invoke(app, ["synthesize", "runs/gen/model", "tiles", "runs/refused"])
    assert refused.exit_code == 2 and "needs a guidance segmenter" in refused.output
    assert not Path("runs/refused").exists()
    todsynth("synthesize", "runs/gen/model", "tiles", "runs/syn-plain", "--crfm-steps", "0", "--num-steps", "2")
    todsynth(
        "synthesize",
        "runs/gen/model",
        "tiles",
        "runs/syn",
        "--segmenter",
        "runs/seg/model",
        "--crfm-steps",
        "2",
        "--num-steps",
        "2",
    )

    # the synthetic sets read back like the tiles: uint16 GeoTIFFs of the 4 selected bands, within the scaling
    low, high = np.array(gen_norm["low"]), np.array(gen_norm["high"])
    for syn in ("runs/syn-plain", "runs/syn"):
        assert "no problems found" in todsynth("data", "check", syn)
        assert yaml.safe_load(Path(syn, "data.yaml").read_text()) == {
            "bands": [1, 2, 3, 4],
            "stretch": {"percentiles": [2.0, 98.0]},
            "rgb": [1, 2, 3],
        }
        images = sorted(Path(syn, "images").glob("*.tif"))
        assert len(images) == 18
        with rasterio.open(images[0]) as src:
            assert (src.count, src.dtypes, src.shape) == (4, ("uint16",) * 4, (SIZE, SIZE))
            assert src.crs is None  # synthetic images show no place: no georeference (the README says so)
        sample = open_dataset(syn)[0]
        assert sample.image.dtype == np.uint16 and sample.image.shape == (SIZE, SIZE, 4)
        assert (sample.image >= np.ceil(low)).all() and (sample.image <= np.floor(high)).all()
        tiles = open_dataset("tiles")  # the synthetic masks are the tiles' masks
        np.testing.assert_array_equal(sample.label, tiles[tiles.ids.index(sample.id.split("__")[0])].label)

    # 4. real + synthetic, scored on the held-out scene
    todsynth(
        "segment",
        "train",
        "tiles",
        "--split-file",
        "split.json",
        "--synthetic",
        "runs/syn",
        "--out",
        "runs/seg-syn",
        "--size",
        SIZE,
        *SEG_TINY,
    )
    for model in ("runs/seg", "runs/seg-syn"):
        out = todsynth("segment", "eval", f"{model}/model", "tiles-test", "--json", f"{model}/test.json")
        assert "mIoU" in out
        metrics = json.loads(Path(model, "test.json").read_text())["metrics"]
        assert 0.0 <= metrics["mIoU"] <= 1.0 and sorted(metrics["IoU"]) == sorted(NAMES)
