"""VAE latents of the training images, encoded once into out/latent_cache.safetensors (`cache_latents`).

Training then reads x0 from the cache instead of running the VAE encoder every step. The augmentation
(horizontal flip, 90° rotations) is applied to the cached latent: exact for the pixel space, approximate for
a VAE, whose encoder commutes with flips and rotations only as far as it learned to (measured in
benchmarks/README.md). All processes build it together: each encodes its share, rank 0 merges.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from todsynth.errors import CheckpointError

LATENT_CACHE = "latent_cache.safetensors"
FORMAT = "todsynth-latent-cache/1"
META_KEY = "todsynth_latent_cache"


def images_fingerprint(images: Tensor, ids: list[str]) -> str:
    """Hash of the ids, the shape and each image's sum and sum of squares (float64): a changed dataset,
    size or order gives another fingerprint without hashing every pixel."""
    stats = torch.stack([images.double().flatten(1).sum(1), images.double().flatten(1).square().sum(1)], 1)
    h = hashlib.sha256(json.dumps([ids, list(images.shape)]).encode())
    h.update(stats.numpy().tobytes())
    return h.hexdigest()


def encode_latents(autoencoder: Any, images: Tensor, device: torch.device | str, batch_size: int = 8) -> Tensor:
    """Posterior-mode latents (as flow_loss encodes) of images [N, 3, S, S], on the CPU in fp32."""
    parts = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            parts.append(autoencoder.encode(images[s : s + batch_size].to(device), sample=False).float().cpu())
    if parts:
        return torch.cat(parts)
    return torch.zeros(0, *autoencoder.latent_shape(images.shape[-2], images.shape[-1]))


def build_latent_cache(
    path: str | Path, autoencoder: Any, images: Tensor, ids: list[str], state: Any = None, batch_size: int = 8
) -> Tensor:
    """Latents [N, C, h, w] of every training image, read from `path` when it holds exactly these images
    encoded by this autoencoder, else encoded (each process its share `rank::world`) and saved by rank 0."""
    path = Path(path)
    meta = {"format": FORMAT, "autoencoder": autoencoder.identity, "images": images_fingerprint(images, ids)}
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    device = state.device if state is not None else "cpu"
    cached = read_latent_cache(path, meta)
    if cached is not None:
        return cached
    mine = encode_latents(autoencoder, images[rank::world], device, batch_size)
    if world > 1:
        _save(path.with_name(f"{path.stem}.rank{rank}.safetensors"), mine, {**meta, "rank": rank})
        state.wait_for_everyone()
    if rank == 0:
        latents = mine if world == 1 else _merge(path, world, len(images))
        _save(path, latents, meta)
    if world > 1:
        state.wait_for_everyone()
        if rank == 0:
            for r in range(world):
                path.with_name(f"{path.stem}.rank{r}.safetensors").unlink(missing_ok=True)
        return read_latent_cache(path, meta)
    return latents


def _merge(path: Path, world: int, n: int) -> Tensor:
    """Interleave the ranks' shards back into dataset order (rank r holds indices r, r + world, ...)."""
    from todsynth.io import load_weights

    shards = [load_weights(path.with_name(f"{path.stem}.rank{r}.safetensors"))["latents"] for r in range(world)]
    out = torch.empty(n, *shards[0].shape[1:], dtype=shards[0].dtype)
    for r, shard in enumerate(shards):
        out[r::world] = shard
    return out


def _save(path: Path, latents: Tensor, meta: dict) -> None:
    """Latents and their identity (one sorted-key JSON metadata entry), written atomically."""
    from todsynth.io import save_weights

    save_weights(path, {"latents": latents.contiguous()}, metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def read_latent_cache(path: Path, meta: dict) -> Tensor | None:
    """The cached latents when `path` exists and was built for `meta` (autoencoder and images), else None."""
    from safetensors import SafetensorError, safe_open

    from todsynth.io import load_weights

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = json.loads((f.metadata() or {}).get(META_KEY, "null"))
        if saved != json.loads(json.dumps(meta, sort_keys=True)):
            return None
        return load_weights(path)["latents"]
    except (OSError, ValueError, KeyError, CheckpointError, SafetensorError):
        return None  # derived data: an unreadable cache is rebuilt
