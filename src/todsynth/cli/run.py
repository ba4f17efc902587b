"""`todsynth demo` and `todsynth experiment`: thin layers over todsynth.demo / todsynth.experiment."""

from __future__ import annotations

from pathlib import Path

import typer

from todsynth.cli.common import console


def demo(
    out: Path = typer.Argument(Path("demo-out"), help="Output folder (re-running resumes finished stages)."),
    budget: str = typer.Option("demo", help="demo (≤ 10 min on 2 CPU cores) or tiny (seconds, a smoke run)."),
    seed: int = typer.Option(0, help="Seed of the generator, synthesis and segmenters."),
) -> None:
    """All three stages on the embedded data: real-only → generator → CRFM synthesis → real+synthetic."""
    from todsynth.demo import BUDGETS, run_demo
    from todsynth.errors import ConfigError

    if budget not in BUDGETS:
        raise ConfigError(f"unknown budget {budget!r}; choose one of {sorted(BUDGETS)}")
    results = run_demo(out, budget=budget, seed=seed, log=lambda m: console.print(m, highlight=False))
    console.print(_tables(results))
    for name, g in results["gains"].items():
        share = g["share_of_oracle_gain"]
        console.print(
            f"{name}: mIoU {g['miou_gain']:+.3f} vs real only"
            + ("" if share is None else f", {100 * share:.0f} % of the oracle's gain")
            + f"; mask fidelity {results['mask_fidelity'][name]:.3f}"
        )
    console.print(f"report: {out / 'report.html'} ({results['wall_time_s']} s)")


def _tables(results: dict):
    """Two narrow tables: overall metrics per method, and per-class IoU (classes as rows)."""
    from rich.columns import Columns
    from rich.table import Table

    metrics = results["metrics"]
    overall = Table(title=f"test set — protocol {results['protocol']}")
    overall.add_column("method")
    for h in ("mIoU", "OA", "mAcc"):
        overall.add_column(h, justify="right")
    for name, m in metrics.items():
        overall.add_row(name, *(f"{m[k]:.3f}" for k in ("mIoU", "OA", "mAcc")))
    per_class = Table(title="per-class IoU")
    per_class.add_column("class")
    for name in metrics:
        per_class.add_column(name.replace("+ synthetic ", "+ syn "), justify="right")
    for c in next(iter(metrics.values()))["IoU"]:
        per_class.add_row(c, *("–" if m["IoU"][c] is None else f"{m['IoU'][c]:.3f}" for m in metrics.values()))
    return Columns([overall, per_class])


def experiment(
    config: str = typer.Argument(..., help="YAML grid file, or a built-in: paper-tables, foundation, smoke."),
    out: Path = typer.Argument(..., help="Output folder (cached stages; re-running resumes)."),
    only: list[str] | None = typer.Option(None, "--only", help="Run only TABLE or TABLE/CELL (repeatable)."),
    seeds: list[int] | None = typer.Option(None, "--seed", help="Override the config's seeds (repeatable)."),
    set_: list[str] | None = typer.Option(None, "--set", help="Override a base setting as key=value."),
) -> None:
    """Run a grid of cells × seeds (mean ± std, CSV + JSON + plots); any cell can run alone."""
    from todsynth.config import parse_overrides
    from todsynth.grid import format_metric, load_grid, run_grid

    grid = load_grid(config)
    summary = run_grid(
        grid,
        out,
        only=only,
        seeds=seeds,
        overrides=parse_overrides(set_),
        log=lambda m: console.print(m, highlight=False),
    )
    for c in summary["cells"]:
        m = c["mIoU"]
        console.print(
            f"{c['table']:>20} | {c['cell']:<28} mIoU {format_metric(m['mean'])} ± "
            f"{format_metric(m['std'])} (n={c['n_seeds']})"
        )
    c = summary["compute"]
    console.print(
        f"results: {out / 'results.csv'} ({summary['wall_time_s']} s now; the grid from scratch: "
        f"{c['seconds'] / 60:.1f} min over {c['stages']} stages, as measured when each ran)"
    )
