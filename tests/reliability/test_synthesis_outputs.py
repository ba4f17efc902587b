"""Synthesis outputs: one file per (mask, transform, copy) whatever the mask ids, labels above 255 kept, inputs
never written into, guides of other classes and foreign split files refused, finished folders left clean.
docs/errors.md ("Synthesis outputs") lists the cases.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from todsynth.data.classes import LOVEDA_NAMES, ClassSpec
from todsynth.errors import ConfigError

from reliability_helpers import invoke, refused_with, torch_threads

WIDE_CLASSES = ClassSpec(tuple(f"c{i}" for i in range(300)), ignore_index=300)  # labels 0..299, ignore 300
TRICKY_IDS = [
    "tile 1",
    "tile_1",
    "Tile_1",
    "TILE_1",
    "水田",
    "山林",
    "a b",
    "a_b",
    "a/b",
    "a\\b",
    ".hidden",
    "_hidden",
    "",
    " ",
    "a.",
    "a~b",
    "café",
    "cafe\u0301",
    "straße",
    "STRASSE",
    "x\x00y",
    "x\ny",
    "\udcff",
    "a" * 300,
]
FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def _fold(name: str) -> str:
    """Canonical caseless form (Unicode's D145): names equal under it are one file on macOS and Windows."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def _mask(path: Path, label: np.ndarray) -> Path:
    """Save a label map as a PNG (8-bit or 16-bit by dtype), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label).save(path)
    return path


def _label_folder(root: Path, names: list[str], classes: ClassSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """A label-only folder dataset of 16 px masks named `names`; returns id -> label map."""
    import yaml

    rng = np.random.default_rng(seed)
    top = max(classes.num_classes - 1, classes.ignore_index)
    dtype = np.uint8 if top <= 255 else np.uint16
    labels = {}
    for name in names:
        label = rng.integers(0, classes.num_classes, (16, 16)).astype(dtype)
        label[0, :4] = classes.ignore_index
        _mask(root / "masks" / f"{name}.png", label)
        labels[name] = label
    (root / "classes.yaml").write_text(yaml.safe_dump(classes.to_dict()))
    return labels


def _synth(gen: Path, masks: Path, out: Path, **kw) -> dict:
    """Run synthesis in-process with tiny settings (1 Euler step, one copy, identity only, no CRFM)."""
    from todsynth.synthesize import build_synthesize_config, synthesize

    values = dict(
        generator=str(gen), masks=str(masks), out=str(out), num_steps=1, copies=1, **{"crfm.steps": 0}, batch_size=4
    )
    values.update(kw)
    with torch_threads(1):
        return synthesize(build_synthesize_config(values), progress=False)


def _manifest(out: Path) -> list[dict]:
    """The records of out/manifest.jsonl."""
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes): to show an input was left untouched."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def wide_generator_dir(tmp_path_factory) -> Path:
    """A saved 1-layer generator for WIDE_CLASSES (300 classes, ignore 300), 16 px, random weights."""
    from tiny_models import save_tiny_generator

    return save_tiny_generator(
        tmp_path_factory.mktemp("wide_gen") / "generator", WIDE_CLASSES, num_layers=1, head_dim=8
    )


def _segmenter(path: Path, num_classes: int, names: tuple[str, ...] | None = None) -> Path:
    """Save a small random segmenter of `num_classes` classes (class names recorded when given)."""
    import torch

    from todsynth.segment.model import Segmenter, SegmenterConfig

    torch.manual_seed(2)
    config = SegmenterConfig(
        arch="segformer", encoder="tu-mobilenetv3_small_050", num_classes=num_classes, class_names=names
    )
    Segmenter(config).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# 1. Output ids


def test_colliding_mask_names_each_get_their_output(tiny_generator_dir: Path, tmp_path: Path) -> None:
    """`tile 1`/`tile_1`/`Tile_1` and two all-CJK names: five masks, five outputs, each mapped to its source."""
    names = ["tile 1", "tile_1", "Tile_1", "水田", "山林"]
    labels = _label_folder(tmp_path / "masks", names, ClassSpec(LOVEDA_NAMES))
    out = tmp_path / "out"
    summary = _synth(tiny_generator_dir, tmp_path / "masks", out)
    assert summary.made == 5 == summary.in_manifest == summary.planned
    records = _manifest(out)
    assert sorted(r["source"] for r in records) == sorted(names)
    assert len({r["id"] for r in records}) == 5
    for record in records:  # each output's mask is its own source's mask: the mapping is exact
        written = np.array(Image.open(out / "masks" / f"{record['id']}.png"))
        assert (out / "images" / f"{record['id']}.png").is_file()
        np.testing.assert_array_equal(written, labels[record["source"]])
    from todsynth.data.readers import FolderDataset

    assert sorted(FolderDataset(out).ids) == sorted(r["id"] for r in records)
    rerun = _synth(tiny_generator_dir, tmp_path / "masks", out)
    assert rerun.made == 0 and rerun.already_done == 5 and len(_manifest(out)) == 5


@FAST
@given(
    ids=st.lists(
        st.one_of(st.sampled_from(TRICKY_IDS), st.text(max_size=12), st.text(alphabet="aAbB _-./~:é水", max_size=6)),
        min_size=1,
        max_size=8,
        unique=True,
    ),
    copies=st.integers(1, 2),
)
def test_output_names_are_unique_stable_and_map_back(ids: list[str], copies: int) -> None:
    """For any set of mask ids: one safe file per (mask, transform, copy), distinct even on case-insensitive
    or normalising file systems, named from its id alone, and the manifest maps every file to its exact source."""
    from todsynth.data.readers import FolderDataset
    from todsynth.synthesize import OutputFolder, build_synthesize_config, plan

    cfg = build_synthesize_config(
        {
            "generator": "g",
            "masks": "m",
            "out": "o",
            "copies": copies,
            "transforms": ["identity", "hflip"],
            "crfm.steps": 0,
        }
    )
    items = plan(ids, cfg)
    names = [it.id for it in items]
    assert len(items) == len(ids) * 2 * copies
    assert len({_fold(n) for n in names}) == len(names)  # no two names are one file on macOS / Windows
    for name in names:
        assert not {"/", "\\", "\x00", "\n"} & set(name) and not name.startswith(".")
        assert len(name.encode("utf-8")) <= 160  # room for suffixes and temp names under the 255-byte limit
    for one in ids:  # a name depends on its own id only: a subset (e.g. a smaller limit) names files alike
        assert [it.id for it in plan([one], cfg)] == [it.id for it in items if it.source_id == one]
    with tempfile.TemporaryDirectory(prefix="todsynth-names-") as tmp:
        out = OutputFolder(Path(tmp), ClassSpec(("a", "b")))
        for it in items:
            record = {"id": it.id, "source": it.source_id, "transform": it.transform, "copy": it.copy}
            out.write(it, np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.int64), record)
        assert out.finish() == len(items)
        lines = (Path(tmp) / "manifest.jsonl").read_text().splitlines()
        back = {(r["source"], r["transform"], r["copy"]): r["id"] for r in map(json.loads, lines)}
        assert back == {(it.source_id, it.transform, it.copy): it.id for it in items}
        assert sorted(FolderDataset(Path(tmp)).ids) == sorted(names)  # the readers see every file


# ---------------------------------------------------------------------------------------------
# 2. Labels above 255


def test_labels_above_255_are_written_16_bit_and_read_back(wide_generator_dir: Path, tmp_path: Path) -> None:
    """300 classes with ignore 300: the synthetic masks hold 256..300 exactly (no wrap-around) and pass check."""
    from todsynth.data.check import check_dataset
    from todsynth.data.readers import FolderDataset

    labels = _label_folder(tmp_path / "masks", ["p", "q"], WIDE_CLASSES)
    labels["q"][5:9, 5:9] = 299
    _mask(tmp_path / "masks" / "masks" / "q.png", labels["q"])
    out = tmp_path / "out"
    assert _synth(wide_generator_dir, tmp_path / "masks", out).made == 2
    ds = FolderDataset(out)
    assert ds.classes == WIDE_CLASSES
    for i, sid in enumerate(ds.ids):
        source = next(r["source"] for r in _manifest(out) if r["id"] == sid)
        np.testing.assert_array_equal(ds.load_label(i), labels[source].astype(np.int64))
    report = check_dataset(out)
    assert report.ok and report.ignore_pixels == 2 * 4 and report.pixel_counts[299] >= 16


# ---------------------------------------------------------------------------------------------
# 3. Writing into the input


@pytest.mark.parametrize(
    "case", ["is_masks", "symlink_to_masks", "inside_masks", "contains_segmenter", "inside_generator", "contains_stats"]
)
def test_output_folder_overlapping_an_input_is_refused(
    cli_app, tiny_generator_dir: Path, toy_masks_16: Path, tiny_segmenter_dir: Path, tmp_path: Path, case: str
) -> None:
    """An output folder that is, contains or is inside an input (symlinks resolved) is refused; nothing is written."""
    masks = Path(shutil.copytree(toy_masks_16, tmp_path / "v"))
    gen = Path(shutil.copytree(tiny_generator_dir, tmp_path / "gen"))
    seg = Path(shutil.copytree(tiny_segmenter_dir, tmp_path / "models" / "seg"))
    stats = tmp_path / "run" / "stats.json"
    stats.parent.mkdir()
    stats.write_text(json.dumps({"class_mean_loss": [1.0] * 7, "ignore_index": 255}))
    (tmp_path / "alias").symlink_to(masks, target_is_directory=True)
    out, relation = {
        "is_masks": (masks, "is the masks dataset"),
        "symlink_to_masks": (tmp_path / "alias", "is the"),
        "inside_masks": (masks / "synth", "is inside the masks dataset"),
        "contains_segmenter": (tmp_path / "models", "contains the segmenter folder"),
        "inside_generator": (gen / "synth", "is inside the generator folder"),
        "contains_stats": (tmp_path / "run", "contains the filter stats"),
    }[case]
    before = _tree(tmp_path)
    refused_with(
        cli_app,
        [
            "synthesize",
            str(gen),
            str(masks),
            str(out),
            "--crfm-steps",
            "0",
            "--segmenter",
            str(seg),
            "--set",
            f"filter_stats={stats}",
            "--set",
            "limit=1",
            "--num-steps",
            "1",
        ],
        relation,
        "choose an output folder outside",
    )
    assert _tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# 4. The guide's and the sampled masks' classes


@pytest.mark.parametrize("case", ["fewer_classes", "more_classes", "same_count_other_names"])
def test_guide_of_other_classes_is_refused(
    cli_app,
    tiny_generator_dir: Path,
    wide_generator_dir: Path,
    toy_masks_16: Path,
    tiny_segmenter_dir: Path,
    tmp_path: Path,
    case: str,
) -> None:
    """A segmenter predicting other classes than the generator and masks stops synthesis before any write."""
    gen, masks = tiny_generator_dir, toy_masks_16
    if case == "fewer_classes":
        seg = _segmenter(tmp_path / "seg", 3, ("background", "building", "water"))
    elif case == "more_classes":  # a 7-class guide for a 300-class generator
        gen, seg = wide_generator_dir, tiny_segmenter_dir
        _label_folder(tmp_path / "wide", ["p"], WIDE_CLASSES)
        masks = tmp_path / "wide"
    else:
        seg = _segmenter(tmp_path / "seg", 7, tuple(reversed(LOVEDA_NAMES)))
    out = tmp_path / "out"
    refused_with(
        cli_app,
        [
            "synthesize",
            str(gen),
            str(masks),
            str(out),
            "--segmenter",
            str(seg),
            "--crfm-steps",
            "1",
            "--num-steps",
            "1",
            "--set",
            "limit=1",
        ],
        str(seg / "config.json"),
        "guidance segmenter",
        "use a segmenter trained on the masks",
    )
    assert not out.exists()


def test_generator_sample_refuses_masks_of_other_classes(
    cli_app, tiny_generator_dir: Path, folder_dataset: Path, tmp_path: Path
) -> None:
    """`generator sample` with 3-class masks for the 7-class generator names the masks; no grid is written."""
    out = tmp_path / "grids"
    refused_with(
        cli_app,
        ["generator", "sample", str(tiny_generator_dir), str(folder_dataset), str(out), "--n", "1", "--num-steps", "1"],
        str(folder_dataset),
        "differ from the generator's",
    )
    assert not (out / "samples.png").exists()


@pytest.mark.parametrize(
    "args, name",
    [
        (["--n", "0"], "n must"),
        (["--n", "-1"], "n must"),
        (["--batch-size", "0"], "batch_size must"),
        (["--num-steps", "0"], "num_steps must"),
        (["--guidance-scale", "nan"], "guidance_scale must"),
        (["--shift", "-1"], "shift must"),
    ],
    ids=["n_zero", "n_negative", "batch_zero", "steps_zero", "guidance_nan", "shift_negative"],
)
def test_generator_sample_refuses_bad_settings(
    cli_app, tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path, args: list[str], name: str
) -> None:
    """Counts below 1 and non-finite or negative guidance/shift are ConfigErrors (exit 2), before any write."""
    out = tmp_path / "grids"
    refused_with(
        cli_app,
        ["generator", "sample", str(tiny_generator_dir), str(toy_masks_16), str(out), "--num-steps", "1", *args],
        name,
    )
    assert not out.exists()


def test_sample_settings_are_checked_in_the_api() -> None:
    """The Python API refuses the same settings (the CLI is a thin layer over it)."""
    from todsynth.generator.sample import sample_grid

    for kw in ({"n": 0}, {"batch_size": 0}, {"num_steps": 0}, {"guidance_scale": math.nan}, {"shift": 0.0}):
        with pytest.raises(ConfigError):
            sample_grid("no-model", "no-masks", "no-out", **kw)


# ---------------------------------------------------------------------------------------------
# 5. A split file of another dataset


def test_split_file_of_another_dataset_is_refused(
    cli_app, tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """Ids that are not in the masks dataset are named with the split file, not 'synthesized 0 pairs'."""
    split = tmp_path / "other_split.json"
    split.write_text(json.dumps({"ids": ["Urban/elsewhere_1", "Rural/elsewhere_2"], "n": 2}))
    out = tmp_path / "out"
    refused_with(
        cli_app,
        [
            "synthesize",
            str(tiny_generator_dir),
            str(toy_masks_16),
            str(out),
            "--crfm-steps",
            "0",
            "--num-steps",
            "1",
            "--set",
            f"split_file={split}",
        ],
        str(split),
        "not in the dataset",
        "use the split made for this dataset",
    )
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 6. Finished folders


def test_same_classes_in_other_yaml_formatting_resume(
    tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """classes.yaml rewritten in flow style (same classes) is the same dataset: the rerun resumes, not refuses."""
    import yaml

    out = tmp_path / "out"
    _synth(tiny_generator_dir, toy_masks_16, out, limit=1)
    spec = yaml.safe_load((out / "classes.yaml").read_text())
    (out / "classes.yaml").write_text("# edited by hand\n" + yaml.safe_dump(spec, default_flow_style=True))
    assert _synth(tiny_generator_dir, toy_masks_16, out, limit=1).made == 0


def test_finished_folder_is_clean_and_still_known_done(
    cli_app, tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """A complete run leaves no .records/.claims; a rerun says all is done; a larger limit adds only what is new
    and the manifest keeps the earlier samples."""
    out = tmp_path / "out"
    first = _synth(tiny_generator_dir, toy_masks_16, out, limit=2, copies=2)
    assert first.made == 4 == first.in_manifest
    assert not (out / ".records").exists() and not (out / ".claims").exists()
    args = [
        "synthesize",
        str(tiny_generator_dir),
        str(toy_masks_16),
        str(out),
        "--crfm-steps",
        "0",
        "--num-steps",
        "1",
        "--copies",
        "2",
        "--batch-size",
        "4",
        "--set",
        "limit=2",
    ]
    result = invoke(cli_app, args)
    assert result.exit_code == 0 and "synthesized 0 pairs (0 rejected, 4 already done)" in result.output
    more = _synth(tiny_generator_dir, toy_masks_16, out, limit=3, copies=2)
    assert more.made == 2 and more.already_done == 4 and more.in_manifest == 6
    assert len({r["id"] for r in _manifest(out)}) == 6 == len(list((out / "images").glob("*.png")))
    assert not (out / ".records").exists() and not (out / ".claims").exists()


def test_output_folder_with_other_classes_is_refused_untouched(
    tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """Other classes (parsed) in the output's classes.yaml: refused before images/, masks/ or records appear."""
    from todsynth.errors import DataError

    out = tmp_path / "out"
    out.mkdir()
    (out / "classes.yaml").write_text("names: [background, building, water]\n")
    with pytest.raises(DataError, match="other classes") as info:
        _synth(tiny_generator_dir, toy_masks_16, out, limit=1)
    assert info.value.path == out / "classes.yaml"
    assert sorted(p.name for p in out.iterdir()) == ["classes.yaml"]


def test_unreadable_manifest_is_named_on_resume(tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path) -> None:
    """A finished folder's manifest is what marks its samples done: a corrupt one is named, not ignored."""
    from todsynth.errors import DataError

    out = tmp_path / "out"
    _synth(tiny_generator_dir, toy_masks_16, out, limit=1)
    (out / "manifest.jsonl").write_text('{"id": "cut sho\n')
    with pytest.raises(DataError, match="line 1: not valid JSON") as info:
        _synth(tiny_generator_dir, toy_masks_16, out, limit=1)
    assert info.value.path == out / "manifest.jsonl" and "delete it and rerun" in str(info.value)
