"""A generative foundation: pretraining on unlabeled images, and fine-tuning from the base (--init)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from todsynth.config import build_config
from todsynth.errors import CheckpointError, ConfigError, DataError
from todsynth.generator.pretrain import (
    PRETRAIN_PROMPT,
    TOY_POOL_START,
    load_unlabeled,
    pretrain_config,
    pretrain_generator,
    toy_pool_indices,
)
from todsynth.generator.train import GeneratorTrainConfig, build_pipeline, train_generator

from gentest_helpers import two_processes_vs_one, weights

TINY = {
    "size": 16,
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.head_dim": 8,
    "batch_size": 4,
    "val_every": 0,
    "val_samples": 2,
    "val_steps": 2,
    "checkpoint_every": 2,
    "progress": False,
    "warmup_steps": 1,
    "text_max_length": 8,
}


def tiny_pretrain(data: str, out: Path, **kw) -> GeneratorTrainConfig:
    return pretrain_config(data, str(out), **{**TINY, "steps": 4, **kw})


def tiny_train(data: Path, out: Path, **kw) -> GeneratorTrainConfig:
    return build_config(GeneratorTrainConfig, {**TINY, "data": str(data), "out": str(out), "steps": 2, **kw})


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    from todsynth.data.toy import write_toy_dataset

    return write_toy_dataset(tmp_path_factory.mktemp("toy") / "toy", n=6, size=16, seed=3)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "base"
    pretrain_generator(tiny_pretrain("toy:12", out, val_every=4, lr=3e-2))  # large steps: gates well away from 0
    return out


def test_pretrain_then_load_then_fine_tune_from_the_base(base, toy, tmp_path):
    """The base is an ordinary generator folder (it samples); `generator train --init` fine-tunes from it."""
    from typer.testing import CliRunner

    from todsynth.cli.main import app
    from todsynth.generator.pipeline import MaskToImagePipeline

    pipe = MaskToImagePipeline.from_pretrained(base / "model")
    assert pipe.transformer.config.control == "none" and not hasattr(pipe.transformer, "mask_embed")
    images = pipe(torch.zeros(2, 16, 16, dtype=torch.long), [PRETRAIN_PROMPT] * 2, seeds=[1, 2], num_steps=2)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert (base / "val" / "step_000004.png").is_file()
    assert json.loads((base / "config.json").read_text())["train_text"] is True  # text + image streams pretrain

    out = tmp_path / "ft"
    args = [
        "generator",
        "train",
        str(toy),
        "--out",
        str(out),
        "--init",
        str(base),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--size",
        "16",
        "--control",
        "triple",
    ]
    args += [
        a
        for k, v in (
            ("model.num_layers", 1),
            ("model.num_heads", 2),
            ("model.head_dim", 8),
            ("val_every", 0),
            ("text_max_length", 8),
            ("progress", "false"),
        )
        for a in ("--set", f"{k}={v}")
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    tuned = MaskToImagePipeline.from_pretrained(out / "model")
    assert tuned.transformer.config.control == "triple"
    # text stream frozen (the paper's policy): the fine-tuned model keeps the base's text weights
    before, after = weights(base), weights(out)
    text = [k for k in before if (k.startswith("blocks.") and ".text." in k) or k.startswith("context_embed.")]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert not torch.equal(before["blocks.0.image.qkv.weight"], after["blocks.0.image.qkv.weight"])


def test_pretrain_cli_writes_a_base(tmp_path):
    from typer.testing import CliRunner

    from todsynth.cli.main import app

    args = [
        "generator",
        "pretrain",
        "toy:4",
        "--out",
        str(tmp_path / "b"),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--size",
        "16",
        "--prompt",
        "an aerial photo",
    ]
    args += [
        a
        for k, v in (
            ("model.num_layers", 1),
            ("model.num_heads", 2),
            ("model.head_dim", 8),
            ("val_every", 0),
            ("text_max_length", 8),
            ("progress", "false"),
        )
        for a in ("--set", f"{k}={v}")
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert (cfg["model"]["control"], cfg["unlabeled"], cfg["train_text"]) == ("none", True, True)
    assert cfg["prompt"] == "an aerial photo"
    assert (tmp_path / "b" / "model" / "pipeline.json").is_file()


def _init_model(base: Path, control: str):
    from todsynth.data.classes import LOVEDA

    return build_pipeline(
        build_config(GeneratorTrainConfig, {**TINY, "data": "x", "model.control": control, "init": str(base)}), LOVEDA
    ).transformer


def _stream(state: dict, block: int, stream: str) -> dict:
    prefix = f"blocks.{block}.{stream}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _inputs(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    text = torch.randn(2, 8, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    mask = torch.randint(0, cfg.num_classes, (2, 16, 16), generator=g)
    return x, torch.tensor([0.3, 0.8]), text, pooled, mask


def test_init_copies_the_pretrained_image_stream_into_the_mask_stream(base):
    """triple: mask stream == base image stream, parameter by parameter; siamese shares the image stream;
    adapter's zero-initialised branch leaves the base's output unchanged at step 0."""
    from todsynth.generator.mmdit import MaskControlMMDiT

    base_state = weights(base)
    base_model = MaskControlMMDiT.from_pretrained(base / "model" / "transformer").eval()
    triple = _init_model(base, "triple")
    state = triple.state_dict()
    for k, v in base_state.items():  # every base weight (text, image, embedders, output) is taken over
        assert torch.equal(state[k], v), k
    last = triple.config.num_layers - 1
    for i in range(triple.config.num_layers):
        image, mask = _stream(base_state, i, "image"), _stream(state, i, "mask")
        for k, v in mask.items():
            if i == last and k.startswith("ada."):  # pre-only last block: (scale, shift) of the image's msa
                dim = triple.config.hidden_size
                assert torch.equal(v, torch.cat([image[k][dim : 2 * dim], image[k][:dim]]))
            else:
                assert torch.equal(v, image[k]), (i, k)
        assert set(mask) <= set(image)

    siamese = _init_model(base, "siamese")
    assert all(blk.mask is None for blk in siamese.blocks)
    assert all(torch.equal(siamese.state_dict()[k], v) for k, v in base_state.items())
    siamese.mask_embed.load_state_dict(triple.mask_embed.state_dict())  # the one fresh layer: same draw
    with torch.no_grad():
        inputs = _inputs(triple)
        out = triple.eval()(*inputs)
        torch.testing.assert_close(out, siamese.eval()(*inputs), rtol=0, atol=1e-5)
        other_mask = (inputs[-1] + 1) % triple.config.num_classes
        assert (out - triple(*inputs[:-1], other_mask)).abs().max() > 1e-3  # the mask does matter

        adapter = _init_model(base, "adapter").eval()
        x, t, text, pooled, mask = _inputs(adapter, 1)
        with_mask = adapter(x, t, text, pooled, mask)
        assert torch.equal(with_mask, base_model(x, t, text, pooled))
        assert with_mask.abs().sum() > 0  # the base is trained: the comparison is not 0 == 0


def test_lora_on_the_pretrained_streams_keeps_fresh_mask_layers_trainable(base):
    from todsynth.data.classes import LOVEDA
    from todsynth.generator.train import apply_freezing

    cfg = build_config(
        GeneratorTrainConfig, {**TINY, "data": "x", "model.control": "adapter", "init": str(base), "lora_rank": 2}
    )
    model = build_pipeline(cfg, LOVEDA).transformer
    apply_freezing(model, cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any(n.startswith("mask_embed.") for n in trainable)
    assert any(n.startswith("adapter.") for n in trainable)
    assert not any(".text." in n or n.startswith(("patch_embed.", "cond_embed.")) for n in trainable)
    assert not any(".image." in n and "lora_" not in n for n in trainable)


def _save_fake_base(base: Path, out: Path, **changes) -> Path:
    """A copy of `base` whose transformer has other architecture settings."""
    from todsynth.generator.mmdit import MaskControlMMDiT, MMDiTConfig

    shutil.copytree(base / "model", out / "model")
    raw = json.loads((base / "model" / "transformer" / "config.json").read_text())
    cfg = MMDiTConfig(**{k: v for k, v in {**raw, **changes}.items() if k != "_class_name"})
    MaskControlMMDiT(cfg).save_pretrained(out / "model" / "transformer")
    return out


@pytest.mark.parametrize(
    "changes, setting",
    [
        ({"num_layers": 2}, "num_layers=2"),
        ({"head_dim": 16}, "head_dim=16"),
        ({"in_channels": 4}, "in_channels=4"),
        ({"control": "triple"}, "control 'triple'"),
    ],
)
def test_a_base_of_another_architecture_is_refused_before_training(base, toy, tmp_path, changes, setting):
    other = _save_fake_base(base, tmp_path / "other", **changes)
    out = tmp_path / "ft"
    with pytest.raises(CheckpointError, match=setting) as info:
        train_generator(tiny_train(toy, out, init=str(other)))
    assert info.value.path == other / "model"
    assert not (out / "checkpoint").exists() and not (out / "config.json").exists()


def test_a_base_of_another_image_size_or_a_missing_base_is_refused(base, toy, tmp_path):
    with pytest.raises(CheckpointError, match="size=16, this run has size=32") as info:
        train_generator(tiny_train(toy, tmp_path / "a", init=str(base), size=32, crop="resize"))  # 16-px tiles
    assert info.value.path == base / "model"
    with pytest.raises(CheckpointError, match="no base model here") as info:
        train_generator(tiny_train(toy, tmp_path / "b", init=str(tmp_path / "nowhere")))
    assert info.value.path == tmp_path / "nowhere"


def test_config_checks():
    with pytest.raises(ConfigError, match="control none"):
        build_config(GeneratorTrainConfig, {"data": "toy:4", "unlabeled": True, "model.control": "triple"})
    with pytest.raises(ConfigError, match="give one"):
        GeneratorTrainConfig(data="d", init="b", sd3_path="s").validate()
    with pytest.raises(ConfigError, match="unlabeled pretraining"):
        GeneratorTrainConfig(data="toy:4").validate()
    with pytest.raises(ConfigError, match="toy:N"):
        load_unlabeled(pretrain_config("toy:x", "o", size=16))
    with pytest.raises(ConfigError, match="control none"):
        pretrain_generator(GeneratorTrainConfig(data="toy:4", unlabeled=False))


def test_pretraining_resumes_exactly(tmp_path):
    """Stopped twice (like a kill after a checkpoint), then resumed: bitwise the uninterrupted base."""
    pretrain_generator(tiny_pretrain("toy:6", tmp_path / "straight", ema_decay=0.9))
    pretrain_generator(tiny_pretrain("toy:6", tmp_path / "resumed", ema_decay=0.9, stop_after=2, resume="auto"))
    pretrain_generator(tiny_pretrain("toy:6", tmp_path / "resumed", ema_decay=0.9, stop_after=3, resume="auto"))
    pretrain_generator(tiny_pretrain("toy:6", tmp_path / "resumed", ema_decay=0.9, resume=True))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(CheckpointError, match="other settings"):
        pretrain_generator(tiny_pretrain("toy:7", tmp_path / "resumed", resume=True))


def test_pretraining_on_a_folder_of_images_without_masks(toy, tmp_path):
    """Images directly in a folder or in images/ (no masks/, no classes.yaml); captions for some of them."""
    from todsynth.data.readers import open_dataset

    src = open_dataset(toy)
    flat = tmp_path / "flat"
    nested = tmp_path / "nested" / "images"
    for folder in (flat, nested):
        folder.mkdir(parents=True)
        for i in range(len(src)):
            shutil.copy(src.paths(i)[0], folder / f"img_{i}.png")
    (tmp_path / "captions.json").write_text(json.dumps({"img_1": "a satellite image of a river"}))
    cfg = tiny_pretrain(str(flat), tmp_path / "run", captions=str(tmp_path / "captions.json"))
    data, classes = load_unlabeled(cfg)
    assert data.ids == [f"img_{i}" for i in range(len(src))] and classes.names == ("unlabelled",)
    assert data.prompts[1] == "a satellite image of a river" and data.prompts[0] == PRETRAIN_PROMPT
    assert data.images.shape == (len(src), 3, 16, 16) and (data.labels == 255).all()
    nested_data, _ = load_unlabeled(tiny_pretrain(str(nested.parent), tmp_path / "n"))
    assert torch.equal(nested_data.images, data.images)
    summary = pretrain_generator(cfg)
    assert summary.steps == 4 and (tmp_path / "run" / "model" / "pipeline.json").is_file()


def test_masks_of_a_labelled_dataset_are_ignored(toy, tmp_path):
    """A LoveDA-layout dataset: its images pretrain; its masks are never read (a broken one does no harm)."""
    from todsynth.data.readers import open_dataset

    copy = tmp_path / "labelled"
    shutil.copytree(toy, copy)
    ds = open_dataset(copy)
    ds.paths(0)[1].write_bytes(b"not a png")
    data, classes = load_unlabeled(tiny_pretrain(str(copy), tmp_path / "run"))
    assert data.ids == list(ds.ids) and classes == ds.classes
    assert set(data.prompts) == {PRETRAIN_PROMPT} and (data.labels == 255).all()
    first = torch.from_numpy(ds.load_image(1)).permute(2, 0, 1).float() / 255
    assert torch.equal(data.images[1], first)
    ds.paths(2)[0].write_bytes(b"not a png either")  # an unreadable image is reported with its file
    with pytest.raises(DataError, match="cannot read image") as info:
        load_unlabeled(tiny_pretrain(str(copy), tmp_path / "run"))
    assert str(ds.paths(2)[0]) in str(info.value)
    with pytest.raises(DataError, match="no images found"):
        (tmp_path / "empty" / "images").mkdir(parents=True)
        load_unlabeled(tiny_pretrain(str(tmp_path / "empty"), tmp_path / "run"))


def test_toy_pool_is_disjoint_from_every_labelled_layout_and_test_tile(tmp_path):
    """The pool's tiles (indices from TOY_POOL_START) are none of the tiles the experiments and the demo draw."""
    from todsynth.demo import BUDGETS
    from todsynth.experiment import resolve_counts, settings_from, stage_data
    from todsynth.grid import expand, load_grid

    paths = stage_data(settings_from(BUDGETS["tiny"]), tmp_path, log=lambda m: None)
    used = {
        int(p.stem.split("_")[1])
        for key in ("real", "layouts", "test", "oracle")
        for p in Path(paths[key]).rglob("toy_*.png")
    }
    assert used and not used & set(toy_pool_indices(100))
    # the largest index any built-in grid (or the demo) can draw stays below the pool
    cells: list[dict] = []
    for name in ("paper-tables", "foundation"):
        grid = load_grid(name)
        cells += [{**grid["base"], **over} for table in expand(grid).values() for over in table.values()]
    for values in cells + [BUDGETS["demo"]]:
        d = resolve_counts(settings_from(values)).data
        assert max(d.n_real, 100_000 + d.n_layouts, 500_000 + d.n_test) < TOY_POOL_START
    data, _ = load_unlabeled(pretrain_config("toy:3:5", "o", size=16))
    assert data.ids == [f"toy_{i}" for i in range(TOY_POOL_START, TOY_POOL_START + 3)]


def test_two_processes_pretrain_like_one(tmp_path):
    """`accelerate launch --cpu --num_processes 2 ... generator pretrain` gives the base one process gives."""
    args = [
        "generator",
        "pretrain",
        "toy:8",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--size",
        "16",
        "--set",
        "model.num_layers=1",
        "--set",
        "model.num_heads=2",
        "--set",
        "model.head_dim=8",
        "--set",
        "val_every=0",
        "--set",
        "augment=false",
        "--set",
        "text_max_length=8",
        "--set",
        "progress=false",
    ]
    assert two_processes_vs_one(args, tmp_path) < 1e-4
