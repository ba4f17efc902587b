"""Control-rectify flow matching (CRFM): during the first k Euler steps, correct the velocity with the
gradient of a segmentation loss on the predicted clean image, so the layout follows the mask.

At step i < k:  x̂0 = x_t − σ_i·v  →  decode  →  segmenter  →  L = CE over valid, misclassified pixels
(mean per image);  g = ∂L/∂v;  v ← v − α_i·ĝ  (see `CRFMConfig.rule`);  then the usual Euler step.
Steps i ≥ k are plain sampling and cost nothing extra.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from todsynth.config import require, setting
from todsynth.generator.flow import predict_x0

Schedule = Literal["constant", "linear_increasing", "linear_decreasing"]
Rule = Literal["relative", "reference"]


@dataclass
class CRFMConfig:
    """Every knob of CRFM. Defaults: k = 4 rectified steps, linear-decreasing α (as the paper's code)."""

    steps: int = setting(4, help="k: rectified steps at the start of sampling (0: plain sampling)")
    alpha_max: float = setting(0.5, help="largest correction step size α")
    schedule: Schedule = setting("linear_decreasing", help="α over the k steps")
    inner_iters: int = setting(1, help="corrections per rectified step")
    rule: Rule = setting(
        "relative",
        help="relative: α scales the normalised gradient relative to v; reference: the released code's v − α·g",
    )
    normalize: bool = setting(
        True, help="per-sample L2 normalisation of g (reference rule only; relative always normalises)"
    )
    shrink: bool = setting(False, help="v ← (1 − α)·v before the gradient step (reference option)")
    clamp: float | None = setting(None, help="clamp v to [−c, c] after the correction (reference: 1.0)")
    pixels: Literal["misclassified", "all"] = setting("misclassified", help="pixels the segmentation loss covers")

    def validate(self) -> None:
        require(self.steps >= 0, f"crfm steps must be >= 0, got {self.steps}")
        require(math.isfinite(self.alpha_max) and self.alpha_max >= 0, f"alpha_max must be >= 0, got {self.alpha_max}")
        require(self.inner_iters >= 1, f"inner_iters must be >= 1, got {self.inner_iters}")
        require(self.clamp is None or (math.isfinite(self.clamp) and self.clamp > 0), "clamp must be > 0")

    @classmethod
    def reference(cls, steps: int = 4) -> CRFMConfig:
        """The released sampling path's rule: v ← clamp(v − α_i·g, −1, 1) with the raw (unnormalised)
        gradient g, α 0.1 linear-decreasing, no shrink, clamp 1, one inner iteration.

        `inference_with_crfm`, the released entry point, defaults to `l2_norm=False` and the test script
        does not override it; only the inner `control_rf_matching`'s own defaults (never used by the
        released path) normalise g. Set `normalize=True` / `shrink=True` for those variants.
        """
        return cls(
            steps=steps,
            alpha_max=0.1,
            schedule="linear_decreasing",
            rule="reference",
            normalize=False,
            shrink=False,
            clamp=1.0,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def step_size(i: int, cfg: CRFMConfig, num_steps: int) -> float:
    """α_i: constant α_max, linear-increasing α_max·(i+1)/N, or linear-decreasing α_max·(1 − (i+1)/N)."""
    if cfg.schedule == "constant":
        return cfg.alpha_max
    frac = (i + 1) / num_steps
    return cfg.alpha_max * (frac if cfg.schedule == "linear_increasing" else 1 - frac)


def segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int = 255, pixels: str = "misclassified") -> Tensor:
    """Per-image mean CE over valid pixels that are (still) misclassified: [B]. 0 for a perfect image."""
    ce = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")  # [B, H, W]
    keep = labels != ignore_index
    if pixels == "misclassified":
        keep &= logits.argmax(1) != labels
    keep = keep.float()
    return (ce * keep).flatten(1).sum(1) / keep.flatten(1).sum(1).clamp_min(1)


def _per_sample_norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))


class CRFMCorrector:
    """Velocity corrector for `euler_sample`: holds the guidance segmenter, target masks and settings.

    The loss is summed over the batch (per-image means), so each sample's gradient — and thus its
    output — does not depend on which other samples share its batch. `autocast` (a context factory, e.g.
    the pipeline's) runs the decode and the segmenter in reduced precision; the cross-entropy, the gradient
    and its normalisation stay fp32.
    """

    def __init__(
        self,
        decode,
        segmenter: torch.nn.Module,
        labels: Tensor,
        cfg: CRFMConfig,
        num_steps: int,
        ignore_index: int = 255,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
    ):
        cfg.validate()
        self.decode, self.segmenter, self.labels = decode, segmenter.eval(), labels.long()
        self.autocast = autocast
        self.cfg, self.num_steps, self.ignore_index = cfg, num_steps, ignore_index
        self.history: list[dict] = []
        for p in self.segmenter.parameters():
            p.requires_grad_(False)

    def loss(self, x_t: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
        """Per-image segmentation loss of the decoded x̂0 = x_t − σ·v: [B]."""
        with self.autocast():
            image = self.decode(predict_x0(x_t, sigma, v))
            logits = self.segmenter(image)
        logits = logits.float()
        labels = self.labels.to(logits.device)
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return segmentation_loss(logits, labels, self.ignore_index, self.cfg.pixels)

    def __call__(self, i: int, x_t: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
        cfg, alpha = self.cfg, step_size(i, self.cfg, self.num_steps)
        v = v.detach().float()
        v_norm = _per_sample_norm(v)
        for _ in range(cfg.inner_iters):
            with torch.enable_grad():
                v_var = v.clone().requires_grad_(True)
                per_image = self.loss(x_t.detach(), sigma, v_var)
                (g,) = torch.autograd.grad(per_image.sum(), v_var)
            g = g.float()
            self.history.append({"step": i, "alpha": alpha, "loss": per_image.detach().mean().item()})
            v = self._update(v, g, alpha, v_norm)
        return v

    def _update(self, v: Tensor, g: Tensor, alpha: float, v_norm: Tensor) -> Tensor:
        """One correction of v by the gradient g."""
        cfg = self.cfg
        unit = g / _per_sample_norm(g).clamp_min(1e-12)
        if cfg.rule == "relative":  # α is a fraction of ‖v‖: the same meaning in pixel and latent space
            step = alpha * v_norm * unit
        else:
            step = alpha * (unit if cfg.normalize else g)
        if cfg.shrink:
            v = (1 - alpha) * v
        v = v - step
        if cfg.clamp is not None:
            v = v.clamp(-cfg.clamp, cfg.clamp)
        return v


def crfm_sample(
    pipe,
    segmenter: torch.nn.Module,
    labels: Tensor,
    cfg: CRFMConfig,
    prompts=None,
    seeds=None,
    num_steps: int = 20,
    guidance_scale: float = 1.0,
    shift: float = 1.0,
    callback=None,
    return_corrector: bool = False,
):
    """Sample images for `labels` with CRFM (cfg.steps = 0: plain sampling, bit for bit).

    The segmenter sees the decoded images in its own stored normalisation (`segmenter_input`)."""
    corrector = CRFMCorrector(
        segmenter_input(pipe, segmenter),
        segmenter,
        labels.to(pipe.device),
        cfg,
        num_steps,
        pipe.classes.ignore_index,
        autocast=pipe.autocast,
    )
    images = pipe(
        labels,
        prompts,
        seeds=seeds,
        num_steps=num_steps,
        guidance_scale=guidance_scale,
        shift=shift,
        corrector=corrector if cfg.steps > 0 else None,
        num_corrected=cfg.steps,
        callback=callback,
    )
    return (images, corrector) if return_corrector else images


def segmenter_input(pipe, segmenter: torch.nn.Module):
    """latents → the segmenter's input: decoded, then moved from the generator's normalisation to the segmenter's
    (the same tensor when they are equal; models of other bands or sample types are refused)."""
    from todsynth.data.bands import convert

    target = getattr(segmenter, "normalisation", None)
    if target is None:
        return pipe.autoencoder.decode
    source = getattr(pipe, "normalisation", None)
    what = f"the guidance segmenter {getattr(segmenter, 'source', '')}".rstrip()
    convert(torch.zeros(1, target.channels, 1, 1), source, target, what)  # refuse before sampling starts
    return lambda latents: convert(pipe.autoencoder.decode(latents), source, target, what)


def presynth_strip(
    pipe, segmenter, labels: Tensor, cfg: CRFMConfig, seeds, num_steps: int = 20, **kw
) -> tuple[Tensor, list[Tensor]]:
    """Final images and the decoded x̂0 at every step (the 'pre-synth' previews), for figures."""
    frames: list[Tensor] = []

    def grab(i: int, x_t: Tensor, sigma: Tensor, v: Tensor) -> None:
        frames.append(pipe.preview(x_t, sigma, v).cpu())

    images = crfm_sample(pipe, segmenter, labels, cfg, seeds=seeds, num_steps=num_steps, callback=grab, **kw)
    return images, frames
