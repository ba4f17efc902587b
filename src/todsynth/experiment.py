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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from todsynth.config import require

SYNTH_KINDS = ("none", "plain", "crfm", "oracle")
# counts of the embedded toy data where a cell leaves them unset (with a real dataset, unset means all of it)
TOY_COUNTS = {"n_real": 16, "n_layouts": 200, "n_test": 64}
LOG_LINES = 10  # periodic log lines per long stage (training steps, synthesis batches)


@dataclass
class CellSettings:
    """Everything one cell depends on. Paths left empty mean the embedded toy data."""

    # data (counts left unset: the toy data's TOY_COUNTS, or all of a real dataset)
    size: int = 64  # the working size: every model trains at it, test tiles are predicted at it
    n_real: int | None = None  # real_data: a seeded few-shot subset (every class kept, as `data split` draws)
    n_layouts: int | None = None  # layouts_data: a seeded random draw
    n_test: int | None = None  # test_data: a seeded random draw
    data_seed: int = 0
    real_data: str | None = None  # a real dataset (LoveDA/folder/JSONL) instead of toy tiles
    real_split_file: str | None = None  # ids of real_data to train on (`todsynth data split`), instead of n_real
    layouts_data: str | None = None  # label-only masks for protocol (ii)
    oracle_data: str | None = None  # real images of the layouts (ids as in layouts_data): the oracle row
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
        for name in ("size", "seg_steps", "seg_batch", "gen_steps", "gen_batch", "copies", "num_steps"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_real", "n_test"):
            value = getattr(self, name)
            require(value is None or value >= 1, f"{name} must be >= 1 (or unset: all), got {value}")
        require(self.n_layouts is None or self.n_layouts >= 0, f"n_layouts must be >= 0, got {self.n_layouts}")
        require(self.crfm_steps >= 0, f"crfm_steps must be >= 0, got {self.crfm_steps}")
        self._validate_data()
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

    def _validate_data(self) -> None:
        """Refuse data settings that do not apply to this cell's data sources instead of ignoring them."""
        real = self.real_data is not None
        toy_layouts = self.layouts_data is None and not real
        require(real or self.real_split_file is None, "real_split_file selects ids of real_data, but no real_data "
                "is set", fix="set real_data, or drop real_split_file")
        require(self.real_split_file is None or self.n_real is None, "real_split_file and n_real both choose the "
                "real training tiles", fix="give one: the split file's ids, or n_real for a seeded draw")
        require(not real or self.test_data is not None, "real_data needs a test_data: the embedded toy test set "
                "is not your data", fix="set test_data (it may be real_data itself: the test tiles are then "
                "drawn from the tiles not used for training)")
        require(self.n_layouts is None or self.layouts_data is not None or toy_layouts, "n_layouts is set but "
                "there are no layouts to draw from (real_data without layouts_data)",
                fix="set layouts_data (a label-only or labelled dataset of masks), or drop n_layouts")
        require(self.oracle_data is None or self.layouts_data is not None, "oracle_data holds the real images of "
                "the layouts, but layouts_data is not set (the embedded layouts bring their own renders)",
                fix="set layouts_data, or drop oracle_data")
        require(self.synth != "oracle" or toy_layouts or self.oracle_data is not None, "synth: oracle trains on "
                "the real images of the layouts, and this cell has none", fix="set oracle_data to a dataset "
                "holding the images of layouts_data's ids (e.g. the labelled folder the masks came from)")
        require(self.synth in ("none", "oracle") or self.protocol == "masks" or self.layouts_data is not None
                or toy_layouts, f"synth: {self.synth} with protocol: layouts draws one image per layout, and "
                "this cell has no layouts", fix="set layouts_data, or protocol: masks (K images per real mask)")


def settings_from(values: dict[str, Any], source: str = "settings") -> CellSettings:
    """A validated CellSettings; a refused setting names `source` (e.g. 'grid.yaml: table/cell')."""
    from todsynth.config import build_config
    from todsynth.errors import ConfigError

    try:
        return build_config(CellSettings, values, source)
    except ConfigError as e:
        if e.path is None or str(e.path) == "config":
            raise ConfigError(e.problem, path=source, fix=e.fix) from None
        raise


def resolve_counts(s: CellSettings) -> CellSettings:
    """The cell with the toy data's counts filled in where it uses the embedded data and leaves them unset."""
    toy = {"n_real": s.real_data is None, "n_layouts": s.layouts_data is None and s.real_data is None,
           "n_test": s.test_data is None}
    return replace(s, **{n: TOY_COUNTS[n] for n, used in toy.items() if used and getattr(s, n) is None})


def _key(s: CellSettings, names: tuple[str, ...], parent: str = "") -> str:
    """Short hash of the named settings (and a parent stage's key)."""
    blob = json.dumps({n: getattr(s, n) for n in names} | {"_parent": parent}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _added(s: CellSettings, added: dict[str, Any]) -> tuple[str, ...]:
    """The settings of `added` that are not at their default (only those are keyed: old caches stay valid)."""
    return tuple(n for n, default in added.items() if getattr(s, n) != default)


def _data_key(s: CellSettings) -> str:
    """The data stage's key: the data settings and (real_split_file) the split file's content."""
    digest = ""
    if s.real_split_file is not None:
        try:
            digest = hashlib.sha256(Path(s.real_split_file).read_bytes()).hexdigest()[:12]
        except OSError as e:
            from todsynth.errors import ConfigError

            raise ConfigError(f"cannot read the split file: {e.strerror}", path=s.real_split_file,
                              fix="write it with 'todsynth data split DATASET FILE --n N'") from None
    return _key(s, DATA_KEYS + _added(s, DATA_ADDED), digest)


def _gen_key(s: CellSettings) -> str:
    """The generator stage's key: its settings, the data and (init: pretrained) the base."""
    parent = _data_key(s) + (_key(s, BASE_KEYS) if s.init == "pretrained" else "")
    return _key(s, GEN_KEYS + _added(s, GEN_ADDED), parent)


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
SYN_ADDED = {"shift": 1.0, "oracle_data": None}
DATA_ADDED = {"real_split_file": None}
JUDGE_ADDED = {"oracle_data": None}
SYN_KEYS = ("synth", "protocol", "copies", "num_steps", "guidance_scale", "crfm_steps", "crfm_alpha",
            "crfm_schedule", "crfm_rule", "filter", "filter_margin", "balance", "seed")


class StageResult(dict):
    """A stage's recorded output (done.json); `.dir` says which cached folder it came from."""

    dir: Path


class Stage:
    """A cached stage folder: `run(fn)` calls fn(folder) unless done.json exists, then returns its content.

    The folder is absolute, so the paths a stage records stay valid from any working directory. `what` says
    in words what the stage computes (the log names it next to the hash folder).
    """

    def __init__(self, root: Path, name: str, key: str, log: Callable[[str], None], what: str = ""):
        self.dir = Path(root).absolute() / "cache" / f"{name}-{key}"
        self.name, self.log, self.what = name, log, what

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").is_file()

    def run(self, fn: Callable[[Path], dict]) -> StageResult:
        from todsynth.io import read_json, write_json

        if not self.done:
            self.log(f"stage {self.name}: {self.what} → {self.dir.name}" if self.what
                     else f"stage {self.name} → {self.dir.name}")
            self.dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            result = fn(self.dir)
            result["wall_time_s"] = round(time.perf_counter() - t0, 2)
            write_json(self.dir / "done.json", result)
            self.log(f"stage {self.name} done in {result['wall_time_s']:.1f} s")
        out = StageResult(read_json(self.dir / "done.json"))
        out.dir = self.dir
        return out


def step_logger(log: Callable[[str], None], what: str, total: int) -> Callable[[int, float], None]:
    """An on_step(step, loss) callback logging about LOG_LINES lines, e.g. 'generator (...): step 150/600 loss 0.21'."""
    every = max(1, total // LOG_LINES)
    logged = [0]

    def on_step(step: int, loss: float) -> None:
        """Log when `step` passes the next multiple of `every` (callers may report only some steps)."""
        if step // every > logged[0] // every or step == total:
            logged[0] = step
            log(f"{what}: step {step}/{total} loss {loss:.4f}")

    return on_step


def count_logger(log: Callable[[str], None], what: str, unit: str) -> Callable[[int, int], None]:
    """An on_batch(done, total) callback logging about LOG_LINES lines, e.g. 'synthesis (...): 40/200 images'."""
    logged = [0]

    def on_batch(done: int, total: int) -> None:
        tenth = done * LOG_LINES // max(total, 1)
        if tenth > logged[0] or done == total:
            logged[0] = tenth
            log(f"{what}: {done}/{total} {unit}")

    return on_batch


# ---------------------------------------------------------------------------------------------
# Stages


def _mask_files(ds) -> dict[Path, str]:
    """Resolved mask file -> id of every sample (two datasets share a tile when they share its mask file)."""
    return {Path(ds.paths(i)[1]).resolve(): ds.ids[i] for i in range(len(ds))}


def _unused(ds, taken: list[tuple[Any, list[str]]]) -> list[str]:
    """`ds`'s ids minus the tiles already drawn (from `ds` or another view of the same files) for another part."""
    used: set[Path] = set()
    for other, ids in taken:
        chosen = set(ids)
        used |= {f for f, i in _mask_files(other).items() if i in chosen}
    return [i for f, i in _mask_files(ds).items() if f not in used]


def _draw(ids: list[str], n: int | None, seed: list[int], setting: str, source: str) -> list[str]:
    """A seeded random draw of `n` ids (all when `n` is None), kept in dataset order."""
    from todsynth.errors import ConfigError

    if not ids:
        raise ConfigError(f"no tiles of {source} are left for {setting.removeprefix('n_')} (the others are "
                          "drawn for another part of the cell)", path=source,
                          fix="lower n_real / n_test, or give another dataset")
    if n is None:
        return ids
    if n > len(ids):
        raise ConfigError(f"{setting} = {n} but {source} has {len(ids)} tile(s) to draw from", path=source,
                          fix=f"set {setting} to at most {len(ids)}, or leave it unset to use them all")
    keep = set(np.random.default_rng(seed).permutation(len(ids))[:n].tolist())
    return [i for k, i in enumerate(ids) if k in keep]


def _real_ids(s: CellSettings, ds) -> list[str]:
    """The real training tiles: the split file's ids, a seeded few-shot subset of n_real, or all."""
    from todsynth.data.split import few_shot_split, read_split
    from todsynth.errors import ConfigError

    if s.real_split_file is not None:
        return read_split(s.real_split_file, ds)
    if s.n_real is None:
        return list(ds.ids)
    if s.n_real > len(ds):
        raise ConfigError(f"n_real = {s.n_real} but {s.real_data} has {len(ds)} tile(s)", path=s.real_data,
                          fix=f"set n_real to at most {len(ds)}, or leave it unset to use them all")
    return few_shot_split(ds, n=s.n_real, seed=s.data_seed)


def _draw_real_parts(s: CellSettings, log: Callable[[str], None]) -> dict[str, tuple[list[str], dict]]:
    """part -> (ids, what to record) of the real parts (training tiles, test tiles, layouts), disjoint where
    they share files; drawn before the data stage writes anything, so a bad count leaves no folder."""
    from todsynth.data.readers import open_dataset

    out: dict[str, tuple[list[str], dict]] = {}
    taken: list[tuple[Any, list[str]]] = []
    said: list[str] = []
    if s.real_data is not None:
        real = open_dataset(s.real_data, "Train")
        ids = _real_ids(s, real)
        how = (f"split file {s.real_split_file}" if s.real_split_file else "all" if s.n_real is None
               else f"seeded few-shot draw, data_seed {s.data_seed}")
        taken.append((real, ids))
        said.append(f"{len(ids)} real tiles of {len(real)} ({how})")
        out["real"] = (ids, {"source": s.real_data, "how": how})
    parts = (("test", s.test_data, s.test_split, "n_test", 1), ("layouts", s.layouts_data, "Train", "n_layouts", 2))
    for part, source, split, setting, salt in parts:
        if source is None:
            continue
        ds = open_dataset(source, split)
        ids = _draw(_unused(ds, taken), getattr(s, setting), [s.data_seed, salt], setting, source)
        taken.append((ds, ids))
        said.append(f"{len(ids)} {part} tiles of {len(ds)}")
        out[part] = (ids, {"source": source, "split": split, "seed": s.data_seed})
    if said:
        log("data: " + ", ".join(said) + " (tiles used for one part are not drawn for another)")
    return out


def stage_data(s: CellSettings, root: Path, log) -> dict:
    """Real tiles, label-only layouts, a test set and the oracle renders of the layouts (toy parts written,
    real parts drawn: id files of the chosen tiles)."""
    s = resolve_counts(s)
    source = "embedded toy tiles" if s.real_data is None else f"real tiles of {s.real_data}"
    stage = Stage(root, "data", _data_key(s), log, f"{source}, {s.size} px working size")
    drawn = {} if stage.done else _draw_real_parts(s, log)

    def make(d: Path) -> dict:
        from todsynth.data.split import write_split
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
        for part, (ids, meta) in drawn.items():
            write_split(d / f"{part}_ids.json", ids, meta)
            out[f"{part}_ids"] = str(d / f"{part}_ids.json")
        return out

    paths = stage.run(make)
    paths.setdefault("real", s.real_data)
    paths.setdefault("layouts", s.layouts_data)
    paths.setdefault("test", s.test_data)
    paths.setdefault("oracle", None)
    return paths


def _samples(path: str, split: str = "Train", limit: int | None = None, split_file: str | None = None):
    from todsynth.data.check import open_checked

    return open_checked(path, split, split_file, limit=limit)


def _real(data: dict):
    """The real training tiles of a cell (validated)."""
    return _samples(data["real"], split_file=data.get("real_ids"))


def _test(s: CellSettings, data: dict):
    """The test tiles of a cell (validated)."""
    return _samples(data["test"], s.test_split, split_file=data.get("test_ids"))


def _seg_cfg(s: CellSettings, seed: int, arch: str | None = None):
    from todsynth.segment.train import SegmentTrainConfig

    return SegmentTrainConfig(arch=arch or s.seg_arch, encoder=s.seg_encoder if arch is None else None,
                              size=s.size, steps=s.seg_steps, batch_size=s.seg_batch, lr=s.seg_lr, seed=seed,
                              device="auto", warmup_steps=min(20, s.seg_steps // 10),
                              class_weights=s.seg_class_weights if arch is None else "none")


def _train_eval(s: CellSettings, d: Path, real, test, synthetic=None, seed: int = 0, arch: str | None = None,
                repeat_real: int = 1, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train a segmenter on real (+ synthetic), save it (with its working size), evaluate it on the test set
    (each test tile predicted at the working size, scored at its own resolution)."""
    import dataclasses

    from todsynth.segment.train import evaluate_segmenter, train_on_samples

    cfg = dataclasses.replace(_seg_cfg(s, seed, arch), repeat_real=repeat_real)
    outcome = train_on_samples(real, real.classes, cfg, synthetic=synthetic, on_step=on_step)
    outcome.model.save_pretrained(d / "model")
    metrics = evaluate_segmenter(outcome.model, test, batch_size=16)
    return {"model": str(d / "model"), "metrics": metrics.to_dict(list(real.classes.names)),
            "loss_history": [list(h) for h in outcome.history], "train_wall_time_s": round(outcome.wall_time_s, 2)}


def stage_guidance(s: CellSettings, data: dict, root: Path, log) -> dict:
    """Real-only segmenter: CRFM's guidance network, the filter's statistics, and the 'real only' row."""
    s = resolve_counts(s)
    what = f"segmenter on real only ({s.seg_arch}, seed {s.seed})"

    def make(d: Path) -> dict:
        real, test = _real(data), _test(s, data)
        result = _train_eval(s, d, real, test, seed=s.seed, on_step=step_logger(log, what, s.seg_steps))
        result["filter_stats"] = _filter_stats(result["model"], data, s.size, d / "filter_stats.json")
        return result

    return Stage(root, "guidance", _key(s, SEG_KEYS, _data_key(s)), log,
                 f"{what}: the real-only row and CRFM's guidance").run(make)


def _filter_stats(model_dir: str, data: dict, size: int, path: Path) -> str:
    """Per-class mean CE of the guidance segmenter on the real set (FreeMask thresholds), as JSON."""
    from todsynth.generator.train import load_train_data
    from todsynth.io import write_json
    from todsynth.segment.model import Segmenter
    from todsynth.synthesize import class_loss_stats

    from todsynth.data.bands import convert

    real, classes = load_train_data(str(data["real"]), "Train", size, data.get("real_ids"))
    segmenter = Segmenter.from_pretrained(model_dir)
    images = convert(real.images, real.normalisation, segmenter.normalisation, f"the segmenter {model_dir}")
    stats = class_loss_stats(segmenter, images, real.labels, classes.num_classes, classes.ignore_index)
    write_json(path, stats)
    return str(path)


def _oracle(s: CellSettings, data: dict):
    """oracle_data's images of the drawn layouts (None without oracle_data); every layout id must have one."""
    from todsynth.errors import DataError

    if s.oracle_data is None:
        return None
    from todsynth.data.readers import open_dataset
    from todsynth.data.split import read_split

    ids = read_split(data["layouts_ids"])
    ds = open_dataset(s.oracle_data)
    missing = sorted(set(ids) - set(ds.ids))
    if missing:
        raise DataError(f"oracle_data has no image for {len(missing)} of the {len(ids)} layouts, e.g. "
                        f"{missing[:5]}", path=s.oracle_data,
                        fix="oracle_data must hold the images of layouts_data's ids (the same file names)")
    return _samples(s.oracle_data, split_file=data["layouts_ids"])


def stage_judge(s: CellSettings, data: dict, root: Path, log) -> dict:
    """An independent judge (other architecture and seed) trained on real + oracle pairs, for mask fidelity."""
    s = resolve_counts(s)
    what = f"judge segmenter ({s.judge_arch}, seed {s.seed + 1000}) on real + oracle pairs"

    def make(d: Path) -> dict:
        real, test = _real(data), _test(s, data)
        oracle = _samples(data["oracle"]) if data.get("oracle") else _oracle(s, data)
        return _train_eval(s, d, real, test, synthetic=oracle, seed=s.seed + 1000, arch=s.judge_arch,
                           on_step=step_logger(log, what, s.seg_steps))

    key = _key(s, JUDGE_KEYS + _added(s, JUDGE_ADDED), _data_key(s))
    return Stage(root, "judge", key, log, what).run(make)


def stage_base(s: CellSettings, root: Path, log, progress: bool = False) -> dict:
    """Pretrain the text and image streams on unlabeled images (control none): the base every
    `init: pretrained` cell with the same base settings fine-tunes from, whatever its seed or control."""
    what = f"generator base pretrained on unlabeled images ({s.base_steps} steps)"

    def make(d: Path) -> dict:
        from todsynth.generator.pretrain import pretrain_config, pretrain_generator

        cfg = pretrain_config(
            data=s.base_data or f"toy:{s.base_pool}:{s.data_seed}", out=str(d), size=s.size,
            autoencoder=s.autoencoder, autoencoder_path=s.autoencoder_path, patch_size=s.gen_patch,
            num_layers=s.gen_layers, num_heads=s.gen_heads, head_dim=s.gen_head_dim, steps=s.base_steps,
            batch_size=s.base_batch, lr=s.base_lr, warmup_steps=min(50, s.base_steps // 10), val_every=s.base_steps,
            val_samples=4, val_steps=12, checkpoint_every=max(s.base_steps // 10, 1), seed=0, progress=progress,
            resume="auto")
        summary = pretrain_generator(cfg, on_step=step_logger(log, "generator base", s.base_steps))
        return {"model": str(d / "model"), "summary": asdict(summary), "loss_png": str(d / "loss.png")}

    return Stage(root, "base", _key(s, BASE_KEYS), log, what).run(make)


def stage_generator(s: CellSettings, data: dict, root: Path, log, progress: bool = False,
                    base: dict | None = None) -> dict:
    """Train the mask-controlled MM-DiT on the real pairs (from scratch, SD3 or a pretrained `base`)."""
    s = resolve_counts(s)
    if s.init == "pretrained" and base is None:
        base = stage_base(s, root, log, progress)
    what = f"generator ({s.control}, seed {s.seed})"

    def make(d: Path) -> dict:
        from todsynth.generator.train import GeneratorTrainConfig, train_generator

        cfg = GeneratorTrainConfig(
            data=data["real"], split_file=data.get("real_ids"), out=str(d), size=s.size, control=s.control,
            autoencoder=s.autoencoder,
            autoencoder_path=s.autoencoder_path, sd3_path=s.sd3_path, patch_size=s.gen_patch,
            num_layers=s.gen_layers, num_heads=s.gen_heads, head_dim=s.gen_head_dim, steps=s.gen_steps,
            batch_size=s.gen_batch, lr=s.gen_lr, warmup_steps=min(50, s.gen_steps // 10), ema_decay=s.gen_ema,
            timestep_mean=s.gen_timestep_mean, timestep_tail=s.gen_timestep_tail,
            val_every=s.gen_steps, val_samples=4, val_steps=s.num_steps, checkpoint_every=max(s.gen_steps // 4, 1),
            seed=s.seed, progress=progress, resume="auto",  # a killed stage resumes, a new one starts
            init=base["model"] if s.init == "pretrained" else None, lora_rank=s.gen_lora_rank)
        summary = train_generator(cfg, on_step=step_logger(log, what, s.gen_steps))
        return {"model": str(d / "model"), "summary": asdict(summary), "loss_png": str(d / "loss.png")}

    return Stage(root, "generator", _gen_key(s), log, f"{what}, {s.gen_steps} steps on the real pairs").run(make)


def stage_synthesis(s: CellSettings, data: dict, gen: dict | None, guide: dict, root: Path, log,
                    progress: bool = False) -> dict:
    """Synthetic pairs: generator (plain or CRFM) or the oracle renderer, for layouts or training masks."""
    s = resolve_counts(s)
    parent = _gen_key(s) + _key(s, SEG_KEYS)
    what = f"synthesis ({s.synth}, seed {s.seed})"

    def make(d: Path) -> dict:
        if s.synth == "oracle" and data.get("oracle"):
            return {"path": data["oracle"], "made": s.n_layouts}
        if s.synth == "oracle":
            oracle = _oracle(s, data)
            return {"path": s.oracle_data, "ids": data["layouts_ids"], "made": len(oracle)}
        from todsynth.synthesize import build_synthesize_config, synthesize

        layouts = s.protocol == "layouts"
        masks = data["layouts"] if layouts else data["real"]
        split_file = data.get("layouts_ids") if layouts else data.get("real_ids")
        cfg = build_synthesize_config(dict(
            generator=gen["model"], masks=masks, out=str(d / "pairs"), copies=s.copies, num_steps=s.num_steps,
            guidance_scale=s.guidance_scale, shift=s.shift, segmenter=guide["model"], seed=s.seed, batch_size=16,
            crfm_steps=s.crfm_steps if s.synth == "crfm" else 0, crfm_alpha_max=s.crfm_alpha,
            crfm_schedule=s.crfm_schedule, crfm_rule=s.crfm_rule,
            limit=s.n_layouts if layouts and split_file is None else None,
            filter_stats=guide["filter_stats"] if (s.filter or s.balance) else None, filter_pixels=s.filter,
            filter_margin=s.filter_margin, hard_resample=s.balance, **({"split_file": split_file} if split_file
                                                                      else {})))
        summary = synthesize(cfg, progress=progress, on_batch=count_logger(log, what, "images"))
        return {"path": str(d / "pairs"), **{k: v for k, v in asdict(summary).items() if k not in ("out", "generator")}}

    key = _key(s, SYN_KEYS + ("n_layouts",) + _added(s, SYN_ADDED), parent)
    source = "oracle images of the layouts" if s.synth == "oracle" else f"{s.protocol} → image/label pairs"
    return Stage(root, "synthesis", key, log, f"{what}: {source}").run(make)


def stage_downstream(s: CellSettings, data: dict, syn: dict | None, root: Path, log) -> dict:
    """Segmenter on real (+ synthetic), same number of steps as real-only, scored on the test set."""
    s = resolve_counts(s)
    parent = _data_key(s) + (json.dumps(syn, sort_keys=True, default=str) if syn else "")
    what = f"segmenter on real + {s.synth} ({s.seg_arch}, seed {s.seed})"

    def make(d: Path) -> dict:
        real, test = _real(data), _test(s, data)
        toy_oracle = s.synth == "oracle" and "ids" not in syn
        synthetic = _samples(syn["path"], limit=s.n_layouts if toy_oracle else None, split_file=syn.get("ids"))
        repeat = max(1, round(s.real_share / (1 - s.real_share) * len(synthetic) / len(real)))
        return _train_eval(s, d, real, test, synthetic=synthetic, seed=s.seed, repeat_real=repeat,
                           on_step=step_logger(log, what, s.seg_steps))

    return Stage(root, "downstream", _key(s, SEG_KEYS + ("real_share",), parent), log, what).run(make)


def stage_times(result: dict) -> dict[str, float]:
    """Cached folder -> measured wall time of every stage a `run_cell` result used."""
    return {str(v.dir): float(v.get("wall_time_s", 0.0)) for v in result.values() if isinstance(v, StageResult)}


def run_cell(s: CellSettings, root: str | Path, log: Callable[[str], None] = print, progress: bool = False) -> dict:
    """Run (or reuse) every stage a cell needs; returns its metrics and the stage outputs."""
    s.validate()
    s = resolve_counts(s)
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
    if data.get("oracle") or s.oracle_data:  # a judge needs real + oracle pairs to train on
        out["judge"] = stage_judge(s, data, root, log)
        out["fidelity"] = stage_fidelity(s, syn, out["judge"], root, log)
    return out


def stage_fidelity(s: CellSettings, syn: dict, judge: dict, root: Path, log) -> dict:
    """Mask fidelity of a cell's synthetic pairs: the independent judge's metrics on the synthetic images
    against their conditioning masks (a low flow loss does not mean the masks are obeyed)."""
    what = f"mask fidelity of the {s.synth} pairs (seed {s.seed})"

    def make(d: Path) -> dict:
        return {"metrics": mask_fidelity(syn["path"], judge["model"], limit=s.n_layouts if s.synth == "oracle"
                                         else None)}

    key = hashlib.sha256(f"{syn.dir.name}/{judge.dir.name}".encode()).hexdigest()[:12]
    return Stage(root, "fidelity", key, log, what).run(make)


def cell_compute_s(result: dict) -> float:
    """Measured wall time of the stages a cell used, the one-time pretraining (base) left out."""
    return round(sum(sec for folder, sec in stage_times(result).items()
                     if not Path(folder).name.startswith("base-")), 1)


def mask_fidelity(images_dir: str | Path, judge_model: str, limit: int | None = None) -> dict:
    """Mask fidelity: the judge's metrics on synthetic images against their conditioning masks."""
    from todsynth.segment.model import Segmenter
    from todsynth.segment.train import evaluate_segmenter

    ds = _samples(str(images_dir), limit=limit)
    judge = Segmenter.from_pretrained(judge_model)
    return evaluate_segmenter(judge, ds, batch_size=16).to_dict(list(ds.classes.names))
