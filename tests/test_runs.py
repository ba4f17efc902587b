"""The run layer: LR schedules, settings check, atomic state swap, RNG and loss-scaler round trip, metrics.jsonl."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from todsynth.config import resume_free_names, setting
from todsynth.errors import CheckpointError
from todsynth.runs import Metrics, RunFolder, check_settings, lr_at, read_metrics


def test_cosine_ramp_equals_the_lambda_lr_it_replaced_float_for_float():
    """The generator's schedule: what LambdaLR(warm-up (s+1)/(w+1), then cosine) set, bit for bit."""
    for base, warmup, total in ((3e-4, 20, 400), (1e-3, 2, 40), (0.05, 0, 7), (3e-3, 5, 5)):

        def factor(step: int, warmup: int = warmup, total: int = total) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return 0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(total - warmup, 1), 1.0)))

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        for step in range(total):
            assert lr_at(step, total, base, warmup, "cosine_ramp") == optimizer.param_groups[0]["lr"], step
            optimizer.step()
            scheduler.step()


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_segmenter_schedules_keep_their_numbers(schedule: str):
    """poly and cosine warm up to base at the last warm-up step (the segmenter's formula, bit for bit)."""
    base, warmup, total, power = 5e-4, 3, 50, 0.9
    for step in range(total):
        if step < warmup:
            expected = base * (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, total - warmup)
            expected = (
                base * 0.5 * (1.0 + math.cos(math.pi * progress))
                if schedule == "cosine"
                else base * (1.0 - progress) ** power
            )
        assert lr_at(step, total, base, warmup, schedule, power) == expected
    assert lr_at(0, 10, 1.0, 2, "poly") == 0.5 and lr_at(1, 10, 1.0, 2, "poly") == 1.0
    assert lr_at(5, 10, 1.0, 0, "cosine") == pytest.approx(0.5)


@dataclass
class Inner:
    depth: int = 2
    every: int = setting(5, resume_free=True)


@dataclass
class Outer:
    lr: float = 0.1
    out: str = setting("runs/x", resume_free=True)
    inner: Inner = field(default_factory=Inner)


def test_settings_check_skips_resume_free_fields_and_compares_nested_ones_flat(tmp_path: Path):
    free = resume_free_names(Outer)
    saved = {"lr": 0.1, "out": "a", "inner": {"depth": 2, "every": 5}}
    check_settings(saved, {"lr": 0.1, "out": "b", "inner": {"depth": 2, "every": 9}}, free, tmp_path / "s.json", "x")
    with pytest.raises(CheckpointError, match=r"other settings \(inner.depth: 2 -> 3; lr: 0.1 -> 0.2\)") as info:
        check_settings(
            saved,
            {"lr": 0.2, "out": "a", "inner": {"depth": 3, "every": 5}},
            free,
            tmp_path / "s.json",
            "the checkpoint",
        )
    assert info.value.path == tmp_path / "s.json" and info.value.fix
    with pytest.raises(CheckpointError, match="no settings record"):
        check_settings([1, 2], {}, free, tmp_path / "s.json", "the checkpoint")


def test_state_is_swapped_in_atomically_and_found_after_a_kill_between_the_renames(tmp_path: Path):
    run = RunFolder(tmp_path, {"lr": 0.1}, ())
    metrics = Metrics(tmp_path / "metrics.jsonl")
    run.start({"lr": 0.1}, metrics)
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.1}
    run.save_state(1, {"w": torch.ones(2)}, {"note": "one"})
    run.save_state(2, {"w": torch.full((2,), 2.0)}, {"note": "two"})
    assert not (tmp_path / "checkpoint.tmp").exists() and not (tmp_path / "checkpoint.old").exists()
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")  # killed between the two renames of a save
    assert run.has_state()
    step, tensors, info = RunFolder(tmp_path, {"lr": 0.1}, ()).load_state(metrics)
    assert step == 2 and info["note"] == "two" and torch.equal(tensors["w"], torch.full((2,), 2.0))
    assert (tmp_path / "checkpoint").is_dir() and not (tmp_path / "checkpoint.old").exists()
    with pytest.raises(CheckpointError, match="lr: 0.1 -> 0.3") as e:
        RunFolder(tmp_path, {"lr": 0.3}, ()).load_state(metrics)
    assert e.value.path == tmp_path / "checkpoint" / "state.json"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        RunFolder(tmp_path / "none", {}, ()).load_state(metrics)


def test_rng_and_grad_scaler_round_trip(tmp_path: Path):
    """The torch RNG and a real fp16 GradScaler (scale, growth tracker) come back as saved."""
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.1)
    for value in (1.0, float("inf"), 1.0):  # one overflow: the scale backs off, the tracker restarts
        optimizer.zero_grad()
        scaler.scale((param * value).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    run = RunFolder(tmp_path, {}, ())
    torch.manual_seed(7)
    run.save_state(3, {}, {}, scaler=scaler)
    expected = torch.rand(3)
    torch.manual_seed(99)
    fresh = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    run.load_state(Metrics(), fresh)
    assert torch.equal(torch.rand(3), expected)
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 512.0


def test_metrics_past_the_restored_step_are_dropped(tmp_path: Path):
    path = tmp_path / "metrics.jsonl"
    metrics = Metrics(path)
    metrics.start()
    for step in (1, 2, 3, 4):
        metrics.log({"step": step, "loss": 1.0 / step})
    metrics.log({"step": 4, "val/mIoU": 0.5})
    with path.open("a") as f:
        f.write('{"step": 5, "lo')  # a line cut by a kill
    resumed = Metrics(path)
    resumed.resume(2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2] and resumed.history() == [(1, 1.0), (2, 0.5)]
    resumed.log({"step": 3, "loss": 1 / 3})
    assert path.read_text().splitlines()[-1] == json.dumps({"step": 3, "loss": 1 / 3})
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(CheckpointError, match="line 2"):
        read_metrics(path)
