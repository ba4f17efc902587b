"""Checkpoints and multi-process training: model-only snapshots with a limit, full state for exact resume,
2-process runs launched with configs/accelerate/fsdp.yaml and deepspeed_zero2.yaml that train, save and resume
exactly, and the DeepSpeed settings derived from the run's (or refused)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import small, toy  # noqa: F401 - the toy fixture

from todsynth.errors import ConfigError
from todsynth.generator.distributed import deepspeed_settings
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


def launch(config: str, data: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> None:
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
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


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero2_two_processes_train_save_and_resume_exactly(toy, tmp_path):  # noqa: F811
    """ZeRO-2 on the CPU (DeepSpeed's CPU accelerator, gloo): the engine accumulates (2 micro-steps), clips and
    steps; its partitioned optimizer state goes through accelerate's save_state, so a resume equals a straight run."""
    ds = {"DS_ACCELERATOR": "cpu"}
    cfg = "configs/accelerate/deepspeed_zero2.yaml"
    launch(cfg, toy, tmp_path / "straight", "grad_accum=2", "grad_clip=0.01", env=ds)
    launch(cfg, toy, tmp_path / "resumed", "grad_accum=2", "grad_clip=0.01", "stop_after=2", env=ds)
    launch(cfg, toy, tmp_path / "resumed", "grad_accum=2", "grad_clip=0.01", "resume=true", env=ds)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = load_weights(tmp_path / "straight" / "checkpoint" / "state.safetensors")
    sb = load_weights(tmp_path / "resumed" / "checkpoint" / "state.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    kept = sorted(p.name for p in (tmp_path / "resumed" / "deepspeed").iterdir())
    assert kept == ["step_0000002", "step_0000004"]  # the committed state stays until the next one is committed


def ds(**config):
    """deepspeed_settings of a run with grad_accum 2, grad_clip 0.5, batch 8 on 2 processes, fp32."""
    return deepspeed_settings(config, grad_accum=2, grad_clip=0.5, batch_size=8, world=2, mixed_precision="no")


def test_deepspeed_settings_come_from_the_run():
    want = {
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,
        "train_micro_batch_size_per_gpu": 4,
        "train_batch_size": 16,
    }
    assert ds() == want
    assert ds(gradient_accumulation_steps="auto", gradient_clipping="auto", zero_optimization={"stage": 2}) == want
    assert ds(gradient_accumulation_steps=2, gradient_clipping=0.5, bf16={"enabled": False}) == want


@pytest.mark.parametrize(
    "config, words",
    [
        ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps=1 but the run's grad_accum is 2"),
        ({"gradient_clipping": 1.0}, "gradient_clipping=1.0 but the run's grad_clip is 0.5"),
        ({"zero_optimization": {"stage": 3}}, "ZeRO-3"),
        ({"bf16": {"enabled": True}}, "mixed precision bf16 but the run's mixed_precision is no"),
    ],
)
def test_deepspeed_settings_refuse_a_mismatch(config, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(")) as err:
        ds(**config)
    assert err.value.fix
