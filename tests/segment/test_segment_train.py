"""Training: round trip, exact resumption, config validation, schedules, evaluation over a whole dataset."""

from __future__ import annotations

import json
import math

import pytest
import torch

from todsynth.config import build_config
from todsynth.errors import CheckpointError, ConfigError
from todsynth.runs import RunFolder
from todsynth.segment.model import Segmenter, SegmenterConfig
from todsynth.segment.train import (
    SegmentTrainConfig,
    TrainOutcome,
    class_pixel_counts,
    class_weights_from_counts,
    cross_entropy,
    evaluate_segmenter,
    train_on_samples,
)

from segtest_helpers import CLASSES, make_samples

TINY_ENCODER = "tu-mobilenetv3_small_050"


def tiny_cfg(**kw) -> SegmentTrainConfig:
    """A few CPU steps of a tiny segformer (mobilenetv3 encoder, 0.7M parameters) on 32 px tiles."""
    base = dict(
        arch="segformer",
        encoder=TINY_ENCODER,
        size=32,
        steps=4,
        batch_size=2,
        lr=1e-3,
        device="cpu",
        log_every=1,
        checkpoint_every=2,
        eval_batch_size=4,
    )
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
    return train_on_samples(
        real,
        CLASSES,
        tiny_cfg(**RESUME_CFG),
        val_samples=val,
        synthetic=synthetic,
        run=RunFolder(tmp_path_factory.mktemp("straight")),
    )


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
        train_on_samples(real, CLASSES, cfg, synthetic=synthetic, run=RunFolder(tmp_path), on_step=stop_at(2))
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text())["step"] == 2
    resumed = train_on_samples(real, CLASSES, cfg, synthetic=synthetic, run=RunFolder(tmp_path), resume=True)
    assert resumed.steps == 4 and resumed.history == straight.history
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_validation_during_training_is_logged_and_changes_nothing(straight, tmp_path):
    """val_every: val/ records in metrics.jsonl at those steps; validation never touches what training draws."""
    from todsynth.runs import read_metrics

    real, synthetic, val = train_data()
    outcome = train_on_samples(
        real,
        CLASSES,
        tiny_cfg(**RESUME_CFG, val_every=1),
        val_samples=val,
        synthetic=synthetic,
        run=RunFolder(tmp_path),
    )
    a, b = straight.model.state_dict(), outcome.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "val/mIoU" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all({"lr", "samples_per_s"} <= set(r) for r in records if "loss" in r)
    assert records[-1]["val/mIoU"] == straight.val.miou


def test_tensorboard_tracker_writes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from todsynth.runs import read_metrics

    train_on_samples(make_samples(4), CLASSES, tiny_cfg(steps=2, log_with="tensorboard"), run=RunFolder(tmp_path))
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path):
    samples = make_samples(4)
    with pytest.raises(CheckpointError, match="no checkpoint") as e:
        train_on_samples(samples, CLASSES, tiny_cfg(), run=RunFolder(tmp_path), resume=True)
    assert e.value.path == tmp_path / "checkpoint"
    with pytest.raises(Stop):
        train_on_samples(samples, CLASSES, tiny_cfg(), run=RunFolder(tmp_path), on_step=stop_at(2))
    with pytest.raises(CheckpointError, match="lr: 0.001 -> 0.002"):
        train_on_samples(samples, CLASSES, tiny_cfg(lr=2e-3), run=RunFolder(tmp_path), resume=True)
    with pytest.raises(ConfigError, match="run folder"):
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


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": -1.0},
        {"lr": float("nan")},
        {"epochs": 0},
        {"batch_size": -2},
        {"arch": "pspnet"},
        {"synthetic_ratio": -0.5},
        {"weight_decay": float("inf")},
        {"size": 0},
        {"schedule": "step"},
        {"num_workers": -1},
        {"class_weights": "median"},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ConfigError):
        build_config(SegmentTrainConfig, bad)


def test_class_weights_favour_rare_classes_and_keep_the_pixel_mean():
    counts = torch.tensor([900.0, 90.0, 10.0, 0.0])
    assert class_weights_from_counts(counts, "none") is None
    freq = counts / counts.sum()
    sqrt = class_weights_from_counts(counts, "sqrt_inverse")
    inverse = class_weights_from_counts(counts, "inverse")
    for w in (sqrt, inverse):
        assert float((freq * w).sum()) == pytest.approx(1.0)
        assert w[0] < w[1] < w[2]
        assert float(w[2] / w[0]) <= 10.0 + 1e-5 and float(w[3] / w[0]) == pytest.approx(10.0)
    assert float(sqrt[1] / sqrt[0]) == pytest.approx(math.sqrt(10.0), rel=1e-5)
    assert float(inverse[2] / inverse[0]) == pytest.approx(10.0, rel=1e-5)  # 90x rarer, capped at 10x
    assert class_weights_from_counts(torch.zeros(3), "inverse") is None


def test_weighted_cross_entropy_counts_pixels_not_weights():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    labels[0, 0] = 255
    weight = torch.tensor([0.5, 1.0, 4.0])
    nll = -torch.log_softmax(logits, 1).gather(1, labels.clamp(max=2)[:, None])[:, 0]
    valid = labels != 255
    expected = (weight[labels.clamp(max=2)] * nll)[valid].sum() / valid.sum()
    assert float(cross_entropy(logits, labels, 255, weight)) == pytest.approx(float(expected), rel=1e-5)
    assert float(cross_entropy(logits, labels, 255, torch.ones(3))) == pytest.approx(
        float(cross_entropy(logits, labels, 255)), rel=1e-6
    )


def test_class_weighted_training_uses_the_mix_counts():
    from todsynth.data.torchdata import SegTorchDataset, mix_real_synthetic

    real, synthetic = make_samples(2, ignore_share=0.2), make_samples(3, seed=5)
    counts = class_pixel_counts(SegTorchDataset(real + synthetic, size=32), 3, 255)
    assert counts.sum() == sum(int((s.label != 255).sum()) for s in real + synthetic)
    mix = mix_real_synthetic(SegTorchDataset(real, size=32), SegTorchDataset(synthetic, size=32), None, repeat_real=3)
    real_counts = class_pixel_counts(SegTorchDataset(real, size=32), 3, 255)
    assert torch.equal(class_pixel_counts(mix, 3, 255), counts + 2 * real_counts)
    outcome = train_on_samples(real, CLASSES, tiny_cfg(steps=1, class_weights="sqrt_inverse"), synthetic=synthetic)
    assert outcome.class_weights == pytest.approx(class_weights_from_counts(counts, "sqrt_inverse").tolist())
    plain = train_on_samples(real, CLASSES, tiny_cfg(steps=1), synthetic=synthetic)
    assert plain.class_weights is None and plain.final_loss != outcome.final_loss
