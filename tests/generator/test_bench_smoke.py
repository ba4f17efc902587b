"""benchmarks/bench_generator.py --quick runs end to end and writes complete, finite results (no speed is asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_generator.py"


def load_bench() -> ModuleType:
    """Import the benchmark script as a module (registered first: its dataclasses look themselves up)."""
    spec = importlib.util.spec_from_file_location("bench_generator", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def positive(v: float) -> bool:
    """Finite and > 0."""
    return math.isfinite(v) and v > 0


def test_quick_run_writes_complete_results(tmp_path):
    bench = load_bench()
    out, plot = tmp_path / "bench.json", tmp_path / "loss.png"
    returned = bench.main(["--quick", "--json", str(out), "--plot", str(plot)])
    res = json.loads(out.read_text())
    assert res["loss_curves"]["plot"] == returned["loss_curves"]["plot"] == str(plot)
    assert set(res) >= {"sizes", "machine", "peaks", "params", "flops", "timing", "memory", "goals", "loss_curves"}
    assert plot.stat().st_size > 0
    for p in ("fp32", "bf16"):
        assert positive(res["peaks"][p]["best_gflops"]) and positive(res["peaks"][p]["median_gflops"])
        for case in bench.CASES:
            t = res["timing"][p][case]
            assert len(t["times_ms"]) == res["steps"] and all(positive(x) for x in t["times_ms"])
            assert all(
                positive(t[k])
                for k in (
                    "median_ms",
                    "min_ms",
                    "ratio",
                    "cpu_median_ms",
                    "cpu_ratio",
                    "ratio_vs_fp32",
                    "cpu_ratio_vs_fp32",
                )
            )
            assert len(t["cpu_times_ms"]) == res["steps"]
            mem = res["memory"][p][case]
            assert mem is None or (positive(mem["params_mib"]) and mem["step_mib"] >= 0)
        assert res["timing"][p]["diffusers"]["ratio"] == 1.0
        assert res["timing"]["fp32"][case]["ratio"] == res["timing"]["fp32"][case]["ratio_vs_fp32"]
        assert set(res["goals"][p]) == set(bench.GOALS)
    # same architecture without the mask stream: same parameters, nearly the same FLOPs; the mask tokens add FLOPs
    flops = res["flops"]["per_step"]
    assert res["params"]["none"] == res["params"]["diffusers"]
    assert abs(flops["none"] - flops["diffusers"]) < 0.05 * flops["diffusers"]
    assert flops["triple"] > 1.3 * flops["none"] and all(positive(v) for v in flops.values())
    curves = res["loss_curves"]
    assert len(curves["fp32"]) == len(curves["bf16"]) == len(curves["steps"]) > 1
    assert all(math.isfinite(v) for v in curves["fp32"] + curves["bf16"] + [curves["max_abs_diff"]])
    assert curves["fp32"][0] == curves["bf16"][0] or abs(curves["fp32"][0] - curves["bf16"][0]) < 0.05


def test_fullscale_quick_run_writes_complete_results(tmp_path):
    """bench_fullscale.py --quick: the SD3.5-medium-shaped benchmark end to end on tiny shapes."""
    spec = importlib.util.spec_from_file_location("bench_fullscale", SCRIPT.with_name("bench_fullscale.py"))
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "full.json"
    bench.main(["--quick", "--json", str(out)])
    res = json.loads(out.read_text())
    train, syn = res["train"], res["synthesis"]
    assert len(train["step_s"]) == res["setting"]["steps"] and all(positive(x) for x in train["step_s"])
    assert positive(train["tflop_per_step"]) and positive(res["vae"]["encode_s_per_image"])
    assert positive(syn["plain"]["images_per_s"]) and positive(syn["crfm"]["images_per_s"])
    assert res["model"]["config"]["dual_attention_layers"] == [0] and res["model"]["config"]["qk_norm"]
    assert positive(res["peak_rss_mib"]) and train["mfu"] is None  # no peak known for a CPU


def test_gpu_check_fails_fast_without_cuda(tmp_path):
    import subprocess

    import torch

    if torch.cuda.is_available():
        return
    script = SCRIPT.with_name("gpu_check.sh")
    done = subprocess.run(
        ["bash", str(script), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert done.returncode == 3 and "no CUDA device" in done.stderr
    assert not (tmp_path / "out").exists()
