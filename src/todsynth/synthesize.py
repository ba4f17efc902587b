"""Task-oriented synthesis of a labelled dataset: for each mask (of a dataset, a split or a label-only folder),
K images from the generator with CRFM, optional mask transforms, FreeMask-style filtering.

Output: the generic folder layout (images/, masks/, classes.yaml) plus manifest.jsonl. 8-bit RGB generators write
PNG images; others write GeoTIFFs of the source's bands and sample type (inverse scaling) with the data.yaml that
reads them back as the source is read (`todsynth.data.bands`). Every sample's seed derives from (seed, mask id,
transform, copy), so output is independent of batch size and process count. Each finished sample leaves a record
file (written last, atomically): a killed run resumes by skipping recorded samples, and several processes
(accelerate, or two independent runs) claim samples with lock files so they never write the same one. Once every
sample is done the records are gathered into manifest.jsonl and the records and claims are removed; a rerun then
finds its samples there. File names come from `todsynth.filenames.file_stem`, so distinct mask ids never share a file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml

from todsynth.config import build_config, require, require_at_least, resume_free_names, setting
from todsynth.crfm import CRFMConfig
from todsynth.errors import CheckpointError, DataError, TodsynthError
from todsynth.filenames import file_stem
from todsynth.io import atomic_path, read_json, write_json, write_text
from todsynth.locks import create_exclusive, owner_alive, owner_tag
from todsynth.runs import Progress, check_settings, read_jsonl

Transform = Literal["identity", "hflip", "vflip", "rot90", "rot180", "rot270", "crop"]
RECORDS = ".records"
CLAIMS = ".claims"
MANIFEST = "manifest.jsonl"
SETTINGS_FILE = "synthesize.json"  # the settings a rerun (which resumes) must match
PROMPT_CACHE = "prompt_cache.safetensors"  # every prompt of the run (and "") encoded once, kept for reruns


@dataclass
class SynthesizeConfig:
    """Settings of `todsynth synthesize`."""

    generator: str = setting("", help="GENERATOR: generator folder (out/model of `generator train`)")
    masks: str = setting("", help="MASKS: the masks to synthesize for (a dataset or a label-only folder)")
    out: str = setting("", resume_free=True, help="OUT: output folder (generic layout + manifest.jsonl)")
    split: str = setting("Train", help="split of a LoveDA root")
    split_file: str | None = setting(None, help="JSON split file of the mask ids to use")
    copies: int = setting(1, help="K images per (mask, transform)")
    transforms: tuple[Transform, ...] = setting(("identity",), help="mask transforms, each giving its own images")
    num_steps: int = setting(20, help="Euler sampling steps")
    guidance_scale: float = setting(1.0, help="classifier-free guidance scale on the text")
    shift: float = setting(1.0, help="sigma shift of the sampling schedule (SD3: 3.0)")
    segmenter: str | None = setting(
        None, help="guidance segmenter (trained on the real set); required when crfm.steps > 0"
    )
    crfm: CRFMConfig = setting(default_factory=CRFMConfig, help="control-rectify flow matching")
    batch_size: int = setting(8, resume_free=True, help="samples per forward pass (the output does not depend on it)")
    seed: int = setting(0, help="global seed: each sample's seed derives from it, the mask id, transform and copy")
    limit: int | None = setting(None, resume_free=True, help="only the first N masks")
    crop: Literal["resize", "center"] = setting(
        "resize",
        help="how masks reach the generator's size: resize (short side, nearest; the long side center-cropped) or "
        "center (a window at the masks' own scale; tile large masks first with `data tile`)",
    )
    filter_stats: str | None = setting(None, help="per-class loss JSON (see class_loss_stats); enables pixel filtering")
    filter_pixels: bool = setting(True, help="with filter_stats: pixels above margin × class loss become ignore")
    filter_margin: float = setting(1.25, help="the filter's margin over the class loss")
    reject_ignored_fraction: float | None = setting(None, help="image-level rejection above this ignored share")
    hard_resample: bool = setting(False, help="copies ∝ mask hardness (needs filter_stats)")
    device: str = setting(
        "auto",
        resume_free=True,
        help="auto: accelerate's device for this process (its GPU when there is one); cpu; cuda:1",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = setting(
        "no", help="autocast of transformer, decoder and segmenter"
    )

    def validate(self) -> None:
        require(
            bool(self.generator) and bool(self.masks) and bool(self.out),
            "generator, masks and out are required",
            fix="give GENERATOR MASKS OUT (see `todsynth synthesize --help`)",
        )
        require_at_least(self, 1, "copies", "num_steps", "batch_size", "limit")
        require(len(self.transforms) > 0, "give at least one transform (identity = the mask as is)")
        require(
            math.isfinite(self.guidance_scale) and math.isfinite(self.shift) and self.shift > 0,
            "guidance_scale and shift must be finite, shift > 0",
        )
        require(math.isfinite(self.filter_margin) and self.filter_margin > 0, "filter_margin must be > 0")
        require(
            self.reject_ignored_fraction is None or 0 <= self.reject_ignored_fraction <= 1,
            "reject_ignored_fraction must be in [0, 1]",
        )
        require(not self.hard_resample or self.filter_stats is not None, "hard_resample needs filter_stats")
        require(bool(self.device), "device must be auto, cpu or a device name")
        self.crfm.validate()
        require(
            self.crfm.steps == 0 or self.segmenter is not None,
            "CRFM (crfm.steps > 0) needs a guidance segmenter",
            fix="give --segmenter SEG (a segmenter trained on the real data), or --crfm-steps 0 for plain sampling",
        )
        require(self.crfm.steps <= self.num_steps, "crfm.steps cannot exceed num_steps")


def build_synthesize_config(values: dict) -> SynthesizeConfig:
    """SynthesizeConfig from settings (dotted names such as `crfm.steps`, or a nested `crfm` mapping)."""
    return build_config(SynthesizeConfig, values, "synthesize settings")


# ---------------------------------------------------------------------------------------------
# Work items


@dataclass(frozen=True)
class WorkItem:
    """One synthetic sample to make: source mask index, transform, copy number and its output id."""

    index: int
    source_id: str
    transform: str
    copy: int

    @property
    def id(self) -> str:
        """Output file stem: unique per (mask id, transform, copy), see todsynth.filenames."""
        return f"{file_stem(self.source_id)}__{self.transform}__k{self.copy}"


def transform_label(label: torch.Tensor, name: str, seed_key: int = 0) -> torch.Tensor:
    """Apply a mask transform (flip, 90° rotation, or a random crop resized back, nearest)."""
    if name == "identity":
        return label
    if name == "hflip":
        return label.flip(-1)
    if name == "vflip":
        return label.flip(-2)
    if name.startswith("rot"):
        return torch.rot90(label, int(name[3:]) // 90, (-2, -1))
    h, w = label.shape[-2:]
    rng = np.random.default_rng(seed_key)
    ch, cw = max(h * 5 // 8, 1), max(w * 5 // 8, 1)
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = label[..., y : y + ch, x : x + cw].float()[None, None]
    return torch.nn.functional.interpolate(crop, size=(h, w), mode="nearest")[0, 0].long()


def plan(ids: list[str], cfg: SynthesizeConfig, copies: list[int] | None = None) -> list[WorkItem]:
    """All work items, in a fixed order (mask, transform, copy); `copies` per mask (default: cfg.copies each)."""
    copies = copies or [cfg.copies] * len(ids)
    return [WorkItem(i, sid, t, k) for i, sid in enumerate(ids) for t in cfg.transforms for k in range(copies[i])]


# ---------------------------------------------------------------------------------------------
# Filtering (FreeMask-style)


@torch.no_grad()
def class_loss_stats(
    segmenter,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = 255,
    batch_size: int = 16,
) -> dict:
    """Per-class mean cross-entropy of a segmenter on a (real) set: the filtering thresholds' base."""
    sums, counts = np.zeros(num_classes), np.zeros(num_classes)
    segmenter.eval()
    for s in range(0, len(images), batch_size):
        logits = segmenter(images[s : s + batch_size])
        lab = labels[s : s + batch_size]
        ce = torch.nn.functional.cross_entropy(logits, lab, ignore_index=ignore_index, reduction="none")
        for c in range(num_classes):
            sel = lab == c
            sums[c] += ce[sel].sum().item()
            counts[c] += sel.sum().item()
    means = [float(s / n) if n else None for s, n in zip(sums, counts, strict=True)]
    return {"class_mean_loss": means, "pixels": counts.astype(int).tolist(), "ignore_index": ignore_index}


def filter_mask(
    logits: torch.Tensor, label: torch.Tensor, class_means: list[float | None], margin: float, ignore_index: int = 255
) -> torch.Tensor:
    """Pixels of class c whose loss exceeds margin × mean(c) become ignore; others stay as they are."""
    ce = torch.nn.functional.cross_entropy(logits[None], label[None], ignore_index=ignore_index, reduction="none")[0]
    means = torch.tensor([m if m is not None else float("inf") for m in class_means], dtype=ce.dtype)
    valid = label != ignore_index
    threshold = torch.full_like(ce, float("inf"))
    threshold[valid] = margin * means[label[valid]]
    out = label.clone()
    out[valid & (ce > threshold)] = ignore_index
    return out


def mask_hardness(label: torch.Tensor, class_means: list[float | None], ignore_index: int = 255) -> float:
    """Mean of the per-class loss over a mask's pixels: masks of hard classes score high."""
    means = torch.tensor([m if m is not None else 0.0 for m in class_means])
    valid = label != ignore_index
    return float(means[label[valid]].mean()) if valid.any() else 0.0


def hardness_copies(labels: torch.Tensor, class_means, copies: int, ignore_index: int = 255) -> list[int]:
    """Copies per mask ∝ hardness (mean = `copies`), at least 1 and at most 2·copies."""
    h = np.array([mask_hardness(lab, class_means, ignore_index) for lab in labels])
    scale = copies / h.mean() if h.mean() > 0 else 1.0
    return [int(np.clip(round(x * scale), 1, 2 * copies)) for x in h]


# ---------------------------------------------------------------------------------------------
# Output folder


class OutputFolder:
    """images/, masks/, classes.yaml (and data.yaml for multi-band images), manifest.jsonl, and per-sample records
    and claims under one root; images are written as `normalisation` says (None: 8-bit RGB PNG)."""

    def __init__(
        self, root: Path, classes, normalisation=None, settings: dict | None = None, record_settings: bool = True
    ):
        """Refuse a folder of other classes, data.yaml or `settings` (batching aside) before writing anything, so a
        refused rerun leaves it as it was; in a new folder the settings are recorded (with `record_settings`)."""
        from todsynth.data.bands import Normalisation, data_yaml

        self.root, self.classes = root, classes
        self.normalisation = normalisation or Normalisation.rgb8()
        self.data_yaml = data_yaml(self.normalisation)  # what the images need to read back as their source
        self._manifest_key: tuple[int, int, int] | None = None
        self._manifest: dict[str, dict] = {}
        self._check_dataset_files()
        path = root / SETTINGS_FILE
        if settings is not None and path.exists():
            fix = "rerun with the settings of the first run (see this file), or write into another OUT folder"
            check_settings(read_json(path), settings, resume_free_names(SynthesizeConfig), path, "this folder", fix)
        elif settings is not None and record_settings:
            write_json(path, settings)
        for sub in ("images", "masks", RECORDS, CLAIMS):
            try:
                (root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DataError(
                    f"cannot create the output folder: {e.strerror}",
                    path=root / sub,
                    fix="choose a writable output folder",
                ) from None
        if not (root / "classes.yaml").exists():
            write_text(root / "classes.yaml", yaml.safe_dump(classes.to_dict(), sort_keys=False))
        if self.data_yaml is not None and not (root / "data.yaml").exists():
            write_text(root / "data.yaml", self.data_yaml)

    def _check_dataset_files(self) -> None:
        """Refuse a folder whose classes.yaml holds other classes (compared parsed, not as text) or whose data.yaml
        says other bands or scaling than this generator's images need (None: 8-bit RGB PNGs need none)."""
        from todsynth.data.readers import load_classes

        path = self.root / "classes.yaml"
        if path.exists() and load_classes(path) != self.classes:
            raise DataError(
                f"the output folder holds a dataset with other classes than "
                f"{list(self.classes.names)} (ignore {self.classes.ignore_index})",
                path=path,
                fix="choose an empty output folder",
            )
        path, wanted = self.root / "data.yaml", self.data_yaml
        if path.exists() and (wanted is None or path.read_text(encoding="utf-8") != wanted):
            raise DataError(
                "the output folder holds a data.yaml other than this generator's images need "
                f"({wanted.strip() if wanted else 'none: 8-bit RGB'})",
                path=path,
                fix="choose an empty output folder",
            )

    def image_array(self, image: torch.Tensor) -> np.ndarray:
        """A generated CxHxW image in [0, 1] as the samples written: 8-bit RGB, or the source's sample type."""
        from todsynth.data.bands import to_raw
        from todsynth.viz import to_uint8

        return to_uint8(image) if self.normalisation.is_rgb8 else to_raw(image, self.normalisation)

    def done(self, item: WorkItem) -> bool:
        """Whether the item is finished: it has a record, or (records go once all are done) the manifest lists it."""
        return (self.root / RECORDS / f"{item.id}.json").is_file() or item.id in self._finished()

    def _finished(self) -> dict[str, dict]:
        """The manifest's records by id, re-read only when the file changed (another process may rewrite it)."""
        path = self.root / MANIFEST
        try:
            st = path.stat()
        except FileNotFoundError:
            return {}
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if key != self._manifest_key:
            self._manifest, self._manifest_key = _read_manifest(path), key
        return self._manifest

    def claim(self, item: WorkItem) -> bool:
        """Atomically claim an unfinished item (a lock file holding this process); False if it is done or
        another process has it. A process that finishes the folder removes .claims; the item is then done,
        which the check after locking sees."""
        if self.done(item):
            return False
        path = self.root / CLAIMS / f"{item.id}.lock"
        try:
            got = create_exclusive(path, owner_tag())
        except FileNotFoundError:  # .claims was removed by a process that completed the folder
            path.parent.mkdir(parents=True, exist_ok=True)
            got = create_exclusive(path, owner_tag())
        if got and self.done(item):
            path.unlink(missing_ok=True)
            return False
        return got

    def unclaim(self, items: list[WorkItem]) -> None:
        """Drop this process's claims on items that have no record yet."""
        for item in items:
            if not self.done(item):
                (self.root / CLAIMS / f"{item.id}.lock").unlink(missing_ok=True)

    def release_stale_claims(self) -> int:
        """Remove claims of processes on this host that no longer run (killed runs); returns how many."""
        released = 0
        for lock in (self.root / CLAIMS).glob("*.lock"):
            if (self.root / RECORDS / f"{lock.stem}.json").exists() or owner_alive(lock):
                continue
            lock.unlink(missing_ok=True)
            released += 1
        return released

    def write(self, item: WorkItem, image: np.ndarray, label: np.ndarray, record: dict) -> None:
        """Image (HxWxC samples: PNG for 8-bit RGB, else GeoTIFF), then mask (8-bit, or 16-bit for labels above
        255), then the record (the 'done' marker), each atomically."""
        from PIL import Image

        from todsynth.data.bands import write_geotiff

        if self.normalisation.is_rgb8:
            with atomic_path(self.root / "images" / f"{item.id}.png") as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
        else:
            write_geotiff(self.root / "images" / f"{item.id}.tif", image)
        with atomic_path(self.root / "masks" / f"{item.id}.png") as tmp:
            Image.fromarray(label.astype(mask_dtype(self.classes))).save(tmp, format="PNG")
        self.write_record(item, record)

    def write_record(self, item: WorkItem, record: dict) -> None:
        """The record marks the item done (rejected items get a record and no files)."""
        write_json(self.root / RECORDS / f"{item.id}.json", record)

    def write_manifest(self) -> int:
        """Merge the manifest's records and the per-sample records into manifest.jsonl (sorted by id),
        atomically; returns the count."""
        from todsynth.io import read_json  # looked up when called, so a stand-in for it (tests) takes effect

        path = self.root / MANIFEST
        found = {}
        for p in sorted((self.root / RECORDS).glob("*.json")):
            try:
                found[p.stem] = read_json(p)
            except TodsynthError:  # gone: another process's finish() wrote a manifest listing it (read below)
                if p.exists():
                    raise
        bad = next((k for k, r in found.items() if not isinstance(r, dict) or r.get("id") != k), None)
        if bad is not None:
            fix = "delete it: its sample is made again on the next run"
            raise DataError(f"not a record of sample '{bad}'", path=self.root / RECORDS / f"{bad}.json", fix=fix)
        records = _read_manifest(path)  # after the records: it holds every record another process removed
        records.update(found)
        write_text(path, "".join(json.dumps(records[k], sort_keys=True) + "\n" for k in sorted(records)))
        return len(records)

    def finish(self) -> int:
        """Write the complete manifest, then remove the records and claims it makes redundant; returns the count.
        The manifest is in place before any record goes, so a process checking an item (record first, then
        manifest) always finds it done. Leftovers of an interrupted removal are harmless and go next time."""
        total = self.write_manifest()
        for sub in (RECORDS, CLAIMS):
            shutil.rmtree(self.root / sub, ignore_errors=True)
        return total


def _read_manifest(path: Path) -> dict[str, dict]:
    """Records of a manifest.jsonl by id; an unreadable line is a DataError naming the file."""
    fix = "delete it and rerun: the samples it lists are made again, identically"
    return {record["id"]: record for record in read_jsonl(path, "id", str, DataError, fix)}


def mask_dtype(classes, path: str | Path | None = None) -> type:
    """Smallest PNG-able integer type holding every label of `classes` (uint8, or uint16 = PNG mode I;16),
    so that no label wraps around; `path` names the class source in the error."""
    top = max(classes.num_classes - 1, classes.ignore_index)
    if top <= 255:
        return np.uint8
    if top <= 65535:
        return np.uint16
    raise DataError(
        f"labels up to {top} do not fit a 16-bit PNG mask",
        path=path,
        fix="use at most 65536 classes and an ignore_index of at most 65535",
    )


# ---------------------------------------------------------------------------------------------
# Driver


@dataclass
class SynthesisResult:
    """What `synthesize` made: the dataset folder, the generator folder it sampled and its image side (that of
    every pair), counts and timing (`in_manifest`: samples listed once the folder is complete, None while other
    processes still work)."""

    out: str
    generator: str
    image_size: int
    made: int
    rejected: int
    planned: int
    already_done: int
    in_manifest: int | None
    wall_time_s: float


def synthesize(
    cfg: SynthesizeConfig, accelerator=None, progress: bool = True, on_batch: Callable[[int, int], None] | None = None
) -> SynthesisResult:
    """Run synthesis (resumable, shardable); returns counts and timing. `accelerator`: an accelerate
    PartialState/Accelerator when launched with `accelerate launch` (processes take items[rank::world]);
    `on_batch(done, total)` is called on rank 0 after every batch (the experiment runner logs with it)."""
    from todsynth.generator.pipeline import MaskToImagePipeline
    from todsynth.generator.runtime import resolve_runtime
    from todsynth.generator.sample import check_mask_classes, load_masks

    cfg.validate()
    check_output_folder(
        cfg.out,
        {
            "masks dataset": cfg.masks,
            "generator folder": cfg.generator,
            "segmenter folder": cfg.segmenter,
            "filter stats": cfg.filter_stats,
            "split file": cfg.split_file,
        },
    )
    runtime = resolve_runtime(cfg.device, cfg.mixed_precision, state=accelerator)
    rank, world = runtime.process_index, runtime.num_processes
    pipe = MaskToImagePipeline.for_runtime(cfg.generator, runtime)
    labels, prompts, ids, classes = load_masks(
        cfg.masks, cfg.split, pipe.image_size, n=cfg.limit, split_file=cfg.split_file, crop=cfg.crop
    )
    check_mask_classes(classes, pipe.classes, cfg.masks)
    mask_dtype(classes, cfg.masks)
    segmenter = _segmenter(cfg.segmenter, runtime.device, classes) if cfg.segmenter else None
    if segmenter is not None:  # other bands or sample type than the generator's: refused before anything is made
        _segmenter_images(pipe, segmenter, torch.zeros(1, pipe.normalisation.channels, 1, 1))
    stats = _read_stats(cfg.filter_stats, classes.num_classes) if cfg.filter_stats else None
    copies = None
    if cfg.hard_resample:  # validate() made sure of filter_stats
        copies = hardness_copies(labels, stats["class_mean_loss"], cfg.copies, classes.ignore_index)
    out = OutputFolder(Path(cfg.out), classes, pipe.normalisation, config_dict(cfg), record_settings=rank == 0)
    runtime.wait_for_everyone()
    out.release_stale_claims()
    items = plan(ids, cfg, copies)
    pipe.use_prompt_cache(
        out.root / PROMPT_CACHE,
        sorted({item_input(it, labels, prompts, classes, pipe, cfg)[1] for it in items}),
        runtime,
        offload_text=True,
    )
    already = sum(out.done(it) for it in items)
    todo = [it for it in items[rank::world] if not out.done(it)]
    t0, made, rejected = time.perf_counter(), 0, 0
    bar = Progress("synthesize", len(todo), enabled=progress and rank == 0)
    for s in range(0, len(todo), cfg.batch_size):
        batch = [it for it in todo[s : s + cfg.batch_size] if out.claim(it)]
        if not batch:
            continue
        try:
            made_b, rej_b = _run_batch(pipe, segmenter, batch, labels, prompts, classes, stats, cfg, out)
        except BaseException:
            out.unclaim(batch)  # Ctrl-C or an error: unfinished items go back to the pool
            raise
        made, rejected = made + made_b, rejected + rej_b
        bar.advance(len(batch))
        if on_batch is not None and rank == 0:
            on_batch(min(s + cfg.batch_size, len(todo)), len(todo))
    bar.close()
    runtime.wait_for_everyone()
    # Only a process that sees every sample done writes the manifest: one still held by another live
    # process would be missing, and that process writes it when it finishes.
    total = out.finish() if rank == 0 and all(out.done(it) for it in items) else None
    return SynthesisResult(
        str(out.root),
        cfg.generator,
        pipe.image_size,
        made,
        rejected,
        len(items),
        already,
        total,
        time.perf_counter() - t0,
    )


def check_output_folder(out: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """Refuse an output folder that is, contains or lies inside one of the `inputs` (name: path), symlinks
    resolved: writing images/, masks/ and classes.yaml there would change what the input is."""
    target = _resolved(out)
    for what, value in inputs.items():
        if not value:
            continue
        source = _resolved(value)
        if target == source:
            relation = "is"
        elif source.is_relative_to(target):
            relation = "contains"
        elif source.is_dir() and target.is_relative_to(source):
            relation = "is inside"
        else:
            continue
        raise DataError(
            f"the output folder {relation} the {what} {source}",
            path=out,
            fix="choose an output folder outside every input (dataset, models, stats, split)",
        )


def _resolved(path: str | Path) -> Path:
    """Absolute path with symlinks resolved as far as they exist."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare what can be compared
        return Path(os.path.abspath(path))


def _read_stats(path: str, num_classes: int) -> dict:
    """Read a class_loss_stats JSON, checking it holds one mean loss (or null) per class."""
    stats = read_json(path)
    means = stats.get("class_mean_loss") if isinstance(stats, dict) else None
    ok = (
        isinstance(means, list)
        and len(means) == num_classes
        and all(
            m is None or (isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) and m >= 0)
            for m in means
        )
    )
    if not ok:
        raise DataError(
            f'expected {{"class_mean_loss": [...]}} with {num_classes} finite losses (or null)',
            path=path,
            fix="write it with class_loss_stats for this dataset's classes",
        )
    return stats


def _segmenter(path: str, device, classes):
    """Load the guidance segmenter, refusing one trained for other classes than the masks and generator."""
    from todsynth.segment.model import CONFIG_NAME, Segmenter

    model = Segmenter.from_pretrained(path)
    check_segmenter_classes(model.config, classes, Path(path) / CONFIG_NAME)
    return model.to(device).eval()


def _segmenter_images(pipe, segmenter, images: torch.Tensor) -> torch.Tensor:
    """Generated images in the segmenter's stored normalisation (the same tensor when it is the generator's)."""
    from todsynth.data.bands import convert

    return convert(
        images,
        pipe.normalisation,
        segmenter.normalisation,
        f"the segmenter {getattr(segmenter, 'source', '')}".rstrip(),
    )


def check_segmenter_classes(config, classes, path: str | Path) -> None:
    """Raise CheckpointError unless a segmenter config predicts `classes` (count, and names when saved)."""
    from todsynth.data.classes import class_difference

    names = None if config.class_names is None else list(config.class_names)
    if config.num_classes == classes.num_classes and (names is None or names == list(classes.names)):
        return
    guide = class_difference(names or config.num_classes, classes.names)
    used = class_difference(list(classes.names), names or config.num_classes)
    raise CheckpointError(
        f"the guidance segmenter predicts {guide}, but the generator and masks use {used}",
        path=path,
        fix="use a segmenter trained on the masks' dataset (same classes, same order)",
    )


def _item_key(item: WorkItem) -> str:
    """The seed key of an item's transform (shared by its copies)."""
    return f"{item.transform}/{item.source_id}"


def item_input(item: WorkItem, labels, prompts: list[str], classes, pipe, cfg: SynthesizeConfig):
    """An item's (transformed) label map and its prompt: the mask's own prompt, or one built from the
    classes of the transformed mask (a crop may drop classes)."""
    from todsynth.data.prompts import build_prompt
    from todsynth.generator.pipeline import sample_seeds

    if item.transform == "identity":
        return labels[item.index], prompts[item.index]
    lab = transform_label(labels[item.index], item.transform, sample_seeds(cfg.seed, [_item_key(item)])[0])
    return lab, build_prompt(lab.numpy(), classes, pipe.prompt_template)


def _run_batch(
    pipe, segmenter, batch: list[WorkItem], labels, prompts, classes, stats, cfg: SynthesizeConfig, out: OutputFolder
) -> tuple[int, int]:
    """Generate, filter and write one batch of work items."""
    from todsynth.crfm import crfm_sample
    from todsynth.generator.pipeline import sample_seeds

    inputs = [item_input(it, labels, prompts, classes, pipe, cfg) for it in batch]
    labs = torch.stack([lab for lab, _ in inputs])
    texts = [text for _, text in inputs]
    seeds = [sample_seeds(cfg.seed, [_item_key(it)], it.copy)[0] for it in batch]
    sampling = dict(seeds=seeds, num_steps=cfg.num_steps, guidance_scale=cfg.guidance_scale, shift=cfg.shift)
    if segmenter is not None and cfg.crfm.steps > 0:
        images = crfm_sample(pipe, segmenter, labs, cfg.crfm, prompts=texts, **sampling)
    else:
        images = pipe(labs, texts, **sampling)
    images = images.cpu()
    made = rejected = 0
    logits = None
    if stats is not None and segmenter is not None and cfg.filter_pixels:
        with torch.no_grad():
            logits = segmenter(_segmenter_images(pipe, segmenter, images.to(pipe.device))).cpu()
    for j, it in enumerate(batch):
        lab = labs[j]
        record = {
            "id": it.id,
            "source": it.source_id,
            "transform": it.transform,
            "copy": it.copy,
            "seed": seeds[j],
            "prompt": texts[j],
            "num_steps": cfg.num_steps,
            "guidance_scale": cfg.guidance_scale,
            "crfm": cfg.crfm.to_dict(),
            "filter": None,
        }
        if logits is not None:
            lab = filter_mask(logits[j], lab, stats["class_mean_loss"], cfg.filter_margin, classes.ignore_index)
            ignored = float((lab == classes.ignore_index).float().mean())
            reject = cfg.reject_ignored_fraction is not None and ignored > cfg.reject_ignored_fraction
            record["filter"] = {"ignored_fraction": ignored, "rejected": reject, "margin": cfg.filter_margin}
            if reject:
                rejected += 1
                out.write_record(it, record)
                continue
        out.write(it, out.image_array(images[j]), lab.numpy(), record)
        made += 1
    return made, rejected


def config_dict(cfg: SynthesizeConfig) -> dict:
    """The run's settings as synthesize.json records them: every input path absolute, so a rerun from
    another working directory compares equal."""
    d = asdict(cfg)
    for name in ("generator", "masks", "segmenter", "filter_stats", "split_file"):
        if d[name]:
            d[name] = str(Path(d[name]).resolve())
    d.pop("out")
    return d
