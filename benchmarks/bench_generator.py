"""Generator benchmark: train-step time, FLOP/s, peak memory and bf16 loss agreement of MaskControlMMDiT.

Compares our MM-DiT (control none / triple / siamese / adapter) with diffusers' SD3Transformer2DModel at
the same size, fp32 and bf16 autocast, on the CPU. All cases of one precision are timed in the same
rounds, one step each, alternating their order every round, so load from other processes hits them
alike; a case's ratio is the median over rounds of (case time / diffusers time in that round).

    .venv/bin/python benchmarks/bench_generator.py [--steps 5] [--warmup 1] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from todsynth.generator.mmdit import MaskControlMMDiT, MMDiTConfig, count_parameters

CASES = ("diffusers", "none", "triple", "siamese", "adapter")
PRECISIONS = ("fp32", "bf16")
GOALS = {"none": 1.0, "triple": 1.5}  # train-step time as a multiple of diffusers'
LR = 1e-4


@dataclass(frozen=True)
class Sizes:
    """Model and batch size of one benchmark setting."""

    batch: int = 8
    latent: int = 32  # latent side: (latent / patch)² image tokens
    channels: int = 16
    patch: int = 2
    text_tokens: int = 16
    heads: int = 4
    head_dim: int = 64
    depth: int = 6
    cond_dim: int = 384  # joint_attention_dim and pooled_projection_dim
    num_classes: int = 7

    @property
    def image_tokens(self) -> int:
        """Image tokens per sample (as many mask tokens for the mask stream)."""
        return (self.latent // self.patch) ** 2


REFERENCE = Sizes()
QUICK = Sizes(batch=2, latent=8, channels=4, text_tokens=4, heads=2, head_dim=16, depth=2, cond_dim=24, num_classes=4)


# ---------------------------------------------------------------------------------------------
# Models, inputs, one train step


def ours_config(s: Sizes, control: str) -> MMDiTConfig:
    """Our generator's config at size `s` (one-hot mask at the latent's resolution)."""
    return MMDiTConfig(
        in_channels=s.channels,
        patch_size=s.patch,
        sample_size=s.latent,
        pos_embed_max_size=max(64, s.latent // s.patch),
        num_layers=s.depth,
        num_heads=s.heads,
        head_dim=s.head_dim,
        joint_attention_dim=s.cond_dim,
        pooled_projection_dim=s.cond_dim,
        qk_norm=False,
        control=control,
        num_classes=s.num_classes,
        mask_downscale=1,
    )


def build_model(case: str, s: Sizes, seed: int = 0) -> nn.Module:
    """diffusers' SD3 transformer or our model with control=`case`, each with its own init."""
    torch.manual_seed(seed)
    if case == "diffusers":
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel(
            sample_size=s.latent,
            patch_size=s.patch,
            in_channels=s.channels,
            out_channels=s.channels,
            num_layers=s.depth,
            attention_head_dim=s.head_dim,
            num_attention_heads=s.heads,
            joint_attention_dim=s.cond_dim,
            caption_projection_dim=s.heads * s.head_dim,
            pooled_projection_dim=s.cond_dim,
            pos_embed_max_size=max(64, s.latent // s.patch),
        )
    return MaskControlMMDiT(ours_config(s, case))


def make_inputs(s: Sizes, seed: int = 1) -> dict[str, Tensor]:
    """A fixed random batch: latent, timestep, text tokens, pooled text, label map, regression target."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(s.batch, s.channels, s.latent, s.latent, generator=g),
        "t": torch.rand(s.batch, generator=g),
        "text": torch.randn(s.batch, s.text_tokens, s.cond_dim, generator=g),
        "pooled": torch.randn(s.batch, s.cond_dim, generator=g),
        "mask": torch.randint(0, s.num_classes, (s.batch, s.latent, s.latent), generator=g),
        "target": torch.randn(s.batch, s.channels, s.latent, s.latent, generator=g),
    }


def predict(case: str, model: nn.Module, inp: dict[str, Tensor]) -> Tensor:
    """The model's velocity prediction for the batch, through each model's own call signature."""
    if case == "diffusers":
        return model(
            inp["x"], encoder_hidden_states=inp["text"], pooled_projections=inp["pooled"], timestep=inp["t"] * 1000
        ).sample
    mask = None if case == "none" else inp["mask"]
    return model(inp["x"], inp["t"], inp["text"], inp["pooled"], mask)


def fill_zero_tensors(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Give all-zero parameters (DiT's zero-initialised adaLN, gates, output layer, biases) small random values.

    Timing a few steps from DiT's init would otherwise see many gradients that are exactly zero, and
    AdamW's sqrt over all-zero moment tensors runs ~20× slower than over other values on this CPU: a
    transient of the first steps, not the steady-state cost of a train step.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


class Runner:
    """One case's model, optimizer (AdamW as in generator training) and fixed batch."""

    def __init__(self, case: str, s: Sizes, seed: int = 0):
        self.case = case
        self.model = build_model(case, s, seed).train()
        fill_zero_tensors(self.model, seed=seed)
        self.inputs = make_inputs(s)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.01)

    def loss(self, bf16: bool) -> Tensor:
        """MSE of the prediction against the fixed random target (forward only)."""
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = predict(self.case, self.model, self.inputs)
        return F.mse_loss(out.float(), self.inputs["target"])

    def step(self, bf16: bool) -> float:
        """Forward, MSE loss, backward, AdamW step; returns the loss."""
        loss = self.loss(bf16)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


# ---------------------------------------------------------------------------------------------
# Measurements


def machine_info() -> dict:
    """CPU model, bf16 matrix-unit flags, threads and library versions."""
    import diffusers

    cpu, flags = platform.processor(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
        flags = set(re.search(r"flags\s*:\s*(.+)", text).group(1).split())
    except (OSError, AttributeError):
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"}),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def matmul_peak(n: int, dtype: torch.dtype, reps: int) -> dict:
    """GFLOP/s of an n×n×n matmul: best and median of `reps` after a warm-up."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3
    return {"n": n, "best_gflops": flops / min(times) / 1e9, "median_gflops": flops / statistics.median(times) / 1e9}


def count_flops(runner: Runner) -> int:
    """Matmul FLOPs of one fp32 forward + backward, counted by FlopCounterMode.

    SDPA is forced to its math backend so that the attention's q·kᵀ and attn·v appear as bmm (the
    counter has no formula for the CPU flash kernel); the maths, and so the count, is the same.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        runner.loss(bf16=False).backward()
    runner.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_cases(runners: dict[str, Runner], steps: int, warmup: int) -> dict:
    """Interleaved train-step timings of every case in both precisions, all in the same rounds.

    Per case and precision: wall and process-CPU medians (ms); `ratio` / `cpu_ratio`: median over rounds of
    (this step / diffusers' step in the same precision and round); `ratio_vs_fp32`: the same against diffusers'
    fp32 step (diffusers' default), so a bf16 case is compared with what a diffusers user runs by default.
    """
    entries = [(p, name) for p in PRECISIONS for name in runners]
    for _ in range(warmup):
        for p, name in entries:
            runners[name].step(p == "bf16")
    wall: dict[tuple[str, str], list[float]] = {e: [] for e in entries}
    cpu: dict[tuple[str, str], list[float]] = {e: [] for e in entries}
    for r in range(steps):
        for p, name in entries if r % 2 == 0 else entries[::-1]:
            t0, c0 = time.perf_counter(), time.process_time()
            runners[name].step(p == "bf16")
            wall[(p, name)].append((time.perf_counter() - t0) * 1000)
            cpu[(p, name)].append((time.process_time() - c0) * 1000)

    def paired(times: dict, entry: tuple[str, str], base: tuple[str, str]) -> float:
        """Median over rounds of entry time / base time."""
        return statistics.median(a / b for a, b in zip(times[entry], times[base], strict=True))

    return {
        p: {
            name: {
                "median_ms": statistics.median(wall[(p, name)]),
                "min_ms": min(wall[(p, name)]),
                "times_ms": wall[(p, name)],
                "ratio": paired(wall, (p, name), (p, "diffusers")),
                "ratio_vs_fp32": paired(wall, (p, name), ("fp32", "diffusers")),
                "cpu_median_ms": statistics.median(cpu[(p, name)]),
                "cpu_times_ms": cpu[(p, name)],
                "cpu_ratio": paired(cpu, (p, name), (p, "diffusers")),
                "cpu_ratio_vs_fp32": paired(cpu, (p, name), ("fp32", "diffusers")),
            }
            for name in runners
        }
        for p in PRECISIONS
    }


def _rss_mib() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MiB, from /proc/self/status."""
    text = Path("/proc/self/status").read_text()
    return tuple(int(re.search(rf"{k}:\s+(\d+)", text).group(1)) / 1024 for k in ("VmRSS", "VmHWM"))


def _reset_peak_rss() -> bool:
    """Free what can be freed and reset the kernel's peak-RSS mark (VmHWM) to the current RSS."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def step_memory(case: str, s: Sizes, bf16: bool) -> dict | None:
    """Peak RSS of two train steps above the RSS before them (fresh model, optimizer state included).

    Reads the process's own peak RSS after resetting it (Linux /proc/self/clear_refs), so torch's
    allocations are seen; None where that is not available.
    """
    runner = Runner(case, s)
    if not _reset_peak_rss():
        return None
    before, _ = _rss_mib()
    for _ in range(2):
        runner.step(bf16)
    _, peak = _rss_mib()
    params = sum(p.numel() * p.element_size() for p in runner.model.parameters()) / 2**20
    del runner
    return {"step_mib": peak - before, "params_mib": params}


# ---------------------------------------------------------------------------------------------
# fp32 vs bf16 loss curves


class RegressionTask:
    """Fixed synthetic flow-matching task: the clean latent colours each mask class with a fixed vector."""

    def __init__(self, s: Sizes, seed: int = 2):
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randint(0, s.num_classes, (s.batch, s.latent // 4 or 1, s.latent // 4 or 1), generator=g)
        self.mask = F.interpolate(coarse[:, None].float(), size=(s.latent, s.latent), mode="nearest")[:, 0].long()
        colours = torch.randn(s.num_classes, s.channels, generator=g)
        self.data = colours[self.mask].permute(0, 3, 1, 2).contiguous()
        self.text = torch.randn(s.batch, s.text_tokens, s.cond_dim, generator=g)
        self.pooled = torch.randn(s.batch, s.cond_dim, generator=g)

    def batch(self, g: torch.Generator) -> tuple[Tensor, ...]:
        """x_t = (1 - t)·data + t·noise and its velocity target noise - data, for fresh t and noise."""
        noise = torch.randn(self.data.shape, generator=g)
        t = torch.rand(self.data.shape[0], generator=g)
        tt = t[:, None, None, None]
        return (1 - tt) * self.data + tt * noise, t, noise - self.data


def loss_curves(s: Sizes, steps: int, lr: float = 1e-3, seed: int = 0) -> dict:
    """Train the triple model on RegressionTask in fp32 and in bf16 autocast from the same init and data."""
    torch.manual_seed(seed)
    model = MaskControlMMDiT(ours_config(s, "triple"))
    init = copy.deepcopy(model.state_dict())
    task = RegressionTask(s)
    curves = {}
    for name in PRECISIONS:
        model.load_state_dict(init)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        g = torch.Generator().manual_seed(seed + 1)
        losses = []
        for _ in range(steps):
            x, t, target = task.batch(g)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                out = model(x, t, task.text, task.pooled, task.mask)
            loss = F.mse_loss(out.float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[name] = losses
    diff = [abs(a - b) for a, b in zip(curves["fp32"], curves["bf16"], strict=True)]
    return {
        "sizes": asdict(s),
        "lr": lr,
        "steps": list(range(1, steps + 1)),
        **curves,
        "start": {k: curves[k][0] for k in PRECISIONS},
        "end": {k: curves[k][-1] for k in PRECISIONS},
        "max_abs_diff": max(diff),
        "max_rel_diff": max(d / a for d, a in zip(diff, curves["fp32"], strict=True)),
    }


# ---------------------------------------------------------------------------------------------
# Report


def _fmt(v: float | None, spec: str) -> str:
    """Format a number, or "n/a" for a missing or non-finite one."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def report(res: dict) -> str:
    """Human-readable tables of a results dict from `run`."""
    s, m = res["sizes"], res["machine"]
    lines = [
        f"{m['cpu']}, {m['threads']} threads, bf16 flags: {' '.join(m['bf16_flags']) or 'none'};"
        f" torch {m['torch']}, diffusers {m['diffusers']}",
        f"train step = forward + MSE + backward + AdamW; batch {s['batch']}, {s['image_tokens']} image tokens"
        f" (+{s['image_tokens']} mask tokens), {s['text_tokens']} text tokens, width {s['heads'] * s['head_dim']}"
        f" ({s['heads']}×{s['head_dim']}), depth {s['depth']}; {res['steps']} timed steps per case after"
        f" {res['warmup']} warm-up, interleaved",
        "matmul peak (2·n³ / time): "
        + ", ".join(
            f"{p} {_fmt(res['peaks'][p]['best_gflops'], '.0f')} GFLOP/s best"
            f" ({_fmt(res['peaks'][p]['median_gflops'], '.0f')} median, n={res['peaks'][p]['n']})"
            for p in PRECISIONS
        ),
        f"FLOPs: {res['flops']['method']}",
        "",
    ]
    head = (
        f"{'prec':5} {'case':10} {'params':>7} {'wall ms':>8} {'min ms':>7} {'× diff.':>8} {'CPU ms':>7}"
        f" {'× diff.':>8} {'GFLOP':>6} {'GFLOP/s':>8} {'% peak':>7} {'step MiB':>9}"
    )
    lines += [
        "wall ms: median wall-clock time of a step; × diff.: median over rounds of the ratio to diffusers'"
        " step in the same round (wall, then process CPU time); GFLOP/s at the median wall time",
        "",
        head,
        "-" * len(head),
    ]
    for p in PRECISIONS:
        for case in CASES:
            tm, fl, mem = res["timing"][p][case], res["flops"]["per_step"][case], res["memory"][p].get(case)
            gflops = fl / tm["median_ms"] / 1e6
            lines.append(
                f"{p:5} {case:10} {res['params'][case] / 1e6:6.1f}M {tm['median_ms']:8.0f} {tm['min_ms']:7.0f}"
                f" {tm['ratio']:7.2f}× {tm['cpu_median_ms']:7.0f} {tm['cpu_ratio']:7.2f}× {fl / 1e9:6.1f}"
                f" {gflops:8.1f} {100 * gflops / res['peaks'][p]['best_gflops']:6.0f}%"
                f" {_fmt(mem and mem['step_mib'], '9.0f'):>9}"
            )
    lines.append("")
    for p in PRECISIONS:
        for case, target in GOALS.items():
            g = res["goals"][p][case]
            lines.append(
                f"goal {p} {case:6} ≤ {target:.1f}× diffusers {p}: {g['ratio']:.2f}× wall,"
                f" {g['cpu_ratio']:.2f}× CPU -> {'met' if g['met'] else 'missed'}"
            )
    for case, target in GOALS.items():
        g = res["goals"]["bf16"][case]
        lines.append(
            f"goal bf16 {case:6} ≤ {target:.1f}× diffusers fp32 (its default):"
            f" {g['ratio_vs_fp32']:.2f}× wall, {g['cpu_ratio_vs_fp32']:.2f}× CPU"
            f" -> {'met' if g['met_vs_fp32'] else 'missed'}"
        )
    c = res["loss_curves"]
    lines += [
        "",
        f"loss curves, triple, {len(c['steps'])} steps, lr {c['lr']:g}:"
        f" fp32 {c['start']['fp32']:.4f} -> {c['end']['fp32']:.4f},"
        f" bf16 {c['start']['bf16']:.4f} -> {c['end']['bf16']:.4f},"
        f" max |fp32 - bf16| {c['max_abs_diff']:.4f} ({100 * c['max_rel_diff']:.1f}%)"
        + (f"; plot {c['plot']}" if c.get("plot") else ""),
    ]
    return "\n".join(lines)


def run(
    s: Sizes,
    curve_sizes: Sizes,
    steps: int,
    warmup: int,
    curve_steps: int,
    peak_n: int,
    log: Callable[[str], None] = print,
) -> dict:
    """All measurements; returns the results dict (see `report`)."""
    res: dict = {
        "sizes": {**asdict(s), "image_tokens": s.image_tokens},
        "steps": steps,
        "warmup": warmup,
        "machine": machine_info(),
    }
    log("matmul peaks ...")
    res["peaks"] = {
        p: matmul_peak(peak_n, torch.float32 if p == "fp32" else torch.bfloat16, reps=5) for p in PRECISIONS
    }
    runners = {case: Runner(case, s) for case in CASES}
    res["params"] = {case: count_parameters(r.model) for case, r in runners.items()}
    log("counting FLOPs ...")
    res["flops"] = {
        "method": "torch.utils.flop_counter.FlopCounterMode on one fp32 forward+backward (mm, addmm,"
        " bmm, conv; attention via SDPA's math backend); optimizer and elementwise ops"
        " not counted",
        "per_step": {case: count_flops(r) for case, r in runners.items()},
    }
    log("timing fp32 and bf16, interleaved ...")
    res["timing"] = time_cases(runners, steps, warmup)
    del runners
    res["memory"] = {p: {} for p in PRECISIONS}
    log("peak memory ...")
    for p in PRECISIONS:
        for case in CASES:
            res["memory"][p][case] = step_memory(case, s, p == "bf16")
    res["goals"] = {
        p: {
            case: {
                "ratio": (tm := res["timing"][p][case])["ratio"],
                "cpu_ratio": tm["cpu_ratio"],
                "ratio_vs_fp32": tm["ratio_vs_fp32"],
                "cpu_ratio_vs_fp32": tm["cpu_ratio_vs_fp32"],
                "target": target,
                "met": tm["ratio"] <= target,
                "met_vs_fp32": tm["ratio_vs_fp32"] <= target,
            }
            for case, target in GOALS.items()
        }
        for p in PRECISIONS
    }
    log("loss curves ...")
    res["loss_curves"] = loss_curves(curve_sizes, curve_steps)
    return res


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed train steps per case and precision")
    ap.add_argument("--warmup", type=int, default=1, help="untimed train steps per case first")
    ap.add_argument("--curve-steps", type=int, default=30, help="training steps of the fp32/bf16 loss curves")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine, threads that wait for each other at"
        " every op make multi-threaded timings swing several-fold)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="loss-curve PNG (default: next to --json, else bench_generator_loss.png)",
    )
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.curve_steps < 1 or args.threads < 1:
        ap.error("--steps, --curve-steps and --threads must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print the tables, write --json and the loss plot; returns the results."""
    from todsynth.io import write_json
    from todsynth.viz import plot_curves

    args = parse_args(argv)
    if args.quick:
        s, curve_sizes, peak_n = QUICK, QUICK, 256
        steps, warmup, curve_steps = min(args.steps, 2), min(args.warmup, 1), min(args.curve_steps, 4)
    else:
        s, curve_sizes, peak_n = REFERENCE, replace(REFERENCE, batch=4, latent=16), 2048
        steps, warmup, curve_steps = args.steps, args.warmup, args.curve_steps
    log = (lambda msg: None) if args.quick else (lambda msg: print(msg, file=sys.stderr, flush=True))
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    gc.freeze()  # objects from imports: keeps the per-case gc.collect() short
    try:
        res = run(s, curve_sizes, steps, warmup, curve_steps, peak_n, log)
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
    plot = args.plot or (args.json.with_suffix(".loss.png") if args.json else Path("bench_generator_loss.png"))
    c = res["loss_curves"]
    plot_curves(plot, {p: (c["steps"], c[p]) for p in PRECISIONS}, xlabel="step", ylabel="MSE loss")
    c["plot"] = str(plot)
    print(report(res))
    if args.json:
        write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
