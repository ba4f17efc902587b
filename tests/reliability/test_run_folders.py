"""Run folders and written files: one run per folder (lock), no silent overwrite of an earlier run, written
weights with the umask's mode, safetensors write failures reported like any other, clear device errors.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from todsynth.errors import ConfigError, TodsynthError
from todsynth.locks import RUN_LOCK, owner_tag

from reliability_helpers import cli_env, invoke, refused_with
from tiny_models import TINY_GEN, TINY_SEG


def seg_train(data: Path, out: Path, *extra: str) -> list[str]:
    """`todsynth segment train` arguments of a 1-step tiny run."""
    return ["segment", "train", str(data), "--out", str(out), *TINY_SEG, *extra]


def gen_train(data: Path, out: Path, *extra: str) -> list[str]:
    """`todsynth generator train` arguments of a 1-step tiny run."""
    return ["generator", "train", str(data), "--out", str(out), *TINY_GEN, *extra]


def ok(app, args: list[str]) -> str:
    """Invoke the CLI; assert success; returns the output."""
    result = invoke(app, args)
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    return result.output


def snapshot(folder: Path) -> dict[str, bytes]:
    """Relative path → bytes of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    """A live process of this host whose pid can stand in for another run holding a lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(proc.stdout)


# ---------------------------------------------------------------------------------------------
# One run per folder


def test_a_second_run_on_a_locked_folder_is_refused(cli_app, toy_masks_16: Path, tmp_path: Path) -> None:
    """While another process holds the folder's run lock, segment and generator train refuse, naming its pid."""
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from todsynth.locks import run_lock\n"
            f"with run_lock({str(out)!r}):\n    print('held', flush=True); sys.stdin.read()",
        ],
        env=cli_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = out / RUN_LOCK
        owner = f"{socket.gethostname()}:{holder.pid}"
        assert lock.read_text() == owner
        for args in (seg_train(toy_masks_16, out), gen_train(toy_masks_16, out)):
            refused_with(cli_app, args, str(lock), f"lock held by process {owner}", "another run")
        assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK] and lock.read_text() == owner
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and not out.exists()  # released, and the empty folder it made is gone


@pytest.mark.parametrize("command", ["segment", "generator"])
def test_a_lock_held_by_a_live_pid_is_refused_and_a_dead_one_taken_over(
    cli_app, toy_masks_16: Path, tmp_path: Path, sleeper: subprocess.Popen, command: str
) -> None:
    """A lock naming a running process refuses the run; one naming a dead process is taken over and released."""
    out = tmp_path / "run"
    out.mkdir()
    lock = out / RUN_LOCK
    args = seg_train(toy_masks_16, out) if command == "segment" else gen_train(toy_masks_16, out)
    live = f"{socket.gethostname()}:{sleeper.pid}"
    lock.write_text(live)
    refused_with(cli_app, args, str(lock), live, "delete")
    assert lock.read_text() == live and sorted(p.name for p in out.iterdir()) == [RUN_LOCK]
    lock.write_text(f"{socket.gethostname()}:{dead_pid()}")  # what a killed run leaves
    ok(cli_app, args)
    assert (out / "model").is_dir() and not lock.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(f"{RUN_LOCK}.") or p.name.startswith(f".{RUN_LOCK}")]


def test_the_lock_is_held_during_the_run_and_released_on_ctrl_c(toy_masks_16: Path, tmp_path: Path) -> None:
    """The API holds `out/run.lock` (this process) while training; Ctrl-C or an error releases it."""
    from todsynth.config import load_config
    from todsynth.segment.train import SegmentTrainConfig, train_segmenter

    out = tmp_path / "run"
    cfg = load_config(
        SegmentTrainConfig,
        None,
        {
            "data": str(toy_masks_16),
            "out": str(out),
            "arch": "segformer",
            "encoder": "tu-mobilenetv3_small_050",
            "size": 16,
            "steps": 2,
            "batch_size": 2,
            "device": "cpu",
            "log_every": 1,
        },
    )
    seen: list[str] = []

    def interrupt(step: int, loss: float) -> None:
        """Record the lock's owner, then stop like Ctrl-C."""
        seen.append((out / RUN_LOCK).read_text())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmenter(cfg, on_step=interrupt)
    assert seen == [owner_tag()] and not (out / RUN_LOCK).exists()

    def fail(step: int, loss: float) -> None:
        """An error inside the run."""
        raise TodsynthError("simulated failure")

    with pytest.raises(TodsynthError, match="simulated"):
        train_segmenter(cfg, on_step=fail)
    assert not (out / RUN_LOCK).exists()


# ---------------------------------------------------------------------------------------------
# No silent overwrite of an earlier run


def test_segment_train_never_overwrites_an_earlier_run_silently(cli_app, toy_masks_16: Path, tmp_path: Path) -> None:
    """A finished or checkpointed run is refused, naming --resume and --overwrite; --overwrite replaces it."""
    out = tmp_path / "run"
    ok(cli_app, seg_train(toy_masks_16, out))
    before = snapshot(out)
    refused_with(
        cli_app, seg_train(toy_masks_16, out, "--seed", "1"), str(out), "earlier run", "--resume", "--overwrite"
    )
    assert snapshot(out) == before
    for name in ("model/model.safetensors", "model/config.json", "results.json"):  # as a kill mid-run leaves it
        (out / name).unlink()
    (out / "model").rmdir()
    refused_with(cli_app, seg_train(toy_masks_16, out, "--seed", "1"), str(out), "checkpoint/state.safetensors")
    refused_with(cli_app, seg_train(toy_masks_16, out, "--resume", "--overwrite"), "exclude each other")
    ok(cli_app, seg_train(toy_masks_16, out, "--seed", "1", "--overwrite"))
    assert '"seed": 1' in (out / "results.json").read_text()
    ok(cli_app, seg_train(toy_masks_16, out, "--seed", "1", "--resume"))  # overwrite is a resume-free setting


def test_generator_train_never_overwrites_an_earlier_run_silently(cli_app, toy_masks_16: Path, tmp_path: Path) -> None:
    """generator train without --resume on a finished run is refused; --overwrite starts afresh."""
    out = tmp_path / "run"
    ok(cli_app, gen_train(toy_masks_16, out))
    before = snapshot(out)
    refused_with(cli_app, gen_train(toy_masks_16, out, "--set", "seed=1"), str(out), "--resume", "--overwrite")
    assert snapshot(out) == before
    ok(cli_app, gen_train(toy_masks_16, out, "--set", "seed=1", "--overwrite"))
    assert '"seed": 1' in (out / "config.json").read_text()
    assert snapshot(out)["model/transformer/model.safetensors"] != before["model/transformer/model.safetensors"]


# ---------------------------------------------------------------------------------------------
# Written files


@pytest.fixture
def umask_022() -> Iterator[None]:
    """Run with umask 022 (files 0644), restoring the caller's umask."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(folder: Path) -> dict[str, int]:
    """Relative path → permission bits of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_weight_files_get_the_umask_mode(cli_app, umask_022: None, toy_masks_16: Path, tmp_path: Path) -> None:
    """Saved weights, a trained segmenter's folder and a generator's (prompt cache, checkpoint) are 0644, not 0600."""
    import torch

    from todsynth.io import save_weights

    save_weights(tmp_path / "w.safetensors", {"x": torch.ones(2)})
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
    seg, gen = tmp_path / "seg", tmp_path / "gen"
    ok(cli_app, seg_train(toy_masks_16, seg))
    ok(cli_app, gen_train(toy_masks_16, gen))
    for folder, weights in (
        (seg, {"model/model.safetensors", "checkpoint/state.safetensors"}),
        (gen, {"model/transformer/model.safetensors", "prompt_cache.safetensors", "checkpoint/state.safetensors"}),
    ):
        found = modes(folder)
        assert weights <= found.keys()
        assert {name: oct(mode) for name, mode in found.items() if mode != 0o644} == {}


def test_a_safetensors_write_failure_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk inside safetensors' writer (a SafetensorError, not an OSError): TodsynthError, no file left."""
    import safetensors.torch
    import torch
    from safetensors import SafetensorError

    from todsynth import io

    target = tmp_path / "out" / "w.safetensors"
    io.save_weights(target, {"x": torch.zeros(2)})
    old = target.read_bytes()

    def disk_full(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        """safetensors' save_file on a full disk: part of the file written, then its error."""
        Path(filename).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(errno.ENOSPC)} (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(TodsynthError) as info:
        io.save_weights(target, {"x": torch.ones(2)})
    monkeypatch.undo()
    assert info.value.path == target and "writing failed: No space left on device" in str(info.value)
    assert "disk space" in str(info.value)
    assert target.read_bytes() == old and sorted(p.name for p in target.parent.iterdir()) == ["w.safetensors"]


def test_a_real_safetensors_write_failure_is_a_clear_error(tmp_path: Path) -> None:
    """A real I/O error inside safetensors' writer (file size limit: EFBIG) is reported like any write failure."""
    import torch

    from todsynth import io

    target = tmp_path / "w.safetensors"
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(TodsynthError) as info:
            io.save_weights(target, {"x": torch.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert info.value.path == target and f"writing failed: {os.strerror(errno.EFBIG)}" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Settings


def test_resume_choices_are_all_named(cli_app, toy_masks_16: Path, tmp_path: Path) -> None:
    """An invalid resume value lists every valid one, 'auto' included."""
    from todsynth.config import load_config
    from todsynth.generator.train import GeneratorTrainConfig

    with pytest.raises(ConfigError, match="'resume' must be true, false or 'auto', got 'maybe'"):
        load_config(GeneratorTrainConfig, None, {"data": "d", "resume": "maybe"})
    out = tmp_path / "run"
    refused_with(cli_app, gen_train(toy_masks_16, out, "--set", "resume=maybe"), "'auto'")
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", ["eval", "train"])
def test_cuda_without_a_gpu_is_a_clear_error(
    cli_app, toy_masks_16: Path, tiny_segmenter_dir: Path, tmp_path: Path, command: str
) -> None:
    """segment eval / train --device cuda on a machine without a GPU: exit 2, 'use --device cpu', nothing written."""
    out = tmp_path / "out"
    evaluate = ["segment", "eval", str(tiny_segmenter_dir), str(toy_masks_16), "--split", "Train", "--json", str(out)]
    train = ["segment", "train", str(toy_masks_16), "--out", str(out), *TINY_SEG[:-2]]
    args = evaluate if command == "eval" else train
    refused_with(cli_app, [*args, "--device", "cuda"], "no CUDA device", "--device cpu")
    assert not out.exists()
