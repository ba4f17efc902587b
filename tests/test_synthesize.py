"""Synthesis: a valid dataset out, seeds independent of batching and processes, resume, filtering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from todsynth.synthesize import OutputFolder, build_synthesize_config, filter_mask, synthesize


def cfg_for(gen: Path, masks: Path, out: Path, seg: Path | None = None, **kw):
    values = dict(
        generator=str(gen),
        masks=str(masks),
        out=str(out),
        num_steps=4,
        copies=2,
        batch_size=3,
        transforms=["identity", "hflip"],
        limit=3,
        **{"crfm.steps": 2 if seg else 0},
    )
    if seg:
        values["segmenter"] = str(seg)
    values.update(kw)
    return build_synthesize_config(values)


def files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.parent.name in ("images", "masks")
    }


def test_output_is_a_valid_dataset_with_manifest(tiny_generator_dir, tiny_segmenter_dir, toy_masks_16, tmp_path):
    from todsynth.data.check import validate_dataset
    from todsynth.data.readers import FolderDataset

    summary = synthesize(cfg_for(tiny_generator_dir, toy_masks_16, tmp_path / "s", tiny_segmenter_dir), progress=False)
    assert summary.made == 3 * 2 * 2 == summary.in_manifest
    ds = FolderDataset(tmp_path / "s")
    validate_dataset(ds)
    assert len(ds) == 12 and ds[0].image.shape == (16, 16, 3)
    lines = (tmp_path / "s" / "manifest.jsonl").read_text().splitlines()
    rec = json.loads(lines[0])
    assert {"source", "seed", "prompt", "crfm", "transform", "filter"} <= set(rec)
    assert rec["crfm"]["steps"] == 2
    assert not list((tmp_path / "s").rglob("*.tmp"))


def test_batch_size_does_not_change_output(tiny_generator_dir, toy_masks_16, tmp_path):
    synthesize(cfg_for(tiny_generator_dir, toy_masks_16, tmp_path / "a", batch_size=1), progress=False)
    synthesize(cfg_for(tiny_generator_dir, toy_masks_16, tmp_path / "b", batch_size=5), progress=False)
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_interrupted_run_resumes_to_the_same_dataset(tiny_generator_dir, toy_masks_16, tmp_path, monkeypatch):
    synthesize(cfg_for(tiny_generator_dir, toy_masks_16, tmp_path / "full"), progress=False)
    calls = {"n": 0}
    original = OutputFolder.write

    def dying_write(self, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the run stops mid-way, as on Ctrl-C
        return original(self, *args, **kw)

    monkeypatch.setattr(OutputFolder, "write", dying_write)
    with pytest.raises(KeyboardInterrupt):
        synthesize(cfg_for(tiny_generator_dir, toy_masks_16, tmp_path / "cut"), progress=False)
    monkeypatch.setattr(OutputFolder, "write", original)
    assert len(files(tmp_path / "cut")) == 8
    summary = synthesize(cfg_for(tiny_generator_dir, toy_masks_16, tmp_path / "cut"), progress=False)
    assert summary.made == 8  # only what was missing
    assert files(tmp_path / "cut") == files(tmp_path / "full")


def test_rerun_with_other_settings_is_refused(tiny_generator_dir, toy_masks_16, tmp_path):
    from todsynth.errors import CheckpointError

    synthesize(cfg_for(tiny_generator_dir, toy_masks_16, tmp_path / "s", limit=1), progress=False)
    with pytest.raises(CheckpointError, match="other settings") as info:
        synthesize(cfg_for(tiny_generator_dir, toy_masks_16, tmp_path / "s", limit=1, seed=9), progress=False)
    assert "--overwrite" not in str(info.value) and "another OUT" in str(info.value)  # synthesize has no --overwrite


def test_filter_marks_only_pixels_above_threshold():
    label = torch.tensor([[0, 0], [1, 255]])
    logits = torch.zeros(2, 2, 2)
    logits[0] = torch.tensor([[4.0, -4.0], [0.0, 0.0]])  # pixel (0,1): class 0 has a high loss
    means = [0.05, 1.0]
    out = filter_mask(logits, label, means, margin=1.25)
    ce = torch.nn.functional.cross_entropy(logits[None], label[None].clamp(max=1), reduction="none")[0]
    expected = label.clone()
    expected[(label != 255) & (ce > 1.25 * torch.tensor(means)[label.clamp(max=1)])] = 255
    assert torch.equal(out, expected)
    assert out[0, 1] == 255 and out[0, 0] == 0 and out[1, 0] == 1


def test_filtering_and_hard_resampling_write_records(tiny_generator_dir, tiny_segmenter_dir, toy_masks_16, tmp_path):
    from todsynth.io import write_json

    stats = tmp_path / "stats.json"
    write_json(stats, {"class_mean_loss": [0.5, 3.0, 0.5, 0.5, 0.5, 0.5, 0.5], "ignore_index": 255})
    cfg = cfg_for(
        tiny_generator_dir,
        toy_masks_16,
        tmp_path / "f",
        tiny_segmenter_dir,
        filter_stats=str(stats),
        reject_ignored_fraction=0.99,
        hard_resample=True,
        transforms=["identity"],
    )
    summary = synthesize(cfg, progress=False)
    recs = [json.loads(x) for x in (tmp_path / "f" / "manifest.jsonl").read_text().splitlines()]
    assert len(recs) == summary.planned and all(r["filter"] is not None for r in recs)


@pytest.mark.slow
def test_two_processes_give_identical_files(tiny_generator_dir, tiny_segmenter_dir, toy_masks_16, tmp_path):
    args = [
        "synthesize",
        str(tiny_generator_dir),
        str(toy_masks_16),
        "--num-steps",
        "3",
        "--copies",
        "1",
        "--set",
        "limit=4",
        "--batch-size",
        "3",
        "--segmenter",
        str(tiny_segmenter_dir),
        "--crfm-steps",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "todsynth.cli.main",
    ]
    two = subprocess.run(
        launch + args[:3] + [str(tmp_path / "two")] + args[3:], env=env, capture_output=True, text=True, timeout=600
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "todsynth.cli.main"] + args[:3] + [str(tmp_path / "one")] + args[3:],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert files(tmp_path / "one") == files(tmp_path / "two") and len(files(tmp_path / "one")) == 8
    assert (tmp_path / "two" / "manifest.jsonl").read_text() == (tmp_path / "one" / "manifest.jsonl").read_text()
