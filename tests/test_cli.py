"""The CLI as a new user meets it: defaults in --help, usage for missing arguments, the next command to run, and
defaults that work on what `data toy` writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from todsynth.cli import common
from todsynth.cli.main import app

from tiny_models import TINY_GEN, TINY_SEG


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """One line per message, so long tmp paths and help lines are not folded."""
    monkeypatch.setattr(common.console, "width", 2000)
    monkeypatch.setattr(common.err_console, "width", 2000)
    monkeypatch.setenv("COLUMNS", "2000")


def invoke(*args: str):
    """Run `todsynth ARGS` in-process; typer's Result."""
    return CliRunner().invoke(app, [str(a) for a in args])


def words(text: str) -> str:
    """Help or error text as one line of words (rich boxes and wrapping removed)."""
    return " ".join(text.replace("│", " ").split())


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (["synthesize"], "Missing arguments 'GENERATOR', 'MASKS', 'OUT'"),
        (["synthesize", "gen", "masks"], "Missing argument 'OUT'"),
        (["generator", "train"], "Missing argument 'DATA'"),
        (["segment", "train"], "Missing argument 'DATA'"),
    ],
)
def test_missing_arguments_print_usage(args: list[str], missing: str) -> None:
    """A left-out positional argument is a usage error (exit 2, usage, the argument), not a config error."""
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    shown = words(result.output)
    assert "Usage:" in shown and missing in shown and "error: config" not in shown, shown


def test_config_file_still_gives_the_arguments(tmp_path: Path) -> None:
    """GENERATOR MASKS OUT from --config: no usage error; the run goes on to check the paths."""
    config = tmp_path / "syn.yaml"
    config.write_text(f"generator: {tmp_path / 'gen'}\nmasks: {tmp_path / 'masks'}\nout: {tmp_path / 'out'}\n")
    result = invoke("synthesize", "--config", config, "--crfm-steps", "0")
    assert result.exit_code == 2, result.output
    assert "Missing argument" not in result.output and "error:" in result.output, result.output


@pytest.mark.parametrize(
    ("args", "stage", "settings"),
    [
        (["generator", "train"], "generator-train", ["out", "steps", "batch_size", "size", "model.control"]),
        (["generator", "pretrain"], "generator-pretrain", ["out", "steps", "batch_size"]),
        (["segment", "train"], "segment-train", ["out", "arch", "lr", "seed", "batch_size"]),
        (["synthesize"], "synthesize", ["num_steps", "guidance_scale", "copies", "crfm.steps", "device"]),
    ],
)
def test_help_shows_the_stage_defaults(args: list[str], stage: str, settings: list[str]) -> None:
    """--help of a config-driven command shows each setting's default, read from the stage's config."""
    cfg = common.stage_defaults(stage)
    shown = words(invoke(*args, "--help").output)
    for name in settings:
        assert f"[default: {common._setting(cfg, name)}]" in shown, (name, shown)


def test_finish_prints_where_and_next_on_the_main_process_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`finish` prints the outputs and the next commands; other ranks of a launch print nothing."""
    monkeypatch.setenv("RANK", "1")
    common.finish("wrote x", "todsynth segment train x")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    common.finish("wrote x", "todsynth segment train 'a b'")
    assert capsys.readouterr().out.splitlines() == ["wrote x", "next: todsynth segment train 'a b'"]


def test_data_toy_says_what_to_run_next(tmp_path: Path) -> None:
    """`data toy` names its folder and the commands that train on it (masks only: synthesis)."""
    out = tmp_path / "toy"
    result = invoke("data", "toy", out, "--n", "2", "--size", "16")
    assert result.exit_code == 0, result.output
    assert f"next: todsynth segment train {out} --size 16" in result.output
    assert f"next: todsynth generator train {out} --size 16" in result.output
    result = invoke("data", "toy", tmp_path / "layouts", "--n", "2", "--size", "16", "--label-only")
    assert f"next: todsynth synthesize GENERATOR {tmp_path / 'layouts'} SYN --segmenter SEG" in result.output
    result = invoke("data", "toy", out, "--n", "3", "--size", "24")  # would mix 24-px tiles into the 16-px ones
    assert result.exit_code == 2 and "already holds tiles" in result.output and "Train" in result.output
    assert len(list(out.rglob("*.png"))) == 4  # 2 images + 2 masks, untouched
    result = invoke("data", "check", out)  # the trainers' default sizes exceed these tiles: the next lines say so
    assert result.exit_code == 0 and f"next: todsynth segment train {out} --size 16" in result.output, result.output


def test_synthesize_next_line_trains_at_the_pairs_size(
    tiny_generator_dir: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    out = tmp_path / "syn"
    result = invoke("synthesize", tiny_generator_dir, toy_masks_16, out, "--crfm-steps", "0", "--num-steps", "1")
    assert result.exit_code == 0, result.output
    assert f"next: todsynth segment train REAL --synthetic {out} --out DOWNSTREAM --size 16" in result.output


def test_segment_eval_scores_the_only_split_of_a_toy_root(
    tiny_segmenter_dir: Path, toy_masks_16: Path, tmp_path: Path
) -> None:
    """`data toy` writes only Train: eval without --split scores it, and says so; --split Val is still refused."""
    result = invoke("segment", "eval", tiny_segmenter_dir, toy_masks_16, "--batch-size", "6")
    assert result.exit_code == 0, result.output
    assert "has no Val split: scoring its only split, Train" in result.output and "(Train)" in result.output
    assert f"next: todsynth synthesize GENERATOR MASKS SYN --segmenter {tiny_segmenter_dir}" in result.output
    for bad in (tmp_path, Path("/proc/nope.json")):  # a folder, a place nothing can be written: refused up front
        result = invoke("segment", "eval", tiny_segmenter_dir, toy_masks_16, "--json", bad)
        assert result.exit_code == 2 and "cannot write the metrics file here" in result.output, result.output
        assert "mIoU" not in result.output
    result = invoke("segment", "eval", tiny_segmenter_dir, toy_masks_16, "--split", "Val")
    assert result.exit_code == 2 and "Val" in result.output, result.output


def test_a_run_that_fails_before_its_first_state_leaves_nothing(toy_masks_16: Path, tmp_path: Path) -> None:
    """`segment train` on 16 px tiles at the default size 512 is refused; its run folder keeps no config.json or
    metrics.jsonl, so the corrected command starts there without --overwrite."""
    out = tmp_path / "seg"
    result = invoke("segment", "train", toy_masks_16, "--out", out)
    assert result.exit_code == 2 and "smaller than the working size 512" in result.output, result.output
    assert not (out / "config.json").exists() and not (out / "metrics.jsonl").exists()


def test_stop_after_says_where_it_stopped_and_how_to_continue(toy_masks_16: Path, tmp_path: Path) -> None:
    out = tmp_path / "gen"
    result = invoke(
        "generator", "train", toy_masks_16, "--out", out, *TINY_GEN, "--steps", "3", "--set", "stop_after=1"
    )
    assert result.exit_code == 0, result.output
    assert "stopped at step 1 of 3" in result.output and "next: the same command with --resume" in result.output
    assert (out / "checkpoint").is_dir() and not (out / "model").exists() and not (out / "results.json").exists()


def test_segment_train_stops_after_and_resumes_like_the_generator(toy_masks_16: Path, tmp_path: Path) -> None:
    """The segmenter spells resume and stop_after as the generator does: settings, --resume, resume=auto."""
    out = tmp_path / "seg"
    args = ["segment", "train", toy_masks_16, "--out", out, *TINY_SEG, "--steps", "2"]
    result = invoke(*args, "--set", "stop_after=1", "--set", "resume=auto")
    assert result.exit_code == 0, result.output
    assert "stopped at step 1 of 2" in result.output and "next: the same command with --resume" in result.output
    assert (out / "checkpoint").is_dir() and not (out / "model").exists() and not (out / "results.json").exists()
    result = invoke(*args, "--resume")
    assert result.exit_code == 0 and "model saved to" in result.output, result.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 2


def test_a_killed_run_with_snapshots_only_is_not_silently_reused(toy_masks_16: Path, tmp_path: Path) -> None:
    """Model snapshots (checkpoints/) show a run progressed there: a new run is refused without --overwrite."""
    out = tmp_path / "gen"
    (out / "checkpoints" / "step_000001").mkdir(parents=True)
    result = invoke("generator", "train", toy_masks_16, "--out", out, *TINY_GEN)
    assert result.exit_code == 2 and "checkpoints" in result.output and "--overwrite" in result.output, result.output


def test_an_empty_set_value_is_refused(toy_masks_16: Path, tmp_path: Path) -> None:
    result = invoke("generator", "train", toy_masks_16, "--out", tmp_path / "gen", "--set", "lr=", *TINY_GEN)
    assert result.exit_code == 2 and "'lr=' has no value" in result.output, result.output
