"""Flow-matching training of the mask-controlled MM-DiT on accelerate (1 process to many, CPU or GPU).

Determinism: the batch of step s and each sample's (t, ε, text dropout) derive from (seed, s, index)
alone, so a resumed run equals an uninterrupted one, and 2 processes equal 1 with the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from todsynth import runs
from todsynth.checkpoint import load_optimizer_state, optimizer_state
from todsynth.config import require, require_at_least, resume_free_names, setting
from todsynth.data.crops import CropMode
from todsynth.generator import distributed
from todsynth.generator.mmdit import MMDiTArch
from todsynth.generator.presets import MemoryPreset, Optimizer, apply_preset, cast_frozen, make_optimizer


@dataclass
class GeneratorTrainConfig(runs.RunControl):
    """Settings of `todsynth generator train` (and `generator pretrain`)."""

    data: str = setting(
        "",
        help="DATA: the training dataset (LoveDA root, folder with images/ and masks/, .jsonl "
        "index; pretraining: images or toy:N)",
    )
    out: str = setting("runs/generator", resume_free=True, help="output folder (model/, checkpoint/, results.json)")
    split: str = setting("Train", help="split of a LoveDA root")
    split_file: str | None = setting(None, help="JSON split file of the ids to train on (`todsynth data split`)")
    val_data: str | None = setting(None, help="held-out masks for validation (default: the last masks of data)")
    size: int = setting(32, help="training image side in pixels")
    crop: CropMode = setting(
        "random",
        help="how samples reach size x size: random crops (drawn per seed, step, "
        "sample; keep the ground sampling distance), center, or resize (short "
        "side to size, never distorted)",
    )
    num_workers: int = setting(
        0, resume_free=True, help="DataLoader processes reading samples from disk (0: in the training process)"
    )
    model: MMDiTArch = setting(
        default_factory=MMDiTArch,
        help="architecture: these settings, or a size preset "
        f"name ({', '.join(MMDiTArch.PRESETS)}) as the value of model",
    )
    autoencoder: Literal["pixel", "vae"] = setting(
        "pixel", help="image space: pixels, or a diffusers VAE (autoencoder_path)"
    )
    autoencoder_path: str | None = setting(None, help="local diffusers VAE or pipeline folder (autoencoder vae)")
    text_encoder: Literal["minilm", "sd3"] = setting(
        "minilm", help="prompt encoder: MiniLM, or SD3's encoders (text_encoder_path)"
    )
    text_encoder_path: str | None = setting(None, help="local diffusers SD3 pipeline folder (text_encoder sd3)")
    text_max_length: int = setting(16, help="prompt tokens kept (minilm)")
    sd3_path: str | None = setting(None, help="initialise text/image streams from a diffusers SD3 transformer")
    init: str | None = setting(
        None, help="initialise text/image streams from a pretrained base (the out folder of `generator pretrain`)"
    )
    train_text: bool = setting(False, help="train the text stream")
    train_image: bool = setting(True, help="train the image stream")
    train_mask: bool = setting(True, help="train the mask stream")
    lora_rank: int = setting(0, help="> 0: LoRA (peft) on the trained streams instead of full fine-tuning")
    preset: MemoryPreset | None = setting(
        None, help="memory preset (generator/presets.py): sets the settings below; explicit values win"
    )
    optimizer: Optimizer = setting(
        "adamw", help="AdamW: torch's, its fused kernel, or bitsandbytes' 8-bit / paged 8-bit"
    )
    frozen_dtype: Literal["fp32", "bf16"] = setting(
        "fp32", help="bf16: parameters that do not train are stored in bf16 (needs mixed_precision bf16)"
    )
    steps: int = setting(400, help="optimizer steps")
    batch_size: int = setting(8, help="global batch size (all processes)")
    grad_accum: int = setting(1, help="micro-batches per optimizer step")
    lr: float = setting(3e-4, help="peak AdamW learning rate")
    weight_decay: float = setting(0.01, help="AdamW weight decay")
    warmup_steps: int = setting(20, help="linear warm-up steps before the cosine decay")
    grad_clip: float = setting(1.0, help="gradient norm clip (0: none)")
    timestep_sampling: Literal["uniform", "logit_normal"] = setting("logit_normal", help="training t distribution")
    timestep_mean: float = setting(0.0, help="logit-normal mean (SD3's mode shift; > 0 trains more near noise)")
    timestep_std: float = setting(1.0, help="logit-normal standard deviation")
    timestep_tail: float = setting(0.0, help="share of t drawn uniform in [0.8, 1): the steps CRFM corrects")
    text_dropout: float = setting(0.1, help="share of prompts dropped (classifier-free guidance)")
    augment: bool = setting(True, help="random flips and 90° rotations")
    cache_latents: bool = setting(
        False, help="encode every training image's VAE latent once (out/latent_cache.safetensors)"
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = setting("no", help="autocast precision")
    ema_decay: float = setting(0.0, help="EMA of the weights (0: none)")
    gradient_checkpointing: bool = setting(False, help="recompute activations in the backward pass (less memory)")
    val_every: int = setting(100, resume_free=True, help="validation samples every N steps (0: never)")
    val_samples: int = setting(4, help="validation masks")
    val_steps: int = setting(20, help="Euler steps of the validation samples")
    guidance_scale: float = setting(1.0, help="classifier-free guidance scale of the validation samples")
    fidelity_segmenter: str | None = setting(
        None, help="segmenter folder: mask fidelity (mIoU of generated vs masks) at validation"
    )
    checkpoint_every: int = setting(
        100, resume_free=True, help="model-only snapshot checkpoints/step_N (EMA weights if any) every N steps"
    )
    full_state_every: int = setting(
        500,
        resume_free=True,
        help="resumable state in checkpoint/ (model, optimizer, EMA) every N steps and at the end",
    )
    checkpoints_total_limit: int = setting(3, resume_free=True, help="model-only snapshots kept, newest first (0: all)")
    log_every: int = setting(10, resume_free=True, help="loss log interval in steps")
    seed: int = setting(0, help="seed of the weights, batches and noise")
    progress: bool = setting(True, resume_free=True, help="show a progress bar")
    unlabeled: bool = setting(False, help="pretraining: images only, masks ignored (control none)")
    captions: str | None = setting(None, help="pretraining: JSON {image id: caption}; others get prompt")
    prompt: str | None = setting(
        None, help='pretraining: the prompt of uncaptioned images (default "a satellite image")'
    )

    def validate(self) -> None:
        self.model.validate()
        require(
            bool(self.data),
            "data: no dataset given",
            fix="give IMAGES (a folder of images, a dataset, or toy:N)"
            if self.unlabeled
            else "give DATA (a LoveDA root, a folder with images/ and masks/, or a .jsonl index), "
            "or 'data:' in --config",
        )
        require(
            self.text_encoder != "sd3" or bool(self.text_encoder_path),
            "the sd3 text encoder needs text_encoder_path (a local diffusers SD3 pipeline folder)",
            fix="give --set text_encoder_path=<SD3 pipeline folder>",
        )
        require(
            not (self.overwrite and self.resume is not False),
            "overwrite and resume exclude each other: give --resume to continue the run in out, "
            "or --overwrite to replace it",
        )
        require_at_least(
            self, 1, "size", "steps", "batch_size", "grad_accum", "val_steps", "checkpoint_every", "full_state_every"
        )
        require_at_least(self, 1, "log_every", "text_max_length", "stop_after")
        require_at_least(self, 0, "lr", "weight_decay", "grad_clip", "warmup_steps", "val_every", "val_samples")
        require_at_least(self, 0, "lora_rank", "num_workers", "checkpoints_total_limit")
        require(
            not (self.cache_latents and self.crop == "random"),
            "cache_latents needs crop center or resize: a random crop differs at every step, a cached latent does not",
        )
        require(0 <= self.text_dropout < 1, f"text_dropout must be in [0, 1), got {self.text_dropout}")
        require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        require(
            self.frozen_dtype == "fp32" or self.mixed_precision == "bf16",
            "frozen_dtype=bf16 needs mixed_precision=bf16 (the bf16 weights run under autocast)",
        )
        require(
            math.isfinite(self.timestep_mean) and math.isfinite(self.timestep_std) and self.timestep_std > 0,
            f"timestep_mean must be finite and timestep_std > 0, got {self.timestep_mean}, {self.timestep_std}",
        )
        require(0 <= self.timestep_tail <= 1, f"timestep_tail must be in [0, 1], got {self.timestep_tail}")
        require(
            self.size % self.model.patch_size == 0,
            f"size {self.size} must be a multiple of model.patch_size {self.model.patch_size}",
        )
        require(not (self.init and self.sd3_path), "init and sd3_path both initialise the model: give one")
        require(
            not self.unlabeled or self.model.control == "none",
            f"unlabeled images have no masks: pretraining needs control none, got {self.model.control!r}",
        )
        require(
            not self.unlabeled or not (self.val_data or self.fidelity_segmenter),
            "val_data and fidelity_segmenter need masks; unlabeled pretraining has none",
        )
        require(
            self.unlabeled or not (self.captions or self.prompt or self.data.startswith("toy:")),
            "captions, prompt and toy:N pools are for unlabeled pretraining (`generator pretrain`)",
        )


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class TrainData:
    """A dataset in memory: images [N, C, S, S] in [0, 1] by `normalisation` (None: 8-bit RGB / 255, stored with
    the generator), labels [N, S, S], prompts, ids (small sets only)."""

    images: Tensor
    labels: Tensor
    prompts: list[str]
    ids: list[str]
    normalisation: Any = None


def load_train_data(
    path: str, split: str, size: int, split_file: str | None = None, images: bool = True, crop: str = "resize"
):
    """Validate and read a whole dataset (any reader) into tensors at `size` by `crop` (todsynth.data.crops;
    `resize` scales the short side, labels nearest, and center-crops the rest). Training streams instead."""
    from todsynth.generator.stream import collate, open_train_stream

    data, classes = open_train_stream(path, split, size, crop, 0, split_file, images=images)
    _, image_t, labels = collate([data.samples[(i, 0, i)] for i in range(len(data.ids))])
    image_t = torch.empty(0) if image_t is None else image_t
    return TrainData(image_t, labels, data.prompts, data.ids, data.normalisation), classes


def augment(images: Tensor, labels: Tensor, gens: list[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Random horizontal flip and 90° rotation per sample (its own RNG), identical on image and label."""
    out_i, out_l = [], []
    for img, lab, gen in zip(images, labels, gens, strict=True):
        flip, rot = torch.randint(0, 2, (1,), generator=gen).item(), torch.randint(0, 4, (1,), generator=gen).item()
        if flip:
            img, lab = img.flip(-1), lab.flip(-1)
        out_i.append(torch.rot90(img, rot, (-2, -1)))
        out_l.append(torch.rot90(lab, rot, (-2, -1)))
    return torch.stack(out_i), torch.stack(out_l)


def batch_indices(step: int, n: int, batch: int, seed: int) -> np.ndarray:
    """Global sample indices of step `step`: epochs are seeded permutations, read batch by batch."""
    per_epoch = max(n // batch, 1)
    epoch, pos = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if n < batch:
        perm = np.resize(perm, batch)
    return perm[pos * batch : (pos + 1) * batch]


def step_generator(seed: int, step: int, index: int) -> torch.Generator:
    """RNG for one sample of one step (t, ε, dropout, augmentation): same in any process layout."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + step * 9_973 + index + 1)


# ---------------------------------------------------------------------------------------------
# Building the pipeline


def build_pipeline(cfg: GeneratorTrainConfig, classes, device: str = "cpu", normalisation: Any = None):
    """Transformer (fresh or from SD3), autoencoder and text encoder for a training run on images of
    `normalisation`'s bands (None: 8-bit RGB)."""
    from todsynth.generator.autoencoder import load_autoencoder
    from todsynth.generator.mmdit import MaskControlMMDiT, MMDiTConfig
    from todsynth.generator.pipeline import MaskToImagePipeline
    from todsynth.generator.text import load_text_encoder

    channels = 3 if normalisation is None else normalisation.channels
    ae = load_autoencoder(cfg.autoencoder, path=cfg.autoencoder_path, channels=channels)
    te_kw = {"max_length": cfg.text_max_length} if cfg.text_encoder == "minilm" else {}
    # SD3's frozen CLIP + T5 only fill the prompt cache: under bf16 they load in bf16 (T5-XXL ~9 GiB, not ~18)
    text_dtype = torch.bfloat16 if cfg.text_encoder == "sd3" and cfg.mixed_precision == "bf16" else None
    te = load_text_encoder(cfg.text_encoder, path=cfg.text_encoder_path, dtype=text_dtype, **te_kw)
    common = dict(
        control=cfg.model.control,
        num_classes=classes.num_classes,
        ignore_index=classes.ignore_index,
        mask_encoding=cfg.model.mask_encoding,
        mask_downscale=ae.downscale,
        mask_channels=ae.latent_channels,
    )
    if cfg.sd3_path:
        from todsynth.generator.sd3 import from_sd3

        model = from_sd3(cfg.sd3_path, **common)
    else:
        latent = cfg.size // ae.downscale
        mcfg = MMDiTConfig(
            **{**asdict(cfg.model), **common},
            in_channels=ae.latent_channels,
            sample_size=latent,
            pos_embed_max_size=max(latent // cfg.model.patch_size, 8) * 2,
            joint_attention_dim=te.token_dim,
            pooled_projection_dim=te.pooled_dim,
        )
        torch.manual_seed(cfg.seed)
        model = MaskControlMMDiT(mcfg)
        if cfg.init:  # text/image streams from a pretrained base; mask stream a copy of its image stream
            from todsynth.generator.pretrain import load_base_into

            load_base_into(model, cfg.init, ae, te, cfg.size)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return MaskToImagePipeline(model, ae, te, classes, cfg.size, normalisation=normalisation).to(device)


def apply_freezing(model, cfg: GeneratorTrainConfig) -> None:
    """Freezing policy, or LoRA adapters (peft) on the streams that train."""
    model.set_trainable(
        text=cfg.train_text, image=cfg.train_image, mask=cfg.train_mask, cond=cfg.train_image or cfg.train_mask
    )
    if cfg.lora_rank > 0:
        from todsynth.generator.lora import add_lora

        streams = [
            s for s, on in (("text", cfg.train_text), ("image", cfg.train_image), ("mask", cfg.train_mask)) if on
        ]
        add_lora(model, cfg.lora_rank, streams)
        if cfg.train_mask:  # layers with no pretrained weights to adapt (mask embedding, adapter) train in full
            for name, p in model.named_parameters():
                if name.startswith(("mask_embed.", "adapter.")):
                    p.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# The loop


def flow_loss(
    pipe,
    model,
    images: Tensor,
    labels: Tensor,
    prompts: list[str],
    gens: list[torch.Generator],
    cfg: GeneratorTrainConfig,
    latents: bool = False,
) -> Tensor:
    """Rectified-flow loss ‖v_θ(x_t, t) − (ε − x0)‖² for one batch; per-sample randomness from `gens`.
    `model` is the (possibly DDP-wrapped) transformer; the pipeline supplies the conditioning. With
    `latents`, `images` already are x0 (from the latent cache) and the VAE is not run."""
    from todsynth.generator.flow import interpolate, sample_timesteps, velocity_target

    device = pipe.device
    sampling = dict(mode=cfg.timestep_sampling, mean=cfg.timestep_mean, std=cfg.timestep_std, tail=cfg.timestep_tail)
    t = to_device(torch.cat([sample_timesteps(1, generator=g, **sampling) for g in gens]), device)
    drop = torch.tensor([torch.rand(1, generator=g).item() < cfg.text_dropout for g in gens])
    with torch.no_grad():
        x0 = images.to(device) if latents else pipe.autoencoder.encode(images.to(device), sample=False)
        noise = to_device(torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]), device)
        cond = pipe.condition(labels, prompts, drop_text=drop)
    x_t = interpolate(x0, noise, t)
    v = model(x_t, t, cond.text, cond.pooled, cond.mask)
    return torch.nn.functional.mse_loss(v.float(), velocity_target(x0, noise).float())


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """Copy CPU-made randomness (per-sample generators: deterministic, resumable) to the device without a host
    sync: pinned and non-blocking on CUDA."""
    if torch.device(device).type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


@dataclass
class GeneratorResult:
    """What `train_generator` returns and writes to out/results.json: the model folder and how its training went."""

    model: str
    steps: int
    final_loss: float | None
    val: dict | None
    trainable_parameters: int
    processes: int
    wall_time_s: float


def train_generator(
    cfg: GeneratorTrainConfig, on_step: runs.StepCallback | None = None, accelerator: Any = None
) -> GeneratorResult:
    """Train; returns the result written to out/results.json. Resumable with cfg.resume (see the config).

    `on_step(step, loss)` is called on the main process at every log step (the experiment runner logs with it);
    `accelerator`: the entry point's (default: one made here, with the trackers of `cfg.log_with`).

    The run holds `out`'s run lock throughout; an `out` holding an earlier run is refused unless it is resumed
    or `cfg.overwrite` replaces it.
    """
    from accelerate.utils import get_int_from_env, set_seed

    from todsynth.generator.stream import MemorySamples, StepBatches, StreamData, batch_loader, open_train_stream
    from todsynth.io import write_json

    cfg.validate()
    cfg = apply_preset(cfg)
    cfg.validate()
    out = Path(cfg.out)
    # the main process of a (possibly `accelerate launch`ed) run, known before accelerate starts
    main = get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0) == 0
    with runs.open_run(out, cfg.resume, cfg.overwrite, RUN_OUTPUTS, main) as (run, resuming):
        run.settings, run.free = asdict(cfg), resume_free_names(GeneratorTrainConfig)
        accelerator = accelerator or runs.make_accelerator(cfg.log_with, out / "logs")
        set_seed(cfg.seed)
        if cfg.unlabeled:
            from todsynth.generator.pretrain import load_unlabeled

            pool, classes = load_unlabeled(cfg)
            data = StreamData(MemorySamples(pool.images, pool.labels), pool.prompts, pool.ids)
        else:
            data, classes = open_train_stream(cfg.data, cfg.split, cfg.size, cfg.crop, cfg.seed, cfg.split_file)
        val_labels, val_prompts = _validation_masks(cfg, data)
        pipe = build_pipeline(cfg, classes, accelerator.device, data.normalisation)
        # every prompt encoded once into out/prompt_cache.safetensors, each process its share; training never re-encodes
        pipe.use_prompt_cache(
            out / "prompt_cache.safetensors", sorted(set(data.prompts + val_prompts)), accelerator, offload_text=True
        )
        if cfg.cache_latents:
            data = _latent_cache(pipe, data, out, accelerator)
        model = pipe.transformer
        apply_freezing(model, cfg)
        cast_frozen(model, cfg.frozen_dtype)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        n_trainable = sum(p.numel() for p in trainable.values())  # before FSDP flattens them
        optimizer = make_optimizer(cfg.optimizer, list(trainable.values()), cfg.lr, cfg.weight_decay)
        distributed.configure_deepspeed(accelerator, cfg.grad_accum, cfg.grad_clip, cfg.batch_size, cfg.mixed_precision)
        prepared, optimizer = accelerator.prepare(model, optimizer)
        task = _GeneratorTask(
            cfg, pipe, accelerator, prepared, optimizer, list(trainable), data, val_labels, val_prompts, out
        )
        metrics = runs.Metrics(out / runs.METRICS_FILE, accelerator)
        start = 0
        if resuming:
            start, tensors, info = run.load_state(metrics, task.precision.scaler)
            task.load(tensors, info, run.checkpoint)
        else:
            run.start(asdict(cfg), metrics)
        runs.start_trackers(accelerator, "generator", asdict(cfg))

        world, rank = accelerator.num_processes, accelerator.process_index
        require(cfg.batch_size % world == 0, f"batch_size {cfg.batch_size} must divide by {world} processes")
        t0 = time.perf_counter()
        end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
        batches = StepBatches(
            len(data.ids), cfg.batch_size, cfg.seed, start * cfg.grad_accum, end * cfg.grad_accum, rank, world
        )
        task.loader = iter(batch_loader(data.samples, batches, cfg.num_workers))
        loop = runs.Loop(
            start,
            end,
            cfg.steps,
            lambda s: runs.lr_at(s, cfg.steps, cfg.lr, cfg.warmup_steps, "cosine_ramp"),
            cfg.batch_size * cfg.grad_accum,
            cfg.log_every,
            cfg.val_every,
            bool(cfg.val_every),
            cfg.full_state_every,
        )
        progress = runs.Progress("generator", cfg.steps, start, cfg.progress and accelerator.is_main_process)
        last = runs.fit(task, loop, metrics, accelerator, run, progress, on_step, task.precision.scaler)

        history = metrics.history()
        val = metrics.last("val/")
        result = GeneratorResult(
            str(out / "model"),
            end,
            last if last is not None else history[-1][1] if history else None,
            None if val is None else {k[4:] if k.startswith("val/") else k: v for k, v in val.items()},
            n_trainable,
            world,
            time.perf_counter() - t0,
        )
        if end < cfg.steps:  # stopped (stop_after): the state alone, as a kill leaves it, so nothing looks finished
            accelerator.end_training()
            return result
        task.save_final(out / "model")
        if accelerator.is_main_process:
            from todsynth.viz import plot_curves

            curve = ([s for s, _ in history], [v for _, v in history])
            plot_curves(out / "loss.png", {"flow-matching loss": curve}, xlabel="step", log_y=True)
            write_json(out / "results.json", asdict(result))
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return result


@dataclass
class _GeneratorTask:
    """The generator's part of the fit loop (one flow-matching step, validation, snapshots) and what its state
    holds: the prepared (DDP/FSDP) and the plain model, optimizer, EMA of the trainable parameters, precision."""

    cfg: GeneratorTrainConfig
    pipe: Any
    accelerator: Any
    prepared: torch.nn.Module
    optimizer: Any
    trainable_names: list[str]  # names of the trainable parameters in the model's state dict
    data: Any
    val_labels: Tensor
    val_prompts: list[str]
    out: Path
    engine_state: str | None = None  # DeepSpeed: the committed checkpoint's engine state
    done: int = 0  # steps done
    loader: Iterator = field(init=False)  # the batches from the first step on, set once a state is restored

    def __post_init__(self) -> None:
        self.model = self.pipe.transformer
        self.trainable = [p for p in self.prepared.parameters() if p.requires_grad]  # FSDP: this rank's shards
        self.ema: Any = None  # of the trainable parameters only (frozen ones never change)
        if self.cfg.ema_decay > 0:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable, decay=self.cfg.ema_decay, use_ema_warmup=False)
        self.precision = runs.Precision(self.cfg.mixed_precision, self.accelerator.device)
        from accelerate.utils import DistributedType

        # FSDP: every rank takes part in gathering weights and in forward; DeepSpeed: its engine does accumulation,
        # clipping and the optimizer step
        layout = self.accelerator.distributed_type
        self.sharded, self.deepspeed = layout == DistributedType.FSDP, layout == DistributedType.DEEPSPEED

    def train_step(self, step: int) -> Tensor:
        """grad_accum micro-batches, clipped update (DeepSpeed: the engine's), EMA; returns the step's loss (float64,
        on the device)."""
        cfg, acc, model = self.cfg, self.accelerator, self.prepared
        world, rank = acc.num_processes, acc.process_index
        loss_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
        for micro in range(cfg.grad_accum):
            local, images, labels = next(self.loader)
            gens = [
                step_generator(cfg.seed, step * cfg.grad_accum + micro, rank + world * j) for j in range(len(local))
            ]
            if cfg.augment:
                images, labels = augment(images, labels, gens)
            prompts = [self.data.prompts[i] for i in local]
            if self.deepspeed:  # the engine scales by grad_accum, then clips, steps and zeroes at the boundary
                with acc.accumulate(model), self.precision.autocast():
                    loss = flow_loss(self.pipe, model, images, labels, prompts, gens, cfg, cfg.cache_latents)
                    acc.backward(loss)
                loss_sum += loss.detach().double() / cfg.grad_accum
                continue
            ctx = acc.no_sync(model) if micro < cfg.grad_accum - 1 and world > 1 else contextlib.nullcontext()
            with ctx, self.precision.autocast():
                loss = (
                    flow_loss(self.pipe, model, images, labels, prompts, gens, cfg, cfg.cache_latents) / cfg.grad_accum
                )
                self.precision.backward(loss)
            loss_sum += loss.detach().double()
        if not self.deepspeed:
            if cfg.grad_clip > 0:
                self.precision.unscale(self.optimizer)
                acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.precision.step(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.trainable)
        return loss_sum

    @torch.no_grad()
    def validate(self, step: int) -> dict[str, float]:
        """Sample the fixed validation masks with the live modules (EMA weights swapped in), save a grid,
        the samples (safetensors) and, with a segmenter, the mask fidelity (mIoU of generated vs masks).

        FSDP: every rank runs the sharded model (its forward gathers weights); otherwise the main process alone."""
        from todsynth.io import save_weights
        from todsynth.viz import save_mask_image_grid

        cfg, pipe, labels, acc = self.cfg, self.pipe, self.val_labels, self.accelerator
        if not (acc.is_main_process or self.sharded) or len(labels) == 0:
            return {}
        module = self.prepared if self.sharded else pipe.transformer
        with distributed.ema_weights(self.trainable, self.ema), _module_in(pipe, module), self.precision.autocast():
            seeds = validation_seeds(len(labels), cfg.seed)
            images = pipe(
                labels, self.val_prompts, seeds=seeds, num_steps=cfg.val_steps, guidance_scale=cfg.guidance_scale
            )
        if not acc.is_main_process:
            return {}
        images = images.float()
        about = {"step": step, "num_steps": cfg.val_steps, "guidance_scale": cfg.guidance_scale, "seed": cfg.seed}
        metadata = {k: str(v) for k, v in about.items()}
        save_weights(
            self.out / "val" / "last_samples.safetensors", {"images": images, "labels": labels}, metadata=metadata
        )
        grid = self.out / "val" / f"step_{step:06d}.png"
        save_mask_image_grid(grid, labels, images, pipe.classes, normalisation=pipe.normalisation)
        if not cfg.fidelity_segmenter:
            return {}
        miou = mask_fidelity(images, labels, cfg.fidelity_segmenter, pipe.classes, pipe.normalisation)
        return {"mask_fidelity_miou": miou}

    def after_step(self, step: int) -> None:
        """Every checkpoint_every steps, model-only weights (EMA ones with EMA) in out/checkpoints/step_N, the newest
        `checkpoints_total_limit` kept."""
        self.done = step
        if step % self.cfg.checkpoint_every:
            return
        with distributed.ema_weights(self.trainable, self.ema):
            weights = {k: v.to("cpu", copy=True) for k, v in self.accelerator.get_state_dict(self.prepared).items()}
        if self.accelerator.is_main_process:
            config = {"_class_name": type(self.model).__name__, **self.model.config.to_dict()}
            distributed.save_snapshot(self.out / "checkpoints", step, weights, config, self.cfg.checkpoints_total_limit)
        self.accelerator.wait_for_everyone()

    def state(self) -> tuple[dict[str, Tensor], dict]:
        """Model, AdamW moments and EMA weights (gathered on all ranks); optimizer groups and EMA step. DeepSpeed:
        the optimizer is in the engine's state, saved through accelerate and referenced here."""
        acc = self.accelerator
        tensors = {f"model.{k}": v for k, v in acc.get_state_dict(self.prepared).items()}
        info: dict = {}
        if self.deepspeed:
            self.engine_state = info["engine_state"] = distributed.save_engine_state(
                acc, self.out, self.done, self.engine_state
            )
        else:
            optim, info["optimizer_groups"] = optimizer_state(self.prepared, self.optimizer)
            tensors.update(optim)
        if self.ema is not None:
            with distributed.ema_weights(self.trainable, self.ema):
                ema = acc.get_state_dict(self.prepared)
                tensors.update({f"ema.{k}": ema[k].to("cpu", copy=True) for k in self.trainable_names if k in ema})
        return tensors, {**info, "ema_step": self.ema.optimization_step if self.ema else None}

    def load(self, tensors: dict[str, Tensor], info: dict, path: Path) -> None:
        """Load a saved state into the model, EMA and optimizer (on every rank)."""
        from todsynth.errors import CheckpointError

        acc, weights = self.accelerator, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.engine_state = info.get("engine_state")
        try:
            if self.ema is not None:  # EMA weights through the model, so each rank's (sharded) shadow gets its part
                ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
                distributed.load_model_state(self.prepared, self.model, {**weights, **ema}, path, self.sharded)
                with torch.no_grad():
                    for shadow, p in zip(self.ema.shadow_params, self.trainable, strict=True):
                        shadow.copy_(p)
                self.ema.optimization_step = int(info["ema_step"])
            if self.deepspeed:  # weights and partitioned optimizer state from the engine's own state
                acc.load_state(str(path.parent / info["engine_state"]))
                return
            distributed.load_model_state(self.prepared, self.model, weights, path, self.sharded)
            load_optimizer_state(self.prepared, self.optimizer, tensors, info["optimizer_groups"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint does not fit this model: {str(e)[:200]}", path=path) from None

    def save_final(self, directory: Path) -> None:
        """The pipeline with EMA weights (fp32) in `directory`; FSDP: weights gathered on all ranks into a plain
        copy. The end of the run: the model is not trained or saved again."""
        from todsynth.checkpoint import build_on_meta

        acc, model = self.accelerator, self.model
        with distributed.ema_weights(self.trainable, self.ema):
            if self.sharded:
                weights = acc.get_state_dict(self.prepared)
                if acc.is_main_process:
                    plain = build_on_meta(lambda: type(model)(model.config))
                    plain.load_state_dict({k: v.float() for k, v in weights.items()}, assign=True)
                    with _module_in(self.pipe, plain):
                        self.pipe.save_pretrained(directory)
            elif acc.is_main_process:
                for p in model.parameters():  # bf16-stored frozen weights are written as fp32, like the rest
                    p.data = p.data.float()
                self.pipe.save_pretrained(directory)
        acc.wait_for_everyone()


def _validation_masks(cfg: GeneratorTrainConfig, data) -> tuple[Tensor, list[str]]:
    """Fixed masks for validation: from val_data, else the first training masks; center crops where training
    crops at random, so validation sees the same masks at every step."""
    from todsynth.generator.stream import TrainSamples, open_train_stream, read_labels

    crop = "center" if cfg.crop == "random" else cfg.crop
    if cfg.val_data:
        data, _ = open_train_stream(cfg.val_data, cfg.split, cfg.size, crop, cfg.seed, images=False)
    samples = data.samples
    if isinstance(samples, TrainSamples):
        samples = TrainSamples(samples.ds, cfg.size, crop, cfg.seed, images=False)
    n = min(cfg.val_samples, len(data.ids))
    return read_labels(samples, list(range(n))), data.prompts[:n]


def validation_seeds(n: int, seed: int) -> list[int]:
    from todsynth.generator.pipeline import sample_seeds

    return sample_seeds(seed, [f"val{i}" for i in range(n)])


def mask_fidelity(images: Tensor, labels: Tensor, segmenter_dir: str, classes, normalisation: Any = None) -> float:
    """mIoU of a frozen segmenter's prediction on generated images (of `normalisation`, converted to the
    segmenter's stored one) against their conditioning masks."""
    from todsynth.data.bands import convert
    from todsynth.segment.metrics import segmentation_metrics
    from todsynth.segment.model import CONFIG_NAME, Segmenter

    seg = Segmenter.from_pretrained(segmenter_dir).eval()
    images = convert(
        images.cpu(), normalisation, seg.normalisation, f"the segmenter {Path(segmenter_dir) / CONFIG_NAME}"
    )
    pred = seg.predict(images)
    return float(segmentation_metrics(pred, labels.cpu(), classes.num_classes, classes.ignore_index).miou)


@contextlib.contextmanager
def _module_in(pipe, module) -> Iterator[None]:
    """Context: `pipe.transformer` is `module` (the sharded FSDP model for validation), restored on exit."""
    saved, pipe.transformer = pipe.transformer, module
    try:
        yield
    finally:
        pipe.transformer = saved


def _latent_cache(pipe, data, out: Path, accelerator):
    """The training set as VAE latents of its (deterministically cropped) images, encoded once into
    out/latent_cache.safetensors by all processes, with its labels: the loop then never runs the encoder."""
    from todsynth.generator.latent_cache import LATENT_CACHE, build_latent_cache
    from todsynth.generator.stream import MemorySamples, StreamData, collate

    _, images, labels = collate([data.samples[(i, 0, i)] for i in range(len(data.ids))])
    latents = build_latent_cache(out / LATENT_CACHE, pipe.autoencoder, images, data.ids, accelerator)
    return StreamData(MemorySamples(latents, labels), data.prompts, data.ids, data.normalisation)


CACHES = ("prompt_cache.safetensors", "latent_cache.safetensors")  # encoded prompts and VAE latents of the data
# What a generator run writes into its folder: removed before a run started with `overwrite`.
RUN_OUTPUTS = (*runs.RUN_OUTPUTS, *CACHES, "val", "loss.png", "checkpoints", distributed.ENGINE_STATES)
