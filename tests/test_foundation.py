"""The `foundation` protocol: a cached, shared `base` (pretraining) stage and cells with init: pretrained."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from todsynth.config import flatten
from todsynth.demo import BUDGETS
from todsynth.experiment import (
    CellSettings,
    base_config,
    generator_config,
    resolve_counts,
    run_cell,
    settings_from,
    stage_key,
)
from todsynth.grid import expand, load_grid

ROOT = Path("exp")


def base_key(s: CellSettings) -> str:
    return stage_key(ROOT, base_config(s))


def gen_key(s: CellSettings) -> str:
    """The generator stage's key of cell `s` on a stand-in data stage (its base: the one `s` keys)."""
    base = {"model": str(ROOT.absolute() / "cache" / f"base-{base_key(s)}" / "model")}
    data = {"real": str(ROOT.absolute() / "cache" / "data-x" / "real")}
    return stage_key(ROOT, generator_config(resolve_counts(s), data, base if s.init == "pretrained" else None))


def cell(values: dict) -> CellSettings:
    return settings_from(flatten(CellSettings, values))


def test_foundation_config_expands_and_shares_one_base():
    grid = load_grid("foundation")
    tables = expand(grid)
    assert list(tables) == ["init", "main", "control", "crfm_steps"]
    assert list(tables["control"]) == ["adapter", "siamese", "triple"]
    assert list(tables["crfm_steps"]) == [f"synthesis.crfm.steps={k}" for k in (0, 2, 4, 6)]
    assert list(tables["main"]) == ["real only", "plain", "CRFM", "oracle"]
    own = ("init", "generator.model.control", "synthesis.num_steps", "synthesis.crfm.steps")  # the paper's k = 4 of 23
    base = flatten(CellSettings, grid["base"])
    labelled = {k: v for k, v in base.items() if not k.startswith("base.") and k not in own}
    assert labelled == {k: v for k, v in flatten(CellSettings, BUDGETS["demo"]).items() if k not in own}
    assert (base["synthesis.num_steps"], base["synthesis.crfm.steps"]) == (23, 4)
    bases, gens = set(), {}
    for table, cells in tables.items():
        for name, over in cells.items():
            for seed in grid["seeds"]:
                s = cell({**base, **over, "seed": seed})
                if s.init == "pretrained":
                    bases.add(base_key(s))
                gens[(table, name, seed)] = gen_key(s)
    assert len(bases) == 1  # one pretraining for every pretrained cell, control and seed
    init = {name: gens[("init", name, 0)] for name in tables["init"]}
    assert init["scratch, plain"] == init["scratch, CRFM"] != init["pretrained, plain"] == init["pretrained, CRFM"]
    assert gens[("main", "CRFM", 0)] == init["pretrained, CRFM"] == gens[("control", "triple", 0)]


def test_generator_keys_follow_the_base_settings_only_when_pretrained():
    s = cell(BUDGETS["demo"])
    p = dataclasses.replace(s, init="pretrained")
    assert gen_key(p) != gen_key(s)
    more = dataclasses.replace(p.base, steps=10)
    assert gen_key(dataclasses.replace(p, base=more)) != gen_key(p)
    assert gen_key(dataclasses.replace(s, base=more)) == gen_key(s)  # scratch ignores base settings
    adapter = dataclasses.replace(p.generator, model=dataclasses.replace(p.generator.model, control="adapter"))
    assert base_key(dataclasses.replace(p, seed=5, generator=adapter)) == base_key(p)
    assert gen_key(dataclasses.replace(s, generator=dataclasses.replace(s.generator, lr=0.01))) != gen_key(s)


def test_a_pretrained_cell_runs_end_to_end_and_reuses_its_base(tmp_path):
    tiny = {
        **flatten(CellSettings, BUDGETS["tiny"]),
        "init": "pretrained",
        "base.pool": 8,
        "base.steps": 2,
        "base.batch_size": 4,
        "synth": "plain",
    }
    s = cell(tiny)
    logs: list[str] = []
    first = run_cell(s, tmp_path, log=logs.append)
    assert 0 <= first["metrics"]["mIoU"] <= 1
    base_dir = Path(first["base"]["model"])
    gen_cfg = json.loads((Path(first["generator"]["model"]).parent / "config.json").read_text())
    assert gen_cfg["init"] == str(base_dir) and gen_cfg["model"]["control"] == "triple"
    base_cfg = json.loads((base_dir.parent / "config.json").read_text())
    assert base_cfg["data"] == "toy:8:0" and base_cfg["model"]["control"] == "none" and base_cfg["unlabeled"]
    logs.clear()
    again = run_cell(cell({**tiny, "seed": 1, "generator.model.control": "adapter"}), tmp_path, log=logs.append)
    base_lines = [m for m in logs if m.startswith("stage base")]
    assert again["base"].dir == first["base"].dir and base_lines and all(m.endswith("(cached)") for m in base_lines)
    assert any("stage generator" in m for m in logs)


def test_markdown_reports_pretraining_apart(tmp_path):
    from todsynth.grid import write_markdown

    cell = {"table": "t", "cell": "c", "n_seeds": 1, "mIoU": {"mean": 0.5, "std": 0.0}, "IoU": {"a": {"mean": 0.5}}}
    summary = {
        "cells": [cell],
        "compute": {
            "seconds": 600.0,
            "stages": 3,
            "by_kind": {"base": {"stages": 1, "seconds": 420.0}, "generator": {"stages": 2, "seconds": 180.0}},
        },
    }
    write_markdown(tmp_path / "r.md", summary, [{"table": "t", "cell": "c", "metrics": {"mIoU": 0.5}}])
    text = (tmp_path / "r.md").read_text()
    assert "pretraining (one-time" in text and "7.0 min over 1 base(s)" in text
