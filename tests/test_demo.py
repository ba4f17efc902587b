"""The demo and the experiment runner end to end at a tiny budget; reports agree with the result JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from todsynth.demo import run_demo

ACCELERATORS: list[object] = []  # every accelerate.Accelerator the tiny demo made


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> tuple[Path, dict]:
    from accelerate import Accelerator

    init = Accelerator.__init__

    def counted(self, *args, **kwargs) -> None:
        ACCELERATORS.append(self)
        init(self, *args, **kwargs)

    out = tmp_path_factory.mktemp("demo") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Accelerator, "__init__", counted)
        return out, run_demo(out, budget="tiny", log=lambda m: None)


def test_the_demo_makes_one_accelerator_for_all_its_stages(demo_out):
    """One Accelerator per entry point, passed down to every trainer and synthesis (none made per stage)."""
    assert len(ACCELERATORS) == 1


def test_report_files_exist(demo_out):
    out, _ = demo_out
    for name in (
        "report.md",
        "report.html",
        "results.json",
        "figures/per_class_iou.png",
        "figures/losses.png",
        "figures/samples.png",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name


def test_report_numbers_match_results_json(demo_out):
    out, results = demo_out
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == json.loads(json.dumps(results["metrics"]))
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for name, m in saved["metrics"].items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{m['mIoU']:.3f}" and cells[2] == f"{m['OA']:.3f}" and cells[3] == f"{m['mAcc']:.3f}"
        assert f"<td>{m['mIoU']:.3f}</td>" in html
    real = saved["metrics"]["real only"]["mIoU"]
    for name, g in saved["gains"].items():
        assert g["miou_gain"] == pytest.approx(saved["metrics"][name]["mIoU"] - real)
        assert f"| {name} | {g['miou_gain']:+.3f} |" in md
    assert "(ii)" in md and "label-only" in md  # the report says which protocol it used


def test_demo_resumes_from_cache(demo_out):
    out, results = demo_out
    again = run_demo(out, budget="tiny", log=lambda m: None)
    assert again["metrics"] == results["metrics"]
    assert again["wall_time_s"] < 0.5 * results["wall_time_s"] + 30


def test_experiment_smoke_grid(tmp_path):
    from todsynth.grid import load_grid, run_grid

    grid = load_grid("smoke")
    summary = run_grid(grid, tmp_path / "exp", only=["main"], seeds=[0, 1], log=lambda m: None)
    cells = {c["cell"]: c for c in summary["cells"]}
    assert set(cells) == {"real only", "CRFM"} and all(c["n_seeds"] == 2 for c in cells.values())
    rows = json.loads((tmp_path / "exp" / "results.json").read_text())["rows"]
    vals = [r["metrics"]["mIoU"] for r in rows if r["cell"] == "CRFM"]
    assert cells["CRFM"]["mIoU"]["mean"] == pytest.approx(sum(vals) / len(vals))
    assert (tmp_path / "exp" / "results.csv").read_text().count("\n") == 3
    assert (tmp_path / "exp" / "figures" / "main.png").is_file()
    md = (tmp_path / "exp" / "results.md").read_text()
    m = cells["CRFM"]["mIoU"]
    fid = cells["CRFM"]["mask_fidelity"]
    assert f"| CRFM | 2 | {m['mean']:.3f} ± {m['std']:.3f} | {vals[0]:.3f} / {vals[1]:.3f} | {fid['mean']:.3f} |" in md
    fids = [r["mask_fidelity"] for r in rows if r["cell"] == "CRFM"]
    assert all(0 <= f <= 1 for f in fids) and fid["mean"] == pytest.approx(sum(fids) / 2)
    assert cells["real only"]["mask_fidelity"]["mean"] is None  # no synthetic pairs to judge
    assert all(r["compute_s"] > 0 for r in rows)
    compute = summary["compute"]  # every distinct stage once: data; per seed guidance, generator, synthesis,
    # downstream, and the judge with the fidelity of the synthetic pairs
    assert compute["stages"] == 2 * 6 + 1 and set(compute["by_kind"]) == {
        "data",
        "guidance",
        "generator",
        "synthesis",
        "downstream",
        "judge",
        "fidelity",
    }
    assert compute["by_kind"]["guidance"]["stages"] == 2 and compute["seconds"] >= summary["wall_time_s"] * 0.5
    again = run_grid(grid, tmp_path / "exp", only=["main"], seeds=[0, 1], log=lambda m: None)
    assert again["compute"] == compute and again["wall_time_s"] < summary["wall_time_s"]


def test_builtin_paper_tables_config_expands():
    from todsynth.config import flatten
    from todsynth.demo import BUDGETS
    from todsynth.experiment import CellSettings, settings_from
    from todsynth.grid import expand, load_grid

    grid = load_grid("paper-tables")
    assert grid["base"] == BUDGETS["demo"]  # the main table's seed 0 is the demo
    tables = expand(grid)
    assert {
        "main",
        "control",
        "crfm_steps",
        "crfm_schedule",
        "ratio",
        "filtering",
        "few_shot",
        "protocol",
        "balance",
    } <= set(tables)
    assert list(tables["crfm_steps"]) == [f"synthesis.crfm.steps={k}" for k in (0, 2, 4, 6)]
    for cells in tables.values():
        for over in cells.values():
            settings_from({**flatten(CellSettings, grid["base"]), **over}).validate()


def test_cache_made_from_a_relative_folder_works_from_another_directory(tmp_path, monkeypatch):
    import dataclasses

    from todsynth.demo import BUDGETS
    from todsynth.experiment import run_cell, settings_from

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cell = settings_from({**BUDGETS["tiny"], "synth": "oracle"})
    monkeypatch.chdir(tmp_path / "a")
    first = run_cell(cell, "exp", log=lambda m: None)
    assert Path(first["data"]["real"]).is_absolute()
    monkeypatch.chdir(tmp_path / "b")  # a new downstream stage opens the cached data from elsewhere
    again = run_cell(
        dataclasses.replace(cell, downstream=dataclasses.replace(cell.downstream, real_share=0.25)),
        tmp_path / "a" / "exp",
        log=lambda m: None,
    )
    assert again["data"] == first["data"] and 0 <= again["metrics"]["mIoU"] <= 1
