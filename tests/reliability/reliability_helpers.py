"""Shared tools of the reliability tests: CLI subprocesses, SIGKILL at seeded moments, output integrity checks."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

CLI = [sys.executable, "-m", "todsynth.cli.main"]
PROCESS_TIMEOUT_S = 300


def cli_env() -> dict[str, str]:
    """Environment of a CLI subprocess: one thread (bit-equal to the in-process references), offline."""
    src = str(Path(__file__).resolve().parents[2] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": path,
        "COLUMNS": "2000",
    }


@contextlib.contextmanager
def torch_threads(n: int = 1) -> Iterator[None]:
    """Run in-process references on `n` threads, as the CLI subprocesses do (CPU kernels then agree bit for bit)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def invoke(app, args: list[str]):
    """Run the CLI in-process on one thread (as the CLI subprocesses run); returns typer's Result."""
    from typer.testing import CliRunner

    with torch_threads(1):
        return CliRunner().invoke(app, args)


def json_step(path: Path, key: str = "step") -> int:
    """`key` of a JSON file, or -1 while it does not exist (or is being swapped in)."""
    try:
        return int(json.loads(path.read_text())[key])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def is_temp(path: Path) -> bool:
    """Whether `path` is a writer's temporary file (dot-prefixed `*.tmp`), which readers must ignore."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def check_file(path: Path) -> None:
    """Fully parse one output file by its suffix; raises if it is truncated or half-written."""
    suffix = path.suffix.lower()
    if suffix == ".png":
        from PIL import Image

        with Image.open(path) as im:
            im.load()
    elif suffix == ".json":
        json.loads(path.read_text())
    elif suffix == ".jsonl":
        for line in path.read_text().splitlines():
            json.loads(line)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        load_file(str(path))
    elif suffix == ".yaml":
        import yaml

        yaml.safe_load(path.read_text())


def check_visible_files(root: Path) -> int:
    """Parse every visible file under `root` (temp files skipped); returns how many were checked."""
    checked = 0
    for path in sorted(root.rglob("*")):
        if path.is_file() and not is_temp(path):
            try:
                check_file(path)
            except Exception as e:  # noqa: BLE001 - any parse failure is a half-written file
                raise AssertionError(f"half-written or corrupt file visible after a kill: {path} ({e!r})") from e
            checked += 1
    return checked


def file_bytes(root: Path, keep: Callable[[Path], bool] = lambda p: True) -> dict[str, bytes]:
    """Relative path → bytes of the non-temporary files under `root` that `keep` accepts."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not is_temp(p) and keep(p.relative_to(root))
    }


def bytes_lost(reference: dict[str, bytes], final: dict[str, bytes]) -> int:
    """Bytes of reference files that are missing or different in the final output."""
    return sum(len(data) for name, data in reference.items() if final.get(name) != data)


@dataclass
class KillLog:
    """What a kill sequence did: delays drawn, kills that hit a running process, files checked after each."""

    delays: list[float] = field(default_factory=list)
    kills: int = 0
    files_checked: int = 0
    outputs: list[str] = field(default_factory=list)


def run_and_kill(
    args: list[str],
    out: Path,
    progressed: Callable[[], bool],
    delay: float,
    log: KillLog,
    patience_s: float = PROCESS_TIMEOUT_S,
) -> None:
    """Start `todsynth <args>`; once `progressed()` holds, wait `delay` s and SIGKILL it; check `out`."""
    proc = subprocess.Popen(CLI + args, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + patience_s
    while proc.poll() is None and not progressed() and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    output, _ = proc.communicate(timeout=PROCESS_TIMEOUT_S)  # reaps the child: its pid is free again
    log.delays.append(round(delay, 3))
    log.outputs.append(output[-2000:])
    if proc.returncode == -signal.SIGKILL:
        log.kills += 1
    else:
        assert proc.returncode == 0, f"run failed before the kill:\n{output[-3000:]}"
    if out.exists():
        log.files_checked += check_visible_files(out)


def kill_sequence(
    runs: list[list[str]], out: Path, progress: Callable[[], int], windows: list[float], seed: int
) -> KillLog:
    """Start each run in turn and SIGKILL it a seeded random time (up to its window) after it made progress."""
    rng = random.Random(seed)
    log = KillLog()
    for args, window in zip(runs, windows, strict=True):
        start = progress()
        run_and_kill(args, out, lambda s=start: progress() > s, rng.uniform(0.0, window), log)
    return log


# 6 masks x 3 transforms x 2 copies = 36 samples of 16 px, 4 Euler steps each: a few seconds of work.
SYNTH_SETTINGS: dict[str, str] = {
    "num_steps": "4",
    "copies": "2",
    "transforms": "identity,hflip,vflip",
    "batch_size": "2",
    "crfm.steps": "0",
}
SYNTH_SAMPLES = 36


def synth_args(generator: Path, masks: Path, out: Path) -> list[str]:
    """`todsynth synthesize` arguments for SYNTH_SETTINGS."""
    sets = [x for k, v in SYNTH_SETTINGS.items() for x in ("--set", f"{k}={v}")]
    return ["synthesize", str(generator), str(masks), str(out), *sets]


def synth_keep(rel: Path) -> bool:
    """Files that define a synthesized dataset (claims hold process ids and differ between runs)."""
    return rel.parts[0] != ".claims"


def refused_with(app, args: list[str], *words: str) -> str:
    """Invoke the CLI; assert exit 2 with one 'error:' message holding `words`, and no traceback."""
    result = invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output[-3000:], result.exception)
    assert "error:" in result.output and "Traceback" not in result.output
    for word in words:
        assert word in result.output, (word, result.output)
    return result.output
