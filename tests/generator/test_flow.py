"""Rectified-flow maths: interpolation, target, x̂0, and the training timestep distributions."""

from __future__ import annotations

import pytest
import torch

from todsynth.generator.flow import (
    euler_sample,
    flow_sigmas,
    interpolate,
    predict_x0,
    sample_timesteps,
    velocity_target,
)


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


def test_interpolation_runs_from_data_at_zero_to_noise_at_one_per_sample():
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x = interpolate(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(x[0], x0[0]) and torch.equal(x[1], noise[1])
    mid = interpolate(x0, noise, torch.tensor([0.25, 0.25]))
    assert torch.allclose(mid, 0.75 * x0 + 0.25 * noise)


def test_velocity_target_is_the_time_derivative_of_the_path():
    x0, noise, t = (
        torch.randn(3, 2, 4, 4, dtype=torch.float64),
        torch.randn(3, 2, 4, 4, dtype=torch.float64),
        torch.rand(3, dtype=torch.float64) * 0.9,
    )
    h = 1e-3
    slope = (interpolate(x0, noise, t + h) - interpolate(x0, noise, t)) / h
    assert torch.allclose(slope, velocity_target(x0, noise), atol=1e-9)


def test_uniform_timesteps_fill_the_unit_interval_and_repeat_with_a_seed():
    t = sample_timesteps(50_000, "uniform", generator=torch.Generator().manual_seed(0))
    assert ((t >= 0) & (t < 1)).all()
    assert abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.005
    again = sample_timesteps(50_000, "uniform", generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_logit_normal_is_the_sigmoid_of_the_given_normal():
    t = sample_timesteps(50_000, "logit_normal", mean=0.5, std=0.7, generator=torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.7) < 0.02


def test_unknown_timestep_sampling_is_refused():
    with pytest.raises(ValueError, match="unknown timestep sampling 'cosine'"):
        sample_timesteps(4, "cosine")  # type: ignore[arg-type]


@pytest.mark.parametrize("steps", [1, 4, 28])
def test_sampling_sigmas_fall_from_one_to_zero(steps):
    sigmas = flow_sigmas(steps)
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float32
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and (sigmas[1:] < sigmas[:-1]).all()


def test_shift_spends_more_steps_at_high_noise():
    plain, shifted = flow_sigmas(8), flow_sigmas(8, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert (shifted[1:-1] > plain[1:-1]).all()
    # SD3's time shift s -> shift·s / (1 + (shift − 1)·s) of the plain schedule (diffusers spaces its grid
    # between the shifted end points, which moves each sigma by < 0.01; no shift would be off by > 0.1)
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain), atol=1e-2)


def test_euler_follows_a_straight_path_to_its_end_on_any_schedule():
    """On the rectified-flow path to x0 = 0 the field is v = x/σ; Euler steps land on σ_i·ε exactly."""
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    sigmas = flow_sigmas(5, shift=3.0).double()
    seen = []

    def velocity(x, sigma):
        assert sigma.shape == (2,)
        return x / sigma.view(-1, 1, 1, 1)

    out = euler_sample(velocity, noise, sigmas, callback=lambda i, x, sigma, v: seen.append((i, x.clone())))
    assert [i for i, _ in seen] == list(range(5))
    for i, x in seen:
        assert torch.allclose(x, sigmas[i] * noise, atol=1e-12)
    assert torch.allclose(out, torch.zeros_like(out), atol=1e-12)


def test_euler_with_a_constant_field_lands_on_the_data_point():
    x0, noise = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    out = euler_sample(lambda x, sigma: velocity_target(x0, noise), noise, flow_sigmas(3))
    assert torch.allclose(out, x0, atol=1e-6)


def test_the_corrector_changes_only_the_first_num_corrected_steps():
    noise, sigmas = torch.randn(1, 2, 4, 4), flow_sigmas(4)
    calls = []

    def corrector(i, x, sigma, v):
        calls.append(i)
        return torch.zeros_like(v)  # a corrected step stands still

    def velocity(x, sigma):
        return torch.ones_like(x)

    out = euler_sample(velocity, noise, sigmas, corrector, num_corrected=2)
    assert calls == [0, 1]
    assert torch.allclose(out, noise - sigmas[2])  # only steps 2.. moved, from σ_2 down to 0
    plain = euler_sample(velocity, noise, sigmas)
    assert torch.equal(euler_sample(velocity, noise, sigmas, corrector, num_corrected=0), plain) and calls == [0, 1]
