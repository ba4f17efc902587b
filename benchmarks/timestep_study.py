"""Timestep study (a script, not a test): does x̂0 at CRFM's corrected steps show a readable layout?

For each training timestep distribution (logit-normal mean, share of uniform t near 1) it trains the
generator of one experiment cell (cached stages, so reruns are free), then measures side by side:
- the flow loss by timestep bin on the real tiles (where the model has learnt to predict);
- the mask fidelity of the decoded x̂0 = x_t − σ·v at the first sampling steps (plain sampling, N steps,
  sampling shift 1 and 3): an independent judge segmenter's mIoU against the conditioning masks;
- the final images' fidelity, plain and with CRFM (k of N), and the downstream-free cost of neither;
and writes a pre-synth strip per distribution (mask | x̂0 at steps 0..5 | final) as PNG.

    python benchmarks/timestep_study.py OUT [--grid foundation] [--set control=triple] [--n 48] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

VARIANTS = {
    "logit-normal (0, 1)": {"generator.timestep_mean": 0.0},
    "logit-normal mean 1": {"generator.timestep_mean": 1.0},
    "+ 20 % uniform in [0.8, 1)": {"generator.timestep_mean": 0.0, "generator.timestep_tail": 0.2},
    "mean 0.5 + 20 % tail": {"generator.timestep_mean": 0.5, "generator.timestep_tail": 0.2},
}
SHIFTS = (1.0, 3.0)
FIRST_STEPS = 6
T_BINS = 10


def parse_set(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = yaml.safe_load(value)
    return out


@torch.no_grad()
def loss_by_timestep(pipe, images: torch.Tensor, labels: torch.Tensor, prompts: list[str]) -> list[float]:
    """Flow MSE of the trained generator on real tiles at the centre of each of T_BINS timestep bins."""
    from todsynth.generator.flow import interpolate, velocity_target

    pipe.transformer.eval()
    x0 = pipe.autoencoder.encode(images, sample=False)
    cond = pipe.condition(labels, prompts)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=g)
    out = []
    for b in range(T_BINS):
        t = torch.full((x0.shape[0],), (b + 0.5) / T_BINS)
        v = pipe.transformer(interpolate(x0, noise, t), t, cond.text, cond.pooled, cond.mask)
        out.append(float(torch.nn.functional.mse_loss(v, velocity_target(x0, noise))))
    return out


def fidelity(judge, images: torch.Tensor, labels: torch.Tensor, classes) -> float:
    """The judge's mIoU on `images` against their conditioning masks (one dataset-level confusion matrix)."""
    from todsynth.segment.metrics import segmentation_metrics

    with torch.no_grad():
        pred = torch.cat([judge(images[i : i + 16]).argmax(1) for i in range(0, len(images), 16)])
    return float(segmentation_metrics(pred, labels, classes.num_classes, classes.ignore_index).miou)


def study_variant(name: str, settings, root: Path, judge, n: int, crfm_steps: int) -> dict:
    from todsynth.crfm import CRFMConfig, crfm_sample
    from todsynth.experiment import stage_data, stage_generator, stage_guidance
    from todsynth.generator.pipeline import MaskToImagePipeline
    from todsynth.generator.sample import load_masks
    from todsynth.generator.train import load_train_data
    from todsynth.segment.model import Segmenter

    data = stage_data(settings, root, print)
    guide = stage_guidance(settings, data, root, print)
    gen = stage_generator(settings, data, root, print)
    pipe = MaskToImagePipeline.from_pretrained(gen["model"])
    segmenter = Segmenter.from_pretrained(guide["model"])
    real, _ = load_train_data(data["real"], "Train", settings.data.size)
    labels, prompts, _, classes = load_masks(data["layouts"], "Train", settings.data.size)
    labels, prompts = labels[:n], prompts[:n]
    seeds = list(range(n))
    row = {
        "variant": name,
        "generator_wall_time_s": gen.get("wall_time_s"),
        "loss_by_t": loss_by_timestep(pipe, real.images, real.labels, real.prompts),
        "shifts": {},
    }
    for shift in SHIFTS:
        frames: list[torch.Tensor] = []

        def grab(i, x_t, sigma, v, frames=frames):
            if i < FIRST_STEPS:
                frames.append(pipe.preview(x_t, sigma, v))

        t0 = time.perf_counter()
        plain = pipe(labels, prompts, seeds=seeds, num_steps=settings.synthesis.num_steps, shift=shift, callback=grab)
        t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        crfm_cfg = CRFMConfig(steps=crfm_steps, alpha_max=settings.synthesis.crfm.alpha_max)
        crfm = crfm_sample(
            pipe,
            segmenter,
            labels,
            crfm_cfg,
            prompts=prompts,
            seeds=seeds,
            num_steps=settings.synthesis.num_steps,
            shift=shift,
        )
        t_crfm = time.perf_counter() - t0
        row["shifts"][str(shift)] = {
            "x0_fidelity": [fidelity(judge, f, labels, classes) for f in frames],
            "plain_fidelity": fidelity(judge, plain, labels, classes),
            "crfm_fidelity": fidelity(judge, crfm, labels, classes),
            "crfm_time_ratio": t_crfm / t_plain,
        }
        if shift == 1.0:
            row["_strip"] = (labels[:4], [f[:4] for f in frames], plain[:4])
    return row


def write_strips(rows: list[dict], classes, path: Path) -> None:
    """One block per variant: mask | x̂0 at steps 0..5 | final (plain), four layouts each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from todsynth.viz import colorize, to_uint8

    cols = FIRST_STEPS + 2
    fig, axes = plt.subplots(4 * len(rows), cols, figsize=(cols * 1.1, 4.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        labels, frames, final = row.pop("_strip")
        for j in range(4):
            ax = axes[4 * r + j]
            tiles = (
                [colorize(labels[j].numpy(), classes)]
                + [to_uint8(f[j].cpu()) for f in frames]
                + [to_uint8(final[j].cpu())]
            )
            for c, tile in enumerate(tiles):
                ax[c].imshow(tile)
                ax[c].set_xticks([])
                ax[c].set_yticks([])
            if j == 0:
                ax[0].set_title(row["variant"], fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    from todsynth.config import flatten
    from todsynth.experiment import CellSettings, settings_from, stage_data, stage_judge
    from todsynth.grid import load_grid
    from todsynth.segment.model import Segmenter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--grid", default="paper-tables", help="experiment config whose base settings the cells start from")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="cell setting key=value (repeatable)")
    ap.add_argument("--n", type=int, default=48, help="held-out layouts to sample")
    ap.add_argument("--crfm-steps", type=int, default=4)
    ap.add_argument("--only", action="append", default=[], help="variant name(s) to run")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base = {**flatten(CellSettings, load_grid(args.grid)["base"]), "synthesis.num_steps": 23, **parse_set(args.sets)}
    s0 = settings_from(base, "timestep study")
    data = stage_data(s0, args.out, print)
    judge = Segmenter.from_pretrained(stage_judge(s0, data, args.out, print)["model"]).eval()
    rows = []
    for name, over in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        rows.append(
            study_variant(name, settings_from({**base, **over}, name), args.out, judge, args.n, args.crfm_steps)
        )
    from todsynth.data.classes import LOVEDA

    write_strips(rows, LOVEDA, args.out / "timestep_strips.png")
    report(rows, args.crfm_steps)
    path = args.json or args.out / "timesteps.json"
    path.write_text(json.dumps(rows, indent=2))
    print(f"wrote {path} and {args.out / 'timestep_strips.png'}")
    return rows


def report(rows: list[dict], k: int) -> None:
    print("\nflow loss by timestep bin (t = 0.05 … 0.95)")
    for row in rows:
        print(f"  {row['variant']:<28} " + " ".join(f"{v:.3f}" for v in row["loss_by_t"]))
    for shift in SHIFTS:
        key = str(shift)
        print(
            f"\nshift {shift}: judge mIoU of x̂0 at steps 0..{FIRST_STEPS - 1} | final plain | final CRFM k={k} "
            f"| CRFM time × plain"
        )
        for row in rows:
            d = row["shifts"][key]
            x0 = " ".join(f"{v:.3f}" for v in d["x0_fidelity"])
            print(
                f"  {row['variant']:<28} {x0} | {d['plain_fidelity']:.3f} | {d['crfm_fidelity']:.3f} | "
                f"{d['crfm_time_ratio']:.2f}"
            )
    print(
        "(gain of CRFM over plain per variant, shift 1: "
        + ", ".join(
            f"{r['variant']}: {r['shifts']['1.0']['crfm_fidelity'] - r['shifts']['1.0']['plain_fidelity']:+.3f}"
            for r in rows
        )
        + ")"
    )


if __name__ == "__main__":
    main()
