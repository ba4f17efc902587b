"""Generator training: loss goes down, resume is exact, reload reproduces validation, 2 processes agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from todsynth.errors import CheckpointError
from todsynth.generator.train import GeneratorTrainConfig, train_generator
from todsynth.io import load_weights

from gentest_helpers import two_processes_vs_one, weights


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from todsynth.data.toy import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", n=8, size=16, seed=3)


def small(toy: Path, out: Path, **kw) -> GeneratorTrainConfig:
    from todsynth.generator.mmdit import MMDiTArch

    base = dict(
        data=str(toy),
        out=str(out),
        size=16,
        steps=6,
        batch_size=4,
        model=MMDiTArch(num_layers=2, num_heads=2, head_dim=16),
        val_every=0,
        val_samples=2,
        val_steps=3,
        checkpoint_every=3,
        progress=False,
        warmup_steps=2,
        text_max_length=8,
    )
    base.update(kw)
    return GeneratorTrainConfig(**base)


def test_loss_decreases_and_outputs_exist(toy, tmp_path):
    summary = train_generator(small(toy, tmp_path / "run", steps=30, lr=3e-3, val_every=30, log_every=1))
    from todsynth.runs import read_metrics

    hist = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    first, last = sum(v for _, v in hist[:5]) / 5, sum(v for _, v in hist[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    for name in (
        "loss.png",
        "results.json",
        "metrics.jsonl",
        "config.json",
        "model/pipeline.json",
        "val/step_000030.png",
    ):
        assert (tmp_path / "run" / name).is_file(), name
    assert summary.steps == 30


def test_resume_is_exact(toy, tmp_path):
    """resume="auto" starts a new folder and continues a stopped one; resume=True then finishes the run."""
    train_generator(small(toy, tmp_path / "straight", ema_decay=0.9))
    train_generator(small(toy, tmp_path / "resumed", ema_decay=0.9, stop_after=3, resume="auto"))
    config = tmp_path / "resumed" / "config.json"  # written by a run that starts, not by one that resumes
    stamp = config.stat().st_mtime_ns
    train_generator(small(toy, tmp_path / "resumed", ema_decay=0.9, stop_after=4, resume="auto"))
    assert config.stat().st_mtime_ns == stamp
    train_generator(small(toy, tmp_path / "resumed", ema_decay=0.9, resume=True))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_resume_is_exact(toy, tmp_path):
    """A bf16 run (autocast from the run layer, not accelerate's process-wide state) resumes bit for bit, and the
    metrics.jsonl of the resumed run reads as the uninterrupted one's."""
    from todsynth.runs import read_metrics

    train_generator(small(toy, tmp_path / "straight", mixed_precision="bf16", log_every=1))
    train_generator(small(toy, tmp_path / "resumed", mixed_precision="bf16", log_every=1, stop_after=4))
    train_generator(small(toy, tmp_path / "resumed", mixed_precision="bf16", log_every=1, resume=True))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = [
        [{k: v for k, v in r.items() if k != "samples_per_s"} for r in read_metrics(tmp_path / d / "metrics.jsonl")]
        for d in ("straight", "resumed")
    ]
    assert lines[0] == lines[1] and [r["step"] for r in lines[0]] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_without_checkpoint(toy, tmp_path):
    """resume=True (the CLI's --resume) on a folder without a checkpoint refuses, naming it, and writes nothing."""
    from todsynth.config import load_config
    from todsynth.errors import ConfigError

    out = tmp_path / "empty"
    with pytest.raises(CheckpointError, match="no checkpoint to resume from") as info:
        train_generator(small(toy, out, resume=True))
    assert info.value.path == out / "checkpoint" and "without --resume" in str(info.value)
    assert not out.exists()
    assert load_config(GeneratorTrainConfig, None, {"data": "d", "resume": "auto"}).resume == "auto"
    assert load_config(GeneratorTrainConfig, None, {"data": "d", "resume": "true"}).resume is True
    with pytest.raises(ConfigError, match="resume"):
        load_config(GeneratorTrainConfig, None, {"data": "d", "resume": "maybe"})


def test_resume_refuses_other_settings(toy, tmp_path):
    train_generator(small(toy, tmp_path / "r", stop_after=3))
    with pytest.raises(CheckpointError, match="other settings"):
        train_generator(small(toy, tmp_path / "r", lr=0.5, resume=True))


def test_reloaded_model_reproduces_validation_sample(toy, tmp_path):
    """The saved generator, loaded fresh, gives the in-training validation images bit for bit."""
    from todsynth.generator.pipeline import MaskToImagePipeline
    from todsynth.generator.train import validation_seeds

    cfg = small(toy, tmp_path / "v", val_every=6, ema_decay=0.9, guidance_scale=2.0)
    train_generator(cfg)
    saved = load_weights(tmp_path / "v" / "val" / "last_samples.safetensors")
    pipe = MaskToImagePipeline.from_pretrained(tmp_path / "v" / "model")
    from todsynth.generator.train import load_train_data

    data, _ = load_train_data(str(toy), "Train", 16)
    again = pipe(
        saved["labels"],
        data.prompts[:2],
        seeds=validation_seeds(2, cfg.seed),
        num_steps=cfg.val_steps,
        guidance_scale=cfg.guidance_scale,
    )
    assert torch.equal(again, saved["images"])


@pytest.mark.slow
def test_two_processes_match_one(toy, tmp_path):
    """`accelerate launch --cpu --num_processes 2` trains the same model as one process (same global batch)."""
    args = [
        "generator",
        "train",
        str(toy),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--size",
        "16",
        "--set",
        "model.num_layers=2",
        "--set",
        "model.num_heads=2",
        "--set",
        "model.head_dim=16",
        "--set",
        "val_every=0",
        "--set",
        "augment=false",
        "--set",
        "text_max_length=8",
        "--set",
        "progress=false",
    ]
    assert two_processes_vs_one(args, tmp_path) < 1e-4
