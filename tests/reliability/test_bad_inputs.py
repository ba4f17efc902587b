"""Bad input everywhere: each case exits 2 (CLI) or raises a TodsynthError (API), names the file or setting,
says what to do, and leaves nothing in the output folder. docs/errors.md lists the cases.

The readers' messages are tested in detail in tests/data/test_check.py; here every bad dataset also goes
through the commands that consume data (`data check`, `segment train`, `generator train`, `synthesize`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from todsynth.errors import CheckpointError, ConfigError, DataError, TodsynthError

from reliability_helpers import invoke, is_temp
from tiny_models import TINY_GEN, TINY_SEG

HINTS = (
    "must",
    "expected",
    "valid",
    "known:",
    "choose",
    "give",
    "use ",
    "check",
    "add",
    "remove",
    "fix",
    "keep",
    "convert",
    "re-",
    "write",
    "point",
    "start",
    "save",
    "accepted layouts",
    "resize",
    "set ",
)


def says_what_to_do(text: str) -> bool:
    """Whether a message gives the user something to do (a fix, the valid values or the known choices)."""
    return any(hint in text for hint in HINTS)


def refused(app, args: list[str], out: Path | None, *names: str, lead: str = "error:") -> str:
    """Invoke the CLI; assert exit 2, `lead` and no traceback, `names` in the message, a hint, no `out` folder."""
    result = invoke(app, args)
    output = result.output
    assert result.exit_code == 2, (result.exit_code, output[-2000:], result.exception)
    assert lead in output and "Traceback" not in output
    for name in names:
        assert name in output, (name, output)
    assert says_what_to_do(output), output
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))
    return output


def raises(err: type[TodsynthError], call: Callable[[], object], *names: str) -> TodsynthError:
    """Assert `call()` raises `err` (a TodsynthError) whose message names `names` and gives a hint."""
    with pytest.raises(err) as info:
        call()
    text = str(info.value)
    for name in names:
        assert name in text, (name, text)
    assert says_what_to_do(text), text
    return info.value


# ---------------------------------------------------------------------------------------------
# Bad datasets: each builder breaks the valid `folder_dataset` (or makes its own) and returns
# (dataset path, the file the message must name, words the message must contain).

Case = tuple[Path, Path, tuple[str, ...]]


def _write(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    """Save an array as an image file, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image if mode is None else image.convert(mode)).save(path)
    return path


def _truncate(path: Path) -> Path:
    """Cut a file to half its length."""
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path


def png_random_bytes(root: Path) -> Case:
    """An image file of random bytes."""
    bad = root / "images" / "tile1.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    return root, bad, ("cannot read image",)


def png_truncated_mask(root: Path) -> Case:
    """A mask PNG cut to half its length."""
    return root, _truncate(root / "masks" / "tile2.png"), ("cannot read mask", "truncated")


def jpeg_truncated_image(root: Path) -> Case:
    """An image JPEG cut to half its length."""
    (root / "images" / "tile1.png").unlink()
    bad = _truncate(_write(root / "images" / "tile1.jpg", np.full((8, 8, 3), 90, np.uint8)))
    return root, bad, ("cannot read image",)


def jpeg_mask_with_artefacts(root: Path) -> Case:
    """A mask saved as JPEG: compression invents label values."""
    (root / "masks" / "tile0.png").unlink()
    label = np.zeros((8, 8), np.uint8)
    label[:, 4:] = 2
    bad = _write(root / "masks" / "tile0.jpg", label * 100)
    return root, bad, ("are not classes", "PNG")


def rgba_mask_without_palette(root: Path) -> Case:
    """An RGBA mask while classes.yaml has no palette."""
    return root, _write(root / "masks" / "tile0.png", np.zeros((8, 8, 4), np.uint8)), ("RGBA", "palette")


def palette_mask_index_too_big(root: Path) -> Case:
    """A palette-mode (P) mask whose index is no class."""
    paletted = Image.new("P", (8, 8), color=9)
    paletted.putpalette([0, 0, 0] * 256)
    bad = root / "masks" / "tile0.png"
    paletted.save(bad)
    return root, bad, ("[9]",)


def sixteen_bit_mask_values(root: Path) -> Case:
    """A 16-bit mask holding 300."""
    label = np.zeros((8, 8), np.uint16)
    label[0, 0] = 300
    return root, _write(root / "masks" / "tile1.png", label), ("300", "16-bit")


def sixteen_bit_image(root: Path) -> Case:
    """A 16-bit image without a 'scale' setting (8-bit expected)."""
    return root, _write(root / "images" / "tile1.png", np.full((8, 8), 4000, np.uint16)), ("1-band uint16", "scale")


def label_not_a_class(root: Path) -> Case:
    """A label value >= the number of classes."""
    label = np.zeros((8, 8), np.uint8)
    label[3, 3] = 3  # 3 classes: 0..2 and 255
    return root, _write(root / "masks" / "tile3.png", label), ("[3]", "0..2")


def float_mask(root: Path) -> Case:
    """A floating-point TIFF mask."""
    (root / "masks" / "tile0.png").unlink()
    return root, _write(root / "masks" / "tile0.tif", np.zeros((8, 8), np.float32)), ("floating-point",)


def two_channel_mask(root: Path) -> Case:
    """A grey+alpha (LA) mask."""
    return root, _write(root / "masks" / "tile0.png", np.zeros((8, 8), np.uint8), "LA"), ("not single-channel",)


def palette_colour_unknown(root: Path) -> Case:
    """A colour mask with a colour the palette lacks."""
    (root / "classes.yaml").write_text(
        "names: [background, building, water]\npalette: [[0, 0, 0], [255, 0, 0], [0, 0, 255]]\n"
    )
    for i in range(4):
        _write(root / "masks" / f"tile{i}.png", np.zeros((8, 8, 3), np.uint8))
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[0, 0] = (1, 2, 3)
    return root, _write(root / "masks" / "tile3.png", colour), ("(1, 2, 3)",)


def size_mismatch(root: Path) -> Case:
    """An image larger than its mask."""
    return root, _write(root / "images" / "tile0.png", np.zeros((12, 8, 3), np.uint8)), ("12x8", "8x8")


def image_without_mask(root: Path) -> Case:
    """An image whose mask is missing."""
    (root / "masks" / "tile2.png").unlink()
    return root, root / "images" / "tile2.png", ("no mask",)


def mask_without_image(root: Path) -> Case:
    """A mask whose image is missing."""
    (root / "images" / "tile2.png").unlink()
    return root, root / "masks" / "tile2.png", ("no image",)


def empty_dataset(root: Path) -> Case:
    """Empty images/ and masks/ folders."""
    for sub in ("images", "masks"):
        shutil.rmtree(root / sub)
        (root / sub).mkdir()
    return root, root, ("no samples",)


def duplicate_ids(root: Path) -> Case:
    """Two images with one stem (tile1.png, tile1.jpg)."""
    _write(root / "images" / "tile1.jpg", np.zeros((8, 8, 3), np.uint8))
    return root, root / "images" / "tile1.png", ("duplicate id 'tile1'",)


def classes_unknown_key(root: Path) -> Case:
    """classes.yaml with a key todsynth does not know."""
    (root / "classes.yaml").write_text("names: [background, building, water]\ncolours: [[0, 0, 0]]\n")
    return root, root / "classes.yaml", ("unknown key", "colours")


def classes_duplicate_names(root: Path) -> Case:
    """classes.yaml naming a class twice."""
    (root / "classes.yaml").write_text("names: [background, water, water]\n")
    return root, root / "classes.yaml", ("duplicate class names",)


def classes_ignore_collides(root: Path) -> Case:
    """classes.yaml whose ignore_index is a class label."""
    (root / "classes.yaml").write_text("names: [background, building, water]\nignore_index: 1\n")
    return root, root / "classes.yaml", ("collides",)


def classes_not_yaml(root: Path) -> Case:
    """classes.yaml that is not YAML."""
    (root / "classes.yaml").write_text("names: [background, building\n")
    return root, root / "classes.yaml", ("cannot read classes file",)


def classes_missing(root: Path) -> Case:
    """A folder dataset without classes.yaml."""
    (root / "classes.yaml").unlink()
    return root, root / "classes.yaml", ("classes file not found",)


def _index(root: Path, lines: list[object]) -> Path:
    """Write root/index.jsonl (objects as JSON, strings as they are)."""
    index = root / "index.jsonl"
    index.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return index


def index_escape(kind: str) -> Callable[[Path], Case]:
    """An index line whose mask path leaves the dataset root (../, absolute, symlink) or cannot be a path."""

    def build(root: Path) -> Case:
        """The dataset with the escaping index line."""
        outside = _write(root.parent / "outside.png", np.zeros((8, 8), np.uint8))
        if kind == "symlink":
            os.symlink(outside, root / "masks" / "link.png")
        source = {
            "dotdot": "../outside.png",
            "absolute": str(outside),
            "symlink": "masks/link.png",
            "nul": "masks/a\x00.png",
        }[kind]
        index = _index(
            root,
            [
                {"source": "masks/tile0.png", "target": "images/tile0.png"},
                {"source": source, "target": "images/tile1.png"},
            ],
        )
        words = ("cannot be resolved",) if kind == "nul" else ("outside the dataset root",)
        return index, index, ("line 2", *words)

    build.__name__ = f"index_path_{kind}"
    return build


def index_not_json(root: Path) -> Case:
    """An index line that is not JSON."""
    index = _index(root, [{"source": "masks/tile0.png", "target": "images/tile0.png"}, "{not json"])
    return index, index, ("line 2", "not valid JSON")


def index_duplicate_id(root: Path) -> Case:
    """Two index lines with one id."""
    index = _index(
        root,
        [
            {"source": "masks/tile0.png", "target": "images/tile0.png", "id": "a"},
            {"source": "masks/tile1.png", "target": "images/tile1.png", "id": "a"},
        ],
    )
    return index, index, ("line 2", "duplicate id 'a'")


def index_missing_file(root: Path) -> Case:
    """An index line naming a file that does not exist."""
    index = _index(root, [{"source": "masks/tile0.png", "target": "images/gone.png"}])
    return index, root / "images" / "gone.png", ("not found",)


def loveda_value_out_of_range(root: Path) -> Case:
    """A LoveDA mask holding 8 (valid: 0..7)."""
    split = root.parent / "loveda" / "Train" / "Urban"
    _write(split / "images_png" / "1.png", np.zeros((8, 8, 3), np.uint8))
    bad = _write(split / "masks_png" / "1.png", np.full((8, 8), 8, np.uint8))
    return root.parent / "loveda", bad, ("0 = no-data",)


def dataset_not_found(root: Path) -> Case:
    """A dataset path that does not exist."""
    return root / "nowhere", root / "nowhere", ("not found", "accepted layouts")


def unknown_layout(root: Path) -> Case:
    """A folder in no known dataset layout."""
    odd = root.parent / "odd"
    odd.mkdir()
    (odd / "readme.txt").write_text("no images here")
    return odd, odd, ("not a dataset in a known layout",)


BAD_DATASETS = [
    png_random_bytes,
    png_truncated_mask,
    jpeg_truncated_image,
    jpeg_mask_with_artefacts,
    rgba_mask_without_palette,
    palette_mask_index_too_big,
    sixteen_bit_mask_values,
    sixteen_bit_image,
    label_not_a_class,
    float_mask,
    two_channel_mask,
    palette_colour_unknown,
    size_mismatch,
    image_without_mask,
    mask_without_image,
    empty_dataset,
    duplicate_ids,
    classes_unknown_key,
    classes_duplicate_names,
    classes_ignore_collides,
    classes_not_yaml,
    classes_missing,
    index_escape("dotdot"),
    index_escape("absolute"),
    index_escape("symlink"),
    index_escape("nul"),
    index_not_json,
    index_duplicate_id,
    index_missing_file,
    loveda_value_out_of_range,
    dataset_not_found,
    unknown_layout,
]


@pytest.mark.parametrize("build", BAD_DATASETS, ids=lambda f: f.__name__)
def test_bad_dataset_is_refused_naming_the_file(
    cli_app, folder_dataset: Path, tmp_path: Path, build: Callable[[Path], Case]
) -> None:
    """API: DataError naming the file with a hint; CLI `data check` and `segment train`: exit 2, nothing written."""
    from todsynth.data.check import check_dataset, validate_dataset

    data, bad, words = build(folder_dataset)
    problems = [p for p in check_dataset(data).problems if p.path == bad]
    assert problems, [str(p) for p in check_dataset(data).problems]
    assert any(all(w in str(p) for w in words) and says_what_to_do(str(p)) for p in problems), [
        str(p) for p in problems
    ]
    raises(DataError, lambda: validate_dataset(data), str(bad))
    refused(cli_app, ["data", "check", str(data)], None, str(bad), *words, lead="problem(s)")
    out = tmp_path / "seg_out"
    refused(cli_app, ["segment", "train", str(data), "--out", str(out), *TINY_SEG], out, str(bad))


@pytest.mark.parametrize(
    "build", [png_random_bytes, label_not_a_class, index_escape("dotdot")], ids=lambda f: f.__name__
)
def test_generator_train_refuses_bad_data_before_writing(
    cli_app, folder_dataset: Path, tmp_path: Path, build: Callable[[Path], Case]
) -> None:
    """`generator train` validates every file before it writes anything."""
    data, bad, words = build(folder_dataset)
    out = tmp_path / "gen_out"
    refused(cli_app, ["generator", "train", str(data), "--out", str(out), *TINY_GEN], out, str(bad), *words)


def test_synthesize_refuses_bad_masks_before_writing(
    cli_app, tiny_generator_dir: Path, folder_dataset: Path, tmp_path: Path
) -> None:
    """A mask value that is no class stops `synthesize` before the output folder exists."""
    data, bad, words = label_not_a_class(folder_dataset)
    out = tmp_path / "synth_out"
    refused(
        cli_app,
        ["synthesize", str(tiny_generator_dir), str(data), str(out), "--crfm-steps", "0"],
        out,
        str(bad),
        *words,
    )


@pytest.mark.parametrize(
    "kind", ["rgba_image", "sixteen_bit_mask_small_values", "rgba_palette_mask_transparent", "palette_mode_mask"]
)
def test_handled_modes_read_cleanly(folder_dataset: Path, kind: str) -> None:
    """Modes the readers accept: RGBA images lose alpha, 16-bit/palette masks keep values, transparent = ignore."""
    from todsynth.data.check import validate_dataset
    from todsynth.data.readers import open_dataset

    root = folder_dataset
    label = np.zeros((8, 8), np.uint8)
    label[:, 4:] = 2
    if kind == "rgba_image":
        _write(root / "images" / "tile0.png", np.full((8, 8, 4), 7, np.uint8))
    elif kind == "sixteen_bit_mask_small_values":
        _write(root / "masks" / "tile0.png", label.astype(np.uint16))
    elif kind == "palette_mode_mask":
        paletted = Image.fromarray(label, mode="L").convert("P")
        paletted.save(root / "masks" / "tile0.png")
    else:
        (root / "classes.yaml").write_text(
            "names: [background, building, water]\npalette: [[0, 0, 0], [255, 0, 0], [0, 0, 255]]\n"
        )
        colours = np.array([[0, 0, 0, 255], [255, 0, 0, 255], [0, 0, 255, 255]], np.uint8)
        for i in range(4):
            rgba = colours[label]
            rgba[0, 0] = (9, 9, 9, 0)  # transparent: ignore, whatever its colour
            _write(root / "masks" / f"tile{i}.png", rgba)
    validate_dataset(root)
    sample = open_dataset(root)[0]
    assert sample.image.shape == (8, 8, 3) and sample.image.dtype == np.uint8
    expected = label.astype(np.int64)
    if kind == "rgba_palette_mask_transparent":
        expected[0, 0] = 255
    if kind != "rgba_image":
        assert np.array_equal(sample.label, expected)
    else:
        assert (sample.image == 7).all()


# ---------------------------------------------------------------------------------------------
# Bad settings


@pytest.mark.parametrize(
    "args, names",
    [
        (["--set", "lr=nan"], ("lr", "finite")),
        (["--steps", "-1"], ("steps", ">= 1")),
        (["--set", "lr=-0.1"], ("lr", ">= 0")),
        (["--set", "text_dropout=1.5"], ("text_dropout",)),
        (["--size", "18", "--set", "model.patch_size=4"], ("size 18", "patch_size 4")),
        (["--set", "stepz=3"], ("stepz", "did you mean 'steps'")),
        (["--set", "steps"], ("steps", "key=value")),
        (["--set", "lr=[1"], ("lr=[1", "YAML")),
        (["--set", "batch_size=2.5"], ("batch_size", "integer")),
        (["--control", "quadruple"], ("quadruple", "siamese")),
    ],
    ids=[
        "lr_nan",
        "steps_negative",
        "lr_negative",
        "dropout_above_1",
        "size_not_multiple_of_patch",
        "unknown_setting",
        "set_without_value",
        "set_value_not_yaml",
        "batch_not_integer",
        "unknown_control",
    ],
)
def test_generator_train_refuses_bad_settings(
    cli_app, toy_masks_16: Path, tmp_path: Path, args: list[str], names: tuple[str, ...]
) -> None:
    """Invalid generator settings are named before any file is written."""
    out = tmp_path / "out"
    refused(cli_app, ["generator", "train", str(toy_masks_16), "--out", str(out), *args], out, *names)


@pytest.mark.parametrize(
    "args, names",
    [
        (["--set", "lr=nan"], ("lr", "finite")),
        (["--batch-size", "0"], ("batch_size", ">= 1")),
        (["--set", "steps=-3"], ("steps", ">= 1")),
        (["--arch", "transformer9000"], ("transformer9000", "must be one of")),
        (["--set", "weight_decay=inf"], ("weight_decay", "finite")),
    ],
    ids=["lr_nan", "batch_zero", "steps_negative", "unknown_arch", "weight_decay_inf"],
)
def test_segment_train_refuses_bad_settings(
    cli_app, toy_masks_16: Path, tmp_path: Path, args: list[str], names: tuple[str, ...]
) -> None:
    """Invalid segmenter settings are named before any file is written."""
    out = tmp_path / "out"
    refused(cli_app, ["segment", "train", str(toy_masks_16), "--out", str(out), *args], out, *names)


@pytest.mark.parametrize(
    "args, names",
    [
        (["--num-steps", "0"], ("num_steps", ">= 1")),
        (["--set", "guidance_scale=inf"], ("guidance_scale",)),
        (["--copies", "-2"], ("copies", ">= 1")),
        (["--set", "transforms=identity,shear"], ("transforms", "rot90")),
        (["--crfm-steps", "2"], ("segmenter",)),
    ],
    ids=["num_steps_zero", "guidance_inf", "copies_negative", "unknown_transform", "crfm_without_segmenter"],
)
def test_synthesize_refuses_bad_settings(
    cli_app, tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path, args: list[str], names: tuple[str, ...]
) -> None:
    """Invalid synthesis settings are named before any file is written."""
    out = tmp_path / "out"
    refused(cli_app, ["synthesize", str(tiny_generator_dir), str(toy_masks_16), str(out), *args], out, *names)


@pytest.mark.parametrize(
    "stage, values, name",
    [
        ("generator", {"data": "d", "lr": float("nan")}, "lr"),
        ("generator", {"data": "d", "steps": -1}, "steps"),
        ("segment", {"lr": float("inf")}, "lr"),
        ("segment", {"epochs": 0}, "epochs"),
        ("synthesize", {"generator": "g", "masks": "m", "out": "o", "filter_margin": -1.0}, "filter_margin"),
        ("synthesize", {"generator": "g", "masks": "m", "out": "o", "crfm.alpha_max": float("nan")}, "alpha_max"),
    ],
    ids=[
        "gen_lr_nan",
        "gen_steps_negative",
        "seg_lr_inf",
        "seg_epochs_zero",
        "synth_margin_negative",
        "synth_crfm_alpha_nan",
    ],
)
def test_api_configs_refuse_bad_values(stage: str, values: dict, name: str) -> None:
    """The Python API validates like the CLI: a ConfigError naming the setting."""
    from todsynth.config import build_config
    from todsynth.generator.train import GeneratorTrainConfig
    from todsynth.segment.train import SegmentTrainConfig
    from todsynth.synthesize import build_synthesize_config

    build = {
        "generator": lambda v: build_config(GeneratorTrainConfig, v),
        "segment": lambda v: build_config(SegmentTrainConfig, v),
        "synthesize": build_synthesize_config,
    }[stage]
    error = raises(ConfigError, lambda: build(values), name)
    assert error.path is not None


@pytest.mark.parametrize(
    "text, words",
    [
        (None, "config file not found"),
        ("[1, 2]", "mapping"),
        ("steps: [1\n", "not valid YAML"),
        ("steps: 2001-02-30\n", "not valid YAML"),
        ("1: 2\nstepz: 3\n", "unknown setting"),
        ("/dir", "cannot read"),
    ],
    ids=["missing", "not_a_mapping", "not_yaml", "impossible_date", "unknown_keys", "a_folder"],
)
def test_config_file_problems_name_the_file(
    cli_app, toy_masks_16: Path, tmp_path: Path, text: str | None, words: str
) -> None:
    """A missing, non-mapping or invalid --config YAML is named."""
    config, out = tmp_path / "cfg.yaml", tmp_path / "out"
    if text == "/dir":
        config.mkdir()
    elif text is not None:
        config.write_text(text)
    output = refused(
        cli_app, ["generator", "train", str(toy_masks_16), "--out", str(out), "--config", str(config)], out, str(config)
    )
    assert words in output


# ---------------------------------------------------------------------------------------------
# Bad checkpoints and model folders


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth"])
def test_pickle_checkpoints_are_refused(tmp_path: Path, suffix: str) -> None:
    """Pickle formats are never opened, whatever they hold."""
    from todsynth.io import load_weights

    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"\x80\x04\x95 not even read")
    raises(CheckpointError, lambda: load_weights(path), str(path), "pickle", "safetensors")


def test_generator_folder_with_pickle_weights_is_refused(
    cli_app, tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """A generator whose transformer weights are a .bin (no safetensors) names the missing file."""
    gen = Path(shutil.copytree(tiny_generator_dir, tmp_path / "gen"))
    weights = gen / "transformer" / "model.safetensors"
    weights.rename(gen / "transformer" / "pytorch_model.bin")
    out = tmp_path / "out"
    refused(cli_app, ["synthesize", str(gen), str(toy_masks_16), str(out), "--crfm-steps", "0"], out, str(weights))


def test_generator_of_another_config_is_refused(
    cli_app, tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """Weights that do not fit transformer/config.json are named (not a shape traceback)."""
    gen = Path(shutil.copytree(tiny_generator_dir, tmp_path / "gen"))
    config = gen / "transformer" / "config.json"
    raw = json.loads(config.read_text())
    raw["num_layers"] = raw["num_layers"] + 1
    config.write_text(json.dumps(raw))
    out = tmp_path / "out"
    refused(
        cli_app,
        ["synthesize", str(gen), str(toy_masks_16), str(out), "--crfm-steps", "0"],
        out,
        str(gen / "transformer" / "model.safetensors"),
        "do not match",
    )


def test_model_folders_swapped_are_refused(
    cli_app, tiny_generator_dir: Path, tiny_segmenter_dir: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """A segmenter given as generator, and a generator given as segmenter, are named."""
    out = tmp_path / "out"
    refused(
        cli_app,
        ["synthesize", str(tiny_segmenter_dir), str(toy_masks_16), str(out), "--crfm-steps", "0"],
        out,
        str(tiny_segmenter_dir / "pipeline.json"),
        "generator",
    )
    refused(
        cli_app,
        [
            "synthesize",
            str(tiny_generator_dir),
            str(toy_masks_16),
            str(out),
            "--segmenter",
            str(tiny_generator_dir),
            "--crfm-steps",
            "1",
        ],
        out,
        str(tiny_generator_dir / "config.json"),
    )
    refused(
        cli_app,
        ["segment", "eval", str(tiny_generator_dir), str(toy_masks_16)],
        None,
        str(tiny_generator_dir / "config.json"),
    )


def test_masks_with_other_classes_than_the_generator(cli_app, tiny_generator_dir: Path, tmp_path: Path) -> None:
    """Masks labelled with classes the generator does not know are refused (not silently conditioned)."""
    root = tmp_path / "nine"
    (root / "classes.yaml").parent.mkdir()
    (root / "classes.yaml").write_text("names: [a, b, c, d, e, f, g, h, i]\n")
    _write(root / "masks" / "x.png", np.full((16, 16), 8, np.uint8))
    out = tmp_path / "out"
    refused(
        cli_app,
        ["synthesize", str(tiny_generator_dir), str(root), str(out), "--crfm-steps", "0"],
        out,
        str(root),
        "differ from the generator's",
    )


def test_synthetic_data_with_other_classes(cli_app, folder_dataset: Path, tmp_path: Path) -> None:
    """`segment train --synthetic` with another class list names that dataset."""
    other = Path(shutil.copytree(folder_dataset, tmp_path / "other"))
    (other / "classes.yaml").write_text("names: [background, building, lake]\n")
    out = tmp_path / "out"
    refused(
        cli_app,
        ["segment", "train", str(folder_dataset), "--synthetic", str(other), "--out", str(out), *TINY_SEG],
        out,
        str(other),
        "lake",
    )


def test_filter_stats_of_another_dataset(
    cli_app, tiny_generator_dir: Path, tiny_segmenter_dir: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """A filter_stats JSON without one loss per class is named (not a KeyError)."""
    stats, out = tmp_path / "stats.json", tmp_path / "out"
    stats.write_text(json.dumps({"class_mean_loss": [0.5, 0.5]}))
    refused(
        cli_app,
        [
            "synthesize",
            str(tiny_generator_dir),
            str(toy_masks_16),
            str(out),
            "--crfm-steps",
            "0",
            "--segmenter",
            str(tiny_segmenter_dir),
            "--set",
            f"filter_stats={stats}",
        ],
        out,
        str(stats),
        "7 finite losses",
    )


SD3_CONFIG = {
    "_class_name": "SD3Transformer2DModel",
    "in_channels": 3,
    "patch_size": 2,
    "sample_size": 8,
    "pos_embed_max_size": 16,
    "num_layers": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "joint_attention_dim": 384,
    "pooled_projection_dim": 384,
    "caption_projection_dim": 16,
}


@pytest.mark.parametrize("layout", ["empty", "foreign_config", "config_only", "pickle_only"])
def test_sd3_folder_with_missing_files(cli_app, toy_masks_16: Path, tmp_path: Path, layout: str) -> None:
    """`generator train --sd3-path` on an incomplete SD3 folder names what is missing."""
    sd3 = tmp_path / "sd3"
    (sd3 / "transformer").mkdir(parents=True)
    config = {"foreign_config": {"_class_name": "UNet2DConditionModel"}}.get(layout, SD3_CONFIG)
    if layout != "empty":
        (sd3 / "transformer" / "config.json").write_text(json.dumps(config))
    if layout == "pickle_only":
        (sd3 / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    words = {
        "empty": "no config.json",
        "foreign_config": "not an SD3Transformer2DModel config",
        "config_only": "no .safetensors weights",
        "pickle_only": "diffusion_pytorch_model.bin",
    }[layout]
    out = tmp_path / "out"
    refused(
        cli_app,
        ["generator", "train", str(toy_masks_16), "--out", str(out), "--set", f"sd3_path={sd3}", *TINY_GEN],
        out,
        str(sd3),
        words,
    )


def test_split_file_with_unknown_ids(cli_app, folder_dataset: Path, tmp_path: Path) -> None:
    """A split file made for another dataset names the split file."""
    split, out = tmp_path / "split.json", tmp_path / "out"
    split.write_text(json.dumps({"ids": ["tile0", "tile77"]}))
    refused(
        cli_app,
        ["segment", "train", str(folder_dataset), "--split-file", str(split), "--out", str(out), *TINY_SEG],
        out,
        str(split),
        "tile77",
    )


# ---------------------------------------------------------------------------------------------
# Output folder not writable, disk full


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A regular file: any output folder below it cannot be created (even by root)."""
    path = tmp_path / "file.txt"
    path.write_text("not a folder")
    return path


def test_output_below_a_file_is_refused(
    cli_app, blocker: Path, folder_dataset: Path, toy_masks_16: Path, tiny_generator_dir: Path
) -> None:
    """Every writing command names the folder it cannot create and says to choose a writable one."""
    sub = blocker / "sub"
    refused(
        cli_app,
        ["synthesize", str(tiny_generator_dir), str(toy_masks_16), str(sub), "--crfm-steps", "0", "--set", "limit=1"],
        None,
        str(sub),
        "writable",
    )
    refused(
        cli_app, ["generator", "train", str(toy_masks_16), "--out", str(sub), *TINY_GEN], None, str(sub), "writable"
    )
    refused(
        cli_app, ["segment", "train", str(folder_dataset), "--out", str(sub), *TINY_SEG], None, str(sub), "writable"
    )
    refused(cli_app, ["data", "toy", str(sub), "--n", "1", "--size", "16"], None, str(sub), "writable")
    refused(
        cli_app,
        ["data", "split", str(folder_dataset), str(sub / "split.json"), "--n", "1"],
        None,
        str(blocker),
        "writable",
    )
    assert blocker.read_text() == "not a folder"


def enospc(*args: object, **kwargs: object) -> None:
    """Stand-in for an OS call on a full disk."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_disk_full_leaves_the_old_file_and_no_partial_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """write_json/save_weights on a full disk: TodsynthError naming the file, old content kept, no temp left."""
    import torch

    from todsynth import io

    target, weights = tmp_path / "out" / "state.json", tmp_path / "out" / "w.safetensors"
    io.write_json(target, {"step": 1})
    monkeypatch.setattr(io.os, failing, enospc)
    raises(TodsynthError, lambda: io.write_json(target, {"step": 2}), str(target), "No space left")
    raises(TodsynthError, lambda: io.save_weights(weights, {"x": torch.ones(3)}), str(weights), "No space left")
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"step": 1} and not weights.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["state.json"]


def test_disk_full_during_a_command(
    cli_app, folder_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data split` on a full disk exits 2 naming the file, and leaves no partial split file."""
    from todsynth import io

    out = tmp_path / "splits"
    monkeypatch.setattr(io.os, "replace", enospc)
    refused(
        cli_app,
        ["data", "split", str(folder_dataset), str(out / "few.json"), "--n", "2"],
        out,
        str(out / "few.json"),
        "No space left",
    )


def test_disk_full_mid_synthesis_loses_nothing(
    cli_app,
    tiny_generator_dir: Path,
    toy_masks_16: Path,
    synth_reference: dict[str, bytes],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The disk fills after 20 files: exit 2 naming a file, no partial file; a rerun completes the reference."""
    from todsynth import io

    from reliability_helpers import check_visible_files, file_bytes, synth_args, synth_keep

    out = tmp_path / "synth"
    args = synth_args(tiny_generator_dir, toy_masks_16, out)
    calls = {"n": 0}
    real_replace = os.replace

    def filling_up(src: str, dst: str) -> None:
        """os.replace that fails once 20 files were written."""
        calls["n"] += 1
        if calls["n"] > 20:
            enospc()
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", filling_up)
    result = invoke(cli_app, args)
    assert result.exit_code == 2 and "No space left" in result.output, result.output[-2000:]
    assert not [p for p in out.rglob("*") if is_temp(p)]
    check_visible_files(out)
    assert not list((out / ".claims").glob("*.lock")) or all(
        (out / ".records" / f"{lock.stem}.json").exists() for lock in (out / ".claims").glob("*.lock")
    )
    monkeypatch.undo()
    assert invoke(cli_app, args).exit_code == 0
    assert file_bytes(out, synth_keep) == synth_reference
