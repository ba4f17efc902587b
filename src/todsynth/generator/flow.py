"""Rectified flow: x_t = (1 − t)·x0 + t·ε, the model predicts v ≈ ε − x0; Euler sampling from t = 1 to 0."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

TimestepSampling = Literal["uniform", "logit_normal"]
Velocity = Callable[[Tensor, Tensor], Tensor]  # (x_t, sigma [B]) -> v
Corrector = Callable[[int, Tensor, Tensor, Tensor], Tensor]  # (step, x_t, sigma [B], v) -> corrected v


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 − t)·x0 + t·ε, with t [B] broadcast over the other axes."""
    t = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow regression target v = ε − x0."""
    return noise - x0


def predict_x0(x_t: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
    """x̂0 = x_t − σ·v (exact when v is the true velocity)."""
    return x_t - sigma.view(-1, *([1] * (x_t.ndim - 1))) * v


def sample_timesteps(
    n: int,
    mode: TimestepSampling = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    tail: float = 0.0,
    tail_from: float = 0.8,
) -> Tensor:
    """Training timesteps t in (0, 1): uniform, or logit-normal as in SD3 (sigmoid of N(mean, std); mean > 0
    moves mass toward noise). With `tail` > 0 that share of samples is drawn uniform in [tail_from, 1), where
    logit-normal rarely looks but CRFM's corrected steps sample; tail = 0 draws exactly as before."""
    if mode == "uniform":
        t = torch.rand(n, generator=generator)
    elif mode == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    else:
        raise ValueError(f"unknown timestep sampling {mode!r}")
    if tail > 0:
        pick = torch.rand(n, generator=generator) < tail
        high = tail_from + (1 - tail_from) * torch.rand(n, generator=generator)
        t = torch.where(pick, high, t)
    return t


def flow_sigmas(num_steps: int, shift: float = 1.0) -> Tensor:
    """Sampling sigmas from 1 to 0 (num_steps + 1 values) from diffusers' FlowMatchEulerDiscreteScheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.float().clone()


def euler_sample(
    velocity: Velocity,
    x: Tensor,
    sigmas: Tensor,
    corrector: Corrector | None = None,
    num_corrected: int = 0,
    callback: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Euler integration x ← x + (σ_{i+1} − σ_i)·v. Steps i < num_corrected pass v through `corrector`
    (CRFM) first; with num_corrected = 0 this is plain flow sampling, bit for bit."""
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i].expand(x.shape[0]).to(x.device)
        v = velocity(x, sigma)
        if corrector is not None and i < num_corrected:
            v = corrector(i, x, sigma, v)
        if callback is not None:
            callback(i, x, sigma, v)
        x = x + (sigmas[i + 1] - sigmas[i]).to(x.dtype) * v
    return x
