"""Segmenter: any input size, differentiable in the image, safetensors save/load, CheckpointError cases."""

from __future__ import annotations

import json

import pytest
import torch

from todsynth.errors import CheckpointError, ConfigError
from todsynth.io import save_weights
from todsynth.segment.model import Segmenter, SegmenterConfig

TINY_ENCODER = "tu-mobilenetv3_small_050"
TINY = SegmenterConfig(arch="segformer", encoder=TINY_ENCODER, num_classes=3, class_names=("a", "b", "c"))


@pytest.fixture(scope="module")
def model() -> Segmenter:
    """A tiny randomly initialised segformer (mobilenetv3 encoder, 0.7M parameters)."""
    torch.manual_seed(0)
    return Segmenter(TINY).eval()


@pytest.mark.parametrize("hw", [(37, 45), (8, 8), (32, 64)])
def test_any_size_in_same_size_out(model, hw):
    with torch.no_grad():
        assert model(torch.rand(1, 3, *hw)).shape == (1, 3, *hw)
    assert model.predict(torch.rand(2, 3, *hw)).shape == (2, *hw)


def test_default_unet_pads_and_crops():
    torch.manual_seed(0)
    net = Segmenter(SegmenterConfig(num_classes=3)).eval()
    assert net.config.encoder_name == "resnet18"
    with torch.no_grad():
        assert net(torch.rand(1, 3, 37, 45)).shape == (1, 3, 37, 45)


def test_gradient_reaches_the_image(model):
    image = torch.rand(1, 3, 40, 40, requires_grad=True)
    model(image)[:, 1].mean().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_normalisation_is_inside_the_model(model):
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()


def test_save_load_bit_equal(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["class_names"] == ["a", "b", "c"]
    loaded = Segmenter.from_pretrained(tmp_path / "m", expect=TINY)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.eval()(x))
    assert loaded.config == TINY


def test_missing_files_name_the_file(model, tmp_path):
    with pytest.raises(CheckpointError) as e:
        Segmenter.from_pretrained(tmp_path)
    assert e.value.path == tmp_path / "config.json"
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        Segmenter.from_pretrained(tmp_path)
    assert e.value.path == tmp_path / "model.safetensors"


def test_pickle_weights_refused(model, tmp_path):
    model.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        Segmenter.from_pretrained(tmp_path)
    torch.save(model.net.encoder.state_dict(), tmp_path / "encoder.pt")
    cfg = SegmenterConfig(
        arch="segformer", encoder=TINY_ENCODER, num_classes=3, encoder_weights_file=str(tmp_path / "encoder.pt")
    )
    with pytest.raises(CheckpointError, match="pickle"):
        Segmenter(cfg)


def test_config_mismatch(model, tmp_path):
    model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="num_classes: saved 3 vs expected 4") as e:
        Segmenter.from_pretrained(
            tmp_path, expect=SegmenterConfig(arch="segformer", encoder=TINY_ENCODER, num_classes=4)
        )
    assert e.value.path == tmp_path / "config.json"
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(num_classes=5, class_names=None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match the weights") as e:
        Segmenter.from_pretrained(tmp_path)
    assert e.value.path == tmp_path / "config.json"
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "arch": "nope"}))
    with pytest.raises(CheckpointError, match="unknown arch"):
        Segmenter.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Segmenter.from_pretrained(tmp_path)


def test_encoder_initialised_from_local_safetensors(model, tmp_path):
    save_weights(tmp_path / "enc.safetensors", model.net.encoder.state_dict())
    torch.manual_seed(1)
    fresh = Segmenter(
        SegmenterConfig(
            arch="segformer",
            encoder=TINY_ENCODER,
            num_classes=3,
            encoder_weights_file=str(tmp_path / "enc.safetensors"),
        )
    )
    for k, v in model.net.encoder.state_dict().items():
        assert torch.equal(fresh.net.encoder.state_dict()[k], v)
    save_weights(tmp_path / "other.safetensors", {"conv.weight": torch.zeros(2, 3)})
    with pytest.raises(CheckpointError, match="do not fit") as e:
        Segmenter(
            SegmenterConfig(
                arch="segformer",
                encoder=TINY_ENCODER,
                num_classes=3,
                encoder_weights_file=str(tmp_path / "other.safetensors"),
            )
        )
    assert e.value.path == tmp_path / "other.safetensors"


def test_unknown_arch_is_config_error():
    with pytest.raises(ConfigError, match="unknown arch"):
        Segmenter(SegmenterConfig(arch="pspnet"))
