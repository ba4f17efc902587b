"""`todsynth experiment`: a YAML-driven grid of cells × seeds over the cached stage pipeline, with
mean ± std tables (CSV + JSON) and bar plots. Any cell can be run alone; finished cells are reused.

Config shape (settings as in `todsynth config show experiment-cell`, nested or dotted)::

    base: {data: {size: 32, n_real: 16}, ...}   # CellSettings shared by every cell
    seeds: [0, 1, 2]
    tables:
      main:                                     # one table = named cells (overrides of base)
        cells: {real only: {synth: none}, plain: {synth: plain}, CRFM: {synth: crfm}}
      crfm_steps:
        sweep: {synthesis.crfm.steps: [0, 2, 4, 6]}   # or a one-key sweep (cell name = key=value)
        fixed: {synth: crfm}
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from todsynth.config import flatten
from todsynth.errors import ConfigError
from todsynth.experiment import CellSettings, cell_compute_s, run_cell, settings_from, stage_times
from todsynth.io import write_json, write_text
from todsynth.runs import make_accelerator
from todsynth.viz import _save_figure

BUILTIN = ("paper-tables", "foundation", "smoke")


def load_grid(source: str | Path) -> dict:
    """A grid config from a YAML file or a built-in name (paper-tables, foundation, smoke)."""
    if str(source) in BUILTIN:
        text = resources.files("todsynth").joinpath(f"configs/{source}.yaml").read_text()
        where = f"built-in {source}"
    else:
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError(
                f"cannot read experiment config: {e.strerror}",
                path=path,
                fix=f"give a YAML file or one of {list(BUILTIN)}",
            ) from None
        where = str(path)
    try:
        grid = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", path=where) from None
    if not isinstance(grid, dict) or not isinstance(grid.get("tables"), dict) or not grid["tables"]:
        raise ConfigError("an experiment config needs a 'tables' mapping", path=where)
    grid.setdefault("base", {})
    grid.setdefault("seeds", [0])
    grid["_source"] = where
    return grid


def expand(grid: dict) -> dict[str, dict[str, dict]]:
    """table -> cell name -> settings overrides (base not included)."""
    out: dict[str, dict[str, dict]] = {}
    for table, spec in grid["tables"].items():
        if not isinstance(spec, dict):
            raise ConfigError(f"table {table!r} must be a mapping", path=grid["_source"])
        fixed = flatten(CellSettings, spec.get("fixed") or {})  # dotted names: merging keeps the other nested ones
        if "cells" in spec:
            cells = spec["cells"].items()
            out[table] = {str(name): {**fixed, **flatten(CellSettings, over or {})} for name, over in cells}
        elif "sweep" in spec and isinstance(spec["sweep"], dict) and len(spec["sweep"]) == 1:
            ((key, values),) = spec["sweep"].items()
            out[table] = {f"{key}={v}": {**fixed, key: v} for v in values}
        else:
            raise ConfigError(f"table {table!r} needs 'cells' or a one-key 'sweep'", path=grid["_source"])
    return out


def run_grid(
    grid: dict,
    out: str | Path,
    only: list[str] | None = None,
    seeds: list[int] | None = None,
    log=print,
    overrides: dict | None = None,
) -> dict:
    """Run every (table, cell, seed) — or only `table` / `table/cell` entries — and write the summaries."""
    out = Path(out)
    tables = expand(grid)
    seeds = seeds or list(grid["seeds"])
    rows: list[dict[str, Any]] = []
    used: dict[str, float] = {}
    t0 = time.perf_counter()
    todo = []  # every cell's settings are checked before the first one runs
    for table, cells in tables.items():
        for name, over in cells.items():
            if only and not any(sel in (table, f"{table}/{name}") for sel in only):
                continue
            for seed in seeds:
                values = {**flatten(CellSettings, grid["base"]), **over, **flatten(CellSettings, overrides or {})}
                values["seed"] = seed
                todo.append((table, name, seed, settings_from(values, f"{grid['_source']}: {table}/{name}")))
    accelerator = make_accelerator()  # the grid's one: every stage of every cell trains on it
    for table, name, seed, s in todo:
        log(f"cell {table}/{name} seed {seed}")
        result = run_cell(s, out, log, accelerator=accelerator)
        used.update(stage_times(result))
        fidelity = result["fidelity"]["metrics"]["mIoU"] if "fidelity" in result else None
        rows.append(
            {
                "table": table,
                "cell": name,
                "seed": seed,
                "settings": result["settings"],
                "metrics": result["metrics"],
                "mask_fidelity": fidelity,
                "compute_s": cell_compute_s(result),
            }
        )
    summary = summarise(rows)
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    summary["compute"] = compute_summary(used)
    write_json(out / "results.json", {"rows": rows, "summary": summary})
    write_csv(out / "results.csv", summary)
    write_markdown(out / "results.md", summary, rows)
    plot_tables(out, summary)
    return summary


def compute_summary(stage_seconds: dict[str, float]) -> dict:
    """The grid's cost from scratch: measured wall time of every distinct stage it used (cached ones too),
    in total and per stage kind. A stage that was killed and resumed counts only its last run's time."""
    kinds: dict[str, dict[str, float]] = {}
    for folder, sec in stage_seconds.items():
        kind = Path(folder).name.rsplit("-", 1)[0]
        k = kinds.setdefault(kind, {"stages": 0, "seconds": 0.0})
        k["stages"] += 1
        k["seconds"] = round(k["seconds"] + sec, 2)
    return {"stages": len(stage_seconds), "seconds": round(sum(stage_seconds.values()), 1), "by_kind": kinds}


def summarise(rows: list[dict]) -> dict:
    """Mean ± std over seeds per (table, cell): mIoU, OA, mAcc, per-class IoU, the synthetic pairs' mask
    fidelity (judge mIoU) and the cell's compute (its stages' wall time, pretraining left out)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["table"], r["cell"]), []).append(r)
    cells = []
    for (table, cell), mine in groups.items():
        ms = [r["metrics"] for r in mine]
        entry: dict[str, Any] = {"table": table, "cell": cell, "n_seeds": len(ms)}
        for k in ("mIoU", "OA", "mAcc"):
            entry[k] = _mean_std([m[k] for m in ms])
        entry["IoU"] = {c: _mean_std([m["IoU"][c] for m in ms]) for c in ms[0]["IoU"]}
        for k in ("mask_fidelity", "compute_s"):
            entry[k] = _mean_std([r[k] for r in mine])
        cells.append(entry)
    return {"cells": cells}


def _mean_std(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}


def write_csv(path: Path, summary: dict) -> None:
    buf = io.StringIO()
    if summary["cells"]:
        classes = list(summary["cells"][0]["IoU"])
        w = csv.writer(buf)
        header = ["table", "cell", "n_seeds", "mIoU_mean", "mIoU_std", "OA_mean", "mAcc_mean"]
        w.writerow([*header, *[f"IoU_{c}" for c in classes]])
        for c in summary["cells"]:
            first = [c["table"], c["cell"], c["n_seeds"], c["mIoU"]["mean"], c["mIoU"]["std"], c["OA"]["mean"]]
            w.writerow([*first, c["mAcc"]["mean"], *[c["IoU"][k]["mean"] for k in classes]])
    write_text(path, buf.getvalue())


def write_markdown(path: Path, summary: dict, rows: list[dict]) -> None:
    """The tables as Markdown: mIoU mean ± std, the per-seed values and per-class IoU means; the grid's
    from-scratch compute at the end."""
    per_seed: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        per_seed.setdefault((r["table"], r["cell"]), []).append(format_metric(r["metrics"]["mIoU"]))
    lines: list[str] = []
    for table in dict.fromkeys(c["table"] for c in summary["cells"]):
        cells = [c for c in summary["cells"] if c["table"] == table]
        classes = list(cells[0]["IoU"])
        lines += [
            f"## {table}",
            "",
            "| cell | seeds | mIoU | per seed | mask fidelity | compute min | " + " | ".join(classes) + " |",
            "|---" * (6 + len(classes)) + "|",
        ]
        for c in cells:
            m, fid, sec = c["mIoU"], c.get("mask_fidelity", {}), c.get("compute_s", {})
            ious = " | ".join(format_metric(c["IoU"][k]["mean"]) for k in classes)
            minutes = "n/a" if sec.get("mean") is None else f"{sec['mean'] / 60:.1f}"
            lines.append(
                f"| {c['cell']} | {c['n_seeds']} | {format_metric(m['mean'])} ± "
                f"{format_metric(m['std'])} | {' / '.join(per_seed[(table, c['cell'])])} | "
                f"{format_metric(fid.get('mean'))} | {minutes} | {ious} |"
            )
        lines.append("")
    sizes = sorted({r["settings"]["data"]["size"] for r in rows if "settings" in r})
    if sizes:
        lines += [
            "Mask fidelity: an independent judge segmenter's mIoU on the cell's synthetic images against "
            "their conditioning masks; compute: the wall time of the stages the cell used (pretraining "
            "apart), as measured when each ran.",
            f"Working size {' / '.join(map(str, sizes))} px: every model trains at its cell's size, and "
            "each test tile is predicted at that size and scored at its own resolution.",
        ]
    if "compute" in summary:
        k = summary["compute"]
        kinds = "; ".join(
            f"{name}: {v['stages']} stages, {v['seconds'] / 60:.1f} min" for name, v in k["by_kind"].items()
        )
        lines.append(f"Compute from scratch: {k['seconds'] / 60:.1f} min over {k['stages']} stages ({kinds}).")
        if "base" in k["by_kind"]:
            b = k["by_kind"]["base"]
            lines.append(
                f"Of which pretraining (one-time: every `init: pretrained` cell with the same base settings "
                f"shares it): {b['seconds'] / 60:.1f} min over {b['stages']} base(s)."
            )
    write_text(path, "\n".join(lines) + "\n")


def format_metric(v: float | None) -> str:
    """A metric with 3 decimals, or n/a when it is undefined (None)."""
    return "n/a" if v is None else f"{v:.3f}"


def plot_tables(out: Path, summary: dict) -> None:
    """One bar plot of mIoU (mean ± std) per table."""
    import matplotlib.pyplot as plt

    by_table: dict[str, list[dict]] = {}
    for c in summary["cells"]:
        by_table.setdefault(c["table"], []).append(c)
    for table, cells in by_table.items():
        fig, ax = plt.subplots(figsize=(max(3.5, 1.1 * len(cells)), 3))
        means = [c["mIoU"]["mean"] or 0.0 for c in cells]
        stds = [c["mIoU"]["std"] or 0.0 for c in cells]
        ax.bar(range(len(cells)), means, yerr=stds, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(cells)), [c["cell"] for c in cells], rotation=25, ha="right")
        ax.set_ylabel("mIoU")
        ax.set_title(table)
        ax.grid(axis="y", alpha=0.3)
        _save_figure(fig, out / "figures" / f"{table}.png")
        plt.close(fig)
