"""End to end on files: `todsynth segment train` on a tiny image/mask folder, then `segment eval`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from todsynth.errors import CheckpointError, DataError

from segtest_helpers import make_samples

pytest.importorskip("todsynth.data.readers")

from todsynth.cli.segment import app  # noqa: E402
from todsynth.segment.train import SegmentTrainConfig, train_segmenter  # noqa: E402

TINY_ENCODER = "tu-mobilenetv3_small_050"


def write_folder(root: Path, n: int, seed: int = 0) -> Path:
    """A generic-layout dataset: images/*.png, masks/*.png (class indices) and classes.yaml."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for s in make_samples(n, seed=seed, ignore_share=0.05):
        Image.fromarray(s.image).save(root / "images" / f"{s.id}.png")
        Image.fromarray(s.label.astype(np.uint8), mode="L").save(root / "masks" / f"{s.id}.png")
    (root / "classes.yaml").write_text("names: [background, building, water]\n")
    return root


def test_cli_train_then_eval(tmp_path):
    data = write_folder(tmp_path / "data", 4)
    val = write_folder(tmp_path / "val", 2, seed=1)
    syn = write_folder(tmp_path / "syn", 4, seed=2)
    (tmp_path / "split.json").write_text(json.dumps({"ids": ["t0_0", "t0_2", "t0_3"]}))
    (tmp_path / "cfg.yaml").write_text(f"arch: segformer\nencoder: {TINY_ENCODER}\nsize: 32\nbatch_size: 2\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(data),
            "--val",
            str(val),
            "--synthetic",
            str(syn),
            "--set",
            "synthetic_ratio=1",
            "--split-file",
            str(tmp_path / "split.json"),
            "--config",
            str(tmp_path / "cfg.yaml"),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--set",
            "steps=2",
            "--set",
            "checkpoint_every=1",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and results["train_samples"] == 3
    assert results["synthetic_samples_used"] == 3 and results["synthetic_samples_available"] == 4
    assert results["config"]["encoder"] == TINY_ENCODER and results["val"]["mIoU"] is not None
    assert (out / "model" / "model.safetensors").is_file() and (out / "checkpoint" / "state.safetensors").is_file()
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    result = CliRunner().invoke(app, ["eval", str(out / "model"), str(val), "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output and "building" in result.output
    assert json.loads((tmp_path / "m.json").read_text())["metrics"] == results["val"]


def test_cli_reports_errors_without_traceback(tmp_path):
    result = CliRunner().invoke(app, ["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["train", str(tmp_path), "--set", "lr=-1"])
    assert result.exit_code == 2 and "lr" in result.output
    result = CliRunner().invoke(app, ["eval", str(tmp_path), str(tmp_path)])
    assert result.exit_code == 2 and "config.json" in result.output


def test_class_mismatch_between_datasets(tmp_path):
    data = write_folder(tmp_path / "data", 2)
    other = write_folder(tmp_path / "other", 2)
    (other / "classes.yaml").write_text("names: [background, road, water]\n")
    cfg = SegmentTrainConfig(data=str(data), synthetic=str(other), out=str(tmp_path / "o"), device="cpu")
    with pytest.raises(DataError, match="differ from the training data") as e:
        train_segmenter(cfg)
    assert e.value.path == other


def test_train_segmenter_validates_data_first(tmp_path):
    data = write_folder(tmp_path / "data", 2)
    Image.fromarray(np.full((32, 32), 9, np.uint8), mode="L").save(data / "masks" / "t0_1.png")
    with pytest.raises(DataError, match="t0_1"):
        train_segmenter(SegmentTrainConfig(data=str(data), out=str(tmp_path / "o"), steps=1, device="cpu"))
    assert not (tmp_path / "o").exists()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train_segmenter(
            SegmentTrainConfig(
                data=str(write_folder(tmp_path / "ok", 2)),
                out=str(tmp_path / "o"),
                arch="segformer",
                encoder=TINY_ENCODER,
                size=32,
                steps=1,
                batch_size=2,
                device="cpu",
                resume=True,
            )
        )
