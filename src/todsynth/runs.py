"""The run layer the trainers and synthesis share: run folder, settings check, resumable state, metrics, LR
schedule, precision, progress bar and the fit loop.

A training run folder holds `config.json` (written when the run starts), `checkpoint/` (state.safetensors +
state.json, swapped in by rename so a kill leaves the old or the new state, never half of one) and
`metrics.jsonl` (one JSON object per logged step; a resumed run drops the lines past its restored step, so
the file reads as an uninterrupted run's). A resumed run must have the settings of the run it continues,
except those declared `resume_free` (todsynth.config.setting).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from todsynth.config import flat_dict, setting
from todsynth.errors import CheckpointError, TodsynthError
from todsynth.io import load_weights, read_json, save_weights, write_json, write_text
from todsynth.locks import check_run_folder, run_lock

CONFIG_FILE = "config.json"
CHECKPOINT = "checkpoint"
METRICS_FILE = "metrics.jsonl"
STATE_TENSORS = "state.safetensors"
STATE_INFO = "state.json"
# What every training run writes into its folder: removed before a run started with `overwrite`.
RUN_OUTPUTS = ("model", "results.json", CONFIG_FILE, METRICS_FILE, "logs", CHECKPOINT, CHECKPOINT + ".old")
Schedule = Literal["cosine", "poly", "cosine_ramp"]
StepCallback = Callable[[int, float], None]


# ---------------------------------------------------------------------------------------------
# Learning rate


def lr_at(
    step: int, total: int, base_lr: float, warmup: int = 0, schedule: Schedule = "cosine", power: float = 0.9
) -> float:
    """Learning rate of the 0-based `step` of `total`: linear warm-up, then cosine or poly decay to 0.

    "cosine" and "poly" warm up as base·(step+1)/warmup (base reached at the last warm-up step, the
    segmenter's); "cosine_ramp" as base·(step+1)/(warmup+1) (the generator's, as its reference code)."""
    if step < warmup:
        if schedule == "cosine_ramp":
            return base_lr * ((step + 1) / (warmup + 1))
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    if schedule == "poly":
        return base_lr * (1.0 - progress) ** power
    return base_lr * (0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass
class RunControl:
    """How one invocation treats its run folder, the same settings in every trainer's config; resume-free."""

    resume: bool | Literal["auto"] = setting(
        False,
        resume_free=True,
        help="true: continue from out/checkpoint (refused when there is none); auto: continue if one exists",
    )
    stop_after: int | None = setting(
        None, resume_free=True, help="end this invocation after this step (like a kill; resume continues)"
    )
    overwrite: bool = setting(
        False, resume_free=True, help="start afresh in an out that holds an earlier run (its outputs are removed)"
    )
    log_with: Literal["tensorboard"] | None = setting(
        None, resume_free=True, help="tracker besides out/metrics.jsonl: tensorboard (event files in out/logs)"
    )


RESUME_FIX = "resume with the settings of the original run, replace it with --overwrite, or use another --out"


def check_settings(
    saved: Any, current: dict[str, Any], free: Iterable[str], path: Path, what: str, fix: str = RESUME_FIX
) -> None:
    """Refuse, naming `path`, a run whose recorded settings differ from `current` in any setting not in `free`
    (dotted names; nested settings are compared flat)."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{what} holds no settings record", path=path, fix=fix)
    saved, current, free = flat_dict(saved), flat_dict(json.loads(json.dumps(current))), set(free)
    diffs = [
        f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
        for k in sorted(set(saved) | set(current))
        if k not in free and saved.get(k) != current.get(k)
    ]
    if diffs:
        raise CheckpointError(f"{what} was written with other settings ({'; '.join(diffs)})", path=path, fix=fix)


# ---------------------------------------------------------------------------------------------
# Precision, RNG


class Precision:
    """Autocast and the fp16 loss scaler of one stage, independent of the process-wide accelerate state, so one
    process may train stages in different precisions. fp16 on the CPU runs in fp32 (as accelerate runs it)."""

    def __init__(self, mixed_precision: str, device: torch.device):
        self.device = torch.device(device)
        fp16 = mixed_precision == "fp16" and self.device.type != "cpu"
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16 if fp16 else None}.get(mixed_precision)
        self.scaler = torch.amp.GradScaler(self.device.type) if fp16 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """`torch.autocast` in this stage's dtype (a no-op context in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: Tensor) -> None:
        """Backward of the (fp16: scaled) loss."""
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: Any) -> None:
        """Unscale the gradients before they are clipped (fp16)."""
        if self.scaler is not None:
            self.scaler.unscale_(_raw(optimizer))

    def step(self, optimizer: Any) -> None:
        """Optimizer step (fp16: skipped on overflow, and the scale updated)."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(_raw(optimizer))
        self.scaler.update()


def _raw(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def rng_and_scaler_tensors(scaler: Any = None) -> dict[str, Tensor]:
    """torch (and CUDA) RNG state and the fp16 loss scaler's state as tensors."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    if scaler is not None:
        tensors.update({f"scaler.{k}": torch.tensor(v) for k, v in scaler.state_dict().items()})
    return tensors


def restore_rng_and_scaler(tensors: dict[str, Tensor], scaler: Any = None) -> None:
    """Restore what `rng_and_scaler_tensors` saved."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("rng.cuda.")]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    saved = {k[7:]: v.item() for k, v in tensors.items() if k.startswith("scaler.")}
    if scaler is not None and saved:
        scaler.load_state_dict(saved)


# ---------------------------------------------------------------------------------------------
# Metrics


class Metrics:
    """The records of a run (one dict per logged step), appended to metrics.jsonl (main process) and to
    accelerate's trackers; kept in memory too, so a run without a folder still has its loss trace."""

    def __init__(self, path: Path | None = None, accelerator: Any = None):
        self.path, self.accelerator = path, accelerator
        self.records: list[dict[str, Any]] = []

    @property
    def main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def log(self, record: dict[str, Any]) -> None:
        """Add one record: a metrics.jsonl line (one write: a kill never leaves half a line) and tracker values."""
        self.records.append(record)
        if self.path is not None and self.main:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (json.dumps(record) + "\n").encode())
            finally:
                os.close(fd)
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(
                {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}, step=record["step"]
            )

    def start(self) -> None:
        """A new run: no records."""
        self.records = []
        if self.path is not None and self.main:
            write_text(self.path, "")

    def resume(self, step: int) -> None:
        """Keep the records up to `step` (those past it come again from the resumed run), in memory and on disk."""
        self.records = [r for r in read_metrics(self.path) if r["step"] <= step] if self.path is not None else []
        if self.path is not None and self.main:
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def history(self) -> list[tuple[int, float]]:
        """(step, loss) of every loss record."""
        return [(r["step"], r["loss"]) for r in self.records if "loss" in r]

    def last(self, prefix: str) -> dict[str, Any] | None:
        """The last record holding a key starting with `prefix` (e.g. "val/"), or None."""
        return next((r for r in reversed(self.records) if any(k.startswith(prefix) for k in r)), None)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (none if it does not exist); a line cut by a kill (the last) is dropped."""
    fix = "delete the line (or the file: only the logged values are lost)"
    return read_jsonl(path, "step", int, CheckpointError, fix, drop_cut_last=True)


def read_jsonl(
    path: Path, key: str, kind: type, error: type[TodsynthError], fix: str, drop_cut_last: bool = False
) -> list[dict[str, Any]]:
    """The objects of a .jsonl file, each holding `key` of type `kind` (none if the file does not exist); any other
    line (but a last one cut by a kill, with `drop_cut_last`) or an unreadable file is an `error` naming `path`."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read the file: {e}", path=path, fix=fix) from None
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record, reason = None, f"not valid JSON ({e.msg})"
        else:
            reason = f"expected an object with {'an integer' if kind is int else 'a string'} {key!r}"
        if not isinstance(record, dict) or not isinstance(record.get(key), kind):
            if drop_cut_last and n == len(lines):
                break
            raise error(f"line {n}: {reason}", path=path, fix=fix)
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# Run folder


class RunFolder:
    """A training run's folder: config.json, the resumable state in checkpoint/ and metrics.jsonl.

    `settings` (a config's asdict, plus what else a resumption must match) is recorded with every state and
    compared on resume, the names in `free` aside."""

    def __init__(
        self, root: str | Path, settings: dict[str, Any] | None = None, free: Iterable[str] = (), main: bool = True
    ):
        self.root, self.settings, self.free, self.main = Path(root), settings or {}, set(free), main
        self.checkpoint = self.root / CHECKPOINT
        self.started = False  # this invocation wrote config.json

    def has_state(self) -> bool:
        """Whether a state exists (or `checkpoint.old`, left by a kill between the two renames of a save)."""
        return (self.checkpoint / STATE_INFO).exists() or self.checkpoint.with_name(CHECKPOINT + ".old").exists()

    def start(self, config: dict[str, Any], metrics: Metrics) -> None:
        """A new run: config.json written, an earlier run's state and metrics dropped."""
        if self.main:
            for name in (CHECKPOINT, CHECKPOINT + ".old", CHECKPOINT + ".tmp"):
                shutil.rmtree(self.root / name, ignore_errors=True)
            write_json(self.root / CONFIG_FILE, config)
        self.started = True
        metrics.start()

    def discard_start(self) -> None:
        """Remove what `start` wrote when the run failed before saving any state (nothing half-written stays)."""
        if self.started and self.main and not self.has_state():
            for name in (CONFIG_FILE, METRICS_FILE):
                (self.root / name).unlink(missing_ok=True)

    def save_state(self, step: int, tensors: dict[str, Tensor], info: dict[str, Any], scaler: Any = None) -> None:
        """Write tensors (plus RNG and loss-scaler state), step, settings and `info` into checkpoint/ via a temp
        folder and renames (main process only)."""
        if not self.main:
            return
        tmp, old = self.checkpoint.with_name(CHECKPOINT + ".tmp"), self.checkpoint.with_name(CHECKPOINT + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        save_weights(tmp / STATE_TENSORS, {**tensors, **rng_and_scaler_tensors(scaler)})
        write_json(tmp / STATE_INFO, {"step": step, "settings": self.settings, **info})
        if self.checkpoint.exists():
            shutil.rmtree(old, ignore_errors=True)  # left over when a run was killed before removing it
            self.checkpoint.rename(old)
        tmp.rename(self.checkpoint)
        shutil.rmtree(old, ignore_errors=True)

    def load_state(self, metrics: Metrics, scaler: Any = None) -> tuple[int, dict[str, Tensor], dict[str, Any]]:
        """(step, tensors, info) of the saved state after checking its settings; RNG and loss scaler restored,
        metrics past the step dropped."""
        old = self.checkpoint.with_name(CHECKPOINT + ".old")
        if self.main and not self.checkpoint.exists() and old.exists():  # killed between the two renames
            old.rename(self.checkpoint)
        path = self.checkpoint / STATE_INFO
        if not path.is_file():
            raise CheckpointError("no checkpoint to resume from", path=self.checkpoint, fix="start without resume")
        info = read_json(path)
        if not isinstance(info, dict) or not isinstance(info.get("step"), int):
            raise CheckpointError(
                "not a todsynth checkpoint (no step recorded)",
                path=path,
                fix="point the run at the folder of the run you want to resume",
            )
        check_settings(info.get("settings"), self.settings, self.free, path, "the checkpoint")
        tensors = load_weights(self.checkpoint / STATE_TENSORS)
        restore_rng_and_scaler(tensors, scaler)
        metrics.resume(info["step"])
        return info["step"], tensors, info


@contextlib.contextmanager
def open_run(
    root: str | Path, resume: bool | Literal["auto"], overwrite: bool, outputs: Iterable[str], main: bool = True
) -> Iterator[tuple[RunFolder, bool]]:
    """Hold the folder's run lock; yield (the run folder, whether it resumes). An earlier run there is refused
    unless resumed or replaced (`overwrite` removes its `outputs`); `resume=True` without a state is refused.
    The trainer then sets the run's `settings` and `free` names before it loads or saves a state."""
    with run_lock(root, enabled=main):
        check_run_folder(Path(root), resume, overwrite, outputs, remove=main)
        run = RunFolder(root, main=main)
        resuming = resume is not False and run.has_state()
        if resume is True and not resuming:  # refused before anything is loaded or written
            raise CheckpointError(
                "no checkpoint to resume from",
                path=run.checkpoint,
                fix="start the run without --resume (with --overwrite to replace what an earlier run left there)",
            )
        try:
            yield run, resuming
        except BaseException:
            run.discard_start()
            raise


# ---------------------------------------------------------------------------------------------
# Progress


class Progress:
    """A rich progress bar on stderr with a free text (e.g. the loss); a no-op when disabled (non-main processes)."""

    def __init__(self, label: str, total: int, done: int = 0, enabled: bool = True):
        self.bar = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

        self.bar = Bar(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.description}"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.bar.start()
        self.task = self.bar.add_task("", total=total, completed=done)

    def update(self, done: int, text: str | None = None) -> None:
        """Show `done` (and `text`)."""
        if self.bar is not None:
            if text is None:
                self.bar.update(self.task, completed=done)
            else:
                self.bar.update(self.task, completed=done, description=text)

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---------------------------------------------------------------------------------------------
# The fit loop


class FitTask(Protocol):
    """What a trainer plugs into `fit` (the generator and segmenter tasks)."""

    optimizer: Any

    def train_step(self, step: int) -> Tensor:
        """One optimizer update of the 0-based `step`; returns its loss (on the device)."""

    def validate(self, step: int) -> dict[str, float]:
        """Validation values after `step`, logged as val/<name> (empty: nothing to log)."""

    def after_step(self, step: int) -> None:
        """Work after `step` that is not state (e.g. model-only snapshots)."""

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and JSON info a resumed run restores."""


@dataclass
class Loop:
    """Steps `start`..`end` of a `total`-step run: its learning rate per step, samples per step, and how often
    it logs (and at `total`), validates (and at `total` when `validate_at_end`) and saves (and at the end)."""

    start: int
    end: int
    total: int
    lr: Callable[[int], float]
    samples_per_step: int
    log_every: int
    val_every: int = 0
    validate_at_end: bool = False
    save_every: int = 0


def fit(
    task: FitTask,
    loop: Loop,
    metrics: Metrics,
    accelerator: Any,
    run: RunFolder | None = None,
    progress: Progress | None = None,
    on_step: StepCallback | None = None,
    scaler: Any = None,
) -> float | None:
    """Train `task` over the loop's steps: LR set, step, log, validate, save, `on_step(step, loss)` at log steps.

    `task.validate` runs with the torch RNG forked, so it never changes what training draws.
    Returns the loss last read (that of the last step when it was logged or saved; None if no step ran)."""
    progress = progress or Progress("", 0, enabled=False)
    value = None
    clock, since = time.perf_counter(), loop.start
    for step in range(loop.start, loop.end):
        lr = loop.lr(step)
        for group in task.optimizer.param_groups:
            group["lr"] = lr
        loss = task.train_step(step)
        done = step + 1
        logged = done % loop.log_every == 0 or done == loop.total
        saved = run is not None and (done % loop.save_every == 0 or done in (loop.total, loop.end))
        if logged or saved:
            value = float(
                accelerator.reduce(loss.detach(), reduction="mean") if accelerator.num_processes > 1 else loss
            )
            if not math.isfinite(value):
                raise TodsynthError(
                    f"training diverged: loss is {value} at step {done}",
                    fix="lower the learning rate or check the labels",
                )
        if logged:
            now = time.perf_counter()
            metrics.log(
                {
                    "step": done,
                    "loss": value,
                    "lr": lr,
                    "samples_per_s": (done - since) * loop.samples_per_step / max(now - clock, 1e-9),
                }
            )
            clock, since = now, done
            progress.update(done, f"loss {value:.4f}")
        else:
            progress.update(done)
        if (loop.val_every and done % loop.val_every == 0) or (loop.validate_at_end and done == loop.total):
            devices = [accelerator.device] if accelerator.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                values = task.validate(done)
            if values:
                metrics.log({"step": done, **{f"val/{k}": v for k, v in values.items()}})
        task.after_step(done)
        if saved and run is not None:
            tensors, info = task.state()
            run.save_state(done, tensors, info, scaler=scaler)
            accelerator.wait_for_everyone()
        if logged and value is not None and on_step is not None and accelerator.is_main_process:
            on_step(done, value)
    progress.close()
    return value


def make_accelerator(log_with: str | None = None, logging_dir: str | Path | None = None) -> Any:
    """An accelerate Accelerator for one entry point: its device and processes, trackers (`log_with`) writing
    under `logging_dir`. Mixed precision is each stage's own (`Precision`), so stages of one process may differ."""
    from accelerate import Accelerator

    from todsynth.generator.distributed import process_group_kwargs

    return Accelerator(
        log_with=log_with,
        project_dir=None if logging_dir is None else str(logging_dir),
        kwargs_handlers=process_group_kwargs(),
    )


def start_trackers(accelerator: Any, name: str, config: dict[str, Any]) -> None:
    """Start the accelerator's trackers (if any) with the run's settings (flat; lists and None as text)."""
    if accelerator.log_with:
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat_dict(config).items()}
        accelerator.init_trackers(name, config=flat)
