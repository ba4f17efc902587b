"""`todsynth synthesize`: thin layer over todsynth.synthesize."""

from __future__ import annotations

from typing import Optional

import typer

from todsynth.cli.common import Settings, console, friendly, with_settings


@friendly
@with_settings("num_steps", "guidance_scale", "batch_size", "seed", "device")
def synthesize(
    generator: Optional[str] = typer.Argument(None, show_default=False, help="Generator folder (out/model of "
                                              "`generator train`)."),
    masks: Optional[str] = typer.Argument(None, show_default=False, help="Masks to synthesize for: a dataset or a "
                                          "label-only folder."),
    out: Optional[str] = typer.Argument(None, show_default=False, help="Output folder (generic layout + "
                                        "manifest.jsonl)."),
    segmenter: Optional[str] = typer.Option(None, show_default=False, help="Guidance segmenter folder (needed for "
                                            "CRFM)."),
    copies: Optional[int] = typer.Option(None, show_default=False, help="Images per mask (and transform; default 1)."),
    crfm_steps: Optional[int] = typer.Option(None, show_default=False, help="crfm.steps: CRFM rectified steps k (0 = "
                                             "plain sampling; default 4)."),
    mixed_precision: Optional[str] = typer.Option(None, show_default=False, help="no | bf16 | fp16: autocast of "
                                                  "transformer, decoder and CRFM's segmenter pass."),
    *,
    settings: Settings,
) -> None:
    """Make synthetic image/label pairs with CRFM; resumable, and sharded under `accelerate launch`.

    Every setting: `todsynth config show synthesize` (CRFM's as crfm.*, e.g. --set crfm.alpha_max=0.3)."""
    from todsynth.synthesize import SynthesizeConfig, synthesize as run

    options = {"generator": generator, "masks": masks, "out": out, "segmenter": segmenter, "copies": copies,
               "crfm.steps": crfm_steps, "mixed_precision": mixed_precision}
    cfg = settings.resolve(SynthesizeConfig, options)
    from todsynth.generator.runtime import partial_state

    state = partial_state(cpu=cfg.device == "cpu")  # one process too: its device is accelerate's choice
    summary = run(cfg, accelerator=state)
    if state.is_main_process:
        done = f", {summary['already_done']} already done" if summary["already_done"] else ""
        console.print(f"synthesized {summary['made']} pairs ({summary['rejected']} rejected{done}) into {cfg.out} "
                      f"in {summary['wall_time_s']:.1f} s")
