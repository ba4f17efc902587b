"""Where and in which precision sampling, synthesis and CRFM run: one accelerate-resolved `Runtime` per
entry point, passed down to the pipeline, the segmenter and the loops.

Precision: weights stay fp32; `mixed_precision` bf16/fp16 runs the transformer, the VAE decode and the
segmenter under `torch.autocast`. What accumulates or normalises stays fp32 on purpose: the Euler update
x ← x + Δσ·v (velocities are cast to fp32 before it), CRFM's loss, gradient and its L2 normalisation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from todsynth.errors import ConfigError

MIXED_PRECISIONS = ("no", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_FIX = "use --device auto (accelerate's choice), cpu, or a device this machine has (cuda, cuda:1, mps)"


@dataclass(frozen=True)
class Runtime:
    """The device accelerate chose (or the user named), the autocast precision, and this process's rank."""

    device: torch.device
    mixed_precision: str = "no"
    process_index: int = 0
    num_processes: int = 1
    state: Any = None  # the accelerate PartialState, for barriers; None in a hand-built runtime

    @property
    def is_main_process(self) -> bool:
        """Whether this process is rank 0."""
        return self.process_index == 0

    @property
    def text_dtype(self) -> torch.dtype:
        """Weights dtype of the text encoders: bf16 with bf16 autocast, else fp32 (T5 overflows in fp16)."""
        return torch.bfloat16 if self.mixed_precision == "bf16" else torch.float32

    def wait_for_everyone(self) -> None:
        """Barrier across processes (nothing to wait for with one)."""
        if self.state is not None and self.num_processes > 1:
            self.state.wait_for_everyone()


def autocast(device: torch.device | str, mixed_precision: str = "no") -> contextlib.AbstractContextManager:
    """Autocast context for `device` in `mixed_precision` ("no": nullcontext, so fp32 runs unchanged)."""
    check_mixed_precision(mixed_precision)
    dtype = AUTOCAST_DTYPES.get(mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def check_mixed_precision(value: str) -> None:
    """Raise ConfigError unless `value` is no, bf16 or fp16."""
    if value not in MIXED_PRECISIONS:
        raise ConfigError(
            f"mixed_precision must be one of {list(MIXED_PRECISIONS)}, got {value!r}",
            fix="use no (fp32), bf16 (recommended on GPUs) or fp16",
        )


def resolve_runtime(device: str | None = "auto", mixed_precision: str = "no", state: Any = None) -> Runtime:
    """The Runtime of an entry point: "auto" (or None) takes accelerate's device for this process (its
    GPU under `accelerate launch`, the GPU with one process, else the CPU); "cpu" forces the CPU; another
    name ("cuda", "cuda:1", "mps") is checked to exist. TF32 matmuls are enabled on CUDA."""
    check_mixed_precision(mixed_precision)
    name = "auto" if device is None else str(device)
    if state is None:
        from accelerate.state import PartialState

        state = PartialState()  # a named device is chosen here, never by changing the process-wide state
    chosen = state.device if name == "auto" else _named_device(name)
    if chosen.type == state.device.type and chosen.index is None:
        chosen = state.device  # "cuda" under accelerate launch: this process's GPU
    if chosen.type == "cuda":  # TF32 matmuls: ~1e-3 relative error, far below an 8-bit image's step
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(chosen, mixed_precision, state.process_index, state.num_processes, state)


def _named_device(name: str) -> torch.device:
    """Parse a device name and refuse one this machine lacks, before anything is loaded onto it."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {name!r}", fix=DEVICE_FIX) from None
    available = {
        "cpu": True,
        "meta": False,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "xpu": hasattr(torch, "xpu") and torch.xpu.is_available(),
    }
    if not available.get(dev.type, False):
        raise ConfigError(f"device {name!r} requested but this machine has none", fix=DEVICE_FIX)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist", fix=DEVICE_FIX
        )
    return dev
