"""Image spaces: pixel identity, diffusers VAE with SD3 scaling, mask-to-RGB encoding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from todsynth.errors import CheckpointError, ConfigError, DataError
from todsynth.generator.autoencoder import (
    PixelAutoencoder,
    VAEAutoencoder,
    encode_mask_rgb,
    load_autoencoder,
)

SCALE, SHIFT = 1.5, 0.1


def _tiny_vae(shift: float | None = SHIFT):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = {"down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        **blocks,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=SCALE,
        shift_factor=shift,
    ).eval()


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vae")
    _tiny_vae().save_pretrained(root, safe_serialization=True)
    return root


@pytest.fixture(scope="module")
def ae(vae_folder) -> VAEAutoencoder:
    return VAEAutoencoder.from_pretrained(vae_folder)


def _images(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_pixel_round_trip_and_layout():
    ae = PixelAutoencoder()
    images = _images()
    latents = ae.encode(images)
    assert latents.shape == images.shape and latents.min() >= -1 and latents.max() <= 1
    torch.testing.assert_close(ae.decode(latents), images, atol=1e-7, rtol=0)
    assert ae.decode(torch.full((1, 3, 2, 2), 5.0)).max() == 1
    assert (ae.latent_channels, ae.downscale, ae.latent_shape(16, 8)) == (3, 1, (3, 16, 8))


def test_vae_matches_diffusers_with_sd3_scaling(ae, vae_folder):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder)
    images = _images()
    latents = ae.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        posterior = vae.encode(images * 2 - 1).latent_dist
        expected = (posterior.sample(torch.Generator().manual_seed(3)) - SHIFT) * SCALE
        expected_mode = (posterior.mode() - SHIFT) * SCALE
        decoded = ((vae.decode(expected / SCALE + SHIFT).sample + 1) / 2).clamp(0, 1)
    assert latents.shape == (2, 4, 8, 8) and (ae.latent_channels, ae.downscale) == (4, 2)
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(ae.encode(images, sample=False), expected_mode, atol=1e-6, rtol=0)
    assert (latents - expected_mode).abs().max() > 1e-4
    out = ae.decode(latents)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(out, decoded, atol=1e-6, rtol=0)


def test_vae_decode_is_differentiable_but_weights_frozen(ae):
    latents = torch.randn(1, 4, 8, 8, requires_grad=True)
    ae.decode(latents).mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in ae.parameters())
    torch.nn.ModuleDict({"ae": ae}).train()
    assert not ae.training and not ae.vae.training


def test_vae_loads_from_pipeline_folder_and_without_shift(tmp_path):
    _tiny_vae(shift=None).save_pretrained(tmp_path / "vae", safe_serialization=True)
    ae = load_autoencoder("vae", tmp_path)
    assert ae.config == {"kind": "vae", "path": str(tmp_path), "subfolder": "vae"}
    assert (ae.scaling_factor, ae.shift_factor) == (SCALE, 0.0)
    assert load_autoencoder(**ae.config).identity == ae.identity


def test_vae_missing_or_pickle_only_is_a_checkpoint_error(vae_folder, tmp_path):
    with pytest.raises(CheckpointError) as info:
        VAEAutoencoder.from_pretrained(tmp_path / "absent")
    assert "absent" in str(info.value)
    pickled = tmp_path / "pickled"
    shutil.copytree(vae_folder, pickled)
    (pickled / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(_tiny_vae().state_dict(), pickled / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle") as info:
        VAEAutoencoder.from_pretrained(pickled)
    assert "pickled" in str(info.value)


def test_sizes_and_factory_errors(ae):
    with pytest.raises(ConfigError, match="multiple"):
        ae.encode(torch.rand(1, 3, 15, 16))
    with pytest.raises(ConfigError, match="needs path"):
        load_autoencoder("vae")
    with pytest.raises(ConfigError, match="unknown autoencoder"):
        load_autoencoder("vqgan")
    assert isinstance(load_autoencoder(), PixelAutoencoder)


def test_encode_mask_rgb_grey_levels():
    label = torch.tensor([[[0, 1, 2], [3, 255, 1]]])
    rgb = encode_mask_rgb(label, num_classes=4)
    assert rgb.shape == (1, 3, 2, 3)
    expected = torch.tensor([[0, 1, 2], [3, 0, 1]]) * 255 / 4 / 255
    for channel in rgb[0]:
        torch.testing.assert_close(channel, expected.float())
    with pytest.raises(DataError):
        encode_mask_rgb(torch.tensor([[[4]]]), num_classes=4)
