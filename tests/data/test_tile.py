"""`todsynth data tile`: georeferenced tiles, edge alignment, min_valid skipping, refusals, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from todsynth.cli import common
from todsynth.cli.data import app
from todsynth.data.readers import open_dataset
from todsynth.data.tile import tile_dataset, tile_starts
from todsynth.errors import ConfigError, DataError

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402

runner = CliRunner()
CLASSES = {"names": ["background", "building", "water"], "ignore_index": 255}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """One line per message, so long tmp paths are not folded."""
    monkeypatch.setattr(common.console, "width", 2000)
    monkeypatch.setattr(common.err_console, "width", 2000)


def geotiff_scene(root: Path, h: int = 40, w: int = 56, nodata_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 4-band uint16 GeoTIFF scene (UTM 32N, 10 m pixels) and its uint8 GeoTIFF mask in a folder dataset."""
    rng = np.random.default_rng(0)
    image = rng.integers(1, 4000, (4, h, w), dtype=np.uint16)
    image[:, :nodata_rows] = 0
    label = rng.integers(0, 3, (h, w)).astype(np.uint8)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text(yaml.safe_dump(CLASSES))
    transform = from_origin(500000.0, 4600000.0, 10.0, 10.0)
    common_profile = dict(driver="GTiff", height=h, width=w, crs="EPSG:32632", transform=transform)
    with rasterio.open(root / "images" / "scene.tif", "w", count=4, dtype="uint16", nodata=0, **common_profile) as dst:
        dst.write(image)
    with rasterio.open(root / "masks" / "scene.tif", "w", count=1, dtype="uint8", **common_profile) as dst:
        dst.write(label[None])
    return image, label


def png_scene(root: Path, h: int, w: int, ignore_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """An RGB PNG scene and its index mask (the top `ignore_rows` rows ignore) in a folder dataset."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, 3, (h, w)).astype(np.uint8)
    label[:ignore_rows] = 255
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.yaml").write_text(yaml.safe_dump(CLASSES))
    Image.fromarray(image).save(root / "images" / "a.png")
    Image.fromarray(label).save(root / "masks" / "a.png")
    return image, label


def test_tile_starts_align_the_last_tile_to_the_edge() -> None:
    assert tile_starts(56, 16, 16) == [0, 16, 32, 40]
    assert tile_starts(48, 16, 16) == [0, 16, 32]
    assert tile_starts(16, 16, 8) == [0]
    assert tile_starts(40, 16, 12) == [0, 12, 24]


def test_geotiff_tiles_keep_transform_crs_dtype_and_bands(tmp_path: Path) -> None:
    image, label = geotiff_scene(tmp_path / "src")
    summary = tile_dataset(tmp_path / "src", tmp_path / "tiles", 16, min_valid=0.0)
    assert (summary.written, summary.skipped) == (3 * 4, 0)  # rows 0,16,24; cols 0,16,32,40
    with rasterio.open(tmp_path / "src" / "images" / "scene.tif") as scene:
        crs, transform = scene.crs, scene.transform
    for tile_id, where in summary.tiles.items():
        y, x = where["y"], where["x"]
        with rasterio.open(tmp_path / "tiles" / "images" / f"{tile_id}.tif") as t:
            assert t.crs == crs and t.count == 4 and t.dtypes == ("uint16",) * 4 and t.nodata == 0
            assert t.transform == transform @ transform.translation(x, y)
            assert np.array_equal(t.read(), image[:, y : y + 16, x : x + 16])
        with rasterio.open(tmp_path / "tiles" / "masks" / f"{tile_id}.tif") as m:
            assert m.crs == crs and m.transform == transform @ transform.translation(x, y)
            assert np.array_equal(m.read(1), label[y : y + 16, x : x + 16])
    edge = summary.tiles["scene_r2_c3"]
    assert (edge["y"], edge["x"]) == (24, 40)  # the last row and column meet the scene's edge
    # the georeference is where the pixels are: the edge tile's origin is 40 px east, 24 px south
    with rasterio.open(tmp_path / "tiles" / "images" / "scene_r2_c3.tif") as t:
        assert t.transform.c == 500000.0 + 40 * 10 and t.transform.f == 4600000.0 - 24 * 10
    ds = open_dataset(tmp_path / "tiles")
    assert len(ds) == 12 and ds.classes.names == tuple(CLASSES["names"])
    assert json.loads((tmp_path / "tiles" / "tiles.json").read_text())["size"] == 16


def test_tiles_mostly_nodata_or_ignore_are_skipped_and_counted(tmp_path: Path) -> None:
    geotiff_scene(tmp_path / "geo", h=32, w=32, nodata_rows=12)  # top tiles: 12 of 16 rows nodata
    summary = tile_dataset(tmp_path / "geo", tmp_path / "geo_tiles", 16)
    assert (summary.written, summary.skipped) == (2, 2)
    assert sorted(summary.tiles) == ["scene_r1_c0", "scene_r1_c1"]
    png_scene(tmp_path / "png", 32, 48, ignore_rows=10)  # top row of tiles: 10/16 rows ignore -> 37.5% valid
    summary = tile_dataset(tmp_path / "png", tmp_path / "png_tiles", 16, min_valid=0.5)
    assert (summary.written, summary.skipped) == (3, 3)
    assert len(list((tmp_path / "png_tiles" / "images").glob("*.png"))) == 3


def test_png_tiles_are_exact_windows_and_cli_prints_the_summary(tmp_path: Path) -> None:
    image, label = png_scene(tmp_path / "src", 20, 36)
    result = runner.invoke(app, ["tile", str(tmp_path / "src"), str(tmp_path / "out"), "--size", "16", "--stride", "8"])
    assert result.exit_code == 0, result.output
    assert "wrote 8 tile(s) of 16x16 (stride 8) from 1 scene(s)" in result.output
    assert "skipped 0" in result.output
    tile = np.array(Image.open(tmp_path / "out" / "images" / "a_r1_c3.png"))
    assert np.array_equal(tile, image[4:20, 20:36])
    assert np.array_equal(np.array(Image.open(tmp_path / "out" / "masks" / "a_r1_c3.png")), label[4:20, 20:36])


def test_loveda_source_becomes_index_masks(tmp_path: Path) -> None:
    from todsynth.data.toy import write_toy_dataset

    root = write_toy_dataset(tmp_path / "toy", 2, size=32, seed=0)
    summary = tile_dataset(root, tmp_path / "tiles", 16, min_valid=0.0)
    assert summary.written == 8
    src, tiles = open_dataset(root), open_dataset(tmp_path / "tiles")
    where = summary.tiles[tiles.ids[0]]
    assert np.array_equal(
        tiles[0].label,
        src.load_label(src.ids.index(where["scene"]))[where["y"] : where["y"] + 16, where["x"] : where["x"] + 16],
    )


def test_scene_smaller_than_the_tile_is_refused_before_writing(tmp_path: Path) -> None:
    png_scene(tmp_path / "src", 12, 40)
    with pytest.raises(DataError, match=r"scene 'a' is 12x40, smaller than the tile size 16"):
        tile_dataset(tmp_path / "src", tmp_path / "out", 16)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no partial folder left


def test_refusals_name_the_problem(tmp_path: Path) -> None:
    png_scene(tmp_path / "src", 16, 16, ignore_rows=16)
    with pytest.raises(DataError, match="output folder is inside the source dataset"):
        tile_dataset(tmp_path / "src", tmp_path / "src" / "tiles", 8)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(DataError, match="not empty"):
        tile_dataset(tmp_path / "src", tmp_path / "full", 8)
    with pytest.raises(ConfigError, match="stride"):
        tile_dataset(tmp_path / "src", tmp_path / "out", 8, stride=9)
    with pytest.raises(ConfigError, match="min_valid"):
        tile_dataset(tmp_path / "src", tmp_path / "out", 8, min_valid=1.5)
    with pytest.raises(DataError, match="every one of the 4 tiles has less than 50% valid pixels"):
        tile_dataset(tmp_path / "src", tmp_path / "out", 8)
    assert not (tmp_path / "out").exists()
    result = runner.invoke(app, ["tile", str(tmp_path / "src"), str(tmp_path / "out"), "--size", "8"])
    assert result.exit_code == 2 and "error:" in result.output and "--min-valid" in result.output
