"""CRFM calibration study (a script, not a test): on held-out layouts, compare plain sampling with CRFM
for k ∈ {0, 2, 4, 6} under both step rules. Prints, measured side by side in one run:
mean |Δx̂0| vs plain at a fixed seed, mask fidelity (mIoU of an *independent* judge segmenter on the
generated images vs their masks), wall time relative to plain sampling, and peak memory (RSS).

    python benchmarks/crfm_study.py DEMO_OUT [--n 64] [--num-steps 12] [--json out.json]

DEMO_OUT is a finished `todsynth demo` folder (its cached generator, guidance and judge are reused).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def find(root: Path, stage: str) -> dict:
    """The done.json of the (single) cached stage of that name."""
    hits = sorted((root / "cache").glob(f"{stage}-*/done.json"))
    if not hits:
        raise SystemExit(f"no finished '{stage}' stage under {root}/cache: run `todsynth demo {root}` first")
    return json.loads(hits[0].read_text())


def generator_of(root: Path) -> str:
    """The triple generator's model folder (the demo trains one generator)."""
    return find(root, "generator")["model"]


def main(argv: list[str] | None = None) -> dict:
    from todsynth.crfm import CRFMConfig, crfm_sample
    from todsynth.generator.pipeline import MaskToImagePipeline, sample_seeds
    from todsynth.generator.sample import load_masks
    from todsynth.segment.metrics import segmentation_metrics
    from todsynth.segment.model import Segmenter

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("demo_out", type=Path)
    ap.add_argument("--n", type=int, default=64, help="held-out layouts")
    ap.add_argument("--num-steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    root = args.demo_out
    data = find(root, "data")
    pipe = MaskToImagePipeline.from_pretrained(generator_of(root))
    guide = Segmenter.from_pretrained(find(root, "guidance")["model"]).eval()
    judge = Segmenter.from_pretrained(find(root, "judge")["model"]).eval()
    labels, prompts, ids, classes = load_masks(data["layouts"], "Train", pipe.image_size)
    labels, prompts, ids = labels[: args.n], prompts[: args.n], ids[: args.n]  # layouts the generator never saw
    seeds = sample_seeds(1234, ids)

    def run(cfg: CRFMConfig) -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        out = [
            crfm_sample(
                pipe,
                guide,
                labels[s : s + args.batch],
                cfg,
                prompts=prompts[s : s + args.batch],
                seeds=seeds[s : s + args.batch],
                num_steps=args.num_steps,
            )
            for s in range(0, len(ids), args.batch)
        ]
        return torch.cat(out), time.perf_counter() - t0

    settings = {"plain": CRFMConfig(steps=0)}
    for k in (2, 4, 6):
        if k <= args.num_steps:
            settings[f"reference k={k}"] = CRFMConfig.reference(steps=k)
            settings[f"relative k={k}"] = CRFMConfig(steps=k, alpha_max=0.5)
    plain, _ = run(settings["plain"])
    rows = {}
    for name, cfg in settings.items():
        _, plain_secs = run(settings["plain"])  # timed right before, side by side
        images, secs = run(cfg)
        with torch.no_grad():
            pred = torch.cat([judge.predict(images[s : s + args.batch]) for s in range(0, len(ids), args.batch)])
        fid = segmentation_metrics(pred, labels, classes.num_classes, classes.ignore_index)
        rows[name] = {
            "mean_abs_dx0": float((images - plain).abs().mean()),
            "fidelity_miou": fid.miou,
            "time_s": secs,
            "time_vs_plain": secs / plain_secs,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    print(f"{'setting':<18} {'mean|Δx̂0|':>11} {'fidelity':>9} {'time×plain':>11} {'peak MiB':>9}")
    for name, r in rows.items():
        print(
            f"{name:<18} {r['mean_abs_dx0']:>11.5f} {r['fidelity_miou']:>9.3f} {r['time_vs_plain']:>11.2f} "
            f"{r['peak_rss_mib']:>9.0f}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
