"""`todsynth synthesize`: thin layer over todsynth.synthesize."""

from __future__ import annotations

from typing import Any

from todsynth.cli.common import arg, finish, with_settings


@with_settings(
    "synthesize",
    ("num_steps", "guidance_scale", "batch_size", "seed", "device"),
    names={"crfm_steps": "crfm.steps"},
    arguments={
        "generator": "Generator folder (out/model of `generator train`).",
        "masks": "Masks to synthesize for: a dataset or a label-only folder.",
        "out": "Output folder (generic layout + manifest.jsonl).",
    },
    options={
        "segmenter": (str, "Guidance segmenter folder (needed for CRFM)."),
        "copies": (int, "Images per mask (and transform)."),
        "crfm_steps": (int, "crfm.steps: CRFM rectified steps k (0 = plain sampling)."),
        "mixed_precision": (str, "no | bf16 | fp16: autocast of transformer, decoder and CRFM's segmenter pass."),
    },
)
def synthesize(cfg: Any) -> None:
    """Make synthetic image/label pairs with CRFM; resumable, and sharded under `accelerate launch`.

    Every setting: `todsynth config show synthesize` (CRFM's as crfm.*, e.g. --set crfm.alpha_max=0.3)."""
    from accelerate.state import PartialState

    from todsynth.synthesize import synthesize as run

    state = PartialState()  # one process too: its device is accelerate's choice
    summary = run(cfg, accelerator=state)
    done = f", {summary.already_done} already done" if summary.already_done else ""
    finish(
        f"synthesized {summary.made} pairs ({summary.rejected} rejected{done}) into {cfg.out} "
        f"in {summary.wall_time_s:.1f} s",
        f"todsynth segment train REAL --synthetic {arg(cfg.out)} --out DOWNSTREAM --size {summary.image_size}",
    )
