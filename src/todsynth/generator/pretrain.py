"""A generative foundation: pretrain the MM-DiT's text and image streams on unlabeled imagery, then
fine-tune with masks from it (`generator train --init BASE`).

The paper fine-tunes a generator that already draws realistic images (SD3.5-medium): its mask stream
starts as a copy of the pretrained image stream. Pretraining here *is* `train_generator` — the same loop,
checkpoints, exact resume, accelerate processes and up-front validation — with control ``none`` (no mask
stream) and an image-only dataset (`unlabeled: true`):

- ``toy:N`` (or ``toy:N:SEED``): N tiles of the embedded toy generator from the unlabeled pool, tile indices
  `TOY_POOL_START` and up, disjoint from every labelled, layout and test tile the experiments draw;
- a folder of images with no masks (the images directly in it, or in an ``images/`` subfolder);
- any dataset the readers know (LoveDA, folder, JSONL): its images, masks ignored.

Every image gets the generic prompt ("a satellite image", or `prompt`) unless a captions file (JSON
object: image id → caption) gives it its own. The base is written like any generator (`out/model`);
`load_base_into` starts a fine-tuning model from it, as `sd3.py` does from an SD3 transformer.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import torch

from todsynth.data.classes import ClassSpec
from todsynth.errors import CheckpointError, ConfigError, DataError
from todsynth.generator.train import GeneratorResult, GeneratorTrainConfig, TrainData, train_generator
from todsynth.runs import StepCallback

PRETRAIN_PROMPT = "a satellite image"
# Toy tile indices of the unlabeled pool. The experiment pipeline draws real tiles from index 0, label-only
# layouts (and their oracle renders) from 100 000 and test tiles from 500 000 (`experiment.stage_data`).
TOY_POOL_START = 1_000_000
UNLABELLED = ClassSpec(("unlabelled",))
TOY_SPEC = re.compile(r"^toy:(\d+)(?::(\d+))?$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# MMDiTConfig fields a base must share with the model it initialises, with the train setting that sets each
ARCHITECTURE = (
    ("num_layers", "model.num_layers"),
    ("num_heads", "model.num_heads"),
    ("head_dim", "model.head_dim"),
    ("patch_size", "model.patch_size"),
    ("in_channels", "autoencoder (latent channels)"),
    ("out_channels", "autoencoder (latent channels)"),
    ("sample_size", "size (latent side)"),
    ("pos_embed_max_size", "size (position table)"),
    ("joint_attention_dim", "text_encoder (token width)"),
    ("pooled_projection_dim", "text_encoder (pooled width)"),
    ("mlp_ratio", "model.mlp_ratio"),
    ("qk_norm", "model.qk_norm"),
    ("dual_attention_layers", "model.dual_attention_layers"),
)
# What pretraining sets where `generator train` has other defaults: no mask stream, text and image streams trained
PRETRAIN_DEFAULTS = {
    "out": "runs/base",
    "model.control": "none",
    "unlabeled": True,
    "train_text": True,
    "train_image": True,
    "train_mask": False,
}


def pretrain_config(data: str, out: str = "runs/base", **settings) -> GeneratorTrainConfig:
    """A GeneratorTrainConfig for pretraining: PRETRAIN_DEFAULTS under `settings` (dotted names or nested)."""
    from todsynth.config import build_config, flatten

    return build_config(
        GeneratorTrainConfig, {**PRETRAIN_DEFAULTS, "data": data, "out": out, **flatten(GeneratorTrainConfig, settings)}
    )


def pretrain_generator(cfg: GeneratorTrainConfig, on_step: StepCallback | None = None) -> GeneratorResult:
    """Pretrain a base model (see the module docstring); the same resumable loop (and `on_step`) as
    `train_generator`."""
    if not cfg.unlabeled:  # control none is checked with the config
        raise ConfigError(
            "pretraining runs on unlabeled images with control none",
            fix="build the config with todsynth.generator.pretrain.pretrain_config",
        )
    return train_generator(cfg, on_step)


# ---------------------------------------------------------------------------------------------
# Unlabeled data


def parse_toy_spec(data: str) -> tuple[int, int] | None:
    """(n, seed) of a ``toy:N`` / ``toy:N:SEED`` pool, or None when `data` is a path."""
    if not data.startswith("toy:"):
        return None
    m = TOY_SPEC.match(data)
    if m is None or int(m.group(1)) < 1:
        raise ConfigError(f"bad toy pool {data!r}", fix="write toy:N or toy:N:SEED, e.g. toy:4000")
    return int(m.group(1)), int(m.group(2) or 0)


def toy_pool_indices(n: int) -> range:
    """Toy tile indices of an n-tile unlabeled pool."""
    return range(TOY_POOL_START, TOY_POOL_START + n)


def toy_pool(n: int, size: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Images [n, 3, size, size] in [0, 1] of the unlabeled toy pool, and their ids."""
    from todsynth.data.toy import toy_sample

    images = [torch.from_numpy(toy_sample(i, size, seed)[0]).permute(2, 0, 1) for i in toy_pool_indices(n)]
    return torch.stack(images).float() / 255, [f"toy_{i:05d}" for i in toy_pool_indices(n)]


PRETRAIN_DATA = (
    "give IMAGES: a folder of images (directly in it or in images/), a dataset (a LoveDA root, a "
    "folder with images/ and masks/, or a .jsonl index; its masks are ignored), or toy:N for N tiles "
    "of the embedded toy pool"
)


def _image_folder(path: Path) -> Path | None:
    """The folder whose images pretraining reads at `path`: its images/ (a folder dataset's masks and classes are
    never read), or `path` itself unless it is a label-only folder or a LoveDA layout; None for those and files."""
    from todsynth.data.readers import _loveda_split_dir

    if not path.is_dir():
        return None
    if (path / "images").is_dir():
        return path / "images"
    subfolders = [p for p in path.iterdir() if p.is_dir()]
    if (path / "masks").is_dir() or _loveda_split_dir(path) or any(_loveda_split_dir(p) for p in subfolders):
        return None
    return path


def _list_images(folder: Path, root: Path) -> list[Path]:
    """The image files of `folder` in natural order, by the readers' rules (links out of `root` refused, dot-files
    skipped, one file per id); problems are reported together."""
    from todsynth.data.readers import _files_by_stem
    from todsynth.errors import DatasetProblems

    problems: list[DataError] = []
    files = list(_files_by_stem(folder, root, "image", problems).values())
    if not files and not problems:
        fix = f"put image files ({', '.join(IMAGE_SUFFIXES)}) in it or in an images/ subfolder; {PRETRAIN_DATA}"
        problems.append(DataError("no images found", path=folder, fix=fix))
    if problems:
        raise DatasetProblems(folder, problems)
    return files


def _read_images(loaders: list, size: int, root: Path) -> torch.Tensor:
    """Decode every image (all problems reported together, each naming its file), its short side resized to
    `size` and the long side center-cropped, so a non-square image is never distorted.

    Pretraining reads 8-bit RGB images (/ 255); multi-band or scaled rasters are refused by `image_tensor`."""
    from todsynth.data.bands import image_tensor
    from todsynth.data.crops import fit_pair
    from todsynth.errors import DatasetProblems

    images, problems = [], []
    dummy = torch.zeros(1, 1, dtype=torch.long)
    for load in loaders:
        try:
            image = image_tensor(load(), None, None, "pretraining image")
        except DataError as e:
            problems.append(e)
            continue
        image, _ = fit_pair(image, dummy.expand(*image.shape[-2:]), size, "resize")
        images.append(image)
    if problems:
        raise DatasetProblems(root, problems)
    return torch.stack(images)


def read_captions(path: str, ids: list[str]) -> list[str | None]:
    """Per-image captions from a JSON object {image id: caption}; ids it lacks get None."""
    from todsynth.io import read_json

    try:
        raw = read_json(Path(path))
    except (OSError, ValueError) as e:
        raise DataError(
            f"cannot read the captions file: {e}", path=path, fix='write a JSON object {"image id": "caption", ...}'
        ) from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise DataError(
            "captions must be a JSON object of image id -> caption string",
            path=path,
            fix='write e.g. {"tile_001": "a satellite image of a harbour"}',
        )
    if raw and not set(raw) & set(ids):
        raise DataError(
            f"no caption matches an image id (images are named e.g. {ids[:3]})",
            path=path,
            fix="key the captions by image file stem",
        )
    return [raw.get(i) for i in ids]


def load_unlabeled(cfg: GeneratorTrainConfig) -> tuple[TrainData, ClassSpec]:
    """The images of `cfg.data` (toy pool, image folder or any dataset, masks ignored) as TrainData with
    all-ignore label maps (never read with control none) and per-image prompts."""
    from todsynth.data.classes import IGNORE_INDEX
    from todsynth.data.rasters import DATA_FILE, load_raster_spec
    from todsynth.data.readers import CLASSES_FILE, SubsetDataset, load_classes, open_dataset, read_image
    from todsynth.data.split import read_split
    from todsynth.data.toy import TOY_CLASSES

    toy = parse_toy_spec(cfg.data)
    classes = UNLABELLED
    if toy is not None:
        images, ids = toy_pool(toy[0], cfg.size, toy[1])
        classes = TOY_CLASSES
    else:
        path = Path(cfg.data)
        if not path.exists():
            raise DataError("image folder or dataset not found", path=path, fix=PRETRAIN_DATA)
        if path.is_file() and path.suffix.lower() != ".jsonl":
            raise DataError("not an image folder or a dataset", path=path, fix=PRETRAIN_DATA)
        folder = _image_folder(path)
        if folder is not None:
            files = _list_images(folder, path)
            if cfg.split_file:  # the files it lists, in its order; ids without a file are a DataError
                by_id = {p.stem: p for p in files}
                files = [by_id[i] for i in read_split(cfg.split_file, SimpleNamespace(ids=list(by_id), root=path))]
            ids, root = [p.stem for p in files], folder
            spec = load_raster_spec(path / DATA_FILE)
            loaders = [lambda p=p: read_image(p, spec) for p in files]
            if folder != path and (path / CLASSES_FILE).is_file():
                classes = load_classes(path / CLASSES_FILE)
        else:
            ds = open_dataset(path, split=cfg.split)
            if cfg.split_file:
                ds = SubsetDataset(ds, read_split(cfg.split_file, ds))
            if ds.label_only:
                raise DataError("dataset has masks but no images; pretraining needs images", path=path)
            ids, root, classes = list(ds.ids), path, ds.classes
            loaders = [lambda i=i: ds.load_image(i) for i in range(len(ds))]
        images = _read_images(loaders, cfg.size, root)
    captions = read_captions(cfg.captions, ids) if cfg.captions else [None] * len(ids)
    prompts = [c if c is not None else (cfg.prompt or PRETRAIN_PROMPT) for c in captions]
    labels = torch.full((1, cfg.size, cfg.size), IGNORE_INDEX, dtype=torch.long).expand(len(ids), -1, -1)
    return TrainData(images, labels, prompts, ids), classes


# ---------------------------------------------------------------------------------------------
# Fine-tuning from a base


def base_model_dir(init: str | Path) -> Path:
    """The generator folder of a base: `init` itself (with pipeline.json) or its model/ (a run folder)."""
    path = Path(init)
    for cand in (path, path / "model"):
        if (cand / "pipeline.json").is_file() and (cand / "transformer").is_dir():
            return cand
    raise CheckpointError(
        "no base model here (no pipeline.json in it or in its model/)",
        path=path,
        fix="give the --out folder of `todsynth generator pretrain`, or its model/ subfolder",
    )


def _shown(value) -> str:
    return repr(list(value)) if isinstance(value, (list, tuple)) else repr(value)


def check_base(base_dir: Path, meta: dict, base_cfg, cfg, autoencoder, text_encoder, size: int) -> None:
    """Refuse a base of another architecture, latent space or text encoder than the model it initialises."""
    if base_cfg.control != "none":
        raise CheckpointError(
            f"the base has control {base_cfg.control!r}; --init expects a pretrained base "
            "(control none, no mask stream)",
            path=base_dir,
            fix="pretrain one with `todsynth generator pretrain`, or fine-tune from scratch",
        )
    for kind, module in (("autoencoder", autoencoder), ("text_encoder", text_encoder)):
        theirs = (meta.get(kind) or {}).get("kind")
        if theirs != module.config.get("kind"):
            raise CheckpointError(
                f"the base was pretrained with {kind}={theirs!r}, this run uses {kind}={module.config.get('kind')!r}",
                path=base_dir,
                fix=f"fine-tune with --set {kind}={theirs}, or pretrain a base with this {kind}",
            )
    base_te = meta.get("text_encoder") or {}
    for key, ours in text_encoder.config.items():  # token counts: the sequence the text stream learned to read
        if key not in ("kind", "path") and base_te.get(key) != ours:
            fix = (
                f"fine-tune with --set text_max_length={base_te.get(key)}, or pretrain a base with this text_max_length"
                if key == "max_length" and text_encoder.config.get("kind") == "minilm"
                else "fine-tune with the base's text encoder settings, or pretrain a base with these"
            )
            raise CheckpointError(
                f"the base was pretrained with text_encoder {key}={base_te.get(key)!r}, this run uses {key}={ours!r}",
                path=base_dir,
                fix=fix,
            )
    theirs = meta.get("image_size")
    if theirs != size:
        raise CheckpointError(
            f"the base was pretrained at size={theirs}, this run has size={size}",
            path=base_dir,
            fix=f"fine-tune with --size {theirs}, or pretrain a base at size {size}",
        )
    for name, setting in ARCHITECTURE:
        theirs, ours = getattr(base_cfg, name), getattr(cfg, name)
        if _shown(theirs) != _shown(ours):
            raise CheckpointError(
                f"the base has {name}={_shown(theirs)}, this run's model has {name}={_shown(ours)} (set by {setting})",
                path=base_dir,
                fix="fine-tune with the base's settings, or pretrain a base of this size",
            )


def load_base_into(model, init: str | Path, autoencoder, text_encoder, size: int) -> None:
    """Initialise `model` (any control) from a pretrained base (control none), in place.

    Text and image streams, embedders and output layers take the base's weights; then the triple mask
    stream is re-copied from the (now pretrained) image stream. Layers the base has no weights for — the
    mask embedding and the adapter branch — keep their fresh initialisation (the adapter's zero output
    projections, so an adapter model starts equal to the base)."""
    from todsynth.config import config_from_file
    from todsynth.generator.mmdit import CONFIG_NAME, WEIGHTS_NAME, MaskControlMMDiT, MMDiTConfig
    from todsynth.io import load_weights, read_json

    base_dir = base_model_dir(init)
    meta = read_json(base_dir / "pipeline.json")
    raw = read_json(base_dir / "transformer" / CONFIG_NAME)
    if not isinstance(meta, dict) or not isinstance(raw, dict) or raw.get("_class_name") != MaskControlMMDiT.__name__:
        raise CheckpointError(
            "not a todsynth generator folder",
            path=base_dir,
            fix="give the --out folder of `todsynth generator pretrain`",
        )
    base_cfg = config_from_file(
        MMDiTConfig,
        {k: v for k, v in raw.items() if k != "_class_name"},
        base_dir / "transformer" / CONFIG_NAME,
        fix="re-run the pretraining",
    )
    check_base(base_dir, meta, base_cfg, model.config, autoencoder, text_encoder, size)
    state = load_weights(base_dir / "transformer" / WEIGHTS_NAME)
    own = model.state_dict()
    mask_only = {name for name, _ in model.stream_parameters("mask")}
    missing = sorted(k for k in own if k not in state and k not in mask_only)
    bad = sorted(k for k, v in state.items() if k not in own or own[k].shape != v.shape)
    if missing or bad:
        raise CheckpointError(
            f"base weights do not fit its config (missing {missing[:3]}, mismatched {bad[:3]})",
            path=base_dir / "transformer" / WEIGHTS_NAME,
            fix="re-run the pretraining",
        )
    model.load_state_dict(state, strict=False)
    model.copy_image_stream_to_mask_stream()
