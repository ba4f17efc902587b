"""The segmenter: an smp model that takes images in [0,1], normalises them itself and accepts any size."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from todsynth.checkpoint import load_pretrained
from todsynth.config import config_from_file, require
from todsynth.errors import CheckpointError, ConfigError, TodsynthError
from todsynth.io import load_weights, read_json, save_weights, write_json

ARCHS = ("unet", "deeplabv3plus", "segformer", "fpn")
DEFAULT_ENCODERS = {"unet": "resnet18", "deeplabv3plus": "resnet18", "fpn": "resnet18", "segformer": "mit_b0"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_MULTIPLE = 32
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ENCODER_FIX = "choose an smp encoder (e.g. resnet18, mit_b0, efficientnet-b0) or a timm one as 'tu-<model>'"
FOLDER_FIX = "point at a folder written by Segmenter.save_pretrained"


def check_encoder(name: str | None, source: str = "config") -> None:
    """Raise ConfigError unless `name` is an smp encoder or 'tu-' + a timm model (None = the default)."""
    if name is None:
        return
    from segmentation_models_pytorch.encoders import encoders

    known = name in encoders
    if not known and name.startswith("tu-"):
        import timm

        known = timm.is_model(name[3:])
    require(known, f"unknown encoder {name!r}", source, fix=ENCODER_FIX)


@dataclass
class SegmenterConfig:
    """Architecture of a segmenter; `encoder=None` picks a small default that needs no download.

    `normalisation` is the stored scaling of its input bands (`todsynth.data.bands.Normalisation.to_dict`;
    None: 8-bit RGB / 255, as models saved before bands); eval, synthesis and CRFM apply it.
    """

    arch: str = "unet"
    encoder: str | None = None
    num_classes: int = 7
    in_channels: int = 3
    class_names: tuple[str, ...] | None = None
    ignore_index: int = 255
    encoder_weights_file: str | None = None
    normalisation: dict[str, Any] | None = None
    size: int | None = None  # the working tile size it was trained at: evaluation predicts at it by default

    def validate(self) -> None:
        """Reject unknown architectures and inconsistent class settings."""
        require(self.arch in ARCHS, f"unknown arch {self.arch!r}; choose one of {list(ARCHS)}")
        check_encoder(self.encoder)
        require(self.num_classes >= 1, f"num_classes must be >= 1, got {self.num_classes}")
        require(self.ignore_index >= 0, f"ignore_index must be >= 0, got {self.ignore_index}")
        require(self.in_channels >= 1, f"in_channels must be >= 1, got {self.in_channels}")
        require(self.size is None or self.size >= 1, f"size must be >= 1 (or unset), got {self.size}")
        require(
            self.class_names is None or len(self.class_names) == self.num_classes,
            f"{len(self.class_names or ())} class names for {self.num_classes} classes",
        )
        if self.normalisation is not None:
            channels = self.input_normalisation().channels
            require(
                channels == self.in_channels,
                f"the stored normalisation scales {channels} band(s) but in_channels is {self.in_channels}",
            )

    def input_normalisation(self, path: str | Path = CONFIG_NAME) -> Any:
        """The stored `Normalisation` of the input bands; none stored (models saved before bands, or built in
        Python without one) means uint8 bands / 255."""
        from todsynth.data.bands import Normalisation, stored_normalisation

        if self.normalisation is None and self.in_channels != 3:
            return Normalisation("uint8", (0.0,) * self.in_channels, (255.0,) * self.in_channels)
        return stored_normalisation(self.normalisation, path)

    @property
    def encoder_name(self) -> str:
        """The encoder actually used."""
        return self.encoder or DEFAULT_ENCODERS[self.arch]

    def to_dict(self) -> dict:
        """JSON-ready form (class names as a list)."""
        d = dataclasses.asdict(self)
        d["class_names"] = None if self.class_names is None else list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict, path: str | Path | None = None) -> SegmenterConfig:
        """Build from `config.json` content; unknown keys, wrong types or values raise CheckpointError naming `path`."""
        if isinstance(d, dict) and "_class_name" in d:
            raise CheckpointError(f"not a segmenter config (a {d['_class_name']} config)", path=path, fix=FOLDER_FIX)
        return config_from_file(cls, d, path or CONFIG_NAME, fix="save the model again, or fix the setting")


class Segmenter(nn.Module):
    """smp segmentation model over [0,1] images: normalises, pads to a multiple of 32, crops logits back."""

    mean: torch.Tensor  # per-band input normalisation (buffers, not saved)
    std: torch.Tensor
    source: Path  # the config.json `from_pretrained` read, named when data does not match; unset otherwise

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        import segmentation_models_pytorch as smp

        config.validate()
        encoder_file = config.encoder_weights_file
        encoder_state = load_weights(encoder_file) if encoder_file else None
        self.config = config
        try:
            self.net = smp.create_model(
                config.arch,
                encoder_name=config.encoder_name,
                encoder_weights=None,
                in_channels=config.in_channels,
                classes=config.num_classes,
            )
        except (KeyError, ValueError) as e:  # smp's word on encoder/arch pairs it cannot build
            raise ConfigError(
                f"cannot build {config.arch} with encoder {config.encoder_name!r}: {_first_line(e)}",
                path="config",
                fix=ENCODER_FIX,
            ) from None
        mean, std = _normalisation(config.in_channels)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        if encoder_file and encoder_state is not None:
            self._load_encoder(encoder_state, Path(encoder_file))

    def _load_encoder(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        """Initialise the encoder from safetensors tensors (keys with or without 'encoder.')."""
        state = {k.removeprefix("encoder."): v for k, v in tensors.items()}
        try:
            self.net.encoder.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(
                f"encoder weights do not fit {self.config.encoder_name}: {_first_line(e)}",
                path=path,
                fix="use weights saved from the same encoder",
            ) from None

    @property
    def normalisation(self) -> Any:
        """How raw bands become this model's input (`todsynth.data.bands.Normalisation`), as trained."""
        return self.config.input_normalisation()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits N x C x H x W for images N x C_in x H x W in [0,1]; differentiable in the images."""
        h, w = images.shape[-2:]
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        x = _pad_to_multiple(x, PAD_MULTIPLE)
        return self.net(x)[..., :h, :w]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Label maps N x H x W (int64) for images in [0,1], computed in eval mode."""
        was_training = self.training
        self.eval()
        try:
            return self(images).argmax(dim=1)
        finally:
            self.train(was_training)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `model.safetensors` and `config.json` (with class names) into `directory`, atomically."""
        directory = Path(directory)
        save_weights(directory / WEIGHTS_NAME, self.state_dict(), metadata={"format": "pt"})
        write_json(directory / CONFIG_NAME, self.config.to_dict())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, expect: SegmenterConfig | None = None) -> Segmenter:
        """Load a saved segmenter; a missing file, foreign weights or a config differing from `expect` raise.

        config.json is compared with the weights' header before the model is built, so its sizes cannot
        make the loader allocate more than the weights hold.
        """
        directory = Path(directory)
        config = _read_config(directory / CONFIG_NAME)
        if expect is not None:
            _check_expected(config, expect, directory / CONFIG_NAME)
        config = dataclasses.replace(config, encoder_weights_file=None)
        model = load_pretrained(lambda: cls(config), directory / WEIGHTS_NAME, directory / CONFIG_NAME)
        if config.ignore_index < config.num_classes:  # after the header check, which names a num_classes edit
            raise CheckpointError(
                f"ignore_index {config.ignore_index} is a class label (0..{config.num_classes - 1})",
                path=directory / CONFIG_NAME,
                fix="use the config.json saved with these weights, "
                f"or an ignore_index outside 0..{config.num_classes - 1}, e.g. 255",
            )
        model.source = directory / CONFIG_NAME  # named when data does not match its stored normalisation
        return model


def _read_config(path: Path) -> SegmenterConfig:
    """Read `config.json`, turning absence or corruption into CheckpointError."""
    if not path.is_file():
        raise CheckpointError(
            "segmenter config not found", path=path, fix="point at a folder written by Segmenter.save_pretrained"
        )
    try:
        data = read_json(path)
    except TodsynthError as e:
        raise CheckpointError(e.problem, path=path, fix=e.fix) from None
    return SegmenterConfig.from_dict(data, path)


def _check_expected(found: SegmenterConfig, expect: SegmenterConfig, path: Path) -> None:
    """Raise CheckpointError listing the architecture fields where `found` differs from `expect`."""
    keys = ("arch", "encoder_name", "num_classes", "in_channels", "class_names")
    diffs = {k: (getattr(found, k), getattr(expect, k)) for k in keys if getattr(found, k) != getattr(expect, k)}
    if diffs:
        text = ", ".join(f"{k}: saved {a!r} vs expected {b!r}" for k, (a, b) in diffs.items())
        raise CheckpointError(f"checkpoint is from another configuration ({text})", path=path)


def _normalisation(channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean/std for RGB, 0.5/0.25 for other channel counts, shaped 1xCx1x1."""
    if channels == 3:
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    else:
        mean, std = torch.full((channels,), 0.5), torch.full((channels,), 0.25)
    return mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad bottom/right to a multiple of `multiple`: reflect where possible, else replicate (tiny inputs)."""
    h, w = x.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


def _first_line(e: Exception) -> str:
    """The first informative line of a (long) torch error message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300]


def config_summary(config: SegmenterConfig) -> str:
    """One-line description, e.g. 'unet/resnet18, 7 classes'."""
    return f"{config.arch}/{config.encoder_name}, {config.num_classes} classes"
