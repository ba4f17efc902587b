"""Full-scale benchmark: an SD3.5-medium-shaped MaskControlMMDiT (triple control, RGB-coded mask latents) and
SD3's VAE, both from their real configs with random weights, at 512 px, batch 1.

Measures a train step (forward + backward + AdamW on the image and mask streams, the text stream frozen, as
the paper; latents given, as with the latent cache), its matmul FLOPs (torch.utils.flop_counter on the same
step), model FLOP utilisation against a peak, peak memory, the VAE encode a step costs without the latent
cache, and plain vs CRFM synthesis through the real pipeline (prompt embeddings from a prompt cache).

    python benchmarks/bench_fullscale.py --device cpu --layers 2 --steps 4 --json runs/fullscale_cpu.json
    python benchmarks/bench_fullscale.py --device cuda --json $OUT/fullscale_gpu.json     # all 24 layers, bf16
    python benchmarks/bench_fullscale.py --quick                                          # tiny, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

# diffusers SD3Transformer2DModel config of stabilityai/stable-diffusion-3.5-medium (MMDiT-X: dual attention
# in the first 13 layers, q/k RMSNorm); mapped onto ours by todsynth.generator.sd3.config_from_sd3.
SD35_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
    "dual_attention_layers": list(range(13)),
}
# diffusers AutoencoderKL config of SD3 / SD3.5's VAE (16 latent channels, 8× downscale).
SD3_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "act_fn": "silu",
}
QUICK_MMDIT = {
    **SD35_MEDIUM,
    "sample_size": 4,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 24,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 12,
    "pos_embed_max_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "dual_attention_layers": [0],
}
QUICK_VAE = {
    **SD3_VAE,
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 16,
}
TEXT_TOKENS = 77 + 256  # CLIP-L/G tokens + T5 tokens, as SD3TextEncoder emits them
NUM_CLASSES = 7
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}  # dense bf16


@dataclass
class Setting:
    """What one benchmark run builds and times."""

    device: str = "cpu"
    layers: int = 2
    size: int = 512
    steps: int = 4  # timed train steps (after one warm-up)
    sample_steps: int = 4  # Euler steps per synthesized image
    crfm_steps: int = 2  # CRFM's rectified steps k
    images: int = 1  # synthesized images per timing (batch 1 each)
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    quick: bool = False
    peak_tflops: float | None = None
    json: str | None = None  # where to write the results


def parse(argv: list[str] | None) -> Setting:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda (fails fast without CUDA)")
    p.add_argument("--layers", type=int, default=None, help="transformer depth (default: 24 on cuda, 2 on cpu)")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--sample-steps", type=int, default=None, help="Euler steps (default 28 on cuda, 4 on cpu)")
    p.add_argument("--crfm-steps", type=int, default=None, help="CRFM k (default 4 on cuda, 2 on cpu)")
    p.add_argument("--images", type=int, default=None, help="images per synthesis timing (default 3 cuda, 1 cpu)")
    p.add_argument(
        "--mixed-precision", default=None, choices=["no", "bf16", "fp16"], help="default bf16 on cuda, no on cpu"
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: a smoke run of seconds")
    p.add_argument("--json", default=None, help="write all numbers here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    gpu = a.device.startswith("cuda")
    s = Setting(
        device=a.device,
        layers=a.layers or (24 if gpu else 2),
        size=a.size,
        steps=a.steps,
        sample_steps=a.sample_steps or (28 if gpu else 4),
        crfm_steps=a.crfm_steps or (4 if gpu else 2),
        images=a.images or (3 if gpu else 1),
        mixed_precision=a.mixed_precision or ("bf16" if gpu else "no"),
        gradient_checkpointing=a.gradient_checkpointing,
        quick=a.quick,
        peak_tflops=a.peak_tflops,
        json=a.json,
    )
    if a.quick:
        s = replace(s, device="cpu", layers=2, size=32, steps=2, sample_steps=2, crfm_steps=1, images=1)
    return s


def check_device(device: str) -> torch.device:
    """The device to run on; exits with a clear message when CUDA is asked for and absent."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_fullscale: --device cuda but torch sees no CUDA device (torch.cuda.is_available() is False)")
    if dev.type == "cuda":
        from todsynth.generator.runtime import enable_tf32

        enable_tf32()
    return dev


# ---------------------------------------------------------------------------------------------


def build_models(s: Setting, dev: torch.device):
    """(transformer, VAE autoencoder, segmenter) with random weights, built directly on `dev`."""
    from diffusers import AutoencoderKL

    from todsynth.generator.autoencoder import VAEAutoencoder
    from todsynth.generator.mmdit import MaskControlMMDiT
    from todsynth.generator.sd3 import config_from_sd3
    from todsynth.segment.model import Segmenter, SegmenterConfig

    sd3 = dict(QUICK_MMDIT if s.quick else SD35_MEDIUM)
    sd3["num_layers"] = s.layers
    sd3["dual_attention_layers"] = [i for i in sd3["dual_attention_layers"] if i < s.layers]
    vae_cfg = QUICK_VAE if s.quick else SD3_VAE
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    cfg = config_from_sd3(
        sd3,
        control="triple",
        mask_encoding="rgb",
        num_classes=NUM_CLASSES,
        mask_downscale=down,
        mask_channels=vae_cfg["latent_channels"],
        sample_size=s.size // down,
    )
    torch.manual_seed(0)
    with torch.device(dev):
        model = MaskControlMMDiT(cfg)
        vae = AutoencoderKL(**vae_cfg)
    model.to(dev)
    with torch.no_grad():  # DiT's zero-initialised gates would make the first steps degenerate
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    model.gradient_checkpointing = s.gradient_checkpointing
    model.set_trainable(text=False, image=True, mask=True, cond=True)
    segmenter = Segmenter(SegmenterConfig(num_classes=NUM_CLASSES)).to(dev).eval()
    return model, VAEAutoencoder(vae.to(dev).eval()), segmenter


def text_inputs(model, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompt embeddings shaped as the SD3 text encoders' output."""
    cfg = model.config
    tokens = 8 if cfg.joint_attention_dim < 100 else TEXT_TOKENS
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(1, tokens, cfg.joint_attention_dim, generator=g).to(dev),
        torch.randn(1, cfg.pooled_projection_dim, generator=g).to(dev),
    )


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if platform.system() != "Darwin" else kib / 2**20


def train_step_fn(model, ae, s: Setting, dev: torch.device):
    """One step as generator/train.py does it with cached latents: forward, MSE, backward, AdamW."""
    from todsynth.generator.autoencoder import encode_mask_rgb
    from todsynth.generator.runtime import autocast

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2)
    text, pooled = text_inputs(model, dev)
    g = torch.Generator().manual_seed(2)
    shape = ae.latent_shape(s.size, s.size)
    x0, noise = torch.randn(1, *shape, generator=g).to(dev), torch.randn(1, *shape, generator=g).to(dev)
    labels = torch.randint(0, NUM_CLASSES, (1, s.size, s.size), generator=g).to(dev)
    with torch.no_grad():
        mask = ae.encode(encode_mask_rgb(labels, NUM_CLASSES), sample=False)
    t = torch.full((1,), 0.7, device=dev)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise

    def forward_backward() -> float:
        with autocast(dev, s.mixed_precision):
            v = model(x_t, t, text, pooled, mask)
        loss = F.mse_loss(v.float(), (noise - x0).float())
        loss.backward()
        return loss.detach()

    def step() -> None:
        forward_backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, forward_backward, params, opt


def count_flops(forward_backward) -> int:
    """Matmul FLOPs of one forward + backward (SDPA's math path, so attention's two matmuls are counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        forward_backward()
    return counter.get_total_flops()


def timed(fn, dev: torch.device, n: int) -> list[float]:
    """Wall-clock seconds of n calls (device synchronised)."""
    times = []
    for _ in range(n):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return times


def bench_train(model, ae, s: Setting, dev: torch.device) -> dict:
    """Train-step seconds, FLOPs, MFU and peak memory."""
    step, forward_backward, params, opt = train_step_fn(model, ae, s, dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    step()  # warm-up (AdamW state allocated)
    times = timed(step, dev, s.steps)
    peak_gpu = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    flops = count_flops(forward_backward)
    opt.zero_grad(set_to_none=True)
    median = statistics.median(times)
    achieved = flops / median / 1e12
    peak = s.peak_tflops or (
        next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(dev)), None)
        if dev.type == "cuda"
        else None
    )
    return {
        "step_s": times,
        "step_s_median": median,
        "tflop_per_step": flops / 1e12,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "mfu": achieved / peak if peak else None,
        "trainable_parameters": sum(p.numel() for p in params),
        "peak_gpu_gib": peak_gpu,
    }


def bench_vae_encode(ae, s: Setting, dev: torch.device) -> dict:
    """Seconds to VAE-encode one image and one RGB-coded mask: what each step pays without latent caches."""
    x = torch.rand(1, 3, s.size, s.size).to(dev)
    with torch.no_grad():
        ae.encode(x, sample=False)
        times = timed(lambda: ae.encode(x, sample=False), dev, 2)
    return {"encode_s_per_image": statistics.median(times)}


def bench_synthesis(model, ae, segmenter, s: Setting, dev: torch.device) -> dict:
    """Images per second of plain and CRFM sampling through MaskToImagePipeline (batch 1)."""
    from todsynth.crfm import CRFMConfig, crfm_sample
    from todsynth.data.classes import LOVEDA
    from todsynth.generator.pipeline import MaskToImagePipeline
    from todsynth.generator.text import PromptCache

    text, pooled = text_inputs(model, dev)
    prompt = "a satellite image of water"
    cache = PromptCache(
        {"name": "bench"}, [prompt, ""], torch.cat([text, text * 0]).cpu(), torch.cat([pooled, pooled * 0]).cpu()
    )
    pipe = MaskToImagePipeline(model, ae, None, LOVEDA, s.size, prompt_cache=cache, mixed_precision=s.mixed_precision)
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, NUM_CLASSES, (1, s.size, s.size), generator=g)
    crfm = CRFMConfig(steps=s.crfm_steps)
    out = {}
    for name in ("plain", "crfm"):

        def one(i: int = 0, name: str = name) -> None:  # binds this iteration's name
            if name == "plain":
                pipe(labels, [prompt], seeds=[i], num_steps=s.sample_steps)
            else:
                crfm_sample(pipe, segmenter, labels, crfm, prompts=[prompt], seeds=[i], num_steps=s.sample_steps)

        if dev.type == "cuda":
            one()  # warm-up (kernels, allocator); the CPU run is too slow to afford one
            torch.cuda.reset_peak_memory_stats(dev)
        times = timed(one, dev, s.images)
        out[name] = {
            "s_per_image": statistics.median(times),
            "images_per_s": 1 / statistics.median(times),
            "peak_gpu_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
        }
    out["crfm_over_plain"] = out["crfm"]["s_per_image"] / out["plain"]["s_per_image"]
    return out


def main(argv: list[str] | None = None) -> dict:
    s = parse(argv)
    dev = check_device(s.device)
    t0 = time.perf_counter()
    model, ae, segmenter = build_models(s, dev)
    result = {
        "setting": {k: v for k, v in vars(s).items() if k != "json"},
        "model": {
            "config": model.config.to_dict(),
            "parameters": sum(p.numel() for p in model.parameters()),
            "image_tokens": (s.size // ae.downscale // model.config.patch_size) ** 2,
            "vae_parameters": sum(p.numel() for p in ae.parameters()),
        },
        "machine": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor(),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        },
        "build_s": time.perf_counter() - t0,
    }
    result["train"] = bench_train(model, ae, s, dev)
    result["vae"] = bench_vae_encode(ae, s, dev)
    result["synthesis"] = bench_synthesis(model, ae, segmenter, s, dev)
    result["peak_rss_mib"] = peak_rss_mib()
    result["wall_s"] = time.perf_counter() - t0
    text = json.dumps(result, indent=2)
    if s.json:
        Path(s.json).parent.mkdir(parents=True, exist_ok=True)
        Path(s.json).write_text(text)
    print(text if s.quick else summary(result))
    return result


def summary(r: dict) -> str:
    """A few readable lines of the result."""
    t, syn = r["train"], r["synthesis"]
    mfu = f", MFU {t['mfu']:.1%}" if t["mfu"] else ""
    gpu = f", peak GPU {t['peak_gpu_gib']:.1f} GiB" if t["peak_gpu_gib"] else ""
    return (
        f"{r['model']['parameters'] / 1e9:.2f} B parameters ({r['setting']['layers']} layers), "
        f"{r['setting']['size']} px, {r['setting']['mixed_precision']}\n"
        f"train step {t['step_s_median']:.2f} s, {t['tflop_per_step']:.2f} TFLOP, "
        f"{t['achieved_tflops']:.2f} TFLOP/s{mfu}{gpu}; peak RSS {r['peak_rss_mib']:.0f} MiB\n"
        f"VAE encode {r['vae']['encode_s_per_image']:.2f} s/image (saved per step by the latent cache)\n"
        f"synthesis ({r['setting']['sample_steps']} steps): plain {syn['plain']['s_per_image']:.2f} s/image, "
        f"CRFM k={r['setting']['crfm_steps']} {syn['crfm']['s_per_image']:.2f} s/image "
        f"(×{syn['crfm_over_plain']:.2f})"
    )


if __name__ == "__main__":
    main()
