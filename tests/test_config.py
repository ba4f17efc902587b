"""Nested typed configs: dotted and nested settings, presets, one choice check, `config show` and --print-config."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from todsynth.cli.config import StageName, stage_config
from todsynth.cli.main import app
from todsynth.config import build_config, load_config
from todsynth.errors import ConfigError
from todsynth.experiment import CellSettings
from todsynth.generator.mmdit import MMDiTArch
from todsynth.generator.train import GeneratorTrainConfig
from todsynth.synthesize import SynthesizeConfig

# what each stage needs before it validates (nothing for a cell)
REQUIRED = {
    "generator-train": {"data": "d"},
    "generator-pretrain": {"data": "toy:4"},
    "segment-train": {},
    "synthesize": {"generator": "g", "masks": "m", "out": "o", "segmenter": "s"},
    "experiment-cell": {},
}


@pytest.mark.parametrize("stage", [s.value for s in StageName])
def test_config_show_reads_back_as_the_default_config(stage: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["config", "show", stage])
    assert result.exit_code == 0, result.output
    assert "# " in result.output and "default" in result.output
    path = tmp_path / "show.yaml"
    path.write_text(result.output)
    cls, defaults = stage_config(StageName(stage))
    assert load_config(cls, path, REQUIRED[stage]) == load_config(cls, None, REQUIRED[stage], defaults)


def test_print_config_prints_the_resolved_settings_and_runs_nothing(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text("model: {num_layers: 6}\nsteps: 7\n")
    args = [
        "generator",
        "train",
        "data",
        "--out",
        str(tmp_path / "run"),
        "--config",
        str(tmp_path / "cfg.yaml"),
        "--set",
        "model.num_heads=2",
        "--control",
        "adapter",
        "--print-config",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "run").exists()
    (tmp_path / "printed.yaml").write_text(result.output)
    cfg = load_config(GeneratorTrainConfig, tmp_path / "printed.yaml")
    assert (cfg.model.num_layers, cfg.model.num_heads, cfg.model.control, cfg.steps) == (6, 2, "adapter", 7)
    assert "# optimizer steps [int; default 400]" in result.output


def test_nested_and_dotted_settings_mean_the_same() -> None:
    nested = build_config(
        CellSettings, {"generator": {"model": {"num_layers": 2}}, "synthesis": {"crfm": {"steps": 1}}}
    )
    dotted = build_config(CellSettings, {"generator.model.num_layers": 2, "synthesis.crfm.steps": 1})
    assert nested == dotted and dotted.generator.model.num_layers == 2
    assert dotted.generator.model.num_heads == MMDiTArch().num_heads  # the rest keeps its defaults
    assert build_config(CellSettings, {"synthesis.crfm.alpha_max": 0.3}).synthesis.crfm.steps == 3  # the cell's


def test_a_size_preset_fills_the_model_and_given_settings_win() -> None:
    cfg = load_config(GeneratorTrainConfig, None, {"data": "d", "model": "sd3.5-large", "model.num_layers": 6})
    assert (cfg.model.num_layers, cfg.model.num_heads, cfg.model.head_dim, cfg.model.patch_size) == (6, 38, 64, 2)
    medium = MMDiTArch.PRESETS["sd3.5-medium"]
    assert (medium.num_layers, medium.num_heads * medium.head_dim, len(medium.dual_attention_layers)) == (24, 1536, 13)
    with pytest.raises(ConfigError, match="'model' must be a mapping of settings or one of"):
        load_config(GeneratorTrainConfig, None, {"data": "d", "model": "huge"})


@pytest.mark.parametrize(
    "cls, values, words",
    [
        (GeneratorTrainConfig, {"data": "d", "num_layers": 3}, "did you mean 'model.num_layers'"),
        (SynthesizeConfig, {"generator": "g", "masks": "m", "out": "o", "crfm_steps": 2}, "'crfm.steps'"),
        (CellSettings, {"gen_layers": 2}, "unknown setting 'gen_layers'"),
        (GeneratorTrainConfig, {"data": "d", "model.control": "quad"}, "'model.control' must be one of"),
        (CellSettings, {"synthesis.crfm.schedule": "cubic"}, "'synthesis.crfm.schedule' must be one of"),
        (SynthesizeConfig, {"generator": "g", "masks": "m", "out": "o", "transforms": "identity,spin"}, "transforms"),
    ],
)
def test_unknown_names_and_choices_are_refused_by_their_dotted_name(cls, values, words) -> None:
    with pytest.raises(ConfigError, match=words):
        build_config(cls, values)


def test_a_setting_given_twice_is_refused(tmp_path):
    """Nested and dotted spellings of one setting with two values, or a key repeated in a YAML mapping, are
    ambiguous: refused naming the setting (plain YAML would keep the last one silently)."""
    from todsynth.generator.train import GeneratorTrainConfig

    both = tmp_path / "both.yaml"
    both.write_text("data: x\nmodel: {num_layers: 2}\nmodel.num_layers: 3\n")
    with pytest.raises(ConfigError, match=r"'model.num_layers' is given twice, as 2 and 3"):
        load_config(GeneratorTrainConfig, both)
    repeated = tmp_path / "repeated.yaml"
    repeated.write_text("data: x\nsteps: 5\nsteps: 7\n")
    with pytest.raises(ConfigError, match=r"given twice") as info:
        load_config(GeneratorTrainConfig, repeated)
    assert str(repeated) in str(info.value)
    same = tmp_path / "same.yaml"
    same.write_text("data: x\nmodel: {num_layers: 2}\nmodel.num_layers: 2\n")
    assert load_config(GeneratorTrainConfig, same).model.num_layers == 2
