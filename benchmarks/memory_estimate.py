"""Estimated peak GPU memory per memory preset for fine-tuning SD3.5-medium with a triple mask stream.

Method in `todsynth.generator.memory`: parameters counted on a meta-device build of the real model, block
activations measured on the CPU with saved-tensor hooks and scaled to the real token counts.
Usage: PYTHONPATH=src python benchmarks/memory_estimate.py [--size 512] [--batch-size 1]
"""

from __future__ import annotations

import argparse

from todsynth.generator.memory import table


def main() -> None:
    """Print the README's "Memory presets" table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent = size / 8)")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per process")
    args = parser.parse_args()
    print(
        f"| preset | params (trainable) | weights | grads | optimizer | bf16 casts | EMA | activations "
        f"| total GiB ({args.size} px, batch {args.batch_size}) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for e in table(args.size, args.batch_size):
        print(
            f"| {e.preset} | {e.total_parameters / 1e9:.2f} B ({e.trainable_parameters / 1e9:.2f} B) | "
            f"{e.weights:.1f} | {e.gradients:.1f} | {e.optimizer:.1f} | {e.autocast_copies:.1f} | {e.ema:.1f} | "
            f"{e.activations:.2f} | **{e.total:.1f}** |"
        )


if __name__ == "__main__":
    main()
