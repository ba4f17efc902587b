"""Training: round trip, exact resumption, config validation, schedules, evaluation over a whole dataset."""

from __future__ import annotations

import json
import math

import pytest
import torch
from segtest_helpers import CLASSES, make_samples

from todsynth.config import build_config
from todsynth.errors import CheckpointError, ConfigError
from todsynth.segment.model import Segmenter, SegmenterConfig
from todsynth.segment.train import (SegmentTrainConfig, TrainOutcome, evaluate_segmenter, lr_at,
                                    train_on_samples)

TINY_ENCODER = "tu-mobilenetv3_small_050"


def tiny_cfg(**kw) -> SegmentTrainConfig:
    """A few CPU steps of a tiny segformer (mobilenetv3 encoder, 0.7M parameters) on 32 px tiles."""
    base = dict(arch="segformer", encoder=TINY_ENCODER, size=32, steps=4, batch_size=2, lr=1e-3,
                device="cpu", log_every=1, checkpoint_every=2, eval_batch_size=4)
    return SegmentTrainConfig(**{**base, **kw})


class Stop(Exception):
    """Raised from the step callback to simulate a killed run."""


def stop_at(step: int):
    """A step callback that 'kills' the run right after `step`."""
    def callback(s: int, loss: float) -> None:
        if s == step:
            raise Stop
    return callback


RESUME_CFG = dict(encoder=None, synthetic_ratio=0.5)  # mit_b0: its drop-path makes the RNG state matter


def train_data() -> tuple[list, list, list]:
    """Real, synthetic and validation samples of the straight/resumed runs."""
    return make_samples(4), make_samples(4, seed=2), make_samples(3, seed=9, ignore_share=0.1)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> TrainOutcome:
    """An uninterrupted 4-step run with checkpoints and validation."""
    real, synthetic, val = train_data()
    return train_on_samples(real, CLASSES, tiny_cfg(**RESUME_CFG), val_samples=val, synthetic=synthetic,
                            checkpoint_dir=tmp_path_factory.mktemp("straight"))


def test_train_save_load_eval_round_trip(straight, tmp_path):
    assert straight.steps == 4 and [s for s, _ in straight.history] == [1, 2, 3, 4]
    assert all(math.isfinite(loss) for _, loss in straight.history)
    straight.model.save_pretrained(tmp_path / "model")
    loaded = Segmenter.from_pretrained(tmp_path / "model")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(straight.model.eval()(x), loaded.eval()(x))
    val = train_data()[2]
    again = evaluate_segmenter(loaded, val, batch_size=2)
    assert (again.confusion == straight.val.confusion).all()
    assert again.confusion.sum() == sum(int((s.label != 255).sum()) for s in val)


def test_resume_continues_exactly(straight, tmp_path):
    real, synthetic, _ = train_data()
    cfg = tiny_cfg(**RESUME_CFG)
    with pytest.raises(Stop):
        train_on_samples(real, CLASSES, cfg, synthetic=synthetic, checkpoint_dir=tmp_path, on_step=stop_at(2))
    assert json.loads((tmp_path / "step.json").read_text())["step"] == 2
    resumed = train_on_samples(real, CLASSES, cfg, synthetic=synthetic, checkpoint_dir=tmp_path, resume=True)
    assert resumed.steps == 4 and resumed.history == straight.history
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path):
    samples = make_samples(4)
    with pytest.raises(CheckpointError, match="no checkpoint") as e:
        train_on_samples(samples, CLASSES, tiny_cfg(), checkpoint_dir=tmp_path, resume=True)
    assert e.value.path == tmp_path / "state.safetensors"
    with pytest.raises(Stop):
        train_on_samples(samples, CLASSES, tiny_cfg(), checkpoint_dir=tmp_path, on_step=stop_at(2))
    with pytest.raises(CheckpointError, match="lr: 0.001 -> 0.002"):
        train_on_samples(samples, CLASSES, tiny_cfg(lr=2e-3), checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ConfigError, match="checkpoint folder"):
        train_on_samples(samples, CLASSES, tiny_cfg(), resume=True)


def test_evaluate_mixed_sizes_scores_at_native_resolution():
    torch.manual_seed(0)
    model = Segmenter(SegmenterConfig(arch="segformer", encoder=TINY_ENCODER, num_classes=3))
    data = make_samples(2, size=32) + make_samples(1, size=40, seed=4)
    metrics = evaluate_segmenter(model, data, batch_size=3, size=32)
    assert metrics.confusion.sum() == 2 * 32 * 32 + 40 * 40
    assert model.training


def test_fully_ignored_batch_gives_zero_loss_not_nan():
    samples = make_samples(2, ignore_share=1.0)
    outcome = train_on_samples(samples, CLASSES, tiny_cfg(steps=1))
    assert outcome.final_loss == 0.0


def test_precision_can_change_within_one_process():
    samples = make_samples(2)
    for precision in ("bf16", "no"):
        outcome = train_on_samples(samples, CLASSES, tiny_cfg(steps=1, mixed_precision=precision))
        assert outcome.steps == 1 and math.isfinite(outcome.final_loss)
        assert next(outcome.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("bad", [{"lr": -1.0}, {"lr": float("nan")}, {"epochs": 0}, {"batch_size": -2},
                                 {"arch": "pspnet"}, {"synthetic_ratio": -0.5}, {"weight_decay": float("inf")},
                                 {"size": 0}, {"schedule": "step"}, {"num_workers": -1}])
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        build_config(SegmentTrainConfig, bad)


def test_lr_schedules():
    poly = tiny_cfg(lr=1.0, warmup_steps=2)
    assert [lr_at(s, 10, poly) for s in (0, 1)] == [0.5, 1.0]
    values = [lr_at(s, 10, poly) for s in range(2, 10)]
    assert values[0] == 1.0 and all(a > b for a, b in zip(values, values[1:])) and values[-1] > 0
    cosine = tiny_cfg(lr=1.0, schedule="cosine")
    assert lr_at(0, 10, cosine) == 1.0 and lr_at(5, 10, cosine) == pytest.approx(0.5)
