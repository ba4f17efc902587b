"""CRFM: k = 0 is plain sampling, the correction lowers the segmentation loss, knobs behave as stated."""

from __future__ import annotations

import pytest
import torch

from todsynth.crfm import CRFMConfig, crfm_sample, presynth_strip, segmentation_loss, step_size
from todsynth.errors import ConfigError


@pytest.fixture(scope="module")
def pipe(tiny_generator_dir):
    from todsynth.generator.pipeline import MaskToImagePipeline

    return MaskToImagePipeline.from_pretrained(tiny_generator_dir)


@pytest.fixture(scope="module")
def segmenter(tiny_segmenter_dir):
    from todsynth.segment.model import Segmenter

    return Segmenter.from_pretrained(tiny_segmenter_dir).eval()


def masks(n: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    lab = torch.randint(0, 7, (n, 4, 4), generator=g).repeat_interleave(4, 1).repeat_interleave(4, 2)
    lab[:, 0, :] = 255
    return lab


def test_zero_steps_is_plain_sampling_bit_for_bit(pipe, segmenter):
    labels = masks()
    plain = pipe(labels, seeds=[1, 2, 3], num_steps=6)
    crfm = crfm_sample(pipe, segmenter, labels, CRFMConfig(steps=0), seeds=[1, 2, 3], num_steps=6)
    assert torch.equal(plain, crfm)


def test_zero_alpha_changes_nothing(pipe, segmenter):
    labels = masks()
    plain = pipe(labels, seeds=[1, 2, 3], num_steps=6)
    crfm = crfm_sample(pipe, segmenter, labels, CRFMConfig(steps=3, alpha_max=0.0), seeds=[1, 2, 3], num_steps=6)
    assert torch.equal(plain, crfm)


@pytest.mark.parametrize("rule", ["relative", "reference"])
def test_correction_lowers_segmentation_loss(pipe, segmenter, rule):
    labels = masks()
    cfg = CRFMConfig(steps=4, alpha_max=0.5, schedule="constant", rule=rule, clamp=None)
    plain = pipe(labels, seeds=[4, 5, 6], num_steps=6)
    corrected = crfm_sample(pipe, segmenter, labels, cfg, seeds=[4, 5, 6], num_steps=6)
    with torch.no_grad():
        before = segmentation_loss(segmenter(plain), labels, pixels="all").mean()
        after = segmentation_loss(segmenter(corrected), labels, pixels="all").mean()
    assert after < before, (before.item(), after.item())


def test_output_does_not_depend_on_batch(pipe, segmenter):
    labels, seeds = masks(4), [7, 8, 9, 10]
    cfg = CRFMConfig(steps=2)
    whole = crfm_sample(pipe, segmenter, labels, cfg, seeds=seeds, num_steps=4)
    parts = torch.cat(
        [crfm_sample(pipe, segmenter, labels[i : i + 2], cfg, seeds=seeds[i : i + 2], num_steps=4) for i in (0, 2)]
    )
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-5)


def test_presynth_strip_has_a_frame_per_step(pipe, segmenter):
    images, frames = presynth_strip(pipe, segmenter, masks(2), CRFMConfig(steps=2), seeds=[1, 2], num_steps=5)
    assert len(frames) == 5 and frames[0].shape == images.shape
    assert not torch.equal(frames[0], frames[-1])


def test_segmentation_loss_counts_only_misclassified_valid_pixels():
    labels = torch.tensor([[[0, 1], [255, 1]]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0] = 5.0  # predicts class 0 everywhere: (0,1) and (1,1) are wrong, (1,0) is ignored
    loss = segmentation_loss(logits, labels)
    ce_wrong = torch.nn.functional.cross_entropy(torch.tensor([[5.0, 0.0]]), torch.tensor([1])).item()
    assert loss.item() == pytest.approx(ce_wrong, rel=1e-6)
    logits[0, 1, :, 1] = 10.0  # now correct everywhere
    assert segmentation_loss(logits, labels).item() == 0.0


def test_step_size_schedules():
    const = CRFMConfig(alpha_max=0.1, schedule="constant")
    inc = CRFMConfig(alpha_max=0.1, schedule="linear_increasing")
    dec = CRFMConfig(alpha_max=0.1, schedule="linear_decreasing")
    assert [step_size(i, const, 10) for i in range(3)] == [0.1] * 3
    assert step_size(0, inc, 10) == pytest.approx(0.01) and step_size(9, inc, 10) == pytest.approx(0.1)
    assert step_size(0, dec, 10) == pytest.approx(0.09) and step_size(9, dec, 10) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "bad", [dict(steps=-1), dict(alpha_max=float("nan")), dict(schedule="cosine"), dict(inner_iters=0), dict(clamp=0.0)]
)
def test_bad_settings_are_refused(bad):
    from todsynth.config import build_config

    with pytest.raises(ConfigError):
        build_config(CRFMConfig, bad)


def test_reference_preset_is_the_released_sampling_rule():
    """`inference_with_crfm` (the released entry point) runs l2_norm=False: v ← clamp(v − α_i·g, −1, 1) with
    the raw gradient, α_max 0.1 linear-decreasing, no shrink; the relative rule stays the default."""
    from todsynth.crfm import CRFMCorrector, step_size

    ref = CRFMConfig.reference()
    assert (ref.rule, ref.alpha_max, ref.schedule, ref.normalize, ref.shrink, ref.clamp, ref.inner_iters) == (
        "reference",
        0.1,
        "linear_decreasing",
        False,
        False,
        1.0,
        1,
    )
    assert CRFMConfig().rule == "relative" and CRFMConfig.reference(steps=2).steps == 2
    corrector = CRFMCorrector.__new__(CRFMCorrector)
    corrector.cfg = ref
    v = torch.tensor([[0.5, -0.95, 0.2]])
    g = torch.tensor([[3.0, 1.0, -0.5]])  # ‖g‖ > 1: a normalised step would differ
    alpha = step_size(0, ref, 23)
    assert alpha == pytest.approx(0.1 * (1 - 1 / 23))
    out = corrector._update(v, g, alpha, v.norm())
    assert torch.equal(out, (v - alpha * g).clamp(-1, 1))
