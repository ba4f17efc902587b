"""The three stages end to end, as cached cells: data → guidance segmenter → [base →] generator → synthesis →
downstream segmenter → metrics. Each stage's output lives under a folder named by a hash of the settings
it depends on, with a `done.json` marker written last: cells that share a stage share its work, and a
killed run resumes at the first unfinished stage. `todsynth demo` is one such run; `todsynth experiment`
runs grids of cells with several seeds.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from todsynth.config import require

SYNTH_KINDS = ("none", "plain", "crfm", "oracle")


@dataclass
class CellSettings:
    """Everything one cell depends on. Paths left empty mean the embedded toy data."""

    # data
    size: int = 64
    n_real: int = 16
    n_layouts: int = 200
    n_test: int = 64
    data_seed: int = 0
    real_data: str | None = None  # a real dataset (LoveDA/folder/JSONL) instead of toy tiles
    layouts_data: str | None = None  # label-only masks for protocol (ii)
    test_data: str | None = None
    test_split: str = "Val"
    # segmenters (guidance, downstream, judge)
    seg_arch: str = "unet"
    seg_encoder: str | None = None
    seg_steps: int = 300
    seg_batch: int = 8
    seg_lr: float = 1e-3
    seg_class_weights: str = "none"  # none | sqrt_inverse | inverse: loss weights from the training mix
    judge_arch: str = "fpn"
    # generator
    control: str = "triple"
    gen_steps: int = 600
    gen_batch: int = 16
    gen_lr: float = 5e-4
    gen_layers: int = 4
    gen_heads: int = 4
    gen_head_dim: int = 32
    gen_patch: int = 4
    gen_ema: float = 0.0
    gen_timestep_mean: float = 0.0  # logit-normal mean of the training t (> 0: more training near noise)
    gen_timestep_tail: float = 0.0  # share of training t drawn uniform in [0.8, 1): CRFM's corrected steps
    sd3_path: str | None = None
    autoencoder: str = "pixel"
    autoencoder_path: str | None = None
    # generative foundation (generator/pretrain.py): fine-tune from a base pretrained on unlabeled images
    init: str = "scratch"  # scratch | pretrained
    base_data: str | None = None  # unlabeled images for the base (default: the embedded toy pool)
    base_pool: int = 4000  # toy pool tiles (indices disjoint from the real, layout and test tiles)
    base_steps: int = 3000
    base_batch: int = 32
    base_lr: float = 1e-3
    gen_lora_rank: int = 0  # > 0: fine-tune with LoRA on the (pretrained) streams
    # synthesis
    synth: str = "crfm"  # none | plain | crfm | oracle
    protocol: str = "layouts"  # layouts: one image per new label-only layout; masks: K per training mask
    copies: int = 1
    num_steps: int = 16
    guidance_scale: float = 1.0
    shift: float = 1.0  # sigma shift of the sampling schedule (SD3: 3.0)
    crfm_steps: int = 3
    crfm_alpha: float = 0.5
    crfm_schedule: str = "linear_decreasing"
    crfm_rule: str = "relative"
    filter: bool = False
    filter_margin: float = 1.25
    # downstream mix
    real_share: float = 0.5  # fraction of real samples in the training mix (real repeated to reach it)
    balance: bool = False  # hardness-weighted synthesis: more copies for masks of hard classes
    seed: int = 0

    def validate(self) -> None:
        require(self.synth in SYNTH_KINDS, f"synth must be one of {SYNTH_KINDS}, got {self.synth!r}")
        require(self.protocol in ("layouts", "masks"), "protocol must be 'layouts' or 'masks'")
        from todsynth.segment.train import CLASS_WEIGHTINGS

        require(self.seg_class_weights in CLASS_WEIGHTINGS,
                f"seg_class_weights must be one of {CLASS_WEIGHTINGS}, got {self.seg_class_weights!r}")
        require(0 < self.real_share < 1, f"real_share must be in (0, 1), got {self.real_share}")
        for name in ("size", "n_real", "n_test", "seg_steps", "seg_batch", "gen_steps", "gen_batch", "copies",
                     "num_steps"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.n_layouts >= 0 and self.crfm_steps >= 0, "n_layouts and crfm_steps must be >= 0")
        require(self.init in ("scratch", "pretrained"), f"init must be scratch or pretrained, got {self.init!r}")
        require(self.init == "scratch" or not self.sd3_path, "init: pretrained and sd3_path both initialise the "
                "generator: give one")
        for name in ("base_pool", "base_steps", "base_batch"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.gen_lora_rank >= 0, f"gen_lora_rank must be >= 0, got {self.gen_lora_rank}")
        for name in ("seg_lr", "gen_lr", "base_lr", "crfm_alpha", "filter_margin", "guidance_scale",
                     "gen_timestep_tail"):
            v = getattr(self, name)
            require(math.isfinite(v) and v >= 0, f"{name} must be a finite number >= 0, got {v}")
        require(math.isfinite(self.shift) and self.shift > 0, f"shift must be a finite number > 0, got {self.shift}")
        require(self.gen_timestep_tail <= 1, f"gen_timestep_tail must be in [0, 1], got {self.gen_timestep_tail}")
        require(self.seg_arch != self.judge_arch, "the judge segmenter must use another architecture")


def settings_from(values: dict[str, Any], source: str = "settings") -> CellSettings:
    from todsynth.config import build_config

    return build_config(CellSettings, values, source)


def _key(s: CellSettings, names: tuple[str, ...], parent: str = "") -> str:
    """Short hash of the named settings (and a parent stage's key)."""
    blob = json.dumps({n: getattr(s, n) for n in names} | {"_parent": parent}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _gen_key(s: CellSettings) -> str:
    """The generator stage's key: its settings, the data and (init: pretrained) the base."""
    extra = tuple(n for n, default in GEN_ADDED.items() if getattr(s, n) != default)
    parent = _key(s, DATA_KEYS) + (_key(s, BASE_KEYS) if s.init == "pretrained" else "")
    return _key(s, GEN_KEYS + extra, parent)


DATA_KEYS = ("size", "n_real", "n_layouts", "n_test", "data_seed", "real_data", "layouts_data", "test_data",
             "test_split")
SEG_KEYS = ("seg_arch", "seg_encoder", "seg_steps", "seg_batch", "seg_lr", "seg_class_weights", "size", "seed")
JUDGE_KEYS = ("judge_arch", "seg_arch", "seg_encoder", "seg_steps", "seg_batch", "seg_lr", "size", "seed")
GEN_KEYS = ("control", "gen_steps", "gen_batch", "gen_lr", "gen_layers", "gen_heads", "gen_head_dim", "gen_patch",
            "gen_ema", "sd3_path", "autoencoder", "autoencoder_path", "size", "seed")
# the base depends on neither the cell's seed nor its control: every pretrained cell with these settings shares it
BASE_KEYS = ("base_data", "base_pool", "base_steps", "base_batch", "base_lr", "gen_layers", "gen_heads",
             "gen_head_dim", "gen_patch", "autoencoder", "autoencoder_path", "size", "data_seed")
# generator settings added later: keyed only when not at their default, so earlier caches stay valid
GEN_ADDED = {"init": "scratch", "gen_lora_rank": 0, "gen_timestep_mean": 0.0, "gen_timestep_tail": 0.0}
SYN_ADDED = {"shift": 1.0}
SYN_KEYS = ("synth", "protocol", "copies", "num_steps", "guidance_scale", "crfm_steps", "crfm_alpha",
            "crfm_schedule", "crfm_rule", "filter", "filter_margin", "balance", "seed")


class StageResult(dict):
    """A stage's recorded output (done.json); `.dir` says which cached folder it came from."""

    dir: Path


class Stage:
    """A cached stage folder: `run(fn)` calls fn(folder) unless done.json exists, then returns its content.

    The folder is absolute, so the paths a stage records stay valid from any working directory.
    """

    def __init__(self, root: Path, name: str, key: str, log: Callable[[str], None]):
        self.dir = Path(root).absolute() / "cache" / f"{name}-{key}"
        self.name, self.log = name, log

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").is_file()

    def run(self, fn: Callable[[Path], dict]) -> StageResult:
        from todsynth.io import read_json, write_json

        if not self.done:
            self.log(f"stage {self.name} → {self.dir.name}")
            self.dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            result = fn(self.dir)
            result["wall_time_s"] = round(time.perf_counter() - t0, 2)
            write_json(self.dir / "done.json", result)
        out = StageResult(read_json(self.dir / "done.json"))
        out.dir = self.dir
        return out


# ---------------------------------------------------------------------------------------------
# Stages


def stage_data(s: CellSettings, root: Path, log) -> dict:
    """Real tiles, label-only layouts, a test set and the oracle renders of the layouts."""
    def make(d: Path) -> dict:
        from todsynth.data.toy import write_toy_dataset

        out = {}
        if s.real_data is None:
            out["real"] = str(write_toy_dataset(d / "real", s.n_real, s.size, s.data_seed, start=0))
        if s.layouts_data is None and s.real_data is None:
            out["layouts"] = str(write_toy_dataset(d / "layouts", max(s.n_layouts, 1), s.size, s.data_seed,
                                                   start=100_000, label_only=True))
            out["oracle"] = str(write_toy_dataset(d / "oracle", max(s.n_layouts, 1), s.size, s.data_seed,
                                                  start=100_000))
        if s.test_data is None:
            out["test"] = str(write_toy_dataset(d / "test", s.n_test, s.size, s.data_seed, split="Val",
                                                start=500_000))
        return out

    paths = Stage(root, "data", _key(s, DATA_KEYS), log).run(make)
    paths.setdefault("real", s.real_data)
    paths.setdefault("layouts", s.layouts_data)
    paths.setdefault("test", s.test_data)
    paths.setdefault("oracle", None)
    return paths


def _samples(path: str, split: str = "Train", limit: int | None = None):
    from todsynth.data.check import open_checked

    return open_checked(path, split, limit=limit)


def _seg_cfg(s: CellSettings, seed: int, arch: str | None = None):
    from todsynth.segment.train import SegmentTrainConfig

    return SegmentTrainConfig(arch=arch or s.seg_arch, encoder=s.seg_encoder if arch is None else None,
                              size=s.size, steps=s.seg_steps, batch_size=s.seg_batch, lr=s.seg_lr, seed=seed,
                              device="auto", warmup_steps=min(20, s.seg_steps // 10),
                              class_weights=s.seg_class_weights if arch is None else "none")


def _train_eval(s: CellSettings, d: Path, real, test, synthetic=None, seed: int = 0, arch: str | None = None,
                repeat_real: int = 1) -> dict:
    """Train a segmenter on real (+ synthetic), save it, evaluate it on the test set."""
    import dataclasses

    from todsynth.segment.train import evaluate_segmenter, train_on_samples

    cfg = dataclasses.replace(_seg_cfg(s, seed, arch), repeat_real=repeat_real)
    outcome = train_on_samples(real, real.classes, cfg, synthetic=synthetic)
    outcome.model.save_pretrained(d / "model")
    metrics = evaluate_segmenter(outcome.model, test, batch_size=16)
    return {"model": str(d / "model"), "metrics": metrics.to_dict(list(real.classes.names)),
            "loss_history": [list(h) for h in outcome.history], "train_wall_time_s": round(outcome.wall_time_s, 2)}


def stage_guidance(s: CellSettings, data: dict, root: Path, log) -> dict:
    """Real-only segmenter: CRFM's guidance network, the filter's statistics, and the 'real only' row."""
    def make(d: Path) -> dict:
        real, test = _samples(data["real"]), _samples(data["test"], s.test_split)
        result = _train_eval(s, d, real, test, seed=s.seed)
        result["filter_stats"] = _filter_stats(result["model"], real, s.size, d / "filter_stats.json")
        return result

    return Stage(root, "guidance", _key(s, SEG_KEYS, _key(s, DATA_KEYS)), log).run(make)


def _filter_stats(model_dir: str, real, size: int, path: Path) -> str:
    """Per-class mean CE of the guidance segmenter on the real set (FreeMask thresholds), as JSON."""
    from todsynth.generator.train import load_train_data
    from todsynth.io import write_json
    from todsynth.segment.model import Segmenter
    from todsynth.synthesize import class_loss_stats

    from todsynth.data.bands import convert

    data, classes = load_train_data(str(real.root), "Train", size)
    segmenter = Segmenter.from_pretrained(model_dir)
    images = convert(data.images, data.normalisation, segmenter.normalisation, f"the segmenter {model_dir}")
    stats = class_loss_stats(segmenter, images, data.labels, classes.num_classes, classes.ignore_index)
    write_json(path, stats)
    return str(path)


def stage_judge(s: CellSettings, data: dict, root: Path, log) -> dict:
    """An independent judge (other architecture and seed) trained on real + oracle pairs, for mask fidelity."""
    def make(d: Path) -> dict:
        real, test = _samples(data["real"]), _samples(data["test"], s.test_split)
        oracle = _samples(data["oracle"]) if data.get("oracle") else None
        return _train_eval(s, d, real, test, synthetic=oracle, seed=s.seed + 1000, arch=s.judge_arch)

    return Stage(root, "judge", _key(s, JUDGE_KEYS, _key(s, DATA_KEYS)), log).run(make)


def stage_base(s: CellSettings, root: Path, log, progress: bool = False) -> dict:
    """Pretrain the text and image streams on unlabeled images (control none): the base every
    `init: pretrained` cell with the same base settings fine-tunes from, whatever its seed or control."""
    def make(d: Path) -> dict:
        from todsynth.generator.pretrain import pretrain_config, pretrain_generator

        cfg = pretrain_config(
            data=s.base_data or f"toy:{s.base_pool}:{s.data_seed}", out=str(d), size=s.size,
            autoencoder=s.autoencoder, autoencoder_path=s.autoencoder_path, patch_size=s.gen_patch,
            num_layers=s.gen_layers, num_heads=s.gen_heads, head_dim=s.gen_head_dim, steps=s.base_steps,
            batch_size=s.base_batch, lr=s.base_lr, warmup_steps=min(50, s.base_steps // 10), val_every=s.base_steps,
            val_samples=4, val_steps=12, checkpoint_every=max(s.base_steps // 10, 1), seed=0, progress=progress,
            resume="auto")
        summary = pretrain_generator(cfg)
        return {"model": str(d / "model"), "summary": summary, "loss_png": str(d / "loss.png")}

    return Stage(root, "base", _key(s, BASE_KEYS), log).run(make)


def stage_generator(s: CellSettings, data: dict, root: Path, log, progress: bool = False,
                    base: dict | None = None) -> dict:
    """Train the mask-controlled MM-DiT on the real pairs (from scratch, SD3 or a pretrained `base`)."""
    if s.init == "pretrained" and base is None:
        base = stage_base(s, root, log, progress)

    def make(d: Path) -> dict:
        from todsynth.generator.train import GeneratorTrainConfig, train_generator

        cfg = GeneratorTrainConfig(
            data=data["real"], out=str(d), size=s.size, control=s.control, autoencoder=s.autoencoder,
            autoencoder_path=s.autoencoder_path, sd3_path=s.sd3_path, patch_size=s.gen_patch,
            num_layers=s.gen_layers, num_heads=s.gen_heads, head_dim=s.gen_head_dim, steps=s.gen_steps,
            batch_size=s.gen_batch, lr=s.gen_lr, warmup_steps=min(50, s.gen_steps // 10), ema_decay=s.gen_ema,
            timestep_mean=s.gen_timestep_mean, timestep_tail=s.gen_timestep_tail,
            val_every=s.gen_steps, val_samples=4, val_steps=s.num_steps, checkpoint_every=max(s.gen_steps // 4, 1),
            seed=s.seed, progress=progress, resume="auto",  # a killed stage resumes, a new one starts
            init=base["model"] if s.init == "pretrained" else None, lora_rank=s.gen_lora_rank)
        summary = train_generator(cfg)
        return {"model": str(d / "model"), "summary": summary, "loss_png": str(d / "loss.png")}

    return Stage(root, "generator", _gen_key(s), log).run(make)


def stage_synthesis(s: CellSettings, data: dict, gen: dict | None, guide: dict, root: Path, log,
                    progress: bool = False) -> dict:
    """Synthetic pairs: generator (plain or CRFM) or the oracle renderer, for layouts or training masks."""
    parent = _gen_key(s) + _key(s, SEG_KEYS)

    def make(d: Path) -> dict:
        if s.synth == "oracle":
            return {"path": data["oracle"], "made": s.n_layouts}
        from todsynth.synthesize import build_synthesize_config, synthesize

        masks = data["layouts"] if s.protocol == "layouts" else data["real"]
        cfg = build_synthesize_config(dict(
            generator=gen["model"], masks=masks, out=str(d / "pairs"), copies=s.copies, num_steps=s.num_steps,
            guidance_scale=s.guidance_scale, shift=s.shift, segmenter=guide["model"], seed=s.seed, batch_size=16,
            crfm_steps=s.crfm_steps if s.synth == "crfm" else 0, crfm_alpha_max=s.crfm_alpha,
            crfm_schedule=s.crfm_schedule, crfm_rule=s.crfm_rule,
            limit=s.n_layouts if s.protocol == "layouts" else None,
            filter_stats=guide["filter_stats"] if (s.filter or s.balance) else None, filter_pixels=s.filter,
            filter_margin=s.filter_margin, hard_resample=s.balance))
        summary = synthesize(cfg, progress=progress)
        return {"path": str(d / "pairs"), **summary}

    extra = tuple(n for n, default in SYN_ADDED.items() if getattr(s, n) != default)
    return Stage(root, "synthesis", _key(s, SYN_KEYS + ("n_layouts",) + extra, parent), log).run(make)


def stage_downstream(s: CellSettings, data: dict, syn: dict | None, root: Path, log) -> dict:
    """Segmenter on real (+ synthetic), same number of steps as real-only, scored on the test set."""
    parent = _key(s, DATA_KEYS) + (json.dumps(syn, sort_keys=True, default=str) if syn else "")

    def make(d: Path) -> dict:
        real, test = _samples(data["real"]), _samples(data["test"], s.test_split)
        synthetic = _samples(syn["path"], limit=s.n_layouts if s.synth == "oracle" else None)
        repeat = max(1, round(s.real_share / (1 - s.real_share) * len(synthetic) / len(real)))
        return _train_eval(s, d, real, test, synthetic=synthetic, seed=s.seed, repeat_real=repeat)

    return Stage(root, "downstream", _key(s, SEG_KEYS + ("real_share",), parent), log).run(make)


def stage_times(result: dict) -> dict[str, float]:
    """Cached folder -> measured wall time of every stage a `run_cell` result used."""
    return {str(v.dir): float(v.get("wall_time_s", 0.0)) for v in result.values() if isinstance(v, StageResult)}


def run_cell(s: CellSettings, root: str | Path, log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Run (or reuse) every stage a cell needs; returns its metrics and the stage outputs."""
    s.validate()
    root = Path(root)
    data = stage_data(s, root, log)
    guide = stage_guidance(s, data, root, log)
    out: dict[str, Any] = {"settings": asdict(s), "data": data, "guidance": guide}
    if s.synth == "none":
        out["metrics"] = guide["metrics"]
        return out
    uses_base = s.synth != "oracle" and s.init == "pretrained"
    base = stage_base(s, root, log, progress) if uses_base else None
    gen = stage_generator(s, data, root, log, progress, base) if s.synth != "oracle" else None
    syn = stage_synthesis(s, data, gen, guide, root, log, progress)
    down = stage_downstream(s, data, syn, root, log)
    if base is not None:
        out["base"] = base
    out.update(generator=gen, synthesis=syn, downstream=down, metrics=down["metrics"])
    return out


def mask_fidelity(images_dir: str | Path, judge_model: str, limit: int | None = None) -> dict:
    """Mask fidelity: the judge's metrics on synthetic images against their conditioning masks."""
    from todsynth.segment.model import Segmenter
    from todsynth.segment.train import evaluate_segmenter

    ds = _samples(str(images_dir), limit=limit)
    judge = Segmenter.from_pretrained(judge_model)
    return evaluate_segmenter(judge, ds, batch_size=16).to_dict(list(ds.classes.names))
