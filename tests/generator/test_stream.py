"""Streaming generator data: lazy samples, random crops the same in any worker/process layout, exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from todsynth.errors import CheckpointError
from todsynth.generator.mmdit import MMDiTArch
from todsynth.generator.stream import StepBatches, TrainSamples, batch_loader, open_train_stream
from todsynth.generator.train import GeneratorTrainConfig, batch_indices, train_generator
from todsynth.io import load_weights


@pytest.fixture(scope="module")
def big_tiles(tmp_path_factory) -> Path:
    """Toy tiles larger (24 px) than the working size (16 px), so random crops move."""
    from todsynth.data.toy import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", n=6, size=24, seed=2)


def batches(samples, first: int, end: int, rank: int = 0, world: int = 1, workers: int = 0) -> list:
    return list(batch_loader(samples, StepBatches(len(samples), 4, 7, first, end, rank, world), workers))


def test_samples_are_read_lazily_and_batches_follow_batch_indices(big_tiles: Path) -> None:
    data, _ = open_train_stream(str(big_tiles), "Train", 16, "random", 7)
    assert isinstance(data.samples, TrainSamples) and not any(
        isinstance(v, torch.Tensor) for v in vars(data.samples).values()
    )
    got = batches(data.samples, 0, 5)
    assert [idx for idx, _, _ in got] == [batch_indices(s, 6, 4, 7).tolist() for s in range(5)]
    assert all(im.shape == (4, 3, 16, 16) and lab.shape == (4, 16, 16) for _, im, lab in got)


def test_crops_do_not_depend_on_workers_processes_or_the_first_step(big_tiles: Path) -> None:
    data, _ = open_train_stream(str(big_tiles), "Train", 16, "random", 7)
    one = batches(data.samples, 0, 4)
    workers = batches(data.samples, 0, 4, workers=2)
    later = batches(data.samples, 2, 4)  # a resumed run starting at step 2
    halves = [batches(data.samples, 0, 4, rank=r, world=2) for r in (0, 1)]
    for s in range(4):
        assert torch.equal(one[s][1], workers[s][1]) and torch.equal(one[s][2], workers[s][2])
        merged = torch.empty_like(one[s][2])
        merged[0::2], merged[1::2] = halves[0][s][2], halves[1][s][2]
        assert torch.equal(merged, one[s][2])
    assert all(torch.equal(one[2 + s][2], later[s][2]) for s in range(2))
    seen = {tuple(lab[0, 0, :4].tolist()) for _, _, lab in one}
    assert len(seen) > 1  # the crops move


def test_resume_with_random_crops_and_workers_is_exact(big_tiles: Path, tmp_path: Path) -> None:
    def cfg(out: str, **kw) -> GeneratorTrainConfig:
        return GeneratorTrainConfig(
            data=str(big_tiles),
            out=str(tmp_path / out),
            size=16,
            steps=4,
            batch_size=2,
            model=MMDiTArch(num_layers=1, num_heads=2, head_dim=16),
            val_every=0,
            val_samples=2,
            checkpoint_every=2,
            progress=False,
            warmup_steps=1,
            text_max_length=8,
            **kw,
        )

    train_generator(cfg("straight"))
    train_generator(cfg("resumed", stop_after=2, num_workers=2))
    train_generator(cfg("resumed", resume=True, num_workers=1))
    a = load_weights(tmp_path / "straight" / "model" / "transformer" / "model.safetensors")
    b = load_weights(tmp_path / "resumed" / "model" / "transformer" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = tmp_path / "straight" / "checkpoint" / "state.json"  # a state recorded with another crop mode
    info = json.loads(state.read_text())
    info["settings"]["crop"] = "resize"
    state.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="crop: 'resize' -> 'random'"):
        train_generator(cfg("straight", resume=True))
