"""Rectified-flow maths: interpolation, target, x̂0, and the training timestep distributions."""

from __future__ import annotations

import torch

from todsynth.generator.flow import interpolate, predict_x0, sample_timesteps, velocity_target


def test_x0_prediction_inverts_interpolation_with_the_true_velocity():
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.rand(3)
    x_t = interpolate(x0, noise, t)
    assert torch.allclose(predict_x0(x_t, t, velocity_target(x0, noise)), x0, atol=1e-6)


def test_logit_normal_mean_moves_mass_toward_noise():
    g = torch.Generator().manual_seed(0)
    centred = sample_timesteps(20_000, "logit_normal", 0.0, 1.0, generator=g)
    shifted = sample_timesteps(20_000, "logit_normal", 1.0, 1.0, generator=g)
    assert abs(centred.median() - 0.5) < 0.02
    assert shifted.median() > 0.7 and (shifted > 0.8).float().mean() > 2 * (centred > 0.8).float().mean()


def test_tail_share_draws_that_share_uniformly_near_one():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20_000, "logit_normal", tail=0.25, generator=g)
    base = sample_timesteps(20_000, "logit_normal", generator=torch.Generator().manual_seed(1))
    high = (t >= 0.8).float().mean() - (base >= 0.8).float().mean() * 0.75
    assert abs(high - 0.25) < 0.02
    assert ((t >= 0) & (t < 1)).all()
    only_tail = sample_timesteps(1000, "uniform", tail=1.0, generator=g)
    assert (only_tail >= 0.8).all() and only_tail.std() > 0.03


def test_no_tail_draws_exactly_as_before():
    """tail = 0 consumes no extra random numbers: runs made before the setting existed are unchanged."""
    a = sample_timesteps(8, "logit_normal", generator=torch.Generator().manual_seed(3))
    b = torch.sigmoid(torch.randn(8, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(a, b)
