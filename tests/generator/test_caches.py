"""Caches of what does not change: prompt embeddings (synthesis, sampling, training; built by all processes
together) and VAE latents of the training images."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch

from todsynth.errors import ConfigError
from todsynth.generator.latent_cache import build_latent_cache, encode_latents, read_latent_cache
from todsynth.generator.text import MiniLMTextEncoder, PromptCache, build_prompt_cache


@pytest.fixture
def encoded(monkeypatch) -> Counter:
    """Every prompt the MiniLM encoder runs on, counted (the encoder still runs)."""
    seen: Counter = Counter()
    original = MiniLMTextEncoder.encode_batch

    def counting(self, prompts):
        seen.update(prompts)
        return original(self, prompts)

    monkeypatch.setattr(MiniLMTextEncoder, "encode_batch", counting)
    return seen


def test_synthesis_encodes_each_prompt_and_the_empty_prompt_once(tiny_generator_dir, toy_masks_16, tmp_path, encoded):
    from todsynth.synthesize import PROMPT_CACHE, build_synthesize_config, synthesize

    cfg = build_synthesize_config(
        dict(
            generator=str(tiny_generator_dir),
            masks=str(toy_masks_16),
            out=str(tmp_path / "s"),
            num_steps=2,
            batch_size=2,
            limit=4,
            copies=2,
            guidance_scale=2.0,
            transforms=["identity", "hflip"],
            **{"crfm.steps": 0},
            device="cpu",
        )
    )
    synthesize(cfg, progress=False)  # 16 samples in 8 batches, each with guidance (its "" branch)
    assert encoded and max(encoded.values()) == 1 and encoded[""] == 1, encoded
    cache = PromptCache.load(tmp_path / "s" / PROMPT_CACHE)
    assert set(encoded) <= set(cache.prompts)
    encoded.clear()
    synthesize(cfg, progress=False)  # a rerun reads the cache in the output folder
    assert not encoded


def test_sample_grid_caches_prompts_in_its_output(tiny_generator_dir, toy_masks_16, tmp_path, encoded):
    from todsynth.generator.sample import sample_grid

    sample_grid(
        tiny_generator_dir,
        toy_masks_16,
        tmp_path / "g",
        n=3,
        num_steps=2,
        guidance_scale=2.0,
        batch_size=1,
        device="cpu",
        mixed_precision="bf16",
    )
    assert (tmp_path / "g" / "prompt_cache.safetensors").is_file()
    assert max(encoded.values()) == 1 and encoded[""] == 1


class _ThreadRank:
    """A process stand-in for build_prompt_cache: rank, world size and a barrier shared by threads."""

    def __init__(self, rank: int, world: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.barrier = rank, world, barrier
        self.device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        self.barrier.wait(timeout=60)


def test_ranks_build_one_prompt_cache_each_encoding_its_share(tmp_path, monkeypatch):
    """Two ranks (threads, real files and barriers): each encodes half of the prompts, one file results."""
    encoder = MiniLMTextEncoder(max_length=8)
    prompts = [f"a satellite image of {w}" for w in ("water", "roads", "forest", "farms", "towns")]
    by_thread: dict[int, list[str]] = {}
    original = MiniLMTextEncoder.encode_batch

    def counting(self, batch):
        by_thread.setdefault(threading.get_ident(), []).extend(batch)
        return original(self, batch)

    monkeypatch.setattr(MiniLMTextEncoder, "encode_batch", counting)
    barrier, caches, errors = threading.Barrier(2), {}, []

    def run(rank: int) -> None:
        try:
            caches[rank] = build_prompt_cache(
                tmp_path / "pc.safetensors", encoder, prompts, _ThreadRank(rank, 2, barrier)
            )
        except BaseException as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    shares = sorted(len(v) for v in by_thread.values())
    assert shares == [3, 3] and sum(Counter(p for v in by_thread.values() for p in v).values()) == 6
    assert caches[0].prompts == caches[1].prompts == sorted(["", *prompts])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pc.safetensors"]  # shards merged and removed
    single = PromptCache.build(tmp_path / "one.safetensors", encoder, prompts)
    assert torch.allclose(caches[0].get(prompts)[0], single.get(prompts)[0], atol=1e-6)


# -- latent cache --------------------------------------------------------------------------------------


def _tiny_vae():
    from diffusers import AutoencoderKL

    from todsynth.generator.autoencoder import VAEAutoencoder

    torch.manual_seed(0)
    blocks = {"down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2}
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        **blocks,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=1.5,
        shift_factor=0.1,
    )
    return VAEAutoencoder(vae.eval())


def _loss_pair(ae, augment: bool) -> tuple[float, float]:
    """flow_loss of one batch with x0 encoded per step vs read from the latent cache (same randomness)."""
    from todsynth.data.classes import LOVEDA
    from todsynth.generator.mmdit import MaskControlMMDiT, MMDiTConfig
    from todsynth.generator.pipeline import MaskToImagePipeline
    from todsynth.generator.text import PromptCache
    from todsynth.generator.train import GeneratorTrainConfig, augment as flip_rotate, flow_loss, step_generator

    size = 16
    latent = size // ae.downscale
    torch.manual_seed(0)
    model = MaskControlMMDiT(
        MMDiTConfig(
            in_channels=ae.latent_channels,
            sample_size=latent,
            pos_embed_max_size=8,
            num_layers=1,
            num_heads=2,
            head_dim=8,
            joint_attention_dim=6,
            pooled_projection_dim=6,
            mask_downscale=ae.downscale,
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    cache = PromptCache({"name": "t"}, ["", "p"], torch.randn(2, 3, 6), torch.randn(2, 6))
    pipe = MaskToImagePipeline(model, ae, None, LOVEDA, size, prompt_cache=cache)
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 7, (3, size, size), generator=torch.Generator().manual_seed(2))
    latents = encode_latents(ae, images, "cpu")  # what the cache file holds (round trip tested below)
    cfg = GeneratorTrainConfig(data="x", text_dropout=0.0)
    losses = []
    for source, is_latent in ((images, False), (latents, True)):
        gens = [step_generator(0, 0, i) for i in range(3)]
        x, lab = flip_rotate(source, labels, gens) if augment else (source, labels)
        losses.append(flow_loss(pipe, model, x, lab, ["p"] * 3, gens, cfg, latents=is_latent).item())
    return losses[0], losses[1]


def test_latent_cache_gives_the_per_step_loss():
    from todsynth.generator.autoencoder import PixelAutoencoder

    per_step, cached = _loss_pair(_tiny_vae(), augment=False)
    assert abs(per_step - cached) < 1e-5 * max(1.0, abs(per_step))
    per_step, cached = _loss_pair(PixelAutoencoder(), augment=True)  # flips commute exactly with pixels
    assert abs(per_step - cached) < 1e-6 * max(1.0, abs(per_step))


def test_latent_cache_file_is_reused_and_rebuilt_when_images_change(tmp_path):
    ae = _tiny_vae()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "latent_cache.safetensors"
    first = build_latent_cache(path, ae, images, ["a", "b", "c"])
    assert first.shape == (3, 4, 8, 8) and path.is_file()
    stamp = path.stat().st_mtime_ns
    again = build_latent_cache(path, ae, images, ["a", "b", "c"])
    assert torch.equal(first, again) and path.stat().st_mtime_ns == stamp
    changed = images.clone()
    changed[1] = 1 - changed[1]
    rebuilt = build_latent_cache(path, ae, changed, ["a", "b", "c"])
    assert torch.equal(rebuilt[0], first[0]) and not torch.equal(rebuilt[1], first[1])
    path.write_bytes(b"not safetensors")
    assert read_latent_cache(path, {}) is None


def test_training_with_cached_latents_matches_encoding_each_step(tmp_path):
    """Pixel space (where flips and rotations commute exactly): the same loss trace, and the cache file."""
    from todsynth.data.toy import write_toy_dataset
    from todsynth.generator.mmdit import MMDiTArch
    from todsynth.generator.train import GeneratorTrainConfig, train_generator

    toy = write_toy_dataset(tmp_path / "toy", n=4, size=16, seed=3)
    base = dict(
        data=str(toy),
        size=16,
        steps=3,
        batch_size=2,
        model=MMDiTArch(num_layers=1, num_heads=2, head_dim=16),
        val_every=0,
        checkpoint_every=3,
        progress=False,
        warmup_steps=1,
        text_max_length=8,
        crop="center",
    )
    a = train_generator(GeneratorTrainConfig(out=str(tmp_path / "a"), **base))
    b = train_generator(GeneratorTrainConfig(out=str(tmp_path / "b"), cache_latents=True, **base))
    assert (tmp_path / "b" / "latent_cache.safetensors").is_file()
    assert not (tmp_path / "a" / "latent_cache.safetensors").exists()
    assert abs(a.final_loss - b.final_loss) < 1e-6
    with pytest.raises(ConfigError, match="cache_latents needs crop center or resize"):
        GeneratorTrainConfig(out=str(tmp_path / "c"), **{**base, "crop": "random"}, cache_latents=True).validate()
