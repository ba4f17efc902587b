"""The `foundation` protocol: a cached, shared `base` (pretraining) stage and cells with init: pretrained."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from todsynth.demo import BUDGETS
from todsynth.experiment import BASE_KEYS, DATA_KEYS, GEN_KEYS, CellSettings, _gen_key, _key, run_cell, settings_from
from todsynth.grid import expand, load_grid


def test_foundation_config_expands_and_shares_one_base():
    grid = load_grid("foundation")
    tables = expand(grid)
    assert list(tables) == ["init", "main", "control", "crfm_steps"]
    assert list(tables["control"]) == ["adapter", "siamese", "triple"]
    assert list(tables["crfm_steps"]) == [f"crfm_steps={k}" for k in (0, 2, 4, 6)]
    assert list(tables["main"]) == ["real only", "plain", "CRFM", "oracle"]
    own = ("init", "control", "num_steps", "crfm_steps", "gen_timestep_mean")  # the paper's k = 4 of 23, study's t
    labelled = {k: v for k, v in grid["base"].items() if not k.startswith("base_") and k not in own}
    assert labelled == {k: v for k, v in BUDGETS["demo"].items() if k not in own}  # the demo's labelled side
    assert (grid["base"]["num_steps"], grid["base"]["crfm_steps"]) == (23, 4)
    bases, gens = set(), {}
    for table, cells in tables.items():
        for name, over in cells.items():
            for seed in grid["seeds"]:
                s = settings_from({**grid["base"], **over, "seed": seed})
                if s.init == "pretrained":
                    bases.add(_key(s, BASE_KEYS))
                gens[(table, name, seed)] = _gen_key(s)
    assert len(bases) == 1  # one pretraining for every pretrained cell, control and seed
    init = {name: gens[("init", name, 0)] for name in tables["init"]}
    assert init["scratch, plain"] == init["scratch, CRFM"] != init["pretrained, plain"] == init["pretrained, CRFM"]
    assert gens[("main", "CRFM", 0)] == init["pretrained, CRFM"] == gens[("control", "triple", 0)]


def test_scratch_cells_keep_their_cache_keys_and_base_settings_key_the_generator():
    s = CellSettings(**BUDGETS["demo"])
    assert _gen_key(s) == _key(s, GEN_KEYS, _key(s, DATA_KEYS))  # caches made before the base stage stay valid
    p = dataclasses.replace(s, init="pretrained")
    assert _gen_key(p) != _gen_key(s)
    assert _gen_key(dataclasses.replace(p, base_steps=10)) != _gen_key(p)
    assert _gen_key(dataclasses.replace(s, base_steps=10)) == _gen_key(s)  # scratch ignores base settings
    assert _key(dataclasses.replace(p, seed=5, control="adapter"), BASE_KEYS) == _key(p, BASE_KEYS)


def test_a_pretrained_cell_runs_end_to_end_and_reuses_its_base(tmp_path):
    tiny = dict(BUDGETS["tiny"], init="pretrained", base_pool=8, base_steps=2, base_batch=4, synth="plain")
    cell = CellSettings(**tiny)
    logs: list[str] = []
    first = run_cell(cell, tmp_path, log=logs.append)
    assert 0 <= first["metrics"]["mIoU"] <= 1
    base_dir = Path(first["base"]["model"])
    gen_cfg = json.loads((Path(first["generator"]["model"]).parent / "config.json").read_text())
    assert gen_cfg["init"] == str(base_dir) and gen_cfg["control"] == "triple"
    base_cfg = json.loads((base_dir.parent / "config.json").read_text())
    assert base_cfg["data"] == "toy:8:0" and base_cfg["control"] == "none" and base_cfg["unlabeled"]
    logs.clear()
    again = run_cell(dataclasses.replace(cell, seed=1, control="adapter"), tmp_path, log=logs.append)
    assert again["base"].dir == first["base"].dir and not any("stage base" in m for m in logs)
    assert any("stage generator" in m for m in logs)


def test_markdown_reports_pretraining_apart(tmp_path):
    from todsynth.grid import write_markdown

    cell = {"table": "t", "cell": "c", "n_seeds": 1, "mIoU": {"mean": 0.5, "std": 0.0}, "IoU": {"a": {"mean": 0.5}}}
    summary = {"cells": [cell], "compute": {"seconds": 600.0, "stages": 3, "by_kind": {
        "base": {"stages": 1, "seconds": 420.0}, "generator": {"stages": 2, "seconds": 180.0}}}}
    write_markdown(tmp_path / "r.md", summary, [{"table": "t", "cell": "c", "metrics": {"mIoU": 0.5}}])
    text = (tmp_path / "r.md").read_text()
    assert "pretraining (one-time" in text and "7.0 min over 1 base(s)" in text
