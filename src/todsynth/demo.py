"""`todsynth demo`: all three stages on the embedded toy data, on CPU, with a report.

Protocol (ii): the generator (trained on the few real tiles) draws one image per *new* label-only
layout; a segmenter trained on real + those pairs is compared with real only, with plain sampling vs
CRFM, and with the oracle (the toy renderer itself on the same layouts: the ceiling for any generator).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from todsynth.crfm import presynth_strip
from todsynth.data.readers import open_dataset
from todsynth.data.torchdata import SegTorchDataset
from todsynth.experiment import CellSettings, run_cell, settings_from
from todsynth.io import write_json
from todsynth.report import fmt, metrics_table, write_report
from todsynth.runs import METRICS_FILE, make_accelerator, read_metrics
from todsynth.segment.model import Segmenter
from todsynth.viz import colorize, plot_class_bars, plot_curves, save_png, tile_rows, to_uint8

BUDGETS: dict[str, dict[str, Any]] = {
    # the README demo: ≤ 10 minutes on 2 CPU cores (the generator: the "demo" size, MMDiTArch's defaults)
    "demo": {
        "data": {"size": 32, "n_real": 16, "n_layouts": 200, "n_test": 64},
        "judge_arch": "unet",
        "segmenter": {"arch": "segformer", "steps": 250, "batch_size": 16, "class_weights": "sqrt_inverse"},
        "generator": {"steps": 600, "batch_size": 16, "lr": 1e-3, "model": {"control": "adapter"}},
        "synthesis": {"num_steps": 12, "crfm": {"steps": 3}},
    },
    # seconds: for tests
    "tiny": {
        "data": {"size": 16, "n_real": 4, "n_layouts": 6, "n_test": 4},
        "judge_arch": "unet",
        "segmenter": {
            "arch": "segformer",
            "encoder": "tu-mobilenetv3_small_050",
            "steps": 3,
            "batch_size": 4,
            "class_weights": "sqrt_inverse",
        },
        "generator": {
            "steps": 3,
            "batch_size": 4,
            "model": {"patch_size": 2, "num_layers": 1, "num_heads": 2, "head_dim": 8},
        },
        "synthesis": {"num_steps": 3, "crfm": {"steps": 1}},
    },
}
METHODS = (
    ("real only", "none"),
    ("+ synthetic (plain)", "plain"),
    ("+ synthetic (CRFM)", "crfm"),
    ("+ oracle renders", "oracle"),
)
SYNTHETIC = [name for name, synth in METHODS if synth != "none"]


def run_demo(out: str | Path, budget: str = "demo", seed: int = 0, log=print) -> dict:
    """Run the demo into `out` (resumable: finished stages are reused); returns the results dict."""
    out = Path(out)
    t0 = time.perf_counter()
    base = settings_from({**BUDGETS[budget], "seed": seed}, f"demo {budget}")
    accelerator = make_accelerator()  # the demo's one: every stage of every cell trains on it
    cells = {
        name: run_cell(dataclasses.replace(base, synth=kind), out, log, budget != "tiny", accelerator)
        for name, kind in METHODS
    }
    judge = cells["+ oracle renders"]["judge"]  # every synthetic cell shares this stage
    results = {
        "protocol": "(ii) one synthetic image per new label-only layout",
        "budget": budget,
        "settings": dataclasses.asdict(base),
        "metrics": {name: c["metrics"] for name, c in cells.items()},
        "mask_fidelity": {name: cells[name]["fidelity"]["metrics"]["mIoU"] for name in SYNTHETIC},
        "judge": {"arch": base.judge_arch, "metrics_on_test": judge["metrics"]},
        "stage_wall_time_s": _stage_times(cells, judge),
        "generator": {"final_loss": cells["+ synthetic (CRFM)"]["generator"]["summary"]["final_loss"]},
    }
    results["gains"] = _gains(results["metrics"])
    figures = make_figures(out, base, cells, results)
    results["wall_time_s"] = round(time.perf_counter() - t0, 1)
    write_json(out / "results.json", results)
    write_demo_report(out, results, figures)
    return results


def _stage_times(cells: dict, judge: dict) -> dict:
    """Wall time of every stage that ran (a stage shared by several cells is counted once)."""
    times = {"judge": judge["wall_time_s"]}
    for name, c in cells.items():
        for stage in ("guidance", "generator", "synthesis", "downstream"):
            if isinstance(c.get(stage), dict):
                times[f"{stage} ({name})"] = c[stage]["wall_time_s"]
    return times


def _gains(metrics: dict) -> dict:
    """mIoU gain over real only, and each generator's share of the oracle's gain."""
    real = metrics["real only"]["mIoU"]
    oracle_gain = metrics["+ oracle renders"]["mIoU"] - real
    gains = {}
    for name in SYNTHETIC:
        gain = metrics[name]["mIoU"] - real
        gains[name] = {"miou_gain": gain, "share_of_oracle_gain": gain / oracle_gain if oracle_gain > 0 else None}
    return gains


def make_figures(out: Path, s: CellSettings, cells: dict, results: dict) -> dict[str, Path]:
    """Per-class IoU bars, loss curves and the image grid (oracle | mask | plain | CRFM | pre-synth strip)."""
    names = list(next(iter(results["metrics"].values()))["IoU"])
    figs = {
        "bars": out / "figures" / "per_class_iou.png",
        "losses": out / "figures" / "losses.png",
        "grid": out / "figures" / "samples.png",
    }
    plot_class_bars(figs["bars"], names, {k: [m["IoU"][c] for c in names] for k, m in results["metrics"].items()})
    curves = {f"segmenter: {k}": _xy(c.get("downstream", c["guidance"])["loss_history"]) for k, c in cells.items()}
    gen_hist = _generator_history(cells["+ synthetic (CRFM)"]["generator"]["model"])
    if gen_hist:
        curves["generator (flow matching)"] = gen_hist
    plot_curves(figs["losses"], curves, xlabel="step", ylabel="loss", log_y=True)
    sample_grid(figs["grid"], s, cells)
    return figs


def _xy(history: list) -> tuple[list, list]:
    return [h[0] for h in history], [h[1] for h in history]


def _generator_history(model_dir: str) -> tuple[list, list] | None:
    records = [(r["step"], r["loss"]) for r in read_metrics(Path(model_dir).parent / METRICS_FILE) if "loss" in r]
    return _xy(records) if records else None


def sample_grid(path: Path, s: CellSettings, cells: dict, n: int = 4, frames: int = 6) -> None:
    """Rows: oracle image | mask | plain | CRFM | CRFM's decoded x̂0 over the steps (pre-synth strip)."""
    from todsynth.generator.pipeline import MaskToImagePipeline, sample_seeds
    from todsynth.generator.sample import load_masks

    crfm_cell = cells["+ synthetic (CRFM)"]
    pipe = MaskToImagePipeline.from_pretrained(crfm_cell["generator"]["model"])
    seg = Segmenter.from_pretrained(crfm_cell["guidance"]["model"])
    size, num_steps = s.data.size, s.synthesis.num_steps
    labels, prompts, ids, classes = load_masks(crfm_cell["data"]["layouts"], "Train", size, n)
    oracle = _oracle_images(crfm_cell["data"]["oracle"], ids, size)
    seeds = sample_seeds(s.seed, ids)
    plain = pipe(labels, prompts, seeds=seeds, num_steps=num_steps)
    crfm, strip = presynth_strip(pipe, seg, labels, s.synthesis.crfm, seeds, num_steps=num_steps)
    keep = np.linspace(0, len(strip) - 1, min(frames, len(strip))).round().astype(int)
    rows = []
    for j in range(len(ids)):
        row = [oracle[j], colorize(labels[j].numpy(), classes), to_uint8(plain[j]), to_uint8(crfm[j])]
        row += [to_uint8(strip[k][j]) for k in keep]
        rows.append(row)
    save_png(path, tile_rows(rows, scale=max(1, 96 // size)))


def _oracle_images(root: str | None, ids: list[str], size: int) -> list[np.ndarray]:
    """The toy renderer's images for the given layout ids (the 'real image' of a layout)."""
    ds = open_dataset(root)
    tds = SegTorchDataset(ds, size=size)
    index = {i: k for k, i in enumerate(ds.ids)}
    return [to_uint8(tds[index[i]]["image"]) for i in ids]


def write_demo_report(out: Path, results: dict, figures: dict[str, Path]) -> None:
    names = list(next(iter(results["metrics"].values()))["IoU"])
    gain_rows = [["method", "mIoU gain", "share of oracle gain", "mask fidelity (judge mIoU)"]]
    for name, g in results["gains"].items():
        share = "–" if g["share_of_oracle_gain"] is None else f"{100 * g['share_of_oracle_gain']:.0f} %"
        gain_rows.append([name, f"{g['miou_gain']:+.3f}", share, fmt(results["mask_fidelity"].get(name))])
    s = results["settings"]
    d, seg, gen, syn, crfm = s["data"], s["segmenter"], s["generator"], s["synthesis"], s["synthesis"]["crfm"]
    sections = [
        (
            "Protocol",
            f"Protocol {results['protocol']}. {d['n_real']} real tiles of {d['size']} px, "
            f"{d['n_layouts']} label-only layouts, {d['n_test']} test tiles; every segmenter trains "
            f"{seg['steps']} steps ({seg['arch']}), seed {s['seed']}. Generator: control "
            f"{gen['model']['control']}, {gen['steps']} steps; sampling {syn['num_steps']} Euler steps, CRFM "
            f"on the first {crfm['steps']} (α {crfm['alpha_max']}, {crfm['schedule']}, rule "
            f"{crfm['rule']}). Total wall time {results['wall_time_s']} s.",
        ),
        ("mIoU on the test set", metrics_table(results["metrics"], names)),
        ("Gains", gain_rows),
        ("Per-class IoU", figures["bars"]),
        ("Loss curves", figures["losses"]),
        ("Samples: oracle image | mask | plain | CRFM | CRFM pre-synth x̂0 over the steps", figures["grid"]),
    ]
    write_report(out, "todsynth demo", sections)
