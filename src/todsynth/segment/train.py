"""Segmenter training (stage c) and evaluation: seeded, resumable, one dataset-level confusion matrix."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from todsynth.checkpoint import load_optimizer_state, optimizer_state
from todsynth.config import build_config, require, require_at_least, resume_free_names, setting
from todsynth.data.bands import Normalisation, check_normalisation, dataset_settings, fit_normalisation
from todsynth.data.check import open_checked
from todsynth.data.classes import ClassSpec, class_difference
from todsynth.data.crops import CropMode
from todsynth.data.readers import BaseDataset, ignores_split
from todsynth.data.sample import Sample
from todsynth.data.torchdata import SegTorchDataset, mix_real_synthetic, set_epoch
from todsynth.errors import CheckpointError, ConfigError, DataError
from todsynth.io import write_json
from todsynth.runs import (
    METRICS_FILE,
    RUN_OUTPUTS,
    STATE_TENSORS,
    Loop,
    Metrics,
    Precision,
    Progress,
    RunControl,
    RunFolder,
    StepCallback,
    fit,
    lr_at,
    make_accelerator,
    open_run,
    start_trackers,
)
from todsynth.segment.metrics import ConfusionAccumulator, SegMetrics
from todsynth.segment.model import Segmenter, SegmenterConfig, check_encoder

MIN_TRAIN_SAMPLES = 2  # batches are cut full (drop_last) or hold all samples when fewer
ClassWeighting = Literal["none", "sqrt_inverse", "inverse"]
Arch = Literal["unet", "deeplabv3plus", "segformer", "fpn"]  # segment.model.ARCHS
MAX_CLASS_WEIGHT = 10.0


@dataclass
class SegmentTrainConfig(RunControl):
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
    class_weights: ClassWeighting = setting("none", help="loss weights per class from the training mix's pixel counts")
    seed: int = setting(0, help="seed of the weights and batches")
    num_workers: int = setting(0, resume_free=True, help="data loader workers")
    out: str = setting("runs/segment", resume_free=True, help="output folder (model/, results.json, checkpoint/)")
    device: Literal["auto", "cpu", "cuda"] = setting("auto", resume_free=True, help="auto: the GPU when there is one")
    mixed_precision: Literal["no", "fp16", "bf16"] = setting("no", help="autocast precision")
    log_every: int = setting(10, resume_free=True, help="record the loss every N steps")
    checkpoint_every: int = setting(200, resume_free=True, help="save a resumable checkpoint every N steps")
    val_every: int = setting(0, resume_free=True, help="validate on val every N steps too (0: only at the end)")

    def validate(self) -> None:
        """Reject negative counts and non-finite numbers (choices are checked by their types when loaded)."""
        check_encoder(self.encoder)
        for name in ("lr", "poly_power"):
            value = getattr(self, name)
            require(math.isfinite(value) and value > 0, f"'{name}' must be a finite number > 0, got {value!r}")
        require_at_least(self, 0, "weight_decay", "synthetic_ratio", "warmup_steps", "num_workers", "seed")
        require_at_least(self, 1, "epochs", "batch_size", "eval_batch_size", "repeat_real", "log_every")
        require_at_least(self, 1, "checkpoint_every", "steps", "size", "stop_after")


@dataclass
class TrainOutcome:
    """What a training run produced: the model (on CPU), validation metrics and the loss trace."""

    model: Segmenter
    val: SegMetrics | None
    steps: int  # done (fewer than total_steps after stop_after)
    total_steps: int
    final_loss: float
    train_size: int
    history: list[tuple[int, float]] = field(default_factory=list)
    wall_time_s: float = 0.0
    class_weights: list[float] | None = None


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped), or 1 when the data is smaller than a batch."""
    return max(1, n // batch_size)


def check_device_choice(device: str) -> None:
    """Refuse a --device other than auto, cpu or cuda with the message `segment train` gives (its config's check)."""
    try:
        build_config(SegmentTrainConfig, {"device": device}, check=False)
    except ConfigError as e:
        raise ConfigError(e.problem, path="config", fix="give --device auto, cpu or cuda") from None


def check_eval_split(data: str | Path, split: str, default: str = "Val") -> None:
    """Refuse a split other than the default for a dataset that has no splits (only a LoveDA root has them):
    a setting that does not apply is refused, not ignored."""
    if split != default and ignores_split(data):
        raise ConfigError(
            f"--split {split} is given, but {data} has no splits (only a LoveDA root has Train/Val/Test)",
            path="config",
            fix="leave out --split to score the whole dataset",
        )


def check_device(device: str | torch.device) -> None:
    """Refuse a CUDA device when no GPU is visible, before anything is loaded onto it or written."""
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} requested but there is no CUDA device", fix="use --device cpu")


def _as_train_dataset(
    samples: Sequence[Sample] | Dataset, cfg: SegmentTrainConfig, normalisation: Normalisation
) -> Dataset:
    """A torch dataset over samples scaled by `normalisation` (already-torch datasets pass through;
    torchgeo-style items are refused with the adapter to use)."""
    known = isinstance(samples, (SegTorchDataset, BaseDataset, ConcatDataset))
    first = samples[0] if len(samples) and not known else None
    if isinstance(first, dict) and "label" not in first:
        raise DataError(
            f"the dataset's items hold {sorted(map(str, first))}, not 'image' and 'label'",
            path=getattr(samples, "root", None),
            fix="wrap a torchgeo-style dataset ('image' 0-255, 'mask'): "
            "todsynth.data.torchgeo.TorchGeoSamples(dataset, classes)",
        )
    if isinstance(samples, Dataset):
        return samples
    return SegTorchDataset(
        samples, size=cfg.size, augment=cfg.augment, seed=cfg.seed, crop=cfg.crop, normalisation=normalisation
    )


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean (optionally class-weighted) cross-entropy over non-ignored pixels; 0, not NaN, if all are ignored.
    Weighted pixels are still divided by the pixel count (not the weight sum), so a batch's loss does not depend on
    which other samples share it."""
    total = F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


def class_pixel_counts(data: Dataset, num_classes: int, ignore_index: int) -> torch.Tensor:
    """Labelled pixels per class over a whole training dataset (ignored pixels excluded); a dataset that
    appears several times in a mix (repeated real data) is read once and counted as often as it appears."""
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
    """Per-class loss weights ∝ frequency^-1 (or ^-1/2), capped at 10× the smallest, mean 1 per pixel; absent
    classes get the cap; `how == "none"` gives None (plain cross-entropy)."""
    if how == "none" or counts.sum() <= 0:
        return None
    freq = counts / counts.sum().clamp(min=1)
    power = 1.0 if how == "inverse" else 0.5
    w = torch.where(freq > 0, freq.clamp(min=1e-12) ** -power, torch.tensor(math.inf, dtype=freq.dtype))
    w = torch.minimum(w, w.min() * MAX_CLASS_WEIGHT)
    return (w / (freq * w).sum().clamp(min=1e-12)).float()


@dataclass
class _SegmenterTask:
    """The segmenter's part of the fit loop: one cross-entropy step on the seeded batches, validation, state."""

    model: Segmenter
    optimizer: Any
    precision: Precision
    data: Dataset
    cfg: SegmentTrainConfig
    start: int
    ignore_index: int
    weight: torch.Tensor | None
    val_samples: Any
    val: SegMetrics | None = None  # of the last validation

    def __post_init__(self) -> None:
        self.batches = self._batches(self.data, self.start)

    def _batches(self, data: Dataset, step: int) -> Any:
        """Batches from `step` on, epoch by epoch: a (seed, epoch)-seeded permutation cut into full batches,
        augmented for that epoch. Each epoch's loader is made once the previous one is used up, with its own
        generator, so making one (e.g. on resume) leaves the global torch RNG alone."""
        cfg, n = self.cfg, len(data)
        spe = steps_per_epoch(n, cfg.batch_size)
        while True:
            epoch = step // spe
            set_epoch(data, epoch)
            order = np.random.default_rng([cfg.seed, epoch]).permutation(n).tolist()
            batches = [order[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(spe)][step % spe :]
            loader = DataLoader(
                data,
                batch_sampler=batches,
                num_workers=cfg.num_workers,
                pin_memory=self.precision.device.type == "cuda",
                generator=torch.Generator().manual_seed(cfg.seed + epoch),
            )
            for batch in loader:
                yield batch
                step += 1

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step on the next batch; returns its loss."""
        batch, device = next(self.batches), self.precision.device
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        with self.precision.autocast():
            logits = self.model(images)
        loss = cross_entropy(logits, labels, self.ignore_index, self.weight)
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.precision.step(self.optimizer)
        return loss.detach()

    def validate(self, step: int) -> dict[str, float]:
        """mIoU, overall and mean accuracy on the validation data (the model back in training mode after)."""
        self.val = evaluate_segmenter(
            self.model, self.val_samples, self.cfg.eval_batch_size, self.cfg.size, device=self.precision.device
        )
        return {"mIoU": self.val.miou, "OA": self.val.oa, "mAcc": self.val.macc}

    def after_step(self, step: int) -> None:
        pass

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Model weights and AdamW moments (and its param groups)."""
        optim, groups = optimizer_state(self.model, self.optimizer)
        return {**{f"model.{k}": v for k, v in self.model.state_dict().items()}, **optim}, {"optimizer_groups": groups}


def _training_data(
    samples: Sequence[Sample] | Dataset,
    synthetic: Sequence[Sample] | Dataset | None,
    cfg: SegmentTrainConfig,
    normalisation: Normalisation,
) -> Dataset:
    """The real (+ synthetic) training mix as one torch dataset, all scaled by the real data's normalisation."""
    real = _as_train_dataset(samples, cfg, normalisation)
    if synthetic is not None and not isinstance(synthetic, Dataset):
        check_normalisation(synthetic, normalisation, "being trained")
    syn = None if synthetic is None else _as_train_dataset(synthetic, cfg, normalisation)
    data = mix_real_synthetic(real, syn, cfg.synthetic_ratio, cfg.repeat_real, cfg.seed)
    if len(data) < MIN_TRAIN_SAMPLES:  # every batch would hold one sample: batch norm cannot train on that
        raise DataError(
            f"{len(data)} training sample; training needs at least {MIN_TRAIN_SAMPLES} "
            "(batch-norm layers cannot train on batches of one)",
            path=getattr(samples, "root", None),
            fix=f"add samples, at least {MIN_TRAIN_SAMPLES}",
        )
    return data


def train_on_samples(
    samples: Sequence[Sample] | Dataset,
    classes: ClassSpec,
    cfg: SegmentTrainConfig,
    val_samples: Sequence[Sample] | Dataset | None = None,
    synthetic: Sequence[Sample] | Dataset | None = None,
    run: RunFolder | None = None,
    resume: bool = False,
    on_step: StepCallback | None = None,
    accelerator: Any = None,
) -> TrainOutcome:
    """Train a segmenter on in-memory samples (plus an optional synthetic mix); checkpoints and metrics.jsonl
    only in a `run` folder, whose state `resume` continues. `accelerator`: the entry point's (default: one made here).

    The input normalisation (data.yaml's settings, a stretch computed over `samples`; torch datasets carry no
    settings: 8-bit RGB / 255) is stored in the model's config."""
    from accelerate.utils import set_seed

    cfg.validate()
    if resume and run is None:
        raise ConfigError("resume needs a run folder")
    start = time.perf_counter()
    set_seed(cfg.seed)
    if len(samples) == 0:
        raise DataError("no training samples")
    normalisation = Normalisation.rgb8() if isinstance(samples, Dataset) else fit_normalisation(samples)
    data = _training_data(samples, synthetic, cfg, normalisation)
    check_device(cfg.device)
    accelerator = accelerator or make_accelerator(cfg.log_with, None if run is None else run.root / "logs")
    device = torch.device("cpu") if cfg.device == "cpu" else accelerator.device
    architecture = SegmenterConfig(  # from the training settings, the label space and the input bands
        arch=cfg.arch,
        encoder=cfg.encoder,
        num_classes=classes.num_classes,
        in_channels=normalisation.channels,
        class_names=tuple(classes.names),
        ignore_index=classes.ignore_index,
        encoder_weights_file=cfg.encoder_weights_file,
        normalisation=normalisation.to_dict(),
        size=cfg.size,
    )
    model = Segmenter(architecture).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    precision = Precision(cfg.mixed_precision, device)
    total = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch(len(data), cfg.batch_size)
    metrics = Metrics(None if run is None else run.root / METRICS_FILE, accelerator)
    step = 0
    if run is not None:
        run.settings = {
            "config": dataclasses.asdict(cfg),
            "train_size": len(data),
            "total_steps": total,
            "classes": list(classes.names),
        }
        run.free = {f"config.{name}" for name in resume_free_names(SegmentTrainConfig)}
        if resume:  # model, optimizer, RNG and loss scaler as saved
            step, tensors, info = run.load_state(metrics, precision.scaler)
            try:
                model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
                load_optimizer_state(model, optimizer, tensors, info["optimizer_groups"])
            except (RuntimeError, ValueError, KeyError) as e:
                raise CheckpointError(
                    f"checkpoint does not fit this model: {str(e).splitlines()[0][:300]}",
                    path=run.checkpoint / STATE_TENSORS,
                    fix="resume with the settings of the original run",
                ) from None
        else:
            run.start(dataclasses.asdict(cfg), metrics)
    start_trackers(accelerator, "segmenter", dataclasses.asdict(cfg))
    weight = None
    if cfg.class_weights != "none":  # counting reads every training label: only when weighting
        counts = class_pixel_counts(data, classes.num_classes, classes.ignore_index)
        weight = class_weights_from_counts(counts, cfg.class_weights)
    if weight is not None:
        weight = weight.to(device)
    task = _SegmenterTask(model, optimizer, precision, data, cfg, step, classes.ignore_index, weight, val_samples)
    loop = Loop(
        step,
        total if cfg.stop_after is None else min(total, cfg.stop_after),
        total,
        lambda s: lr_at(s, total, cfg.lr, cfg.warmup_steps, cfg.schedule, cfg.poly_power),
        cfg.batch_size,
        cfg.log_every,
        cfg.val_every if val_samples is not None else 0,
        val_samples is not None,
        cfg.checkpoint_every,
    )
    model.train()
    bar = Progress("segmenter", total, step, accelerator.is_main_process)
    last = fit(task, loop, metrics, accelerator, run, bar, on_step, precision.scaler)
    accelerator.end_training()
    history = metrics.history()
    return TrainOutcome(
        model.float().cpu().eval(),
        task.val,
        loop.end,
        total,
        last if last is not None else history[-1][1] if history else math.nan,
        len(data),
        history,
        time.perf_counter() - start,
        None if weight is None else weight.cpu().tolist(),
    )


def _same_classes(a: ClassSpec, b: ClassSpec, path: str) -> None:
    """Raise DataError unless two datasets share class names and ignore index."""
    if tuple(a.names) != tuple(b.names) or a.ignore_index != b.ignore_index:
        raise DataError(
            f"classes {list(b.names)} (ignore {b.ignore_index}) differ from the training data's "
            f"{list(a.names)} (ignore {a.ignore_index})",
            path=path,
            fix="use datasets with the same classes.yaml",
        )


@dataclass
class SegmenterResult:
    """What `train_segmenter` returns and writes to out/results.json: the model folder, its data and training."""

    model: str
    config: dict[str, Any]
    train_samples: int
    synthetic_samples_used: int
    synthetic_samples_available: int
    steps: int
    total_steps: int
    final_loss: float
    class_weights: list[float] | None
    val: dict[str, Any] | None
    wall_time_s: float


def train_segmenter(
    cfg: SegmentTrainConfig, on_step: StepCallback | None = None, accelerator: Any = None
) -> SegmenterResult:
    """Validate the datasets, train, save `out/model/` and `out/results.json`; returns the result. The run holds
    `out`'s run lock throughout; an `out` holding an earlier run is refused unless `cfg.resume` (continue it) or
    `cfg.overwrite` (replace it)."""
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
    with open_run(out, cfg.resume, cfg.overwrite, RUN_OUTPUTS) as (run, resuming):
        outcome = train_on_samples(
            real, real.classes, cfg, val, synthetic, run, resuming, on_step, accelerator=accelerator
        )
        result = SegmenterResult(
            str(out / "model"),
            dataclasses.asdict(cfg),
            len(real),
            outcome.train_size - cfg.repeat_real * len(real),
            0 if synthetic is None else len(synthetic),
            outcome.steps,
            outcome.total_steps,
            outcome.final_loss,
            outcome.class_weights,
            None if outcome.val is None else outcome.val.to_dict(outcome.model.config.class_names),
            round(outcome.wall_time_s, 3),
        )
        if outcome.steps == outcome.total_steps:  # stopped (stop_after): the state alone, as a kill leaves it
            outcome.model.save_pretrained(out / "model")
            write_json(out / "results.json", dataclasses.asdict(result))
    return result


def _eval_dataset(data: str | Path | Sequence[Sample] | Dataset, split: str, model: Segmenter) -> Dataset:
    """A torch dataset at native resolution for evaluation, scaled by the model's stored normalisation (data whose
    data.yaml states another is refused); paths are opened and validated."""
    if isinstance(data, (str, Path)):
        data = open_checked(str(data), split)
    classes = getattr(data, "classes", None)
    names = model.config.class_names
    if classes is not None and names is not None and tuple(classes.names) != tuple(names):
        raise DataError(
            f"dataset classes {class_difference(list(classes.names), list(names))} differ from the "
            f"model's {class_difference(list(names), list(classes.names))}",
            path=getattr(data, "root", None),
            fix="evaluate on data with the model's classes",
        )
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
    h, w = images.shape[-2:]
    if size is None or (h, w) == (size, size):
        return model(images).argmax(dim=1)
    small = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    logits = F.interpolate(model(small), size=(h, w), mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


def evaluate_segmenter(
    model: Segmenter,
    dataset_or_path: str | Path | Sequence[Sample] | Dataset,
    batch_size: int = 8,
    size: int | None = None,
    split: str = "Val",
    device: torch.device | str | None = None,
    native: bool = False,
) -> SegMetrics:
    """Metrics over a whole dataset (one confusion matrix); predicts at `size` (default: the working size the
    model records, so a model is scored as it was trained) and scores at each tile's own size; `native`
    predicts at the tiles' own size instead."""
    require(
        not (native and size is not None),
        "give a prediction size or native, not both",
        fix="drop 'size' to predict at the tiles' own size",
    )
    if not native and size is None:
        size = model.config.size
    if device is not None:
        check_device(device)
    require(batch_size >= 1, f"'batch_size' must be >= 1, got {batch_size!r}", fix="give a batch size >= 1")
    require(
        size is None or size >= 1,
        f"'size' must be >= 1, got {size!r}",
        fix="give a tile size >= 1, or leave it out to predict at the native size",
    )
    data = _eval_dataset(dataset_or_path, split, model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training, original = model.training, next(model.parameters()).device
    model.to(device).eval()
    meter = ConfusionAccumulator(model.config.num_classes, model.config.ignore_index, device)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=_collate_by_size)
    try:
        for groups in loader:
            for group in groups:
                meter.update(_predict_at(model, group["image"].to(device), size), group["label"].to(device))
    finally:
        model.to(original).train(was_training)
    return meter.compute()
