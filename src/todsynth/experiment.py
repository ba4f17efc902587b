"""The three stages end to end, as cached cells: data → guidance segmenter → [base →] generator → synthesis →
downstream segmenter → metrics. Each stage's output lives under a folder named by a hash of the settings
it depends on, with a `done.json` marker written last: cells that share a stage share its work, and a
killed run resumes at the first unfinished stage. `todsynth demo` is one such run; `todsynth experiment`
runs grids of cells with several seeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from todsynth.config import build_config, flat_dict, like, require, require_at_least, resume_free_names, setting
from todsynth.crfm import CRFMConfig
from todsynth.data.bands import convert
from todsynth.data.check import open_checked
from todsynth.data.readers import open_dataset
from todsynth.data.split import few_shot_split, read_split, write_split
from todsynth.data.toy import write_toy_dataset
from todsynth.errors import ConfigError, DataError
from todsynth.generator.mmdit import MMDiTArch
from todsynth.generator.pretrain import pretrain_config
from todsynth.generator.train import GeneratorTrainConfig, load_train_data, train_generator
from todsynth.io import read_json, write_json
from todsynth.runs import make_accelerator
from todsynth.segment.model import Segmenter
from todsynth.segment.train import Arch, ClassWeighting, SegmentTrainConfig, evaluate_segmenter, train_on_samples
from todsynth.synthesize import SynthesizeConfig, build_synthesize_config, class_loss_stats, synthesize

# counts of the embedded toy data where a cell leaves them unset (with a real dataset, unset means all of it)
TOY_COUNTS = {"n_real": 16, "n_layouts": 200, "n_test": 64}
LOG_LINES = 10  # periodic log lines per long stage (training steps, synthesis batches)


@dataclass
class DataSettings:
    """A cell's data. Paths left empty mean the embedded toy data; counts left unset: the toy data's TOY_COUNTS,
    or all of a real dataset."""

    size: int = setting(64, help="the working size: every model trains at it, test tiles are predicted at it")
    n_real: int | None = setting(
        None, help="real_data: a seeded few-shot subset (every class kept, as `data split` draws)"
    )
    n_layouts: int | None = setting(None, help="layouts_data: a seeded random draw")
    n_test: int | None = setting(None, help="test_data: a seeded random draw")
    seed: int = setting(0, help="seed of the draws and of the toy tiles")
    real_data: str | None = setting(None, help="a real dataset (LoveDA/folder/JSONL) instead of toy tiles")
    real_split_file: str | None = setting(
        None, help="ids of real_data to train on (`todsynth data split`), instead of n_real"
    )
    layouts_data: str | None = setting(None, help="label-only masks for protocol layouts")
    oracle_data: str | None = setting(None, help="real images of the layouts (ids as in layouts_data): the oracle row")
    test_data: str | None = setting(None, help="the test set (may be real_data: then the tiles not trained on)")
    test_split: str = setting("Val", help="split of test_data")

    def validate(self) -> None:
        """Refuse data settings that do not apply to these data sources instead of ignoring them."""
        real = self.real_data is not None
        toy_layouts = self.layouts_data is None and not real
        require_at_least(self, 1, "size", "n_real", "n_test")
        require_at_least(self, 0, "n_layouts")
        require(
            real or self.real_split_file is None,
            "real_split_file selects ids of real_data, but no real_data is set",
            fix="set data.real_data, or drop data.real_split_file",
        )
        require(
            self.real_split_file is None or self.n_real is None,
            "real_split_file and n_real both choose the real training tiles",
            fix="give one: the split file's ids, or n_real for a seeded draw",
        )
        require(
            not real or self.test_data is not None,
            "real_data needs a test_data: the embedded toy test set is not your data",
            fix="set data.test_data (it may be real_data itself: the test tiles are then "
            "drawn from the tiles not used for training)",
        )
        require(
            self.n_layouts is None or self.layouts_data is not None or toy_layouts,
            "n_layouts is set but there are no layouts to draw from (real_data without layouts_data)",
            fix="set data.layouts_data (a label-only or labelled dataset of masks), or drop data.n_layouts",
        )
        require(
            self.oracle_data is None or self.layouts_data is not None,
            "oracle_data holds the real images of "
            "the layouts, but layouts_data is not set (the embedded layouts bring their own renders)",
            fix="set data.layouts_data, or drop data.oracle_data",
        )


@dataclass
class SegmenterSettings:
    """The cell's segmenters (guidance, downstream, judge): the SegmentTrainConfig settings a cell chooses."""

    arch: Arch = like(SegmentTrainConfig, "arch", "unet")
    encoder: str | None = like(SegmentTrainConfig, "encoder")
    steps: int = like(SegmentTrainConfig, "steps", 300)
    batch_size: int = like(SegmentTrainConfig, "batch_size", 8)
    lr: float = like(SegmentTrainConfig, "lr", 1e-3)
    class_weights: ClassWeighting = like(SegmentTrainConfig, "class_weights", "none")


@dataclass
class GeneratorSettings:
    """The GeneratorTrainConfig settings a cell chooses (the stage sets data, schedule and checkpoint intervals)."""

    model: MMDiTArch = like(GeneratorTrainConfig, "model", MMDiTArch.PRESETS["demo"])
    steps: int = like(GeneratorTrainConfig, "steps", 600)
    batch_size: int = like(GeneratorTrainConfig, "batch_size", 16)
    lr: float = like(GeneratorTrainConfig, "lr", 5e-4)
    ema_decay: float = like(GeneratorTrainConfig, "ema_decay")
    timestep_mean: float = like(GeneratorTrainConfig, "timestep_mean")
    timestep_tail: float = like(GeneratorTrainConfig, "timestep_tail")
    lora_rank: int = like(GeneratorTrainConfig, "lora_rank")
    sd3_path: str | None = like(GeneratorTrainConfig, "sd3_path")
    autoencoder: Literal["pixel", "vae"] = like(GeneratorTrainConfig, "autoencoder")
    autoencoder_path: str | None = like(GeneratorTrainConfig, "autoencoder_path")


@dataclass
class BaseSettings:
    """The generative foundation of `init: pretrained` cells (generator/pretrain.py): its architecture and image
    space are the generator's."""

    data: str | None = setting(None, help="unlabeled images for the base (default: the embedded toy pool)")
    pool: int = setting(4000, help="toy pool tiles (indices disjoint from the real, layout and test tiles)")
    steps: int = like(GeneratorTrainConfig, "steps", 3000)
    batch_size: int = like(GeneratorTrainConfig, "batch_size", 32)
    lr: float = like(GeneratorTrainConfig, "lr", 1e-3)


@dataclass
class SynthesisSettings:
    """The SynthesizeConfig settings a cell chooses (the stage sets generator, masks, segmenter and filter stats)."""

    copies: int = like(SynthesizeConfig, "copies")
    num_steps: int = like(SynthesizeConfig, "num_steps", 16)
    guidance_scale: float = like(SynthesizeConfig, "guidance_scale")
    shift: float = like(SynthesizeConfig, "shift")
    crfm: CRFMConfig = like(SynthesizeConfig, "crfm", CRFMConfig(steps=3))
    filter_pixels: bool = like(SynthesizeConfig, "filter_pixels", False)
    filter_margin: float = like(SynthesizeConfig, "filter_margin")
    hard_resample: bool = like(SynthesizeConfig, "hard_resample")


@dataclass
class DownstreamSettings:
    """The downstream segmenter's training mix."""

    real_share: float = setting(0.5, help="fraction of real samples in the training mix (real repeated to reach it)")


@dataclass
class CellSettings:
    """Everything one cell depends on: what it compares, and the settings of each stage's config."""

    synth: Literal["none", "plain", "crfm", "oracle"] = setting(
        "crfm", help="synthetic pairs: none (real only), plain sampling, CRFM, or the oracle renders"
    )
    protocol: Literal["layouts", "masks"] = setting(
        "layouts", help="layouts: one image per new label-only layout; masks: copies per training mask"
    )
    init: Literal["scratch", "pretrained"] = setting(
        "scratch", help="generator from scratch (or sd3_path), or fine-tuned from a base pretrained on unlabeled images"
    )
    judge_arch: Arch = setting("fpn", help="the independent judge segmenter's architecture (mask fidelity)")
    seed: int = setting(0, help="seed of the generator, synthesis and segmenters")
    data: DataSettings = setting(default_factory=DataSettings, help="data")
    segmenter: SegmenterSettings = setting(default_factory=SegmenterSettings, help="segmenters")
    generator: GeneratorSettings = setting(default_factory=GeneratorSettings, help="generator")
    base: BaseSettings = setting(default_factory=BaseSettings, help="pretrained base (init: pretrained)")
    synthesis: SynthesisSettings = setting(default_factory=SynthesisSettings, help="synthesis")
    downstream: DownstreamSettings = setting(default_factory=DownstreamSettings, help="downstream segmenter")

    def validate(self) -> None:
        """The cell's own rules; each stage's settings are checked where they are defined, by building the stage's
        config (on stand-in paths)."""
        d = self.data
        d.validate()
        require(0 < self.downstream.real_share < 1, f"real_share must be in (0, 1), got {self.downstream.real_share}")
        require_at_least(self, 1, "base.pool")
        require_at_least(self, 0, "synthesis.guidance_scale")
        require(self.segmenter.arch != self.judge_arch, "the judge segmenter must use another architecture")
        toy_layouts = d.layouts_data is None and d.real_data is None
        require(
            self.synth != "oracle" or toy_layouts or d.oracle_data is not None,
            "synth: oracle trains on the real images of the layouts, and this cell has none",
            fix="set data.oracle_data to a dataset "
            "holding the images of layouts_data's ids (e.g. the labelled folder the masks came from)",
        )
        require(
            self.synth in ("none", "oracle") or self.protocol == "masks" or d.layouts_data is not None or toy_layouts,
            f"synth: {self.synth} with protocol: layouts draws one image per layout, and this cell has no layouts",
            fix="set data.layouts_data, or protocol: masks (K images per real mask)",
        )
        stand_in = {k: k for k in ("real", "real_ids", "layouts", "layouts_ids", "model", "filter_stats")}
        for part, build in (
            ("segmenter", lambda: segmenter_config(self, self.seed).validate()),
            ("synthesis", lambda: synthesize_config(self, stand_in, stand_in, stand_in)),
            ("base", lambda: base_config(self)),
            ("generator", lambda: generator_config(self, stand_in, stand_in if self.init == "pretrained" else None)),
        ):
            try:
                build()
            except ConfigError as e:
                raise ConfigError(f"{part}: {e.problem}", fix=e.fix) from None


def settings_from(values: dict[str, Any], source: str = "settings") -> CellSettings:
    """A validated CellSettings from nested or dotted settings; a refused one names `source` (e.g.
    'grid.yaml: table/cell')."""
    try:
        return build_config(CellSettings, values, source)
    except ConfigError as e:
        if e.path is None or str(e.path) == "config":
            raise ConfigError(e.problem, path=source, fix=e.fix) from None
        raise


def resolve_counts(s: CellSettings) -> CellSettings:
    """The cell with the toy data's counts filled in where it uses the embedded data and leaves them unset."""
    d = s.data
    toy = {
        "n_real": d.real_data is None,
        "n_layouts": d.layouts_data is None and d.real_data is None,
        "n_test": d.test_data is None,
    }
    counts = {n: TOY_COUNTS[n] for n, used in toy.items() if used and getattr(d, n) is None}
    return replace(s, data=replace(d, **counts))


def stage_key(root: Path, *parts: Any) -> str:
    """Short hash of what a stage depends on: its resolved stage config (resume-free settings left out: they do
    not change the outputs), parent stage folders and other values. Paths under `root` count relative to it
    (a parent stage's output path names that stage's key), so a moved output folder keeps its keys."""
    under = f"{Path(root).absolute()}{os.sep}"

    def plain(x: Any) -> Any:
        if is_dataclass(x) and not isinstance(x, type):
            free = resume_free_names(type(x))
            return {k: plain(v) for k, v in flat_dict(asdict(x)).items() if k not in free}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x.removeprefix(under) if isinstance(x, str) else x

    blob = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _data_key(s: CellSettings, root: Path) -> str:
    """The data stage's key: the data settings and (real_split_file) the split file's content."""
    digest = ""
    if s.data.real_split_file is not None:
        try:
            digest = hashlib.sha256(Path(s.data.real_split_file).read_bytes()).hexdigest()[:12]
        except OSError as e:
            raise ConfigError(
                f"cannot read the split file: {e.strerror}",
                path=s.data.real_split_file,
                fix="write it with 'todsynth data split DATASET FILE --n N'",
            ) from None
    return stage_key(root, s.data, digest)


class StageResult(dict):
    """A stage's recorded output (done.json); `.dir` says which cached folder it came from."""

    dir: Path


class Stage:
    """A cached stage folder: `run(fn)` calls fn(folder) unless done.json exists, then returns its content.

    The folder is absolute, so the paths a stage records stay valid from any working directory. `what` says
    in words what the stage computes (the log names it next to the hash folder).
    """

    def __init__(self, root: Path, name: str, key: str, log: Callable[[str], None], what: str):
        self.dir = Path(root).absolute() / "cache" / f"{name}-{key}"
        self.name, self.log, self.what = name, log, what

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").is_file()

    def run(self, fn: Callable[[Path], dict]) -> StageResult:
        cached = self.done
        self.log(f"stage {self.name}: {self.what} → {self.dir.name}" + (" (cached)" if cached else ""))
        if not cached:
            self.dir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            result = fn(self.dir)
            result["wall_time_s"] = round(time.perf_counter() - t0, 2)
            write_json(self.dir / "done.json", result)
            self.log(f"stage {self.name} done in {result['wall_time_s']:.1f} s: {self.what}")
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


def _draw(ids: list[str], n: int | None, seed: list[int], count: str, source: str) -> list[str]:
    """A seeded random draw of `n` ids (all when `n` is None), kept in dataset order."""
    if not ids:
        raise ConfigError(
            f"no tiles of {source} are left for {count.removeprefix('n_')} (the others are "
            "drawn for another part of the cell)",
            path=source,
            fix="lower data.n_real / data.n_test, or give another dataset",
        )
    if n is None:
        return ids
    if n > len(ids):
        raise ConfigError(
            f"{count} = {n} but {source} has {len(ids)} tile(s) to draw from",
            path=source,
            fix=f"set data.{count} to at most {len(ids)}, or leave it unset to use them all",
        )
    keep = set(np.random.default_rng(seed).permutation(len(ids))[:n].tolist())
    return [i for k, i in enumerate(ids) if k in keep]


def _real_ids(s: CellSettings, ds) -> tuple[list[str], str]:
    """The real training tiles and how they were chosen: the split file's ids, a seeded few-shot subset of n_real,
    or all."""
    d = s.data
    if d.real_split_file is not None:
        return read_split(d.real_split_file, ds), f"split file {d.real_split_file}"
    if d.n_real is None:
        return list(ds.ids), "all"
    if d.n_real > len(ds):
        raise ConfigError(
            f"n_real = {d.n_real} but {d.real_data} has {len(ds)} tile(s)",
            path=d.real_data,
            fix=f"set data.n_real to at most {len(ds)}, or leave it unset to use them all",
        )
    return few_shot_split(ds, n=d.n_real, seed=d.seed), f"seeded few-shot draw, data.seed {d.seed}"


def _draw_real_parts(s: CellSettings, log: Callable[[str], None]) -> dict[str, tuple[list[str], dict]]:
    """part -> (ids, what to record) of the real parts (training tiles, test tiles, layouts), disjoint where
    they share files; drawn before the data stage writes anything, so a bad count leaves no folder."""
    out: dict[str, tuple[list[str], dict]] = {}
    used: set[Path] = set()  # mask files of the tiles drawn so far (another view of the same files shares them)

    def take(ds, ids: list[str]) -> None:
        chosen = set(ids)
        used.update(f for f, i in _mask_files(ds).items() if i in chosen)

    said: list[str] = []
    d = s.data
    if d.real_data is not None:
        real = open_dataset(d.real_data, "Train")
        ids, how = _real_ids(s, real)
        take(real, ids)
        said.append(f"{len(ids)} real tiles of {len(real)} ({how})")
        out["real"] = (ids, {"source": d.real_data, "how": how})
    parts = (("test", d.test_data, d.test_split, "n_test", 1), ("layouts", d.layouts_data, "Train", "n_layouts", 2))
    for part, source, split, count, salt in parts:
        if source is None:
            continue
        ds = open_dataset(source, split)
        unused = [i for f, i in _mask_files(ds).items() if f not in used]
        ids = _draw(unused, getattr(d, count), [d.seed, salt], count, source)
        take(ds, ids)
        said.append(f"{len(ids)} {part} tiles of {len(ds)}")
        out[part] = (ids, {"source": source, "split": split, "seed": d.seed})
    if said:
        log("data: " + ", ".join(said) + " (tiles used for one part are not drawn for another)")
    return out


def stage_data(s: CellSettings, root: Path, log) -> StageResult:
    """Real tiles, label-only layouts, a test set and the oracle renders of the layouts (toy parts written,
    real parts drawn: id files of the chosen tiles)."""
    s = resolve_counts(s)
    d = s.data
    source = "embedded toy tiles" if d.real_data is None else f"real tiles of {d.real_data}"
    stage = Stage(root, "data", _data_key(s, root), log, f"{source}, {d.size} px working size")
    drawn = {} if stage.done else _draw_real_parts(s, log)

    def make(folder: Path) -> dict:
        def toy(part: str, n: int, start: int, **kw: Any) -> str:
            return str(write_toy_dataset(folder / part, n, d.size, d.seed, start=start, **kw))

        out = {}
        if d.real_data is None:
            out["real"] = toy("real", d.n_real, 0)
        if d.layouts_data is None and d.real_data is None:
            out["layouts"] = toy("layouts", max(d.n_layouts, 1), 100_000, label_only=True)
            out["oracle"] = toy("oracle", max(d.n_layouts, 1), 100_000)
        if d.test_data is None:
            out["test"] = toy("test", d.n_test, 500_000, split="Val")
        for part, (ids, meta) in drawn.items():
            write_split(folder / f"{part}_ids.json", ids, meta)
            out[f"{part}_ids"] = str(folder / f"{part}_ids.json")
        return out

    paths = stage.run(make)
    paths.setdefault("real", d.real_data)
    paths.setdefault("layouts", d.layouts_data)
    paths.setdefault("test", d.test_data)
    paths.setdefault("oracle", None)
    return paths


def segmenter_config(s: CellSettings, seed: int, judge: bool = False) -> SegmentTrainConfig:
    """The SegmentTrainConfig of a cell's guidance and downstream segmenters (or, `judge`, its judge: the judge's
    architecture with its default encoder, unweighted loss)."""
    own = {"arch": s.judge_arch, "encoder": None, "class_weights": "none"} if judge else {}
    warmup = min(20, s.segmenter.steps // 10)
    return SegmentTrainConfig(
        **{**asdict(s.segmenter), **own}, size=s.data.size, seed=seed, device="auto", warmup_steps=warmup
    )


def _train_eval(
    cfg: SegmentTrainConfig, d: Path, s: CellSettings, data: dict, log, what: str, mix=None, accelerator: Any = None
) -> dict:
    """Train a segmenter on the cell's real tiles (+ the synthetic pairs `mix(real)` returns with the config to train
    on them), logging its steps as `what`; save it (with its working size), evaluate it on the cell's test tiles
    (each predicted at the working size, scored at its own resolution)."""
    real = open_checked(data["real"], split_file=data.get("real_ids"))
    test = open_checked(data["test"], s.data.test_split, data.get("test_ids"))
    cfg, synthetic = mix(real) if mix else (cfg, None)
    on_step = step_logger(log, what, cfg.steps)
    outcome = train_on_samples(real, real.classes, cfg, synthetic=synthetic, on_step=on_step, accelerator=accelerator)
    outcome.model.save_pretrained(d / "model")
    metrics = evaluate_segmenter(outcome.model, test, batch_size=16)
    return {
        "model": str(d / "model"),
        "metrics": metrics.to_dict(list(real.classes.names)),
        "loss_history": [list(h) for h in outcome.history],
        "train_wall_time_s": round(outcome.wall_time_s, 2),
    }


def stage_guidance(s: CellSettings, data: StageResult, root: Path, log, accelerator: Any = None) -> StageResult:
    """Real-only segmenter: CRFM's guidance network, the filter's statistics, and the 'real only' row."""
    cfg = segmenter_config(s, s.seed)
    what = f"segmenter on real only ({cfg.arch}, seed {s.seed})"

    def make(d: Path) -> dict:
        result = _train_eval(cfg, d, s, data, log, what, accelerator=accelerator)
        result["filter_stats"] = _filter_stats(result["model"], data, s.data.size, d / "filter_stats.json")
        return result

    return Stage(
        root, "guidance", stage_key(root, cfg, data.dir.name), log, f"{what}: the real-only row and CRFM's guidance"
    ).run(make)


def _filter_stats(model_dir: str, data: dict, size: int, path: Path) -> str:
    """Per-class mean CE of the guidance segmenter on the real set (FreeMask thresholds), as JSON."""
    real, classes = load_train_data(str(data["real"]), "Train", size, data.get("real_ids"))
    segmenter = Segmenter.from_pretrained(model_dir)
    images = convert(real.images, real.normalisation, segmenter.normalisation, f"the segmenter {model_dir}")
    stats = class_loss_stats(segmenter, images, real.labels, classes.num_classes, classes.ignore_index)
    write_json(path, stats)
    return str(path)


def _oracle(s: CellSettings, data: dict):
    """The real images of the cell's layouts: the toy renders, or oracle_data's images of the drawn layouts (every
    layout id must have one)."""
    if data.get("oracle"):
        return open_checked(data["oracle"])
    oracle_data = s.data.oracle_data
    ids = read_split(data["layouts_ids"])
    ds = open_dataset(oracle_data)
    missing = sorted(set(ids) - set(ds.ids))
    if missing:
        raise DataError(
            f"oracle_data has no image for {len(missing)} of the {len(ids)} layouts, e.g. {missing[:5]}",
            path=oracle_data,
            fix="oracle_data must hold the images of layouts_data's ids (the same file names)",
        )
    return open_checked(oracle_data, split_file=data["layouts_ids"])


def stage_judge(s: CellSettings, data: StageResult, root: Path, log, accelerator: Any = None) -> StageResult:
    """An independent judge (other architecture and seed) trained on real + oracle pairs, for mask fidelity."""
    cfg = segmenter_config(s, s.seed + 1000, judge=True)
    what = f"judge segmenter ({cfg.arch}, seed {cfg.seed}) on real + oracle pairs"

    def make(d: Path) -> dict:
        return _train_eval(cfg, d, s, data, log, what, lambda real: (cfg, _oracle(s, data)), accelerator)

    return Stage(root, "judge", stage_key(root, cfg, data.dir.name), log, what).run(make)


def base_config(s: CellSettings) -> GeneratorTrainConfig:
    """The pretraining config of a cell's base: its own settings, the generator's architecture (control none) and
    image space; neither the cell's seed nor its control, so every cell with these settings shares the base."""
    b, g = s.base, s.generator
    return pretrain_config(
        b.data or f"toy:{b.pool}:{s.data.seed}",
        size=s.data.size,
        autoencoder=g.autoencoder,
        autoencoder_path=g.autoencoder_path,
        model=replace(g.model, control="none"),
        steps=b.steps,
        batch_size=b.batch_size,
        lr=b.lr,
        warmup_steps=min(50, b.steps // 10),
        val_every=b.steps,
        val_steps=12,
        checkpoint_every=max(b.steps // 10, 1),
        seed=0,
        resume="auto",
    )


def _train_stage(
    root: Path, name: str, cfg: GeneratorTrainConfig, log, what: str, label: str, progress: bool, accelerator: Any
) -> StageResult:
    """A generator (or base) training stage: `cfg` trained into the stage folder, `label` naming its log lines."""

    def make(d: Path) -> dict:
        on_step = step_logger(log, label, cfg.steps)
        summary = train_generator(replace(cfg, out=str(d), progress=progress), on_step=on_step, accelerator=accelerator)
        return {"model": str(d / "model"), "summary": asdict(summary), "loss_png": str(d / "loss.png")}

    return Stage(root, name, stage_key(root, cfg), log, what).run(make)


def stage_base(s: CellSettings, root: Path, log, progress: bool = False, accelerator: Any = None) -> StageResult:
    """Pretrain the text and image streams on unlabeled images (control none): the base every
    `init: pretrained` cell with the same base settings fine-tunes from, whatever its seed or control."""
    cfg = base_config(s)
    what = f"generator base pretrained on unlabeled images ({cfg.steps} steps)"
    return _train_stage(root, "base", cfg, log, what, "generator base", progress, accelerator)


def generator_config(s: CellSettings, data: dict, base: dict | None = None) -> GeneratorTrainConfig:
    """The GeneratorTrainConfig of a cell: its generator settings on the cell's real pairs, validated at every
    full run, snapshots every quarter, resumed when its stage was killed."""
    g = s.generator
    return build_config(
        GeneratorTrainConfig,
        {
            **asdict(g),
            "data": data["real"],
            "split_file": data.get("real_ids"),
            "size": s.data.size,
            "warmup_steps": min(50, g.steps // 10),
            "val_every": g.steps,
            "val_steps": s.synthesis.num_steps,
            "checkpoint_every": max(g.steps // 4, 1),
            "seed": s.seed,
            "resume": "auto",
            "init": base["model"] if base is not None else None,
        },
    )


def stage_generator(
    s: CellSettings,
    data: StageResult,
    root: Path,
    log,
    progress: bool = False,
    base: dict | None = None,
    accelerator: Any = None,
) -> StageResult:
    """Train the mask-controlled MM-DiT on the real pairs (from scratch, SD3 or the pretrained `base` stage)."""
    cfg = generator_config(s, data, base)
    what = f"generator ({cfg.model.control}, seed {s.seed})"
    what_all = f"{what}, {cfg.steps} steps on the real pairs"
    return _train_stage(root, "generator", cfg, log, what_all, what, progress, accelerator)


def synthesize_config(s: CellSettings, data: dict, gen: dict, guide: dict) -> SynthesizeConfig:
    """The SynthesizeConfig of a cell: its synthesis settings for the layouts or the training masks, CRFM off
    for plain sampling, the guidance segmenter's statistics where it filters or balances."""
    syn = s.synthesis
    layouts = s.protocol == "layouts"
    split_file = data.get("layouts_ids") if layouts else data.get("real_ids")
    values = {
        **asdict(syn),
        "generator": gen["model"],
        "masks": data["layouts"] if layouts else data["real"],
        "out": "pairs",
        "segmenter": guide["model"],
        "seed": s.seed,
        "batch_size": 16,
        "crfm.steps": syn.crfm.steps if s.synth == "crfm" else 0,
        "limit": s.data.n_layouts if layouts and split_file is None else None,
        "filter_stats": guide["filter_stats"] if (syn.filter_pixels or syn.hard_resample) else None,
    }
    return build_synthesize_config({**values, **({"split_file": split_file} if split_file else {})})


def stage_synthesis(
    s: CellSettings,
    data: StageResult,
    gen: dict | None,
    guide: dict,
    root: Path,
    log,
    progress: bool = False,
    accelerator: Any = None,
) -> StageResult:
    """Synthetic pairs: generator (plain or CRFM) or the oracle renderer, for layouts or training masks."""
    what = f"synthesis ({s.synth}, seed {s.seed})"
    if s.synth == "oracle":

        def oracle(d: Path) -> dict:
            if data.get("oracle"):
                return {"path": data["oracle"], "made": s.data.n_layouts}
            return {"path": s.data.oracle_data, "ids": data["layouts_ids"], "made": len(_oracle(s, data))}

        return Stage(
            root, "synthesis", stage_key(root, "oracle", data.dir.name), log, f"{what}: oracle images of the layouts"
        ).run(oracle)
    cfg = synthesize_config(s, data, gen, guide)

    def make(d: Path) -> dict:
        on_batch = count_logger(log, what, "images")
        summary = synthesize(replace(cfg, out=str(d / "pairs")), accelerator, progress=progress, on_batch=on_batch)
        return {"path": str(d / "pairs"), **{k: v for k, v in asdict(summary).items() if k not in ("out", "generator")}}

    return Stage(root, "synthesis", stage_key(root, cfg), log, f"{what}: {s.protocol} → image/label pairs").run(make)


def stage_downstream(
    s: CellSettings, data: StageResult, syn: StageResult, root: Path, log, accelerator: Any = None
) -> StageResult:
    """Segmenter on real (+ synthetic, real repeated to make real_share of the mix), same number of steps as
    real-only, scored on the test set."""
    cfg = segmenter_config(s, s.seed)
    what = f"segmenter on real + {s.synth} ({cfg.arch}, seed {s.seed})"
    toy_oracle = s.synth == "oracle" and "ids" not in syn

    def mix(real) -> tuple[SegmentTrainConfig, Any]:
        synthetic = open_checked(syn["path"], split_file=syn.get("ids"), limit=s.data.n_layouts if toy_oracle else None)
        share = s.downstream.real_share
        return replace(cfg, repeat_real=max(1, round(share / (1 - share) * len(synthetic) / len(real)))), synthetic

    key = stage_key(root, cfg, s.downstream, data.dir.name, syn.dir.name)
    return Stage(root, "downstream", key, log, what).run(
        lambda d: _train_eval(cfg, d, s, data, log, what, mix, accelerator)
    )


def stage_times(result: dict) -> dict[str, float]:
    """Cached folder -> measured wall time of every stage a `run_cell` result used."""
    return {str(v.dir): float(v.get("wall_time_s", 0.0)) for v in result.values() if isinstance(v, StageResult)}


def run_cell(
    s: CellSettings,
    root: str | Path,
    log: Callable[[str], None] = print,
    progress: bool = False,
    accelerator: Any = None,
) -> dict:
    """Run (or reuse) every stage a cell needs; returns its metrics and the stage outputs. Every stage trains
    on `accelerator`, the entry point's (default: one made here)."""
    s.validate()
    acc = accelerator or make_accelerator()
    s = resolve_counts(s)
    root = Path(root)
    data = stage_data(s, root, log)
    guide = stage_guidance(s, data, root, log, acc)
    out: dict[str, Any] = {"settings": asdict(s), "data": data, "guidance": guide}
    if s.synth == "none":
        out["metrics"] = guide["metrics"]
        return out
    if s.synth != "oracle" and s.init == "pretrained":
        out["base"] = stage_base(s, root, log, progress, acc)
    gen = stage_generator(s, data, root, log, progress, out.get("base"), acc) if s.synth != "oracle" else None
    syn = stage_synthesis(s, data, gen, guide, root, log, progress, acc)
    down = stage_downstream(s, data, syn, root, log, acc)
    out.update(generator=gen, synthesis=syn, downstream=down, metrics=down["metrics"])
    if data.get("oracle") or s.data.oracle_data:  # a judge needs real + oracle pairs to train on
        out["judge"] = stage_judge(s, data, root, log, acc)
        out["fidelity"] = stage_fidelity(s, syn, out["judge"], root, log)
    return out


def stage_fidelity(s: CellSettings, syn: StageResult, judge: StageResult, root: Path, log) -> StageResult:
    """Mask fidelity of a cell's synthetic pairs: the independent judge's metrics on the synthetic images
    against their conditioning masks (a low flow loss does not mean the masks are obeyed)."""

    def make(d: Path) -> dict:
        pairs = open_checked(syn["path"], limit=s.data.n_layouts if s.synth == "oracle" else None)
        metrics = evaluate_segmenter(Segmenter.from_pretrained(judge["model"]), pairs, batch_size=16)
        return {"metrics": metrics.to_dict(list(pairs.classes.names))}

    key = hashlib.sha256(f"{syn.dir.name}/{judge.dir.name}".encode()).hexdigest()[:12]
    return Stage(root, "fidelity", key, log, f"mask fidelity of the {s.synth} pairs (seed {s.seed})").run(make)


def cell_compute_s(result: dict) -> float:
    """Measured wall time of the stages a cell used, the one-time pretraining (base) left out."""
    return round(
        sum(sec for folder, sec in stage_times(result).items() if not Path(folder).name.startswith("base-")), 1
    )
