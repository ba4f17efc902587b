"""Flow-matching training of the mask-controlled MM-DiT on accelerate (1 process to many, CPU or GPU).

Determinism: the batch of step s and each sample's (t, ε, text dropout) derive from (seed, s, index)
alone, so a resumed run equals an uninterrupted one, and 2 processes equal 1 with the same global batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from todsynth.config import require

CHECKPOINT_DIR = "checkpoint"


@dataclass
class GeneratorTrainConfig:
    """Settings of `todsynth generator train`."""

    data: str = ""
    out: str = "runs/generator"
    split: str = "Train"
    split_file: str | None = None
    val_data: str | None = None  # held-out masks for validation (default: the last masks of `data`)
    size: int = 32
    # model
    control: str = "triple"
    mask_encoding: str = "onehot"
    autoencoder: str = "pixel"
    autoencoder_path: str | None = None
    text_encoder: str = "minilm"
    text_encoder_path: str | None = None
    sd3_path: str | None = None  # initialise text/image streams from a diffusers SD3 transformer
    init: str | None = None  # initialise text/image streams from a pretrained base (generator/pretrain.py)
    patch_size: int = 2
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    qk_norm: bool = True
    text_max_length: int = 16
    # what trains
    train_text: bool = False
    train_image: bool = True
    train_mask: bool = True
    lora_rank: int = 0  # > 0: LoRA (peft) on the trained streams instead of full fine-tuning
    # optimisation
    steps: int = 400
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: int = 20
    grad_clip: float = 1.0
    timestep_sampling: str = "logit_normal"
    timestep_mean: float = 0.0  # logit-normal mean (SD3's mode shift; > 0 trains more near noise)
    timestep_std: float = 1.0
    timestep_tail: float = 0.0  # share of t drawn uniform in [0.8, 1): the steps CRFM corrects
    text_dropout: float = 0.1
    augment: bool = True
    cache_latents: bool = False  # VAE latents of every training image encoded once (out/latent_cache.safetensors)
    mixed_precision: str = "no"
    ema_decay: float = 0.0  # 0 = no EMA
    gradient_checkpointing: bool = False
    # validation, logging, checkpoints
    val_every: int = 100
    val_samples: int = 4
    val_steps: int = 20
    guidance_scale: float = 1.0
    fidelity_segmenter: str | None = None  # segmenter folder: mask fidelity (mIoU of generated vs masks)
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    # True: continue from out/checkpoint, refusing when there is none; "auto": continue if one exists,
    # else start (the experiment pipeline's stages); False: start from scratch
    resume: bool | Literal["auto"] = False
    stop_after: int | None = None  # end this invocation after this step (like a kill; resume continues)
    progress: bool = True
    overwrite: bool = False  # start afresh in an `out` that holds an earlier run (its outputs are removed)
    # pretraining (generator/pretrain.py): images only (toy:N, an image folder or a dataset, masks ignored)
    unlabeled: bool = False
    captions: str | None = None  # JSON {image id: caption}; others get `prompt`
    prompt: str | None = None  # the prompt of uncaptioned images (default "a satellite image")

    def validate(self) -> None:
        require(bool(self.data), "data: give a dataset path")
        require(isinstance(self.resume, bool) or self.resume == "auto",
                f"resume must be true, false or 'auto', got {self.resume!r}")
        require(not (self.overwrite and self.resume is not False),
                "overwrite and resume exclude each other: give --resume to continue the run in out, "
                "or --overwrite to replace it")
        for name in ("size", "steps", "batch_size", "grad_accum", "num_layers", "num_heads", "head_dim",
                     "patch_size", "val_steps", "checkpoint_every", "log_every", "text_max_length"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "weight_decay", "grad_clip", "warmup_steps", "val_every", "val_samples", "lora_rank"):
            v = getattr(self, name)
            require(math.isfinite(v) and v >= 0, f"{name} must be >= 0, got {v}")
        require(0 <= self.text_dropout < 1, f"text_dropout must be in [0, 1), got {self.text_dropout}")
        require(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        require(self.control in ("triple", "siamese", "adapter", "none"),
                f"unknown control {self.control!r}; choose triple, siamese, adapter or none")
        require(self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be no, bf16 or fp16")
        require(self.timestep_sampling in ("uniform", "logit_normal"), "timestep_sampling: uniform|logit_normal")
        require(math.isfinite(self.timestep_mean) and math.isfinite(self.timestep_std) and self.timestep_std > 0,
                f"timestep_mean must be finite and timestep_std > 0, got {self.timestep_mean}, {self.timestep_std}")
        require(0 <= self.timestep_tail <= 1, f"timestep_tail must be in [0, 1], got {self.timestep_tail}")
        require(self.size % self.patch_size == 0,
                f"size {self.size} must be a multiple of patch_size {self.patch_size}")
        require(not (self.init and self.sd3_path), "init and sd3_path both initialise the model: give one")
        require(not self.unlabeled or self.control == "none",
                f"unlabeled images have no masks: pretraining needs control none, got {self.control!r}")
        require(not self.unlabeled or not (self.val_data or self.fidelity_segmenter),
                "val_data and fidelity_segmenter need masks; unlabeled pretraining has none")
        require(self.unlabeled or not (self.captions or self.prompt or self.data.startswith("toy:")),
                "captions, prompt and toy:N pools are for unlabeled pretraining (`generator pretrain`)")


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class TrainData:
    """The training set in memory: images [N, 3, S, S] in [0, 1], labels [N, S, S], prompts, ids."""

    images: Tensor
    labels: Tensor
    prompts: list[str]
    ids: list[str]


def load_train_data(path: str, split: str, size: int, split_file: str | None = None, images: bool = True):
    """Validate and read a dataset (any reader) into tensors resized to `size` (labels nearest)."""
    from todsynth.data.check import open_checked
    from todsynth.data.torchdata import resize_label, resize_pair
    from todsynth.errors import DataError

    ds = open_checked(path, split, split_file or None)
    if images and ds.label_only:
        raise DataError("dataset has masks but no images; the generator needs image/mask pairs", path=path)
    imgs, labs, prompts = [], [], []
    for i in range(len(ds)):
        sample = ds[i]
        prompts.append(sample.prompt)
        label = torch.from_numpy(sample.label)
        if images:
            image = torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255
            image, label = resize_pair(image, label, size)
            imgs.append(image)
        labs.append(resize_label(label, size))
    image_t = torch.stack(imgs) if imgs else torch.empty(0)
    return TrainData(image_t, torch.stack(labs), prompts, list(ds.ids)), ds.classes


def augment(images: Tensor, labels: Tensor, gens: list[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Random horizontal flip and 90° rotation per sample (its own RNG), identical on image and label."""
    out_i, out_l = [], []
    for img, lab, gen in zip(images, labels, gens):
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
    return perm[pos * batch:(pos + 1) * batch]


def step_generator(seed: int, step: int, index: int) -> torch.Generator:
    """RNG for one sample of one step (t, ε, dropout, augmentation): same in any process layout."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + step * 9_973 + index + 1)


# ---------------------------------------------------------------------------------------------
# Building the pipeline


def build_pipeline(cfg: GeneratorTrainConfig, classes, device: str = "cpu"):
    """Transformer (fresh or from SD3), autoencoder and text encoder for a training run."""
    from todsynth.generator.autoencoder import load_autoencoder
    from todsynth.generator.mmdit import MaskControlMMDiT, MMDiTConfig
    from todsynth.generator.pipeline import MaskToImagePipeline
    from todsynth.generator.text import load_text_encoder

    ae = load_autoencoder(cfg.autoencoder, path=cfg.autoencoder_path)
    te_kw = {"max_length": cfg.text_max_length} if cfg.text_encoder == "minilm" else {}
    te = load_text_encoder(cfg.text_encoder, path=cfg.text_encoder_path, **te_kw)
    common = dict(control=cfg.control, num_classes=classes.num_classes, ignore_index=classes.ignore_index,
                  mask_encoding=cfg.mask_encoding, mask_downscale=ae.downscale, mask_channels=ae.latent_channels)
    if cfg.sd3_path:
        from todsynth.generator.sd3 import from_sd3

        model = from_sd3(cfg.sd3_path, **common)
    else:
        latent = cfg.size // ae.downscale
        mcfg = MMDiTConfig(in_channels=ae.latent_channels, patch_size=cfg.patch_size, sample_size=latent,
                           pos_embed_max_size=max(latent // cfg.patch_size, 8) * 2, num_layers=cfg.num_layers,
                           num_heads=cfg.num_heads, head_dim=cfg.head_dim, joint_attention_dim=te.token_dim,
                           pooled_projection_dim=te.pooled_dim, qk_norm=cfg.qk_norm, **common)
        torch.manual_seed(cfg.seed)
        model = MaskControlMMDiT(mcfg)
        if cfg.init:  # text/image streams from a pretrained base; mask stream a copy of its image stream
            from todsynth.generator.pretrain import load_base_into

            load_base_into(model, cfg.init, ae, te, cfg.size)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return MaskToImagePipeline(model, ae, te, classes, cfg.size).to(device)


def apply_freezing(model, cfg: GeneratorTrainConfig) -> None:
    """Freezing policy, or LoRA adapters (peft) on the streams that train."""
    model.set_trainable(text=cfg.train_text, image=cfg.train_image, mask=cfg.train_mask,
                        cond=cfg.train_image or cfg.train_mask)
    if cfg.lora_rank > 0:
        from todsynth.generator.lora import add_lora

        streams = [s for s, on in (("text", cfg.train_text), ("image", cfg.train_image), ("mask", cfg.train_mask)) if on]
        add_lora(model, cfg.lora_rank, streams)
        if cfg.train_mask:  # layers with no pretrained weights to adapt (mask embedding, adapter) train in full
            for name, p in model.named_parameters():
                if name.startswith(("mask_embed.", "adapter.")):
                    p.requires_grad_(True)


# ---------------------------------------------------------------------------------------------
# The loop


def flow_loss(pipe, model, images: Tensor, labels: Tensor, prompts: list[str], gens: list[torch.Generator],
              cfg: GeneratorTrainConfig, latents: bool = False) -> Tensor:
    """Rectified-flow loss ‖v_θ(x_t, t) − (ε − x0)‖² for one batch; per-sample randomness from `gens`.
    `model` is the (possibly DDP-wrapped) transformer; the pipeline supplies the conditioning. With
    `latents`, `images` already are x0 (from the latent cache) and the VAE is not run."""
    from todsynth.generator.flow import interpolate, sample_timesteps, velocity_target

    device = pipe.device
    t = torch.cat([sample_timesteps(1, cfg.timestep_sampling, cfg.timestep_mean, cfg.timestep_std, generator=g,
                                    tail=cfg.timestep_tail) for g in gens]).to(device)
    drop = torch.tensor([torch.rand(1, generator=g).item() < cfg.text_dropout for g in gens])
    with torch.no_grad():
        x0 = images.to(device) if latents else pipe.autoencoder.encode(images.to(device), sample=False)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
        cond = pipe.condition(labels, prompts, drop_text=drop)
    x_t = interpolate(x0, noise, t)
    v = model(x_t, t, cond.text, cond.pooled, cond.mask)
    return torch.nn.functional.mse_loss(v.float(), velocity_target(x0, noise).float())


def lr_lambda(cfg: GeneratorTrainConfig):
    """Linear warm-up then cosine decay to 0 (as the reference code)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return f


def train_generator(cfg: GeneratorTrainConfig) -> dict:
    """Train; returns the summary written to out/results.json. Resumable with cfg.resume (see the config).

    The run holds `out`'s run lock throughout; an `out` holding an earlier run is refused unless it is resumed
    or `cfg.overwrite` replaces it.
    """
    from todsynth.locks import check_run_folder, run_lock

    cfg.validate()
    out = Path(cfg.out)
    main = _main_process()
    with run_lock(out, enabled=main):
        check_run_folder(out, cfg.resume, cfg.overwrite, RUN_OUTPUTS, remove=main)
        return _train(cfg, out)


def _main_process() -> bool:
    """Whether this is the main process of a (possibly `accelerate launch`ed) run, known before accelerate starts."""
    import os

    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"):
        if os.environ.get(name):
            return int(os.environ[name]) == 0
    return True


def _train(cfg: GeneratorTrainConfig, out: Path) -> dict:
    """The training run of `train_generator`, in a locked and checked `out`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from todsynth.io import write_json

    ckpt = out / CHECKPOINT_DIR
    resuming = cfg.resume is not False and _has_checkpoint(ckpt)
    if cfg.resume is True and not resuming:  # refuse before anything is loaded or written to `out`
        from todsynth.errors import CheckpointError

        raise CheckpointError("no checkpoint to resume from", path=ckpt,
                              fix="start the run without resume, or with resume=auto to continue only if one exists")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    if cfg.unlabeled:
        from todsynth.generator.pretrain import load_unlabeled

        data, classes = load_unlabeled(cfg)
    else:
        data, classes = load_train_data(cfg.data, cfg.split, cfg.size, cfg.split_file)
    val_labels, val_prompts = _validation_masks(cfg, data)
    pipe = build_pipeline(cfg, classes, accelerator.device)
    _attach_prompt_cache(pipe, data.prompts + val_prompts, out, accelerator)
    latents = _latent_cache(pipe, data, out, accelerator) if cfg.cache_latents else None
    model = pipe.transformer
    apply_freezing(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    ema = _make_ema(model, cfg)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler steps once per global step

    start, history = 0, {"loss": [], "val": []}
    if resuming:
        start, history = _restore(ckpt, cfg, model, optimizer, scheduler, ema)
    elif accelerator.is_main_process:
        write_json(out / "config.json", asdict(cfg))

    world, rank = accelerator.num_processes, accelerator.process_index
    require(cfg.batch_size % world == 0, f"batch_size {cfg.batch_size} must divide by {world} processes")
    t0 = time.perf_counter()
    progress = _progress(cfg, accelerator, start)
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, cfg.stop_after)
    for step in range(start, end):
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            gidx = batch_indices(step * cfg.grad_accum + micro, len(data.ids), cfg.batch_size, cfg.seed)
            local = gidx[rank::world]
            positions = [rank + world * j for j in range(len(local))]
            gens = [step_generator(cfg.seed, step * cfg.grad_accum + micro, p) for p in positions]
            images, labels = (data.images if latents is None else latents)[local], data.labels[local]
            if cfg.augment:
                images, labels = augment(images, labels, gens)
            prompts = [data.prompts[i] for i in local]
            sync = micro == cfg.grad_accum - 1
            ctx = accelerator.no_sync(ddp_model) if not sync and world > 1 else _null()
            with ctx, accelerator.autocast():
                loss = flow_loss(pipe, ddp_model, images, labels, prompts, gens, cfg,
                                 latents=latents is not None) / cfg.grad_accum
                accelerator.backward(loss)
            loss_sum += loss.item()
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(model.parameters())
        history["loss"].append([step + 1, _mean_across(accelerator, loss_sum)])
        done = step + 1
        if cfg.val_every and (done % cfg.val_every == 0 or done == cfg.steps):
            history["val"].append(validate(pipe, ema, val_labels, val_prompts, cfg, out, done, accelerator))
        if done % cfg.checkpoint_every == 0 or done in (cfg.steps, end):
            if accelerator.is_main_process:
                _save(ckpt, cfg, done, history, model, optimizer, scheduler, ema)
            accelerator.wait_for_everyone()
        if progress is not None:
            progress.update(done, loss=history["loss"][-1][1])
    if progress is not None:
        progress.close()

    summary = {"steps": end, "wall_time_s": time.perf_counter() - t0, "final_loss": history["loss"][-1][1]
               if history["loss"] else None, "val": history["val"][-1] if history["val"] else None,
               "trainable_parameters": sum(p.numel() for p in params), "processes": world}
    if accelerator.is_main_process:
        with _ema_weights(model, ema):
            pipe.save_pretrained(out / "model")
        _plot_loss(history, out / "loss.png")
        write_json(out / "results.json", summary)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _validation_masks(cfg: GeneratorTrainConfig, data: TrainData) -> tuple[Tensor, list[str]]:
    """Fixed masks for validation: from val_data, else the first training masks."""
    if cfg.val_data:
        vdata, _ = load_train_data(cfg.val_data, cfg.split, cfg.size, images=False)
        return vdata.labels[:cfg.val_samples], vdata.prompts[:cfg.val_samples]
    return data.labels[:cfg.val_samples], data.prompts[:cfg.val_samples]


def validation_seeds(n: int, seed: int) -> list[int]:
    from todsynth.generator.pipeline import sample_seeds

    return sample_seeds(seed, [f"val{i}" for i in range(n)])


@torch.no_grad()
def validate(pipe, ema, labels: Tensor, prompts: list[str], cfg: GeneratorTrainConfig, out: Path, step: int,
             accelerator) -> dict:
    """Sample the fixed validation masks with the live modules (EMA weights swapped in), save a grid,
    the samples (safetensors) and, with a segmenter, the mask fidelity (mIoU of generated vs masks)."""
    from todsynth.io import save_weights

    if not accelerator.is_main_process or len(labels) == 0:
        return {"step": step}
    with _ema_weights(pipe.transformer, ema):
        images = pipe(labels, prompts, seeds=validation_seeds(len(labels), cfg.seed), num_steps=cfg.val_steps,
                      guidance_scale=cfg.guidance_scale)
    val_dir = out / "val"
    save_weights(val_dir / "last_samples.safetensors", {"images": images, "labels": labels},
                 metadata={"step": str(step), "num_steps": str(cfg.val_steps),
                           "guidance_scale": str(cfg.guidance_scale), "seed": str(cfg.seed)})
    from todsynth.viz import save_mask_image_grid

    save_mask_image_grid(val_dir / f"step_{step:06d}.png", labels, images, pipe.classes)
    record = {"step": step}
    if cfg.fidelity_segmenter:
        record["mask_fidelity_miou"] = mask_fidelity(images, labels, cfg.fidelity_segmenter, pipe.classes)
    return record


def mask_fidelity(images: Tensor, labels: Tensor, segmenter_dir: str, classes) -> float:
    """mIoU of a frozen segmenter's prediction on generated images against their conditioning masks."""
    from todsynth.segment.metrics import segmentation_metrics
    from todsynth.segment.model import Segmenter

    seg = Segmenter.from_pretrained(segmenter_dir).eval()
    pred = seg.predict(images.cpu())
    return float(segmentation_metrics(pred, labels.cpu(), classes.num_classes, classes.ignore_index).miou)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _ema_weights:
    """Context: EMA weights in the live model (no second copy of the model), restored on exit."""

    def __init__(self, model, ema):
        self.model, self.ema = model, ema

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.model.parameters())
        return False


def _make_ema(model, cfg: GeneratorTrainConfig):
    if cfg.ema_decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(model.parameters(), decay=cfg.ema_decay, use_ema_warmup=False)


def _attach_prompt_cache(pipe, prompts: list[str], out: Path, accelerator) -> None:
    """Encode every prompt once into out/prompt_cache.safetensors, each process its share (no process waits
    behind one encoding them all); training never re-encodes."""
    pipe.use_prompt_cache(out / "prompt_cache.safetensors", sorted(set(prompts)), accelerator)
    if accelerator.device.type != "cpu":  # every prompt is cached: the text encoders leave the accelerator
        pipe.text_encoder.to("cpu")


def _latent_cache(pipe, data: TrainData, out: Path, accelerator) -> Tensor:
    """Latents of every training image, encoded once into out/latent_cache.safetensors (all processes)."""
    from todsynth.generator.latent_cache import LATENT_CACHE, build_latent_cache

    return build_latent_cache(out / LATENT_CACHE, pipe.autoencoder, data.images, data.ids, accelerator)


def _has_checkpoint(ckpt: Path) -> bool:
    """Whether `ckpt` (or `ckpt.old`, left by a kill between the two renames of a save) exists."""
    return ckpt.exists() or ckpt.with_name(ckpt.name + ".old").exists()


ADDED_SETTINGS = {"init": None, "unlabeled": False, "captions": None, "prompt": None,
                  "timestep_mean": 0.0, "timestep_std": 1.0, "timestep_tail": 0.0, "cache_latents": False}
RESUME_FREE = {"resume", "stop_after", "progress", "val_every", "checkpoint_every", "log_every", "out", "overwrite"}
# What a run writes into its folder: removed before a run started with `overwrite`.
RUN_OUTPUTS = ("model", "results.json", CHECKPOINT_DIR, CHECKPOINT_DIR + ".old", CHECKPOINT_DIR + ".tmp", "val",
               "loss.png", "config.json", "prompt_cache.safetensors", "latent_cache.safetensors")


def _save(ckpt: Path, cfg: GeneratorTrainConfig, step: int, history: dict, model, optimizer, scheduler,
          ema) -> None:
    """Model, AdamW moments and EMA weights in safetensors; step, schedule and loss trace in JSON."""
    from todsynth.checkpoint import optimizer_tensors, save_checkpoint

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update(optimizer_tensors(optimizer))
    if ema is not None:
        tensors.update({f"ema.{i}": p for i, p in enumerate(ema.shadow_params)})
    info = {"step": step, "history": history, "config": asdict(cfg), "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
            "ema_step": ema.optimization_step if ema is not None else None}
    save_checkpoint(ckpt, tensors, info)


def _restore(ckpt: Path, cfg: GeneratorTrainConfig, model, optimizer, scheduler, ema) -> tuple[int, dict]:
    """Load a checkpoint written by `_save` after checking it belongs to this configuration."""
    from todsynth.checkpoint import config_differences, load_checkpoint, load_optimizer_tensors
    from todsynth.errors import CheckpointError

    tensors, info = load_checkpoint(ckpt)
    current = json.loads(json.dumps(asdict(cfg)))
    saved = info.get("config", {})
    if isinstance(saved, dict) and saved:  # settings added after the checkpoint was written: their defaults
        saved = {**ADDED_SETTINGS, **saved}
    diff = config_differences(saved, current, RESUME_FREE)
    if diff:
        raise CheckpointError(f"checkpoint was written with other settings: {diff}", path=ckpt / "state.json",
                              fix="resume with the same settings, or use a new output folder")
    try:
        from todsynth.generator.mmdit import load_state_strict

        load_state_strict(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, ckpt)
        load_optimizer_tensors(optimizer, tensors)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint does not fit this model: {str(e)[:200]}", path=ckpt) from None
    scheduler.load_state_dict({**info["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    if ema is not None:
        with torch.no_grad():
            for i, p in enumerate(ema.shadow_params):
                p.copy_(tensors[f"ema.{i}"])
        ema.optimization_step = int(info["ema_step"])
    return int(info["step"]), info["history"]


def _mean_across(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], device=accelerator.device)
    return accelerator.reduce(t, reduction="mean").item()


def _plot_loss(history: dict, path: Path) -> None:
    from todsynth.viz import plot_curves

    steps = [s for s, _ in history["loss"]]
    plot_curves(path, {"flow-matching loss": (steps, [v for _, v in history["loss"]])}, xlabel="step", log_y=True)


class _Progress:
    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("generator"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                          TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn())
        self.p.start()
        self.task = self.p.add_task("train", total=total, completed=start, loss=float("nan"))

    def update(self, done: int, loss: float) -> None:
        self.p.update(self.task, completed=done, loss=loss)

    def close(self) -> None:
        self.p.stop()


def _progress(cfg: GeneratorTrainConfig, accelerator, start: int):
    return _Progress(cfg.steps, start) if cfg.progress and accelerator.is_main_process else None
