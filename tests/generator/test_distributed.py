"""Checkpoints and multi-process training: model-only snapshots with a limit, full state for exact resume,
and a 2-process run launched with configs/accelerate/fsdp.yaml that trains, saves and resumes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import small, toy  # noqa: F401 - the toy fixture

from todsynth.generator.mmdit import MaskControlMMDiT
from todsynth.generator.train import train_generator
from todsynth.io import load_weights

from gentest_helpers import weights

ROOT = Path(__file__).resolve().parents[2]


def test_snapshots_are_model_only_limited_and_loadable(toy, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train_generator(small(toy, out, steps=6, checkpoint_every=1, full_state_every=3, checkpoints_total_limit=2))
    snaps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert snaps == ["step_0000005", "step_0000006"]
    snap = out / "checkpoints" / "step_0000006" / "model.safetensors"
    full = out / "checkpoint" / "state.safetensors"
    assert snap.stat().st_size < full.stat().st_size / 2  # no AdamW moments
    assert not any(k.startswith("optim.") for k in load_weights(snap))
    last = MaskControlMMDiT.from_pretrained(snap.parent).state_dict()
    final = weights(out)
    assert all(torch.equal(last[k], final[k]) for k in final)


def launch(config: str, data: Path, out: Path, *extra: str) -> None:
    """`accelerate launch --config_file <config> --num_processes 2` of `generator train` on the CPU (gloo)."""
    args = [
        "generator",
        "train",
        str(data),
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--size",
        "16",
        *[
            x
            for s in (
                "model.num_layers=2",
                "model.num_heads=2",
                "model.head_dim=16",
                "val_every=0",
                "text_max_length=8",
                "progress=false",
                "ema_decay=0.9",
                "checkpoint_every=1",
                "full_state_every=2",
                *extra,
            )
            for x in ("--set", s)
        ],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / config),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "-m",
        "todsynth.cli.main",
        *args,
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_config_two_processes_train_save_and_resume_exactly(toy, tmp_path):  # noqa: F811
    """On a CPU, accelerate runs an FSDP config as DDP (MULTI_CPU); the checkpoint code is the one FSDP runs:
    state gathered through accelerate on every rank, optimizer state by parameter name."""
    launch("configs/accelerate/fsdp.yaml", toy, tmp_path / "straight")
    launch("configs/accelerate/fsdp.yaml", toy, tmp_path / "resumed", "stop_after=2")
    launch("configs/accelerate/fsdp.yaml", toy, tmp_path / "resumed", "resume=true")
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = load_weights(tmp_path / "straight" / "checkpoint" / "state.safetensors")
    sb = load_weights(tmp_path / "resumed" / "checkpoint" / "state.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(k.startswith("optim.blocks.") for k in sa) and any(k.startswith("ema.") for k in sa)
