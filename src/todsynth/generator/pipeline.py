"""Mask-to-image pipeline: transformer + autoencoder + text encoder, one conditioning function for
training and sampling, and plain (or CRFM-corrected) Euler flow sampling with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from todsynth.config import config_from_file, require
from todsynth.data.classes import ClassSpec
from todsynth.errors import CheckpointError, TodsynthError
from todsynth.generator.flow import Corrector, euler_sample, flow_sigmas, predict_x0
from todsynth.generator.mmdit import MaskControlMMDiT

PIPELINE_FILE = "pipeline.json"
DEFAULT_PROMPT = "a satellite image of {classes}"
RESAVE_FIX = "save the generator again, or fix the setting"


@dataclass
class PipelineFile:
    """The settings of a generator's pipeline.json, checked like any config (keys, types, ranges) when read."""

    autoencoder: dict[str, Any]
    text_encoder: dict[str, Any]
    classes: dict[str, Any]
    image_size: int
    prompt_template: str = DEFAULT_PROMPT
    normalisation: dict[str, Any] | None = None  # None: 8-bit RGB / 255 (generators saved before bands)

    def validate(self) -> None:
        """Image size >= 1 and a `kind` for the autoencoder and the text encoder."""
        require(self.image_size >= 1, f"'image_size' must be >= 1, got {self.image_size}")
        for name in ("autoencoder", "text_encoder"):
            kind = getattr(self, name).get("kind")
            require(isinstance(kind, str), f"'{name}' needs a 'kind' (a string), got {kind!r}")


@dataclass
class Conditioning:
    """Everything the transformer is conditioned on besides (x_t, t)."""

    text: Tensor  # [B, L, Dt]
    pooled: Tensor  # [B, Dp]
    mask: Tensor | None  # long labels [B, H, W] (one-hot encoding) or a mask latent [B, C, h, w]

    def cat(self, other: Conditioning) -> Conditioning:
        """Stack two conditionings along the batch (CFG: conditional | unconditional)."""
        if (self.mask is None) != (other.mask is None):
            raise ValueError("cannot stack a conditioning that has a mask with one that has none")
        mask = None if self.mask is None or other.mask is None else torch.cat([self.mask, other.mask])
        return Conditioning(torch.cat([self.text, other.text]), torch.cat([self.pooled, other.pooled]), mask)


def sample_seeds(seed: int, ids: Sequence[str], k: int = 0) -> list[int]:
    """Per-sample seeds derived from (global seed, sample id, copy k): independent of batching and processes."""
    import hashlib

    return [int.from_bytes(hashlib.sha256(f"{seed}/{i}/{k}".encode()).digest()[:8], "little") >> 1 for i in ids]


def initial_noise(shape: tuple[int, ...], seeds: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """Noise [B, *shape] where row j depends only on seeds[j]."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(rows).to(device)


class MaskToImagePipeline:
    """Generator of images for label maps. Call it with long label maps [B, H, W]; returns images in [0, 1].

    `normalisation` says how its image bands relate to raw samples (`todsynth.data.bands.Normalisation`; None:
    8-bit RGB / 255): stored in pipeline.json, used to write synthetic images back in the source's sample type.
    """

    def __init__(
        self,
        transformer: MaskControlMMDiT,
        autoencoder: Any,
        text_encoder: Any,
        classes: ClassSpec,
        image_size: int,
        prompt_template: str = "a satellite image of {classes}",
        extra: dict | None = None,
        normalisation: Any = None,
        prompt_cache: Any = None,
        mixed_precision: str = "no",
    ):
        from todsynth.data.bands import Normalisation

        self.normalisation = normalisation or Normalisation.rgb8()
        channels = getattr(autoencoder, "image_channels", 3)
        if self.normalisation.channels != channels:
            raise CheckpointError(
                f"the normalisation scales {self.normalisation.channels} band(s) but the autoencoder makes {channels}",
                fix=RESAVE_FIX,
            )
        self.transformer = transformer
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.classes = classes
        self.image_size = image_size
        self.prompt_template = prompt_template
        self.extra = dict(extra or {})
        # prompt → embeddings table (text.PromptCache): every encode_text goes through it when set
        self.prompt_cache = prompt_cache if prompt_cache is not None else self.extra.pop("prompt_cache", None)
        self.mixed_precision = mixed_precision  # autocast of transformer and decoder: no | bf16 | fp16

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def to(self, device: torch.device | str, text_dtype: torch.dtype | None = None) -> MaskToImagePipeline:
        """Move transformer, autoencoder and text encoder to `device` (the text encoder to `text_dtype` too)."""
        self.transformer.to(device)
        if hasattr(self.autoencoder, "to"):
            self.autoencoder.to(device)
        if hasattr(self.text_encoder, "to"):
            self.text_encoder.to(device=device, dtype=text_dtype)
        return self

    def autocast(self):
        """The sampling precision's autocast context on the pipeline's device."""
        from todsynth.generator.runtime import autocast

        return autocast(self.device, self.mixed_precision)

    def use_prompt_cache(
        self, path: str | Path, prompts: Sequence[str], runtime: Any = None, offload_text: bool = False
    ) -> Any:
        """Encode `prompts` (and "") once into the cache file at `path`, shared by all processes (each encodes
        its share), and route every later encode_text through it; returns the cache. `offload_text`: every
        prompt the run needs is cached, so the text encoders leave the accelerator."""
        from todsynth.generator.text import build_prompt_cache

        self.prompt_cache = build_prompt_cache(path, self.text_encoder, prompts, runtime)
        if offload_text and self.device.type != "cpu":
            self.text_encoder.to("cpu")
        return self.prompt_cache

    # -- conditioning: the one function for training and sampling ---------------------------------
    def encode_text(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token and pooled embeddings for prompts (through the prompt cache when one is attached)."""
        cache = self.prompt_cache
        tokens, pooled = cache.get(list(prompts)) if cache is not None else self.text_encoder.encode(list(prompts))
        return tokens.to(self.device, torch.float32), pooled.to(self.device, torch.float32)

    def prompts_for(self, labels: Tensor) -> list[str]:
        """Default prompts built from the classes present in each label map."""
        from todsynth.data.prompts import build_prompt

        return [build_prompt(lab.cpu().numpy(), self.classes, self.prompt_template) for lab in labels]

    def condition(self, labels: Tensor, prompts: Sequence[str], drop_text: Tensor | None = None) -> Conditioning:
        """Build the transformer's conditioning; `drop_text` [B] bool swaps prompts for "" (CFG dropout)."""
        if drop_text is not None:
            prompts = ["" if d else p for p, d in zip(prompts, drop_text.tolist(), strict=True)]
        text, pooled = self.encode_text(prompts)
        cfg = self.transformer.config
        mask: Tensor | None = None
        if cfg.control != "none":
            labels = labels.to(self.device)
            if cfg.mask_encoding == "onehot":
                mask = labels.long()
            else:
                from todsynth.generator.autoencoder import encode_mask_rgb

                rgb = encode_mask_rgb(
                    labels, cfg.num_classes, cfg.ignore_index, getattr(self.autoencoder, "image_channels", 3)
                )
                mask = self.autoencoder.encode(rgb, sample=False)
        return Conditioning(text, pooled, mask)

    # -- sampling ---------------------------------------------------------------------------------
    def velocity_fn(self, cond: Conditioning, guidance_scale: float = 1.0):
        """v(x, σ) with classifier-free guidance on the text (mask kept in both branches)."""
        model = self.transformer
        if guidance_scale == 1.0:
            return lambda x, sigma: model(x, sigma, cond.text, cond.pooled, cond.mask)
        b = cond.text.shape[0]
        empty_t, empty_p = self.encode_text([""] * b)
        both = cond.cat(Conditioning(empty_t, empty_p, cond.mask))

        def velocity(x: Tensor, sigma: Tensor) -> Tensor:
            v_c, v_u = model(torch.cat([x, x]), torch.cat([sigma, sigma]), both.text, both.pooled, both.mask).chunk(2)
            return v_u + guidance_scale * (v_c - v_u)

        return velocity

    def latent_shape(self) -> tuple[int, int, int]:
        f = getattr(self.autoencoder, "downscale", 1)
        return (self.transformer.config.in_channels, self.image_size // f, self.image_size // f)

    def __call__(
        self,
        labels: Tensor,
        prompts: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        num_steps: int = 20,
        guidance_scale: float = 1.0,
        shift: float = 1.0,
        corrector: Corrector | None = None,
        num_corrected: int = 0,
        callback=None,
        output: str = "image",
    ) -> Tensor:
        """Sample images for label maps [B, H, W]. Each row's noise comes from its own seed."""
        labels = labels.to(self.device)
        prompts = list(prompts) if prompts is not None else self.prompts_for(labels)
        seeds = list(seeds) if seeds is not None else list(range(labels.shape[0]))
        was_training = self.transformer.training
        self.transformer.eval()
        try:  # no autograd here; a CRFM corrector enables it only for its own correction
            with torch.no_grad():
                cond = self.condition(labels, prompts)
                x = initial_noise(self.latent_shape(), seeds, self.device)
                velocity = self._autocast_velocity(self.velocity_fn(cond, guidance_scale))
                x0 = euler_sample(velocity, x, flow_sigmas(num_steps, shift), corrector, num_corrected, callback)
                return x0 if output == "latent" else self.decode(x0)
        finally:
            self.transformer.train(was_training)

    def _autocast_velocity(self, velocity):
        """The velocity under the sampling precision's autocast, returned in fp32 for the Euler update."""

        def run(x: Tensor, sigma: Tensor) -> Tensor:
            with self.autocast():
                v = velocity(x, sigma)
            return v.float()

        return run

    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images in [0, 1] (fp32), the decoder under the sampling precision's autocast."""
        with self.autocast():
            images = self.autoencoder.decode(latents)
        return images.float()

    def preview(self, x_t: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
        """Decoded x̂0 = x_t − σ·v: the 'pre-synth' image at a step."""
        with torch.no_grad():
            return self.decode(predict_x0(x_t, sigma, v))

    # -- persistence ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """transformer/ (config + safetensors) and pipeline.json (autoencoder, text encoder, classes)."""
        from todsynth.io import write_json

        directory = Path(directory)
        self.transformer.save_pretrained(directory / "transformer")
        write_json(
            directory / PIPELINE_FILE,
            {
                "_class_name": type(self).__name__,
                "autoencoder": self.autoencoder.config,
                "text_encoder": self.text_encoder.config,
                "classes": self.classes.to_dict(),
                "image_size": self.image_size,
                "prompt_template": self.prompt_template,
                "normalisation": self.normalisation.to_dict(),
            },
        )

    @classmethod
    def for_runtime(cls, directory: str | Path, runtime: Any) -> MaskToImagePipeline:
        """A saved generator on `runtime`'s device (generator.runtime.Runtime): text encoder in the runtime's
        text dtype, sampling under its autocast precision."""
        pipe = cls.from_pretrained(directory, device=runtime.device, text_dtype=runtime.text_dtype)
        pipe.mixed_precision = runtime.mixed_precision
        return pipe

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, device: str | torch.device = "cpu", text_dtype: torch.dtype | None = None
    ) -> MaskToImagePipeline:
        """Load a saved generator onto `device`; the text encoder loads directly in `text_dtype` (e.g. bf16:
        T5-XXL then takes ~9 GiB instead of ~18 GiB)."""
        from todsynth.generator.autoencoder import load_autoencoder
        from todsynth.generator.text import load_text_encoder
        from todsynth.io import read_json

        directory = Path(directory)
        if not (directory / PIPELINE_FILE).is_file():
            raise CheckpointError(
                "not a todsynth generator folder (no pipeline.json)",
                path=directory / PIPELINE_FILE,
                fix="point to a folder written by `todsynth generator train` (its out/model)",
            )
        meta = read_json(directory / PIPELINE_FILE)
        if not isinstance(meta, dict) or meta.get("_class_name") != cls.__name__:
            raise CheckpointError(
                "not a todsynth generator folder",
                path=directory / PIPELINE_FILE,
                fix="point to a folder written by `todsynth generator train`",
            )
        settings = config_from_file(
            PipelineFile,
            {k: v for k, v in meta.items() if k != "_class_name"},
            directory / PIPELINE_FILE,
            fix=RESAVE_FIX,
        )
        from todsynth.data.bands import stored_normalisation

        classes = ClassSpec.from_dict(settings.classes, path=directory / PIPELINE_FILE)
        normalisation = stored_normalisation(settings.normalisation, directory / PIPELINE_FILE)
        transformer = MaskControlMMDiT.from_pretrained(directory / "transformer")
        autoencoder = _load_part(load_autoencoder, "autoencoder", settings.autoencoder, directory / PIPELINE_FILE)
        text_encoder = _load_part(
            load_text_encoder, "text_encoder", settings.text_encoder, directory / PIPELINE_FILE, dtype=text_dtype
        )
        check_parts_agree(
            settings.image_size,
            classes,
            transformer.config,
            autoencoder,
            text_encoder,
            directory / PIPELINE_FILE,
            directory / "transformer" / "config.json",
        )
        try:
            pipe = cls(
                transformer,
                autoencoder,
                text_encoder,
                classes,
                settings.image_size,
                settings.prompt_template,
                normalisation=normalisation,
            )
        except CheckpointError as e:
            raise CheckpointError(e.problem, path=directory / PIPELINE_FILE, fix=e.fix) from None
        return pipe.to(device)


def check_parts_agree(
    image_size: int,
    classes: ClassSpec,
    config: Any,
    autoencoder: Any,
    text_encoder: Any,
    pipeline_path: Path,
    config_path: Path,
) -> None:
    """Refuse a pipeline.json and a transformer config.json that contradict each other: the image size the
    transformer cannot run at (or was not trained at), classes, ignore index, latent space or text widths."""
    fix = "use the pipeline.json and transformer/config.json saved together with these weights"
    f = getattr(autoencoder, "downscale", 1)
    channels = getattr(autoencoder, "latent_channels", config.in_channels)
    agree = (
        ("num_classes", config.num_classes, classes.num_classes, "the number of classes in pipeline.json"),
        ("ignore_index", config.ignore_index, classes.ignore_index, "the ignore index of the classes in pipeline.json"),
        ("in_channels", config.in_channels, channels, "the latent channels of the autoencoder in pipeline.json"),
        ("mask_downscale", config.mask_downscale, f, "the downscale factor of the autoencoder in pipeline.json"),
        (
            "mask_channels",
            config.mask_channels or channels,
            channels,
            "the latent channels of the autoencoder in pipeline.json",
        ),
        (
            "joint_attention_dim",
            config.joint_attention_dim,
            getattr(text_encoder, "token_dim", None),
            "the token width of the text encoder in pipeline.json",
        ),
        (
            "pooled_projection_dim",
            config.pooled_projection_dim,
            getattr(text_encoder, "pooled_dim", None),
            "the pooled width of the text encoder in pipeline.json",
        ),
    )
    for name, theirs, ours, what in agree:
        if ours is not None and theirs != ours:
            raise CheckpointError(f"'{name}' is {theirs}, but {what} is {ours}", path=config_path, fix=fix)
    p, table = config.patch_size, config.pos_embed_max_size
    trained = config.sample_size * f
    if image_size % f or (image_size // f) % p:
        problem = (
            f"'image_size' {image_size} is not a multiple of the autoencoder's downscale factor {f}"
            if image_size % f
            else f"'image_size' {image_size} gives a {image_size // f}-pixel latent, not "
            f"a multiple of the transformer's patch size {p}"
        )
    elif image_size // f // p > table:
        grid = image_size // f // p
        problem = (
            f"'image_size' {image_size} needs a {grid}x{grid} token grid, but the transformer's position "
            f"table holds {table}x{table} (pos_embed_max_size in {config_path})"
        )
    elif image_size != trained and table == max(config.sample_size // p, 8) * 2:  # built by `generator train`:
        # it runs at its training size; an SD3 import (another table) runs at any size its table holds
        problem = (
            f"'image_size' {image_size} is not the size the transformer was trained at: {trained} "
            f"(sample_size {config.sample_size} x downscale {f} in {config_path})"
        )
    else:
        return
    raise CheckpointError(
        problem,
        path=pipeline_path,
        fix=f"set 'image_size' to {trained}, the size the transformer was trained at, or {fix}",
    )


def _load_part(loader: Callable[..., Any], name: str, settings: dict[str, Any], path: Path, **runtime: Any) -> Any:
    """Call `loader(kind, **settings, **runtime)` for a pipeline.json entry, naming pipeline.json in what it
    refuses; `runtime` holds load-time choices that are not saved (a dtype)."""
    import inspect

    settings = dict(settings)
    kind = settings.pop("kind")
    try:
        inspect.signature(loader).bind(kind, **settings)
    except TypeError as e:
        raise CheckpointError(f"'{name}': {e}", path=path, fix=RESAVE_FIX) from None
    try:
        return loader(kind, **settings, **runtime)
    except TodsynthError as e:
        if e.path is not None:
            raise
        raise CheckpointError(f"'{name}': {e.problem}", path=path, fix=e.fix or RESAVE_FIX) from None
