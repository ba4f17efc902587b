"""Segmenter training (stage c) and evaluation: seeded, resumable, one dataset-level confusion matrix."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from todsynth.checkpoint import load_optimizer_tensors, optimizer_tensors
from todsynth.config import require, resume_free_names, setting
from todsynth.data.bands import Normalisation, check_normalisation, dataset_settings, fit_normalisation
from todsynth.data.check import open_checked
from todsynth.data.classes import ClassSpec
from todsynth.data.sample import Sample
from todsynth.data.crops import CropMode
from todsynth.data.torchdata import SegTorchDataset, mix_real_synthetic, set_epoch
from todsynth.errors import CheckpointError, ConfigError, DataError, TodsynthError
from todsynth.io import load_weights, read_json, save_weights, write_json
from todsynth.locks import check_run_folder, run_lock
from todsynth.segment.metrics import ConfusionAccumulator, SegMetrics
from todsynth.segment.model import Segmenter, SegmenterConfig, check_encoder

STATE_FILE = "state.safetensors"
RUN_FILE = "run.json"
STEP_FILE = "step.json"
MIN_TRAIN_SAMPLES = 2  # batches are cut full (drop_last) or hold all samples when fewer
# What a run writes into its folder: removed before a run started with `overwrite`.
RUN_OUTPUTS = ("model", "results.json", "checkpoint")

StepCallback = Callable[[int, float], None]
ClassWeighting = Literal["none", "sqrt_inverse", "inverse"]
CLASS_WEIGHTINGS: tuple[str, ...] = get_args(ClassWeighting)
Arch = Literal["unet", "deeplabv3plus", "segformer", "fpn"]  # segment.model.ARCHS
MAX_CLASS_WEIGHT = 10.0


@dataclass
class SegmentTrainConfig:
    """Settings of one segmenter training run (`todsynth segment train`); `steps` (if set) overrides `epochs`."""

    data: str | None = setting(None, help="DATA: the training dataset (LoveDA root, image/mask folder or .jsonl)")
    split: str = setting("Train", help="split of a LoveDA root")
    split_file: str | None = setting(None, help='JSON split file ({"ids": [...]}) restricting the data')
    synthetic: str | None = setting(None, help="synthetic dataset mixed into training")
    synthetic_split: str = setting("Train", help="split of the synthetic dataset")
    synthetic_ratio: float | None = setting(None, help="synthetic samples per real one (default: all)")
    repeat_real: int = setting(1, help="times each real sample appears in the training mix")
    val: str | None = setting(None, resume_free=True, help="validation dataset, scored after training")
    val_split: str = setting("Val", resume_free=True, help="split of the validation dataset")
    arch: Arch = setting("unet", help="segmentation architecture")
    encoder: str | None = setting(None, help="smp encoder name (default resnet18 / mit_b0)")
    encoder_weights_file: str | None = setting(None, help="local encoder weights (.safetensors or .pth)")
    size: int | None = setting(512, help="training tile side in pixels (null: the tiles' own size)")
    crop: CropMode = setting("random", help="how samples reach size x size: random, center, or resize (short side)")
    epochs: int = setting(10, help="passes over the training mix (unless steps is set)")
    steps: int | None = setting(None, help="optimizer steps (overrides epochs)")
    batch_size: int = setting(8, help="batch size")
    eval_batch_size: int = setting(8, resume_free=True, help="batch size of the validation pass")
    lr: float = setting(5e-4, help="AdamW learning rate")
    weight_decay: float = setting(0.01, help="AdamW weight decay")
    optimizer: Literal["adamw"] = setting("adamw", help="optimizer")
    schedule: Literal["poly", "cosine"] = setting("poly", help="learning-rate decay after the warm-up")
    poly_power: float = setting(0.9, help="exponent of the poly schedule")
    warmup_steps: int = setting(0, help="linear warm-up steps")
    augment: bool = setting(True, help="random flips and 90° rotations")
    class_weights: ClassWeighting = setting("none", help="loss weights per class from the training mix's pixel "
                                                         "counts")
    seed: int = setting(0, help="seed of the weights and batches")
    num_workers: int = setting(0, resume_free=True, help="data loader workers")
    out: str = setting("runs/segment", resume_free=True, help="output folder (model/, results.json, checkpoint/)")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", resume_free=True, help="auto: the GPU when there is one")
    mixed_precision: Literal["no", "fp16", "bf16"] = setting("no", help="autocast precision")
    log_every: int = setting(10, resume_free=True, help="record the loss every N steps")
    checkpoint_every: int = setting(200, resume_free=True, help="save a resumable checkpoint every N steps")
    overwrite: bool = setting(False, resume_free=True, help="start afresh in an out that holds an earlier run (its "
                                                            "outputs are removed)")

    def validate(self) -> None:
        """Reject negative counts and non-finite numbers (choices are checked by their types when loaded)."""
        check_encoder(self.encoder)
        for name in ("lr", "poly_power"):
            value = getattr(self, name)
            require(_finite(value) and value > 0, f"'{name}' must be a finite number > 0, got {value!r}")
        require(_finite(self.weight_decay) and self.weight_decay >= 0,
                f"'weight_decay' must be a finite number >= 0, got {self.weight_decay!r}")
        require(self.synthetic_ratio is None or (_finite(self.synthetic_ratio) and self.synthetic_ratio >= 0),
                f"'synthetic_ratio' must be a finite number >= 0, got {self.synthetic_ratio!r}")
        for name in ("epochs", "batch_size", "eval_batch_size", "repeat_real", "log_every", "checkpoint_every"):
            require(getattr(self, name) >= 1, f"'{name}' must be >= 1, got {getattr(self, name)!r}")
        for name in ("steps", "size"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"'{name}' must be >= 1, got {value!r}")
        for name in ("warmup_steps", "num_workers", "seed"):
            require(getattr(self, name) >= 0, f"'{name}' must be >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclass
class TrainOutcome:
    """What a training run produced: the model (on CPU), validation metrics and the loss trace."""

    model: Segmenter
    val: SegMetrics | None
    steps: int
    final_loss: float
    train_size: int
    history: list[tuple[int, float]] = field(default_factory=list)
    wall_time_s: float = 0.0
    class_weights: list[float] | None = None


def _finite(value: Any) -> bool:
    """Whether `value` is a real finite number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lr_at(step: int, total: int, cfg: SegmentTrainConfig) -> float:
    """Learning rate for the 0-based `step` of `total`: linear warmup, then poly or cosine decay to 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (1.0 - progress) ** cfg.poly_power


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped), or 1 when the data is smaller than a batch."""
    return max(1, n // batch_size)


def total_steps(cfg: SegmentTrainConfig, n: int) -> int:
    """Optimizer steps of the whole run."""
    return cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch(n, cfg.batch_size)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a (seed, epoch)-seeded permutation cut into full batches."""
    order = np.random.default_rng([seed, epoch]).permutation(n).tolist()
    k = steps_per_epoch(n, batch_size)
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(k)]


def _accelerator(cfg: SegmentTrainConfig) -> Any:
    """A fresh single-process `accelerate.Accelerator` for the configured device and precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if PartialState._shared_state.get("num_processes", 1) == 1:
        # accelerate keeps device/precision process-wide; let one process run differently configured trainings
        AcceleratorState._reset_state(reset_partial_state=True)
    check_device(cfg.device)
    try:
        return Accelerator(cpu=cfg.device == "cpu", mixed_precision=cfg.mixed_precision)
    except ValueError as e:
        raise ConfigError(f"cannot set up device/precision: {e}", fix="check 'device' and 'mixed_precision'") from None


def check_device_choice(device: str) -> None:
    """Refuse a --device other than auto, cpu or cuda with the message `segment train` gives (its config's check)."""
    import typing

    choices = list(get_args(typing.get_type_hints(SegmentTrainConfig)["device"]))
    if device not in choices:
        raise ConfigError(f"'device' must be one of {choices}, got {device!r}", path="config",
                          fix=f"give --device {', '.join(choices[:-1])} or {choices[-1]}")


def check_eval_split(data: str | Path, split: str, default: str = "Val") -> None:
    """Refuse a split other than the default for a dataset that has no splits (only a LoveDA root has them):
    a setting that does not apply is refused, not ignored."""
    from todsynth.data.readers import ignores_split

    if split != default and ignores_split(data):
        raise ConfigError(f"--split {split} is given, but {data} has no splits (only a LoveDA root has Train/Val/Test)",
                          path="config", fix="leave out --split to score the whole dataset")


def check_device(device: str | torch.device) -> None:
    """Refuse a CUDA device when no GPU is visible, before anything is loaded onto it or written."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} requested but there is no CUDA device",
                          fix="use --device cpu")


class Checkpointer:
    """Resumable training state in one safetensors file (model, AdamW moments, RNG, step, loss trace)."""

    def __init__(self, directory: Path, run_info: dict[str, Any]):
        self.directory = directory
        self.run_info = run_info

    def start(self) -> None:
        """Record the run's settings (what a resumption must match); an earlier run's state is dropped."""
        for name in (STATE_FILE, STEP_FILE):
            if self.directory.is_dir():
                (self.directory / name).unlink(missing_ok=True)
        write_json(self.directory / RUN_FILE, self.run_info)

    def save(self, step: int, model: Segmenter, optimizer: Any, scaler: Any,
             history: list[tuple[int, float]]) -> None:
        """Write the state at `step` atomically, then the human-readable step file."""
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors.update(optimizer_tensors(optimizer))
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            tensors.update({f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        if scaler is not None:
            tensors.update({f"scaler.{k}": torch.tensor(v) for k, v in scaler.state_dict().items()})
        tensors["meta.step"] = torch.tensor(step, dtype=torch.int64)
        tensors["meta.history"] = torch.tensor(history, dtype=torch.float64).reshape(-1, 2)
        save_weights(self.directory / STATE_FILE, tensors)
        write_json(self.directory / STEP_FILE, {"step": step, "total_steps": self.run_info["total_steps"]})

    def restore(self, model: Segmenter, optimizer: Any, scaler: Any) -> tuple[int, list[tuple[int, float]]]:
        """Load the saved state into model/optimizer/RNG; returns (step, loss trace)."""
        self._check_run()
        path = self.directory / STATE_FILE
        tensors = load_weights(path)
        try:
            model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            load_optimizer_tensors(optimizer, tensors)
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint does not fit this model: {str(e).splitlines()[0][:300]}",
                                  path=path, fix="resume with the settings of the original run") from None
        _restore_rng_and_scaler(tensors, scaler)
        history = [(int(s), float(v)) for s, v in tensors["meta.history"].tolist()]
        return int(tensors["meta.step"]), history

    def _check_run(self) -> None:
        """Raise CheckpointError if the saved run's settings differ from this one's."""
        path = self.directory / RUN_FILE
        if not path.is_file() or not (self.directory / STATE_FILE).is_file():
            raise CheckpointError("no checkpoint to resume from", path=self.directory / STATE_FILE,
                                  fix="start the run without resume")
        try:
            saved = read_json(path)
        except TodsynthError as e:
            raise CheckpointError(e.problem, path=path, fix=e.fix) from None
        diffs = _run_differences(saved, self.run_info)
        if diffs:
            raise CheckpointError(f"the checkpoint is from a run with other settings ({'; '.join(diffs)})",
                                  path=path, fix="resume with the original settings, or start a new run")


def _run_differences(saved: Any, current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two run descriptions, ignoring resume-free settings."""
    if not isinstance(saved, dict):
        return ["saved run description is not a mapping"]
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if key == "config" and isinstance(a, dict) and isinstance(b, dict):
            a = {**SegmentTrainConfig().to_dict(), **a}  # settings added since the checkpoint: their defaults
            diffs += [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                      if k not in resume_free_names(SegmentTrainConfig) and a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


def _restore_rng_and_scaler(tensors: dict[str, torch.Tensor], scaler: Any) -> None:
    """Restore torch (and CUDA) RNG state and the fp16 loss scaler, when saved."""
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if scaler is not None:
        saved = {k[7:]: v.item() for k, v in tensors.items() if k.startswith("scaler.")}
        if saved:
            scaler.load_state_dict(saved)


def _as_train_dataset(samples: Sequence[Sample] | Dataset, cfg: SegmentTrainConfig,
                      normalisation: Normalisation) -> Dataset:
    """A torch dataset over samples scaled by `normalisation` (already-torch datasets pass through;
    torchgeo-style items are refused with the adapter to use)."""
    from torch.utils.data import ConcatDataset

    from todsynth.data.readers import BaseDataset

    known = isinstance(samples, (SegTorchDataset, BaseDataset, ConcatDataset))
    first = samples[0] if len(samples) and not known else None
    if isinstance(first, dict) and "label" not in first:
        raise DataError(f"the dataset's items hold {sorted(map(str, first))}, not 'image' and 'label'",
                        path=getattr(samples, "root", None),
                        fix="wrap a torchgeo-style dataset ('image' 0-255, 'mask'): "
                            "todsynth.data.torchgeo.TorchGeoSamples(dataset, classes)")
    if isinstance(samples, Dataset):
        return samples
    return SegTorchDataset(samples, size=cfg.size, augment=cfg.augment, seed=cfg.seed, crop=cfg.crop,
                           normalisation=normalisation)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean (optionally class-weighted) cross-entropy over non-ignored pixels; 0, not NaN, if all are ignored.

    Weighted pixels are still divided by the pixel count (not the weight sum), so a batch's loss does not
    depend on which other samples share it.
    """
    total = torch.nn.functional.cross_entropy(logits.float(), labels, weight=weight, ignore_index=ignore_index,
                                              reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


def class_pixel_counts(data: Dataset, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Labelled pixels per class over a whole training dataset (ignored pixels excluded); a dataset that
    appears several times in a mix (repeated real data) is read once and counted as often as it appears."""
    from torch.utils.data import ConcatDataset

    if isinstance(data, ConcatDataset):
        counts, seen = torch.zeros(num_classes, dtype=torch.float64), {}
        for part in data.datasets:
            if id(part) not in seen:
                seen[id(part)] = class_pixel_counts(part, num_classes, ignore_index)
            counts += seen[id(part)]
        return counts
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for i in range(len(data)):
        label = data[i]["label"]
        label = label[label != ignore_index]
        counts += torch.bincount(label.clamp(0, num_classes - 1), minlength=num_classes)[:num_classes].double()
    return counts


def class_weights_from_counts(counts: torch.Tensor, how: str) -> torch.Tensor | None:
    """Per-class loss weights ∝ frequency^-1 (or ^-1/2), capped at 10× the smallest, mean 1 per pixel.

    Absent classes get the cap. `how == "none"` gives None (plain cross-entropy).
    """
    if how == "none" or counts.sum() <= 0:
        return None
    freq = counts / counts.sum().clamp(min=1)
    power = 1.0 if how == "inverse" else 0.5
    w = torch.where(freq > 0, freq.clamp(min=1e-12) ** -power, torch.tensor(math.inf, dtype=freq.dtype))
    w = torch.minimum(w, w.min() * MAX_CLASS_WEIGHT)
    return (w / (freq * w).sum().clamp(min=1e-12)).float()


def _train_step(model: Any, batch: dict[str, torch.Tensor], optimizer: Any, ignore_index: int,
                accelerator: Any, weight: torch.Tensor | None = None) -> float:
    """One optimizer step on a batch; returns the loss value."""
    images = batch["image"].to(accelerator.device, non_blocking=True)
    labels = batch["label"].to(accelerator.device, non_blocking=True)
    with accelerator.autocast():
        logits = model(images)
    loss = cross_entropy(logits, labels, ignore_index, weight)
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()
    return float(loss.detach())


def _progress() -> Any:
    """A rich progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                    TimeRemainingColumn(), console=Console(stderr=True))


def _epoch_loader(data: Dataset, cfg: SegmentTrainConfig, step: int, pin_memory: bool) -> DataLoader:
    """The rest of the epoch containing `step`: its seeded batches from that step on, augmented for that epoch.

    The loader gets its own generator, so creating it (e.g. on resume) leaves the global torch RNG alone.
    """
    spe = steps_per_epoch(len(data), cfg.batch_size)
    epoch = step // spe
    set_epoch(data, epoch)
    batches = epoch_batches(len(data), cfg.batch_size, cfg.seed, epoch)[step % spe:]
    return DataLoader(data, batch_sampler=batches, num_workers=cfg.num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(cfg.seed + epoch))


@dataclass
class _Loop:
    """Mutable state of the training loop."""

    step: int
    total: int
    history: list[tuple[int, float]]
    loss: float = math.nan


def _run_loop(model: Any, optimizer: Any, accelerator: Any, data: Dataset, cfg: SegmentTrainConfig,
              loop: _Loop, ignore_index: int, checkpointer: Checkpointer | None,
              on_step: StepCallback | None, weight: torch.Tensor | None = None) -> None:
    """Train from `loop.step` to `loop.total`, checkpointing and logging along the way."""
    model.train()
    with _progress() as bar:
        task = bar.add_task("", total=loop.total, completed=loop.step)
        while loop.step < loop.total:
            for batch in _epoch_loader(data, cfg, loop.step, accelerator.device.type == "cuda"):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(loop.step, loop.total, cfg)
                loop.loss = _train_step(model, batch, optimizer, ignore_index, accelerator, weight)
                loop.step += 1
                _after_step(loop, cfg, model, optimizer, accelerator, checkpointer, on_step)
                bar.update(task, completed=loop.step, description=f"loss {loop.loss:.4f}")
                if loop.history and loop.history[-1][0] == loop.step:
                    bar.console.print(f"step {loop.step}/{loop.total}  loss {loop.loss:.4f}  "
                                      f"lr {optimizer.param_groups[0]['lr']:.2e}", highlight=False)
                if loop.step >= loop.total:
                    break


def _after_step(loop: _Loop, cfg: SegmentTrainConfig, model: Any, optimizer: Any, accelerator: Any,
                checkpointer: Checkpointer | None, on_step: StepCallback | None) -> None:
    """Divergence check, loss trace, periodic checkpoint and the user callback."""
    if not math.isfinite(loop.loss):
        raise TodsynthError(f"training diverged: loss is {loop.loss} at step {loop.step}",
                            fix="lower the learning rate or check the labels")
    if loop.step % cfg.log_every == 0 or loop.step == loop.total:
        loop.history.append((loop.step, loop.loss))
    if checkpointer is not None and (loop.step % cfg.checkpoint_every == 0 or loop.step == loop.total):
        checkpointer.save(loop.step, accelerator.unwrap_model(model), optimizer, accelerator.scaler, loop.history)
    if on_step is not None:
        on_step(loop.step, loop.loss)


def _segmenter_config(cfg: SegmentTrainConfig, classes: ClassSpec, normalisation: Normalisation) -> SegmenterConfig:
    """The model architecture implied by the training settings, the label space and the input bands."""
    return SegmenterConfig(arch=cfg.arch, encoder=cfg.encoder, num_classes=classes.num_classes,
                           in_channels=normalisation.channels, class_names=tuple(classes.names),
                           ignore_index=classes.ignore_index, encoder_weights_file=cfg.encoder_weights_file,
                           normalisation=normalisation.to_dict(), size=cfg.size)


def training_normalisation(samples: Sequence[Sample] | Dataset) -> Normalisation:
    """The input normalisation a segmenter trains with: data.yaml's settings, a stretch computed over `samples`
    (torch datasets carry no settings: 8-bit RGB / 255)."""
    if isinstance(samples, Dataset) or len(samples) == 0:
        return Normalisation.rgb8()
    return fit_normalisation(samples)


def _training_data(samples: Sequence[Sample] | Dataset, synthetic: Sequence[Sample] | Dataset | None,
                   cfg: SegmentTrainConfig, normalisation: Normalisation) -> Dataset:
    """The real (+ synthetic) training mix as one torch dataset, all scaled by the real data's normalisation."""
    real = _as_train_dataset(samples, cfg, normalisation)
    if len(real) == 0:
        raise DataError("no training samples")
    if synthetic is not None and not isinstance(synthetic, Dataset):
        check_normalisation(synthetic, normalisation, "being trained")
    syn = None if synthetic is None else _as_train_dataset(synthetic, cfg, normalisation)
    data = mix_real_synthetic(real, syn, cfg.synthetic_ratio, cfg.repeat_real, cfg.seed)
    if len(data) < MIN_TRAIN_SAMPLES:  # every batch would hold one sample: batch norm cannot train on that
        raise DataError(f"{len(data)} training sample; training needs at least {MIN_TRAIN_SAMPLES} "
                        "(batch-norm layers cannot train on batches of one)", path=getattr(samples, "root", None),
                        fix=f"add samples, at least {MIN_TRAIN_SAMPLES}")
    return data


def _start_or_resume(checkpointer: Checkpointer | None, resume: bool, model: Segmenter, optimizer: Any,
                     scaler: Any, loop: _Loop) -> None:
    """Record a new run, or load the checkpointed state into model, optimizer and loop."""
    if checkpointer is None:
        return
    if resume:
        loop.step, loop.history = checkpointer.restore(model, optimizer, scaler)
    else:
        checkpointer.start()


def train_on_samples(samples: Sequence[Sample] | Dataset, classes: ClassSpec, cfg: SegmentTrainConfig,
                     val_samples: Sequence[Sample] | Dataset | None = None,
                     synthetic: Sequence[Sample] | Dataset | None = None,
                     checkpoint_dir: str | Path | None = None, resume: bool = False,
                     on_step: StepCallback | None = None,
                     normalisation: Normalisation | None = None) -> TrainOutcome:
    """Train a segmenter on in-memory samples (plus an optional synthetic mix); checkpoints only if asked.

    The input normalisation (default: `training_normalisation(samples)`) is stored in the model's config."""
    from accelerate.utils import set_seed

    cfg.validate()
    if resume and checkpoint_dir is None:
        raise ConfigError("resume needs a checkpoint folder")
    start = time.perf_counter()
    set_seed(cfg.seed)
    if len(samples) == 0:
        raise DataError("no training samples")
    normalisation = normalisation or training_normalisation(samples)
    data = _training_data(samples, synthetic, cfg, normalisation)
    accelerator = _accelerator(cfg)
    model = Segmenter(_segmenter_config(cfg, classes, normalisation))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    loop = _Loop(step=0, total=total_steps(cfg, len(data)), history=[])
    checkpointer = None if checkpoint_dir is None else Checkpointer(Path(checkpoint_dir), {
        "config": cfg.to_dict(), "train_size": len(data), "total_steps": loop.total,
        "classes": list(classes.names)})
    _start_or_resume(checkpointer, resume, accelerator.unwrap_model(model), optimizer, accelerator.scaler, loop)
    weight = class_weights_from_counts(class_pixel_counts(data, classes.num_classes, classes.ignore_index),
                                       cfg.class_weights) if cfg.class_weights != "none" else None
    if weight is not None:
        weight = weight.to(accelerator.device)
    _run_loop(model, optimizer, accelerator, data, cfg, loop, classes.ignore_index, checkpointer, on_step, weight)
    net = accelerator.unwrap_model(model).float().cpu().eval()
    val = None
    if val_samples is not None:
        val = evaluate_segmenter(net, val_samples, cfg.eval_batch_size, cfg.size, device=accelerator.device)
    final_loss = loop.history[-1][1] if loop.history else math.nan
    return TrainOutcome(net, val, loop.step, final_loss, len(data), loop.history, time.perf_counter() - start,
                        None if weight is None else weight.cpu().tolist())


def _same_classes(a: ClassSpec, b: ClassSpec, path: str) -> None:
    """Raise DataError unless two datasets share class names and ignore index."""
    if tuple(a.names) != tuple(b.names) or a.ignore_index != b.ignore_index:
        raise DataError(f"classes {list(b.names)} (ignore {b.ignore_index}) differ from the training data's "
                        f"{list(a.names)} (ignore {a.ignore_index})", path=path,
                        fix="use datasets with the same classes.yaml")


def train_segmenter(cfg: SegmentTrainConfig, resume: bool = False, on_step: StepCallback | None = None) -> dict:
    """Validate the datasets, train, save `out/model/` and `out/results.json`; returns the results.

    The run holds `out`'s run lock throughout; an `out` holding an earlier run is refused unless `resume`
    (continue it) or `cfg.overwrite` (replace it).
    """
    cfg.validate()
    if cfg.data is None:
        raise ConfigError("no training data given", fix="set 'data' (--data PATH)")
    if cfg.synthetic_ratio is not None and cfg.synthetic is None:
        raise ConfigError("'synthetic_ratio' is set but no 'synthetic' dataset is given")
    real = open_checked(cfg.data, cfg.split, cfg.split_file)
    synthetic = val = None
    if cfg.synthetic is not None:
        synthetic = open_checked(cfg.synthetic, cfg.synthetic_split)
        _same_classes(real.classes, synthetic.classes, cfg.synthetic)
    if cfg.val is not None:
        val = open_checked(cfg.val, cfg.val_split)
        _same_classes(real.classes, val.classes, cfg.val)
    for other in (synthetic, val):  # before training: bands and scaling as the training data's
        if other is not None and not real.label_only:
            check_normalisation(other, dataset_settings(real), f"trained on {cfg.data}")
    check_device(cfg.device)
    out = Path(cfg.out)
    with run_lock(out):
        check_run_folder(out, resume, cfg.overwrite, RUN_OUTPUTS)
        outcome = train_on_samples(real, real.classes, cfg, val, synthetic, out / "checkpoint", resume, on_step)
        outcome.model.save_pretrained(out / "model")
        results = _results(cfg, outcome, real, synthetic)
        write_json(out / "results.json", results)
    return results


def _results(cfg: SegmentTrainConfig, outcome: TrainOutcome, real: Any, synthetic: Any) -> dict:
    """The content of results.json."""
    names = outcome.model.config.class_names
    return {
        "config": cfg.to_dict(),
        "model": str(Path(cfg.out) / "model"),
        "train_samples": len(real),
        "synthetic_samples_used": outcome.train_size - cfg.repeat_real * len(real),
        "synthetic_samples_available": 0 if synthetic is None else len(synthetic),
        "steps": outcome.steps,
        "final_loss": outcome.final_loss,
        "loss_history": [list(h) for h in outcome.history],
        "class_weights": outcome.class_weights,
        "val": None if outcome.val is None else outcome.val.to_dict(names),
        "wall_time_s": round(outcome.wall_time_s, 3),
    }


def _eval_dataset(data: str | Path | Sequence[Sample] | Dataset, split: str,
                  model: Segmenter) -> Dataset:
    """A torch dataset at native resolution for evaluation, scaled by the model's stored normalisation (data whose
    data.yaml states another is refused); paths are opened and validated."""
    if isinstance(data, (str, Path)):
        data = open_checked(str(data), split)
    classes = getattr(data, "classes", None)
    names = model.config.class_names
    if classes is not None and names is not None and tuple(classes.names) != tuple(names):
        from todsynth.data.classes import class_difference

        raise DataError(f"dataset classes {class_difference(list(classes.names), list(names))} differ from the "
                        f"model's {class_difference(list(names), list(classes.names))}",
                        path=getattr(data, "root", None), fix="evaluate on data with the model's classes")
    if isinstance(data, Dataset):
        return data
    check_normalisation(data, model.normalisation, getattr(model, "source", None))
    return SegTorchDataset(data, normalisation=model.normalisation)


def _collate_by_size(items: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Group a batch into stacks of equally sized items (datasets may mix tile sizes)."""
    groups: dict[tuple[int, ...], list[dict[str, torch.Tensor]]] = {}
    for item in items:
        groups.setdefault(tuple(item["image"].shape), []).append(item)
    return [{k: torch.stack([g[k] for g in group]) for k in ("image", "label")} for group in groups.values()]


@torch.no_grad()
def _predict_at(model: Segmenter, images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Labels at the images' resolution, predicted at `size` x `size` when given."""
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    if size is None or (h, w) == (size, size):
        return model(images).argmax(dim=1)
    small = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    logits = F.interpolate(model(small), size=(h, w), mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


def evaluate_segmenter(model: Segmenter, dataset_or_path: str | Path | Sequence[Sample] | Dataset,
                       batch_size: int = 8, size: int | None = None, split: str = "Val",
                       device: torch.device | str | None = None, native: bool = False) -> SegMetrics:
    """Metrics over a whole dataset (one confusion matrix); predicts at `size` (default: the working size the
    model records, so a model is scored as it was trained) and scores at each tile's own size; `native`
    predicts at the tiles' own size instead."""
    require(not (native and size is not None), "give a prediction size or native, not both",
            fix="drop 'size' to predict at the tiles' own size")
    if not native and size is None:
        size = model.config.size
    if device is not None:
        check_device(device)
    require(batch_size >= 1, f"'batch_size' must be >= 1, got {batch_size!r}", fix="give a batch size >= 1")
    require(size is None or size >= 1, f"'size' must be >= 1, got {size!r}",
            fix="give a tile size >= 1, or leave it out to predict at the native size")
    data = _eval_dataset(dataset_or_path, split, model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training, original = model.training, next(model.parameters()).device
    model.to(device).eval()
    meter = ConfusionAccumulator(model.config.num_classes, model.config.ignore_index, device)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=_collate_by_size)
    try:
        for groups in loader:
            for group in groups:
                labels = group["label"].to(device)
                meter.update(_predict_at(model, group["image"].to(device), size), labels)
    finally:
        model.to(original).train(was_training)
    return meter.compute()
