"""Findings of a new-user trial: each is refused with one clear message naming the file or flag, before anything
is written (or, where that is the decision, handled as docs/errors.md says)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from test_bad_inputs import _write, raises, refused
from test_model_files import edit_json

from todsynth.errors import CheckpointError, ConfigError, DataError

from reliability_helpers import invoke
from tiny_models import TINY_GEN

SYNTH_FAST = ["--crfm-steps", "0", "--num-steps", "1", "--set", "limit=1"]


# ---------------------------------------------------------------------------------------------
# 1, 5: pipeline.json and transformer/config.json that contradict each other


@pytest.mark.parametrize(
    "size, words",
    [
        (100000, "token grid"),
        (2000, "1000x1000 token grid"),
        (32, "trained at: 16"),
        (18, "trained at: 16"),
        (8, "trained at: 16"),
        (17, "not a multiple of the transformer's patch size 2"),
    ],
)
def test_an_image_size_the_transformer_cannot_run_is_refused_when_loading(gen: Path, size: int, words: str) -> None:
    """`image_size` beyond the position table, off the patch grid or other than the training size: CheckpointError
    naming pipeline.json when the pipeline loads (was an allocation failure, a ValueError, or silent)."""
    from todsynth.generator.pipeline import MaskToImagePipeline

    pipeline = edit_json(gen / "pipeline.json", image_size=size)
    raises(CheckpointError, lambda: MaskToImagePipeline.from_pretrained(gen), str(pipeline), words, "image_size")


def test_an_sd3_style_position_table_runs_at_any_size_it_holds(gen: Path) -> None:
    """A transformer whose position table is not the one `generator train` builds (an SD3 import) is not tied to
    sample_size x downscale: it loads at any size its table holds."""
    from todsynth.generator.pipeline import MaskToImagePipeline

    edit_json(gen / "transformer" / "config.json", pos_embed_max_size=24)
    edit_json(gen / "pipeline.json", image_size=32)
    assert MaskToImagePipeline.from_pretrained(gen).image_size == 32


def test_synthesize_refuses_a_huge_image_size_before_writing(
    cli_app, gen: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """The CLI path of the finding: one error line, no allocation, no output folder."""
    edit_json(gen / "pipeline.json", image_size=100000)
    out = tmp_path / "out"
    refused(
        cli_app,
        ["synthesize", str(gen), str(toy_masks_16), str(out), *SYNTH_FAST],
        out,
        str(gen / "pipeline.json"),
        "position table",
    )


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"mask_channels": 100000000}, ("'mask_channels' is 100000000", "latent channels")),
        ({"sample_size": 1000000}, ("sample_size 1000000", "pos_embed_max_size 16")),
        ({"ignore_index": 3}, ("'ignore_index' is 3", "the ignore index of the classes in pipeline.json is 255")),
        ({"ignore_index": 254}, ("'ignore_index' is 254", "255")),
        ({"ignore_index": -5}, ("ignore_index", ">= 0")),
    ],
    ids=["mask_channels", "sample_size", "ignore_index_a_class", "ignore_index_other", "ignore_index_negative"],
)
def test_transformer_config_contradicting_pipeline_json_is_refused(
    gen: Path, changes: dict, words: tuple[str, ...]
) -> None:
    """Edits the weights' header cannot see (they size no tensor) are checked against pipeline.json."""
    from todsynth.generator.pipeline import MaskToImagePipeline

    config = edit_json(gen / "transformer" / "config.json", **changes)
    raises(CheckpointError, lambda: MaskToImagePipeline.from_pretrained(gen), str(config), *words)


def test_segment_eval_refuses_a_negative_ignore_index(cli_app, seg: Path, toy_masks_16: Path) -> None:
    """A segmenter config.json with ignore_index -5 or a class label (was accepted and scored)."""
    config = edit_json(seg / "config.json", ignore_index=-5)
    refused(
        cli_app,
        ["segment", "eval", str(seg), str(toy_masks_16), "--device", "cpu"],
        None,
        str(config),
        "ignore_index must be >= 0",
    )
    edit_json(config, ignore_index=3)
    refused(
        cli_app,
        ["segment", "eval", str(seg), str(toy_masks_16), "--device", "cpu"],
        None,
        str(config),
        "ignore_index 3 is a class label (0..6)",
    )


# ---------------------------------------------------------------------------------------------
# 2: segment eval --device


def test_segment_eval_refuses_an_unknown_device_like_segment_train(
    cli_app, tiny_segmenter_dir: Path, toy_masks_16: Path
) -> None:
    """`--device tpu` is the same one-line error in eval as in train (was a traceback)."""
    words = "'device' must be one of ['auto', 'cpu', 'cuda'], got 'tpu'"
    refused(
        cli_app,
        ["segment", "eval", str(tiny_segmenter_dir), str(toy_masks_16), "--device", "tpu"],
        None,
        words,
        "--device",
    )
    refused(cli_app, ["segment", "train", str(toy_masks_16), "--device", "tpu"], None, words)


# ---------------------------------------------------------------------------------------------
# 3, 4, 6: synthesize and generator sample output folders


def test_a_refused_synthesize_rerun_leaves_the_finished_folder_as_it_was(
    cli_app, tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """Other settings than synthesize.json: refused before .claims/ and .records/ are created."""
    out = tmp_path / "out"
    args = ["synthesize", str(tiny_generator_dir), str(toy_masks_16), str(out), *SYNTH_FAST]
    assert invoke(cli_app, args).exit_code == 0
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert ".claims" not in before and ".records" not in before
    refused(cli_app, [*args, "--seed", "7"], None, str(out / "synthesize.json"), "other settings", "seed: 0 -> 7")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


def test_generator_sample_refuses_an_output_folder_inside_an_input(
    cli_app, gen: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """`generator sample MODEL MASKS MASKS/...` (was samples.png written into the dataset), and into the model."""
    masks = Path(shutil.copytree(toy_masks_16, tmp_path / "masks"))
    for out, what in (
        (masks / "Train" / "Urban" / "images_png", "masks dataset"),
        (masks, "masks dataset"),
        (gen / "grids", "generator folder"),
    ):
        refused(
            cli_app,
            ["generator", "sample", str(gen), str(masks), str(out), "--n", "1", "--num-steps", "1"],
            None,
            str(out),
            what,
            "outside every input",
        )
    assert not list(tmp_path.rglob("samples.png"))


def test_plain_synthesize_says_how_to_go_without_a_segmenter(
    cli_app, tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """CRFM is the default: its refusal names both ways out as flags."""
    out = tmp_path / "out"
    refused(
        cli_app,
        ["synthesize", str(tiny_generator_dir), str(toy_masks_16), str(out)],
        out,
        "needs a guidance segmenter",
        "--segmenter SEG",
        "--crfm-steps 0",
    )


# ---------------------------------------------------------------------------------------------
# 7: class mismatches give counts, not hundreds of names


MANY = [f"class{i:03d}" for i in range(300)]
SEVEN = ["background", "building", "road", "water", "barren", "forest", "agriculture"]


@pytest.mark.parametrize("guide, data", [(MANY, SEVEN), (SEVEN, MANY)], ids=["guide_300", "masks_300"])
def test_guide_class_mismatch_gives_counts_and_a_few_names(guide: list[str], data: list[str]) -> None:
    """The guidance segmenter's classes against the masks', both ways round: counts and at most 5 names each."""
    from todsynth.data.classes import ClassSpec
    from todsynth.synthesize import check_segmenter_classes

    config = SimpleNamespace(num_classes=len(guide), class_names=guide)
    error = raises(
        CheckpointError,
        lambda: check_segmenter_classes(config, ClassSpec(tuple(data), 65535), "seg/config.json"),
        f"predicts {len(guide)} classes",
        f"use {len(data)} classes",
    )
    assert len(str(error)) < 400 and "class299" not in str(error), str(error)


def test_segment_eval_class_mismatch_gives_counts(tmp_path: Path) -> None:
    """`segment eval` of a 300-class dataset with a 7-class model: counts, not 300 names."""
    from todsynth.segment.train import _eval_dataset

    root = tmp_path / "many"
    (root / "classes.yaml").parent.mkdir()
    (root / "classes.yaml").write_text(json.dumps({"names": MANY, "ignore_index": 65535}))
    _write(root / "images" / "a.png", np.zeros((8, 8, 3), np.uint8))
    _write(root / "masks" / "a.png", np.zeros((8, 8), np.uint8))
    model = SimpleNamespace(config=SimpleNamespace(class_names=SEVEN))
    error = raises(DataError, lambda: _eval_dataset(root, "Val", model), "300 classes", "7 classes")
    assert len(str(error)) < 400, str(error)


# ---------------------------------------------------------------------------------------------
# 8, 9: readers and pretraining data


def test_an_image_linked_out_of_the_root_is_one_problem(folder_dataset: Path, tmp_path: Path) -> None:
    """images/tile1.png linked out of the root: 'points outside' only, not also 'masks/tile1.png: mask has no image'."""
    from todsynth.data.check import check_dataset

    outside = _write(tmp_path / "elsewhere" / "tile1.png", np.zeros((8, 8, 3), np.uint8))
    (folder_dataset / "images" / "tile1.png").unlink()
    os.symlink(outside, folder_dataset / "images" / "tile1.png")
    problems = [str(p) for p in check_dataset(folder_dataset).problems]
    assert len(problems) == 1 and "points outside the dataset root" in problems[0], problems


def test_pretraining_reads_only_the_images_of_a_folder_dataset(folder_dataset: Path, tmp_path: Path) -> None:
    """Mask problems do not refuse pretraining (it never reads masks); an image linked out of the root still does."""
    from todsynth.generator.pretrain import load_unlabeled, pretrain_config

    (folder_dataset / "masks" / "tile2.png").unlink()
    _write(folder_dataset / "masks" / "tile9.png", np.zeros((8, 8), np.uint8))
    cfg = pretrain_config(str(folder_dataset), str(tmp_path / "run"), size=8)
    data, classes = load_unlabeled(cfg)
    assert data.ids == ["tile0", "tile1", "tile2", "tile3"] and classes.names == ("background", "building", "water")
    outside = _write(tmp_path / "elsewhere" / "tile1.png", np.zeros((8, 8, 3), np.uint8))
    (folder_dataset / "images" / "tile1.png").unlink()
    os.symlink(outside, folder_dataset / "images" / "tile1.png")
    error = raises(
        DataError,
        lambda: load_unlabeled(cfg),
        str(folder_dataset / "images" / "tile1.png"),
        "points outside the dataset root",
    )
    assert "mask" not in str(error), str(error)


def test_pretrain_on_an_empty_folder_names_what_it_accepts(cli_app, tmp_path: Path) -> None:
    """An empty folder: 'no images found', and the fix names image folders (images/ too) and toy:N."""
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    refused(
        cli_app,
        ["generator", "pretrain", str(empty), "--out", str(out), *TINY_GEN],
        out,
        str(empty),
        "no images found",
        "images/",
        "toy:N",
    )


def test_the_pixel_limit_is_raised_with_an_environment_variable(
    folder_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fix names TODSYNTH_MAX_IMAGE_PIXELS (a CLI user cannot set PIL.Image.MAX_IMAGE_PIXELS); setting it
    lets the image through; a value that is no count is a ConfigError naming the variable."""
    from todsynth.data.check import check_dataset

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    big = _write(folder_dataset / "images" / "tile0.png", np.zeros((40, 40, 3), np.uint8))
    _write(folder_dataset / "masks" / "tile0.png", np.zeros((40, 40), np.uint8))
    problems = [str(p) for p in check_dataset(folder_dataset).problems if p.path == big]
    assert problems and "TODSYNTH_MAX_IMAGE_PIXELS=1600" in problems[0] and "data tile" in problems[0], problems
    assert "raise PIL.Image.MAX_IMAGE_PIXELS" not in problems[0]
    monkeypatch.setenv("TODSYNTH_MAX_IMAGE_PIXELS", "1600")
    assert not check_dataset(folder_dataset).problems
    monkeypatch.setenv("TODSYNTH_MAX_IMAGE_PIXELS", "lots")
    raises(ConfigError, lambda: check_dataset(folder_dataset), "TODSYNTH_MAX_IMAGE_PIXELS='lots'")


def test_dot_files_are_skipped_as_documented(folder_dataset: Path) -> None:
    """Decision: files whose name starts with a dot (hidden files, macOS '._x' files, writers' temporary files)
    are not samples; docs/errors.md says so."""
    from todsynth.data.readers import open_dataset

    _write(folder_dataset / "images" / ".hidden.png", np.zeros((8, 8, 3), np.uint8))
    _write(folder_dataset / "masks" / ".hidden.png", np.zeros((8, 8), np.uint8))
    assert open_dataset(folder_dataset).ids == ["tile0", "tile1", "tile2", "tile3"]
    docs = (Path(__file__).resolve().parents[2] / "docs" / "errors.md").read_text()
    assert "whose name starts with a dot" in docs


# ---------------------------------------------------------------------------------------------
# 10: smaller findings


def test_segment_eval_refuses_a_split_of_a_dataset_without_splits(
    cli_app, tiny_segmenter_dir: Path, folder_dataset: Path
) -> None:
    """A folder dataset has no splits: `--split Nope` is refused, not shown as '(Nope)' in the title."""
    refused(
        cli_app,
        ["segment", "eval", str(tiny_segmenter_dir), str(folder_dataset), "--split", "Nope"],
        None,
        "--split Nope",
        "has no splits",
    )


def test_sd3_text_encoder_without_a_path_names_the_setting(cli_app, toy_masks_16: Path, tmp_path: Path) -> None:
    """`--set text_encoder=sd3` alone: the fix names --set text_encoder_path=."""
    out = tmp_path / "out"
    refused(
        cli_app,
        ["generator", "train", str(toy_masks_16), "--out", str(out), "--set", "text_encoder=sd3", *TINY_GEN],
        out,
        "text_encoder_path",
        "--set text_encoder_path=",
    )


def test_a_base_with_another_text_length_is_refused(tmp_path: Path) -> None:
    """The prompt embeddings' length is part of the text encoder the base was pretrained with."""
    from todsynth.generator.mmdit import MMDiTConfig
    from todsynth.generator.pretrain import check_base

    mcfg = MMDiTConfig(control="none")
    meta = {
        "autoencoder": {"kind": "pixel"},
        "text_encoder": {"kind": "minilm", "path": None, "max_length": 8},
        "image_size": 16,
    }
    ae = SimpleNamespace(config={"kind": "pixel"})
    te = SimpleNamespace(config={"kind": "minilm", "path": "/elsewhere/minilm", "max_length": 16})
    raises(
        CheckpointError,
        lambda: check_base(tmp_path, meta, mcfg, mcfg, ae, te, 16),
        "max_length=8",
        "--set text_max_length=8",
    )
    te.config["max_length"] = 8
    check_base(tmp_path, meta, mcfg, mcfg, ae, te, 16)  # another path to the same encoder is fine


def test_help_shows_the_dataset_as_required_and_the_out_defaults(cli_app) -> None:
    """The dataset argument of train/pretrain is required unless --config gives it; --out shows its default."""
    from todsynth.generator.train import GeneratorTrainConfig

    def shown(args: list[str]) -> str:
        """The help text as one line of words (rich boxes and wrapping removed)."""
        return " ".join(invoke(cli_app, args).output.replace("│", " ").split())

    train, pretrain = shown(["generator", "train", "--help"]), shown(["generator", "pretrain", "--help"])
    assert "required unless --config" in train and "required unless --config" in pretrain
    assert f"[default: {GeneratorTrainConfig().out}]" in train and "[default: runs/base]" in pretrain


def test_pretrain_without_images_names_the_argument(cli_app, tmp_path: Path) -> None:
    """Leaving out IMAGES is a usage error naming the argument (--help says what IMAGES may be)."""
    out = tmp_path / "out"
    result = invoke(cli_app, ["generator", "pretrain", "--out", str(out)])
    assert result.exit_code == 2 and not out.exists(), result.output
    assert "Usage:" in result.output and "Missing argument 'IMAGES'" in result.output, result.output


def test_synthesize_json_records_every_input_path_absolute(tmp_path, monkeypatch):
    """A rerun from another working directory with relative paths is the same run, not 'other settings'."""
    from todsynth.synthesize import SynthesizeConfig, config_dict

    monkeypatch.chdir(tmp_path)
    cfg = SynthesizeConfig(
        generator="gen", masks="masks", out="out", segmenter="seg", filter_stats="stats.json", split_file="split.json"
    )
    recorded = config_dict(cfg)
    for name in ("generator", "masks", "segmenter", "filter_stats", "split_file"):
        assert recorded[name] == str(tmp_path / getattr(cfg, name)), name


def test_mask_class_mismatch_gives_counts_not_every_name() -> None:
    """Masks of 300 classes against a 7-class generator: the counts and a few names, not 300 names."""
    from todsynth.data.classes import LOVEDA, ClassSpec
    from todsynth.errors import DataError
    from todsynth.generator.sample import check_mask_classes

    wide = ClassSpec(tuple(f"c{i}" for i in range(300)), ignore_index=300)
    with pytest.raises(DataError) as info:
        check_mask_classes(wide, LOVEDA, "masks")
    text = str(info.value)
    assert "300 classes" in text and "'c0'" in text and "c299" not in text and len(text) < 600, text
