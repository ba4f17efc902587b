"""Devices and precision of sampling, synthesis and CRFM: accelerate's device with one process too,
text encoders moved with the pipeline, bf16 autocast within tolerance of fp32."""

from __future__ import annotations

import json

import pytest
import torch

from todsynth.errors import ConfigError
from todsynth.generator.pipeline import MaskToImagePipeline
from todsynth.generator.runtime import Runtime, autocast, resolve_runtime


def _labels(n: int = 2, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 7, (n, size, size), generator=g)


def test_auto_device_is_accelerates_choice_for_one_process():
    from accelerate import PartialState

    runtime = resolve_runtime("auto")
    assert runtime.num_processes == 1 and runtime.is_main_process
    assert runtime.device == PartialState().device
    assert resolve_runtime("cpu").device == torch.device("cpu")


def test_unknown_or_missing_devices_and_precisions_are_refused():
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_runtime("warp9")
    with pytest.raises(ConfigError, match="mixed_precision"):
        resolve_runtime("cpu", "fp8")
    with pytest.raises(ConfigError, match="has none"):
        resolve_runtime("meta")  # not a device to compute on
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="has none") as info:
            resolve_runtime("cuda")
        assert "--device" in info.value.fix


def test_generator_and_segmenter_land_on_the_runtimes_device(tiny_generator_dir, tiny_segmenter_dir):
    """A device no code path would choose by itself (meta): the models can only get there by following
    the runtime, so this shows loading obeys the resolved device rather than defaulting to the CPU."""
    from todsynth.synthesize import _segmenter

    runtime = Runtime(torch.device("meta"))
    pipe = MaskToImagePipeline.for_runtime(tiny_generator_dir, runtime)
    assert pipe.device.type == "meta"
    assert {p.device.type for p in pipe.text_encoder.parameters()} == {"meta"}
    segmenter = _segmenter(str(tiny_segmenter_dir), runtime.device, pipe.classes)
    assert {p.device.type for p in segmenter.parameters()} == {"meta"}


def test_pipe_to_moves_the_text_encoder_and_sets_its_dtype(tiny_generator_dir):
    pipe = MaskToImagePipeline.from_pretrained(tiny_generator_dir)
    pipe.to("meta", text_dtype=torch.bfloat16)
    assert {p.device.type for p in pipe.text_encoder.parameters()} == {"meta"}
    assert pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.text_encoder.identity["dtype"] == "bfloat16"  # its prompt cache is not an fp32 one


def test_text_encoder_loads_in_bf16_and_its_embeddings_stay_close(tiny_generator_dir):
    fp32 = MaskToImagePipeline.from_pretrained(tiny_generator_dir)
    bf16 = MaskToImagePipeline.from_pretrained(tiny_generator_dir, text_dtype=torch.bfloat16)
    assert "dtype" not in fp32.text_encoder.identity and bf16.text_encoder.dtype == torch.bfloat16
    t32, p32 = fp32.encode_text(["a satellite image of water"])
    t16, p16 = bf16.encode_text(["a satellite image of water"])
    assert t16.dtype == p16.dtype == torch.float32
    assert torch.allclose(p16, p32, atol=0.03) and torch.allclose(t16, t32, atol=0.15)


def test_bf16_sampling_is_within_tolerance_of_fp32(tiny_generator_dir):
    pipe = MaskToImagePipeline.from_pretrained(tiny_generator_dir)
    labels = _labels()
    kw = dict(seeds=[1, 2], num_steps=4, guidance_scale=2.0)
    ref = pipe(labels, **kw)
    pipe.mixed_precision = "bf16"
    low = pipe(labels, **kw)
    latent = pipe(labels, output="latent", **kw)
    assert low.dtype == latent.dtype == torch.float32  # the Euler state is fp32 under autocast
    diff = (low - ref).abs()
    assert 0 < diff.max() < 0.1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_crfm_under_bf16_keeps_fp32_gradient_and_stays_close(tiny_generator_dir, tiny_segmenter_dir, monkeypatch):
    from todsynth.crfm import CRFMConfig, CRFMCorrector, crfm_sample
    from todsynth.segment.model import Segmenter

    pipe = MaskToImagePipeline.from_pretrained(tiny_generator_dir)
    seg = Segmenter.from_pretrained(tiny_segmenter_dir)
    labels, cfg = _labels(1), CRFMConfig(steps=2, alpha_max=0.5)
    ref = crfm_sample(pipe, seg, labels, cfg, seeds=[4], num_steps=3)
    pipe.mixed_precision = "bf16"
    seen, update = [], CRFMCorrector._update

    def spy(self, v, g, alpha, v_norm):
        seen.append((v.dtype, g.dtype, v_norm.dtype))
        return update(self, v, g, alpha, v_norm)

    monkeypatch.setattr(CRFMCorrector, "_update", spy)
    low = crfm_sample(pipe, seg, labels, cfg, seeds=[4], num_steps=3)
    assert len(seen) == 2 and all(set(d) == {torch.float32} for d in seen)  # update and normalisation in fp32
    assert (low - ref).abs().mean() < 0.02


def test_autocast_no_is_a_no_op_and_bf16_casts_matmuls():
    a = torch.randn(4, 4)
    with autocast("cpu", "no"):
        assert (a @ a).dtype == torch.float32
    with autocast("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16


def test_cli_synthesize_takes_device_and_precision(tiny_generator_dir, toy_masks_16, tmp_path):
    from typer.testing import CliRunner

    from todsynth.cli.main import app

    out = tmp_path / "syn"
    result = CliRunner().invoke(
        app,
        [
            "synthesize",
            str(tiny_generator_dir),
            str(toy_masks_16),
            str(out),
            "--num-steps",
            "2",
            "--crfm-steps",
            "0",
            "--set",
            "limit=1",
            "--device",
            "cpu",
            "--mixed-precision",
            "bf16",
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "synthesize.json").read_text())
    assert saved["mixed_precision"] == "bf16" and saved["device"] == "cpu"
    assert len(list((out / "images").glob("*.png"))) == 1
    refused = CliRunner().invoke(
        app,
        [
            "synthesize",
            str(tiny_generator_dir),
            str(toy_masks_16),
            str(out),
            "--num-steps",
            "2",
            "--crfm-steps",
            "0",
            "--set",
            "limit=1",
            "--device",
            "cpu",
        ],
    )
    assert refused.exit_code == 2 and "mixed_precision" in refused.output  # fp32 would mix into a bf16 folder
