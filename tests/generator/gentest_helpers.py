"""Shared by the generator tests: a trained model's weights, and one run under `accelerate launch` vs one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from todsynth.io import load_weights


def weights(out: Path) -> dict[str, torch.Tensor]:
    """The transformer weights a run saved to out/model."""
    return load_weights(out / "model" / "transformer" / "model.safetensors")


def two_processes_vs_one(args: list[str], tmp_path: Path) -> float:
    """Run the CLI `args` with `accelerate launch --cpu --num_processes 2` and in one process (outputs under
    tmp_path/two and tmp_path/one); return the largest weight difference between the two models."""
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
        launch + args + ["--out", str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, "-m", "todsynth.cli.main"] + args + ["--out", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    return max((a[k] - b[k]).abs().max().item() for k in a)
