"""Model folders and their config files: each malformed or oversized file is one clear error naming it.

A config.json is compared with its weights' safetensors header before the model is built, so a config
edited to huge sizes is refused without allocating them (the `guarded` fixture fails a test that would build
such a model on a real device). docs/errors.md lists the cases under "Model and config files".
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from test_bad_inputs import raises, refused

from todsynth.errors import CheckpointError
from todsynth.generator.mmdit import MaskControlMMDiT
from todsynth.generator.pipeline import MaskToImagePipeline
from todsynth.segment.model import Segmenter

from tiny_models import TINY_SEG

FAST_S = 2.0


def edit_json(path: Path, **changes: Any) -> Path:
    """Rewrite a JSON file with keys set (a value of `...` deletes the key)."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail (before allocating) if a segmenter or MM-DiT is built on a real device from an oversized config."""

    def guard(original: Callable[..., None], too_big: Callable[[Any], bool]) -> Callable[..., None]:
        def init(self: torch.nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
            if too_big(config) and torch.empty(0).device.type != "meta":
                raise AssertionError(f"{type(self).__name__} built on a real device from {config}")
            original(self, config, *args, **kwargs)

        return init

    monkeypatch.setattr(
        Segmenter, "__init__", guard(Segmenter.__init__, lambda c: c.num_classes > 1000 or c.in_channels > 1000)
    )
    monkeypatch.setattr(
        MaskControlMMDiT,
        "__init__",
        guard(
            MaskControlMMDiT.__init__,
            lambda c: max(c.num_layers, c.hidden_size, c.pos_embed_max_size, c.num_classes) > 64,
        ),
    )


# ---------------------------------------------------------------------------------------------
# CLI settings that used to end in a traceback


def test_segment_train_refuses_an_unknown_encoder(cli_app, toy_masks_16: Path, tmp_path: Path) -> None:
    """`segment train --encoder resnet9000` names the encoder before writing anything (was a KeyError)."""
    out = tmp_path / "out"
    args = [a if a != "tu-mobilenetv3_small_050" else "resnet9000" for a in TINY_SEG]
    refused(
        cli_app,
        ["segment", "train", str(toy_masks_16), "--out", str(out), *args],
        out,
        "unknown encoder 'resnet9000'",
        "tu-<model>",
    )
    args = [a if a != "tu-mobilenetv3_small_050" else "tu-no_such_timm_model" for a in TINY_SEG]
    refused(
        cli_app,
        ["segment", "train", str(toy_masks_16), "--out", str(out), *args],
        out,
        "unknown encoder 'tu-no_such_timm_model'",
    )


@pytest.mark.parametrize(
    "option, value, name",
    [("--size", "0", "'size'"), ("--size", "-4", "'size'"), ("--batch-size", "0", "'batch_size'")],
    ids=["size_0", "size_negative", "batch_size_0"],
)
def test_segment_eval_refuses_bad_settings(
    cli_app, tiny_segmenter_dir: Path, toy_masks_16: Path, tmp_path: Path, option: str, value: str, name: str
) -> None:
    """`segment eval --size 0 / -4`, `--batch-size 0` are one error naming the setting, no metrics file."""
    out = tmp_path / "metrics"
    refused(
        cli_app,
        [
            "segment",
            "eval",
            str(tiny_segmenter_dir),
            str(toy_masks_16),
            "--split",
            "Train",
            option,
            value,
            "--json",
            str(out / "m.json"),
        ],
        out,
        name,
        f"got {value}",
    )


# ---------------------------------------------------------------------------------------------
# Malformed config files


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"encoder": "resnet9000"}, ("unknown encoder 'resnet9000'",)),
        ({"colour": "red"}, ("unknown setting 'colour'; known: [",)),
        ({"num_classes": "7"}, ("'num_classes' must be an integer, got '7'",)),
        ({"num_classes": 7.0}, ("'num_classes' must be an integer",)),
        ({"class_names": "background"}, ("'class_names' must be a list",)),
    ],
    ids=["unknown_encoder", "extra_key", "num_classes_string", "num_classes_float", "class_names_string"],
)
def test_segmenter_config_problems_name_the_file(seg: Path, changes: dict, words: tuple[str, ...]) -> None:
    """A segmenter config.json with an unknown encoder, an extra key or a wrong type names file and setting."""
    config = edit_json(seg / "config.json", **changes)
    error = raises(CheckpointError, lambda: Segmenter.from_pretrained(seg), str(config), *words)
    assert error.path == config


def test_segment_eval_refuses_a_malformed_segmenter_config(cli_app, seg: Path, toy_masks_16: Path) -> None:
    """The CLI shows the segmenter config problem as one line, exit 2 (was a KeyError traceback)."""
    config = edit_json(seg / "config.json", encoder="resnet9000")
    refused(
        cli_app, ["segment", "eval", str(seg), str(toy_masks_16), "--split", "Train"], None, str(config), "resnet9000"
    )


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"autoencoder": ...}, ("missing setting(s) ['autoencoder']",)),
        ({"image_size": "big"}, ("'image_size' must be an integer, got 'big'",)),
        ({"image_size": 0}, ("'image_size' must be >= 1, got 0",)),
        ({"guidance": 3}, ("unknown setting 'guidance'",)),
        ({"autoencoder": {"kind": "pixel", "zoom": 2}}, ("'autoencoder'", "zoom")),
        ({"autoencoder": {"kind": "gan"}}, ("unknown autoencoder 'gan'",)),
        ({"text_encoder": {}}, ("'text_encoder' needs a 'kind'",)),
    ],
    ids=[
        "no_autoencoder",
        "image_size_string",
        "image_size_0",
        "extra_key",
        "autoencoder_extra_setting",
        "autoencoder_unknown_kind",
        "text_encoder_no_kind",
    ],
)
def test_pipeline_json_problems_name_the_file(gen: Path, changes: dict, words: tuple[str, ...]) -> None:
    """A malformed pipeline.json is a CheckpointError naming it and the setting (was KeyError/ValueError)."""
    pipeline = edit_json(gen / "pipeline.json", **changes)
    error = raises(CheckpointError, lambda: MaskToImagePipeline.from_pretrained(gen), str(pipeline), *words)
    assert error.path == pipeline


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"num_layers": 2.5}, ("'num_layers' must be an integer, got 2.5",)),
        ({"num_heads": "2"}, ("'num_heads' must be an integer, got '2'",)),
        ({"control": "quadruple"}, ("'control' must be one of",)),
        ({"flash": True}, ("unknown setting 'flash'",)),
    ],
    ids=["num_layers_float", "num_heads_string", "unknown_control", "extra_key"],
)
def test_transformer_config_problems_name_the_file(gen: Path, changes: dict, words: tuple[str, ...]) -> None:
    """A malformed transformer/config.json is a CheckpointError naming it (2.5 layers was a TypeError)."""
    config = edit_json(gen / "transformer" / "config.json", **changes)
    error = raises(CheckpointError, lambda: MaskControlMMDiT.from_pretrained(gen / "transformer"), str(config), *words)
    assert error.path == config


def test_synthesize_refuses_a_malformed_generator(cli_app, gen: Path, toy_masks_16: Path, tmp_path: Path) -> None:
    """synthesize shows a malformed pipeline.json as one line, exit 2, and writes nothing."""
    pipeline = edit_json(gen / "pipeline.json", image_size="big")
    out = tmp_path / "out"
    refused(
        cli_app,
        ["synthesize", str(gen), str(toy_masks_16), str(out), "--crfm-steps", "0"],
        out,
        str(pipeline),
        "'image_size'",
    )


# ---------------------------------------------------------------------------------------------
# Oversized configs: compared with the weights' header, never allocated


def _refused_fast(call: Callable[[], object], *names: str) -> CheckpointError:
    """Assert `call()` raises a CheckpointError naming `names` within FAST_S seconds."""
    start = time.perf_counter()
    error = raises(CheckpointError, call, *names)
    assert time.perf_counter() - start < FAST_S
    return error


def test_huge_segmenter_config_is_refused_before_allocating(guarded: None, seg: Path) -> None:
    """num_classes 20,000,000 (20 GB of head weights) is refused from the header, naming the head weight."""
    config = edit_json(seg / "config.json", num_classes=20_000_000, class_names=None)
    error = _refused_fast(
        lambda: Segmenter.from_pretrained(seg),
        str(config),
        str(seg / "model.safetensors"),
        "do not match",
        "segmentation_head.0.weight",
        "20000000",
    )
    assert error.path == config
    edit_json(config, num_classes=7, in_channels=10_000_000)
    _refused_fast(lambda: Segmenter.from_pretrained(seg), str(config), "config [")


@pytest.mark.parametrize(
    "changes, words",
    [
        (
            {"num_layers": 64, "num_heads": 64, "head_dim": 128},
            ("do not match", "config [49152, 8192] vs weights [192, 32]"),
        ),
        ({"num_layers": 1_000_000_000}, ("num_layers 1000000000",)),
        ({"num_classes": 50_000_000}, ("do not match", "mask_embed.weight")),
    ],
    ids=["64x64x128", "a_billion_layers", "huge_num_classes"],
)
def test_huge_transformer_config_is_refused_before_allocating(
    guarded: None, gen: Path, changes: dict, words: tuple[str, ...]
) -> None:
    """An MM-DiT config.json edited to huge sizes is refused within seconds, naming config.json."""
    config = edit_json(gen / "transformer" / "config.json", **changes)
    error = _refused_fast(lambda: MaskToImagePipeline.from_pretrained(gen), str(config), *words)
    assert error.path == config


@pytest.mark.parametrize("encoder", ["mit_b0", "tu-mobilenetv3_small_050"])
def test_meta_build_has_the_real_shapes(encoder: str) -> None:
    """The meta build gives a real build's shapes, also for smp's MiT (which reads .item() off a linspace)."""
    from todsynth.checkpoint import build_on_meta
    from todsynth.segment.model import SegmenterConfig

    config = SegmenterConfig(arch="segformer", encoder=encoder, num_classes=3)
    meta = build_on_meta(lambda: Segmenter(config))
    assert {t.device.type for t in meta.parameters()} == {"meta"}
    real = Segmenter(config)
    assert {k: v.shape for k, v in meta.state_dict().items()} == {k: v.shape for k, v in real.state_dict().items()}
