"""The experiment runner on a user's real folder dataset (seeded draws, split files, oracle images, working
size, progress lines) and the torchgeo adapter (a torchgeo-shaped dataset, and torchgeo's own LoveDA class)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from todsynth.config import flatten
from todsynth.data.classes import LOVEDA
from todsynth.data.readers import open_dataset
from todsynth.data.split import read_split
from todsynth.data.toy import write_toy_dataset
from todsynth.demo import BUDGETS
from todsynth.errors import ConfigError, DataError
from todsynth.experiment import CellSettings, DataSettings, run_cell, settings_from, stage_data

TINY = {
    k: v
    for k, v in flatten(CellSettings, BUDGETS["tiny"]).items()
    if k not in ("data.n_real", "data.n_layouts", "data.n_test")
}
DATA = {f.name for f in dataclasses.fields(DataSettings)} - {"seed"}


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> Path:
    """The user's data: 12 labelled 16-px tiles in the folder layout (images/, masks/, classes.yaml)."""
    return write_toy_dataset(tmp_path_factory.mktemp("user") / "tiles", n=12, size=16, seed=3, layout="folder")


@pytest.fixture(scope="module")
def split_file(real, tmp_path_factory) -> Path:
    """`todsynth data split tiles split.json --n 4 --seed 5`, through the CLI."""
    from typer.testing import CliRunner

    from todsynth.cli.data import app

    out = tmp_path_factory.mktemp("split") / "split.json"
    result = CliRunner().invoke(app, ["split", str(real), str(out), "--n", "4", "--seed", "5"])
    assert result.exit_code == 0, result.output
    return out


def cell(real: Path, **over) -> CellSettings:
    """A tiny cell on the real folder: trained and tested on disjoint tiles of it."""
    values = {**TINY, "data.real_data": str(real), "data.test_data": str(real), "data.n_test": 3}
    return settings_from({**values, **{f"data.{k}" if k in DATA else k: v for k, v in over.items()}})


def test_n_real_draws_what_data_split_draws_and_the_test_tiles_are_the_others(real, split_file, tmp_path):
    logs: list[str] = []
    result = run_cell(cell(real, n_real=4, synth="none", **{"data.seed": 5}), tmp_path, log=logs.append)
    real_ids = read_split(result["data"]["real_ids"])
    test_ids = read_split(result["data"]["test_ids"])
    assert real_ids == read_split(split_file)  # n_real = the few-shot subset `data split --n 4` writes
    assert len(test_ids) == 3 and not set(test_ids) & set(real_ids)
    assert 0 <= result["metrics"]["mIoU"] <= 1
    saved = json.loads((Path(result["guidance"]["model"]) / "config.json").read_text())
    assert saved["size"] == 16  # the model records its working size
    assert any("segmenter on real only (segformer, seed 0): step 3/3 loss" in m for m in logs)
    assert any(m.startswith("stage guidance: segmenter on real only") for m in logs)
    assert any("4 real tiles of 12" in m for m in logs)

    by_file = run_cell(cell(real, real_split_file=str(split_file), synth="none"), tmp_path, log=logs.append)
    assert read_split(by_file["data"]["real_ids"]) == real_ids
    assert by_file["guidance"].dir != result["guidance"].dir  # keyed by the split file, not by n_real


def test_layouts_and_test_tiles_are_seeded_random_draws(real, tmp_path):
    def draw(seed: int, root: str) -> tuple[list[str], list[str]]:
        s = cell(real, n_real=3, layouts_data=str(real), n_layouts=4, synth="none", **{"data.seed": seed})
        data = stage_data(s, tmp_path / root, log=lambda m: None)
        return read_split(data["layouts_ids"]), read_split(data["test_ids"])

    layouts0, test0 = draw(0, "a")
    assert draw(0, "b") == (layouts0, test0)  # reproducible
    layouts1, _ = draw(1, "c")
    assert layouts0 != layouts1
    ids = list(open_dataset(real).ids)
    assert layouts0 != ids[:4] or layouts1 != ids[:4]  # not the first N in sorted order
    assert not set(layouts0) & set(test0)  # no layout is a test tile


def test_settings_that_do_not_apply_are_refused(real, split_file):
    cases = [
        (dict(synth="oracle", layouts_data=str(real)), "oracle_data"),
        (dict(n_layouts=5), "no layouts"),
        (dict(real_split_file=str(split_file), n_real=4), "real_split_file and n_real"),
        (dict(oracle_data=str(real)), "layouts_data"),
        (dict(synth="crfm"), "no layouts"),
    ]
    for over, words in cases:
        with pytest.raises(ConfigError, match=words):
            cell(real, **over)
    with pytest.raises(ConfigError, match="test_data"):
        settings_from({**TINY, "data.real_data": str(real)})
    with pytest.raises(ConfigError, match="no real_data"):
        settings_from({**TINY, "data.real_split_file": str(split_file)})


def test_a_count_larger_than_the_data_is_a_config_error(real, tmp_path):
    with pytest.raises(ConfigError, match="n_test = 20 but"):
        stage_data(cell(real, n_real=4, n_test=20, synth="none"), tmp_path, log=lambda m: None)
    assert not (tmp_path / "cache").exists()  # refused before the data stage wrote anything


def test_a_grid_checks_every_cell_before_running_the_first(real, tmp_path):
    from todsynth.grid import run_grid

    grid = {
        "_source": "my-grid.yaml",
        "seeds": [0],
        "base": {**TINY, "data.real_data": str(real), "data.test_data": str(real), "data.n_test": 3},
        "tables": {
            "main": {
                "cells": {"real only": {"synth": "none"}, "oracle": {"synth": "oracle", "data.layouts_data": str(real)}}
            }
        },
    }
    with pytest.raises(ConfigError, match="oracle_data") as e:
        run_grid(grid, tmp_path / "exp", log=lambda m: None)
    assert str(e.value.path) == "my-grid.yaml: main/oracle" and not (tmp_path / "exp").exists()


def test_oracle_takes_the_layouts_real_images(real, tmp_path):
    s = cell(real, n_real=4, layouts_data=str(real), n_layouts=3, oracle_data=str(real), synth="oracle")
    result = run_cell(s, tmp_path, log=lambda m: None)
    syn = result["synthesis"]
    assert syn["path"] == str(real) and syn["made"] == 3
    assert read_split(syn["ids"]) == read_split(result["data"]["layouts_ids"])
    assert 0 <= result["metrics"]["mIoU"] <= 1


def test_oracle_data_without_the_layout_ids_is_a_data_error(real, tmp_path):
    other = write_toy_dataset(tmp_path / "layouts", n=4, size=16, seed=3, layout="folder", label_only=True, start=100)
    s = cell(real, n_real=4, layouts_data=str(other), oracle_data=str(real), synth="oracle")
    with pytest.raises(DataError, match="oracle_data has no image for 4 of the 4 layouts") as e:
        run_cell(s, tmp_path / "exp", log=lambda m: None)
    assert Path(e.value.path) == real


def test_plain_synthesis_on_real_layouts_logs_its_progress(real, tmp_path):
    logs: list[str] = []
    s = cell(real, n_real=4, layouts_data=str(real), n_layouts=3, synth="plain")
    result = run_cell(s, tmp_path, log=logs.append)
    pairs = open_dataset(result["synthesis"]["path"])
    assert sorted(i.split("__")[0] for i in pairs.ids) == sorted(read_split(result["data"]["layouts_ids"]))
    assert any(m.startswith("generator (triple, seed 0): step 3/3 loss") for m in logs)
    assert any(m.startswith("stage generator: generator (triple, seed 0), 3 steps") for m in logs)
    assert any(m == "synthesis (plain, seed 0): 3/3 images" for m in logs)


def test_eval_predicts_at_the_recorded_size(tmp_path, monkeypatch):
    from todsynth.segment import train as seg_train
    from todsynth.segment.model import Segmenter

    big = write_toy_dataset(tmp_path / "big", n=4, size=32, seed=1, layout="folder")
    ds = open_dataset(big)
    cfg = seg_train.SegmentTrainConfig(
        arch="segformer", encoder="tu-mobilenetv3_small_050", size=16, steps=2, batch_size=2, device="cpu"
    )
    model = seg_train.train_on_samples(ds, ds.classes, cfg).model
    model.save_pretrained(tmp_path / "model")
    loaded = Segmenter.from_pretrained(tmp_path / "model")
    assert loaded.config.size == 16
    seen: list[int | None] = []
    predict = seg_train._predict_at
    monkeypatch.setattr(seg_train, "_predict_at", lambda m, x, size: seen.append(size) or predict(m, x, size))
    seg_train.evaluate_segmenter(loaded, ds)
    seg_train.evaluate_segmenter(loaded, ds, native=True)
    seg_train.evaluate_segmenter(loaded, ds, size=24)
    assert seen == [16, None, 24]


# ---------------------------------------------------------------------------------------------
# torchgeo


class TorchGeoShaped(torch.utils.data.Dataset):
    """What torchgeo datasets return: {"image": float32 CxHxW in 0..255, "mask": int64 HxW, 0 = no-data}."""

    def __init__(self, n: int = 6, size: int = 16, channels: int = 3):
        rng = np.random.default_rng(0)
        self.images = [
            torch.from_numpy(rng.integers(0, 256, (channels, size, size)).astype(np.float32)) for _ in range(n)
        ]
        self.masks = [torch.from_numpy(rng.integers(0, 4, (size, size))).long() for _ in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "mask": self.masks[i]}


def test_torchgeo_items_become_samples_and_train_a_segmenter():
    from todsynth.data.torchgeo import TorchGeoSamples
    from todsynth.segment.train import SegmentTrainConfig, evaluate_segmenter, train_on_samples

    raw = TorchGeoShaped()
    cfg = SegmentTrainConfig(
        arch="segformer", encoder="tu-mobilenetv3_small_050", size=16, steps=2, batch_size=2, device="cpu"
    )
    with pytest.raises(DataError, match="TorchGeoSamples"):  # not a raw KeyError('label')
        train_on_samples(raw, LOVEDA, cfg)
    samples = TorchGeoSamples(raw, ["grass", "road", "roof"])
    s = samples[2]
    mask = raw.masks[2].numpy()
    assert s.image.dtype == np.uint8 and s.image.shape == (16, 16, 3)
    assert np.array_equal(s.image, raw.images[2].numpy().transpose(1, 2, 0).astype(np.uint8))
    assert np.array_equal(s.label, np.where(mask == 0, 255, mask - 1))  # 0 = no-data -> ignore, classes shifted
    outcome = train_on_samples(samples, samples.classes, cfg)
    assert 0 <= evaluate_segmenter(outcome.model, samples).miou <= 1


def test_torchgeo_adapter_refuses_what_it_cannot_read():
    from todsynth.data.torchgeo import TorchGeoSamples

    raw = TorchGeoShaped()
    with pytest.raises(DataError, match=r"mask values \[3\] are not classes"):
        TorchGeoSamples(raw, ["grass", "road"])[0]
    raw.images[1] = raw.images[1] / 255.0 * 1000.0
    with pytest.raises(DataError, match="outside 0..image_max = 255"):
        TorchGeoSamples(raw, ["grass", "road", "roof"])[1]
    with pytest.raises(DataError, match="4 channels"):
        TorchGeoSamples(TorchGeoShaped(channels=4), ["grass", "road", "roof"])[0]
    four = TorchGeoSamples(TorchGeoShaped(channels=4), ["grass", "road", "roof"], bands=(2, 1, 0))[0]
    assert four.image.shape == (16, 16, 3)
    with pytest.raises(DataError, match="has no 'mask'"):
        TorchGeoSamples([{"image": torch.zeros(3, 4, 4)}], ["a"])[0]


def test_torchgeo_masks_condition_synthesis_and_export_as_a_folder(tmp_path):
    from todsynth.data.torchgeo import TorchGeoSamples, mask_batch, write_folder

    samples = TorchGeoSamples(TorchGeoShaped(n=3), ["grass", "road", "roof"])
    labels, prompts, ids = mask_batch(samples, 8)
    assert labels.shape == (3, 8, 8) and labels.dtype == torch.long and ids == ["00000", "00001", "00002"]
    assert all(p.startswith("a satellite image") or p for p in prompts)
    root = write_folder(samples, tmp_path / "exported")
    ds = open_dataset(root)
    assert list(ds.classes.names) == ["grass", "road", "roof"] and ds.ids == ids
    assert np.array_equal(ds[1].label, samples[1].label) and np.array_equal(ds[1].image, samples[1].image)
    assert not (tmp_path / "exported.partial").exists()


def test_a_real_torchgeo_loveda_reads_as_todsynth_reads_it(tmp_path):
    pytest.importorskip("torchgeo")
    from torchgeo.datasets import LoveDA

    from todsynth.data.torchgeo import TorchGeoSamples

    root = write_toy_dataset(tmp_path / "LoveDA", n=6, size=16, seed=2)  # LoveDA's own folder layout
    scenes = [d.name.lower() for d in sorted((root / "Train").iterdir())]
    tg = LoveDA(str(root), split="train", scene=scenes, checksum=False)
    ids = [f"{Path(f['image']).parent.parent.name}/{Path(f['image']).stem}" for f in tg.files]
    samples = TorchGeoSamples(tg, LOVEDA, ids=ids)
    ours = open_dataset(root)
    assert sorted(samples.ids) == sorted(ours.ids)
    for k, i in enumerate(samples.ids):
        mine = ours[ours.ids.index(i)]
        assert np.array_equal(samples[k].label, mine.label) and np.array_equal(samples[k].image, mine.image)
