"""Image spaces of the generator: images in [0, 1] ↔ latents, by identity (pixels) or a diffusers VAE."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from todsynth.errors import CheckpointError, ConfigError, DataError
from todsynth.generator.text import check_pretrained_dir

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

VAE_LAYOUT = (
    "a diffusers AutoencoderKL folder holds config.json and diffusion_pytorch_model.safetensors "
    "(a pipeline folder holds them in vae/)"
)


class Autoencoder(nn.Module):
    """Base of the image spaces: encode images [B, I, H, W] in [0, 1] to latents [B, C, H/d, W/d], and back.

    `image_channels` (I) is the band count of the images (3 for a VAE; any for pixels).

    Frozen and in eval mode. `decode` is differentiable with respect to the latents (CRFM backpropagates
    a segmentation loss through it). `config` holds the keyword arguments of `load_autoencoder` that
    rebuild it; `identity` adds the latent layout, for checkpoints to tell image spaces apart.
    """

    name: str = "autoencoder"
    latent_channels: int
    downscale: int
    image_channels: int = 3

    @property
    def config(self) -> dict[str, Any]:
        """Keyword arguments of `load_autoencoder` that rebuild this autoencoder."""
        raise NotImplementedError

    @property
    def identity(self) -> dict[str, Any]:
        """The config plus the latent layout: equal identities give interchangeable latents."""
        return {
            "name": self.name,
            "config": self.config,
            "latent_channels": self.latent_channels,
            "downscale": self.downscale,
        }

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Latent (channels, height, width) for images of `height` × `width` pixels."""
        self._check_size(height, width)
        return self.latent_channels, height // self.downscale, width // self.downscale

    def encode(self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Images [B, I, H, W] in [0, 1] → latents [B, C, H/d, W/d]."""
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        """Latents [B, C, h, w] → images [B, I, h·d, w·d] clamped to [0, 1]; differentiable."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> Autoencoder:
        """Stay in eval mode: the autoencoder is frozen, so a parent's .train() must not change it."""
        return super().train(False)

    def _check_size(self, height: int, width: int) -> None:
        """Refuse image sizes the downscale factor does not divide."""
        if height % self.downscale or width % self.downscale:
            raise ConfigError(
                f"image size {height}x{width} is not a multiple of the autoencoder's downscale factor {self.downscale}"
            )


class PixelAutoencoder(Autoencoder):
    """Identity image space: latents = 2·image − 1, one latent channel per band (3 for RGB), no downscaling
    (the small default).

    `sample` and `generator` are accepted for the common interface and ignored: encoding is exact.
    """

    name = "pixel"
    downscale = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ConfigError(f"the pixel autoencoder needs channels >= 1, got {channels!r}")
        self.latent_channels = self.image_channels = channels

    @property
    def config(self) -> dict[str, Any]:
        """Keyword arguments of `load_autoencoder` that rebuild this autoencoder (RGB as before bands existed)."""
        return {"kind": "pixel"} if self.image_channels == 3 else {"kind": "pixel", "channels": self.image_channels}

    def encode(self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] → latents in [-1, 1]."""
        return images * 2 - 1

    def decode(self, latents: Tensor) -> Tensor:
        """Latents → images, clamped to [0, 1]."""
        return ((latents + 1) / 2).clamp(0, 1)


class VAEAutoencoder(Autoencoder):
    """A frozen diffusers AutoencoderKL with SD3's latent convention.

    latents = (posterior sample (or mode) of vae.encode(2x − 1) − shift_factor) · scaling_factor;
    images = (vae.decode(latents / scaling_factor + shift_factor) + 1) / 2, clamped to [0, 1].
    """

    name = "vae"

    def __init__(self, vae: AutoencoderKL, path: str | Path | None = None, subfolder: str | None = None):
        super().__init__()
        self.vae = vae
        self.path = None if path is None else str(path)
        self.subfolder = subfolder
        config = vae.config
        self.latent_channels = int(config.latent_channels)
        self.downscale = 2 ** (len(config.block_out_channels) - 1)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(config.shift_factor or 0.0)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, subfolder: str | None = None, dtype: torch.dtype | None = None
    ) -> VAEAutoencoder:
        """Load an AutoencoderKL (safetensors only) from a bare VAE folder or a pipeline folder's vae/."""
        from diffusers import AutoencoderKL

        root = Path(folder)
        if subfolder is None and (root / "vae").is_dir():
            subfolder = "vae"
        target = root / subfolder if subfolder else root
        check_pretrained_dir(target, "diffusion_pytorch_model", VAE_LAYOUT)
        kw = {} if dtype is None else {"torch_dtype": dtype}
        try:
            vae = AutoencoderKL.from_pretrained(str(target), use_safetensors=True, local_files_only=True, **kw)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load the VAE: {e}", path=target, fix=VAE_LAYOUT) from e
        return cls(vae, path=root, subfolder=subfolder)

    @property
    def config(self) -> dict[str, Any]:
        """Keyword arguments of `load_autoencoder` that rebuild this autoencoder."""
        return {"kind": "vae", "path": self.path, "subfolder": self.subfolder}

    @property
    def identity(self) -> dict[str, Any]:
        """The config plus latent layout and SD3 scaling constants."""
        return {**super().identity, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor}

    def encode(self, images: Tensor, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] → scaled latents; `sample` draws from the posterior (as SD3 training does),
        otherwise its mode (mean) is used, e.g. for evaluation."""
        self._check_size(images.shape[-2], images.shape[-1])
        posterior = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        z = posterior.sample(generator) if sample else posterior.mode()
        return ((z - self.shift_factor) * self.scaling_factor).to(images.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents → images clamped to [0, 1]; differentiable with respect to the latents."""
        z = latents / self.scaling_factor + self.shift_factor
        images = self.vae.decode(z.to(self.vae.dtype)).sample
        return ((images.to(latents.dtype) + 1) / 2).clamp(0, 1)


def load_autoencoder(
    kind: str = "pixel", path: str | Path | None = None, subfolder: str | None = None, channels: int = 3
) -> Autoencoder:
    """Build an image space by kind: "pixel" (identity of `channels` bands, default) or "vae" (a local diffusers
    VAE: RGB only, other band counts are refused)."""
    if kind == "pixel":
        return PixelAutoencoder(channels)
    if kind == "vae":
        if channels != 3:
            raise ConfigError(
                f"the vae autoencoder (SD3's VAE) encodes 3-band RGB images, but the data has {channels} band(s)",
                fix="use autoencoder pixel for multi-band data, or select 3 bands with 'bands:' in data.yaml",
            )
        if path is None:
            raise ConfigError("the vae autoencoder needs path= (a local diffusers VAE or pipeline folder)")
        return VAEAutoencoder.from_pretrained(path, subfolder=subfolder)
    raise ConfigError(f"unknown autoencoder {kind!r}; known: 'pixel', 'vae'")


def encode_mask_rgb(label: Tensor, num_classes: int, ignore_index: int = 255, channels: int = 3) -> Tensor:
    """Label maps [B, H, W] → grey images [B, channels, H, W] in [0, 1] (RGB by default), the reference mask
    encoding, with as many bands as the autoencoder's images.

    Grey level = label·255/num_classes (ignored pixels → 0), divided by 255; not rounded to 8 bits.
    Note that class 0 and ignored pixels share grey level 0, as in the reference code.
    """
    if label.dim() != 3:
        raise DataError(f"label maps must be [B, H, W], got shape {tuple(label.shape)}")
    ignored = label == ignore_index
    if bool(((label < 0) | (label >= num_classes))[~ignored].any()):
        raise DataError(f"label values must be in 0..{num_classes - 1} or {ignore_index} (ignored)")
    grey = torch.where(ignored, 0.0, label.to(torch.float32) * 255 / num_classes) / 255
    return grey.unsqueeze(1).expand(-1, channels, -1, -1).contiguous()
