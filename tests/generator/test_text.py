"""Text encoders: bundled MiniLM, SD3 triple encoder (checked against diffusers), prompt cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from todsynth.errors import CheckpointError, ConfigError, TodsynthError
from todsynth.generator.text import (
    MiniLMTextEncoder,
    PromptCache,
    SD3TextEncoder,
    encode_prompts_cached,
    load_text_encoder,
)

PROMPTS = ["a road next to a tree", "trees", "", "buildings, roads and low vegetation in a city"]
LONG = "an aerial image of " + " and ".join(["buildings", "roads", "trees", "cars", "water"] * 4)
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder(max_length=16)


def _clip_tokenizer(pad: str):
    """A tiny CLIP BPE tokenizer: single letters, a few merges, CLIP's special tokens."""
    from transformers import CLIPTokenizer

    merges = [("r", "o"), ("ro", "a"), ("roa", "d</w>"), ("t", "r"), ("e", "e</w>"), ("tr", "ee</w>")]
    tokens = [*LETTERS, *(c + "</w>" for c in LETTERS), *(a + b for a, b in merges), "!"]
    vocab = {t: i for i, t in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token=pad)


def _t5_tokenizer():
    """A tiny T5 unigram tokenizer built in code (no sentencepiece model needed)."""
    from transformers import T5TokenizerFast

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    words = [("▁road", -3.0), ("▁tree", -3.0)]
    return T5TokenizerFast(vocab=specials + words + [(c, -5.0) for c in LETTERS], extra_ids=0)


def _clip_model(tokenizer, hidden: int, projection: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def _t5_model(tokenizer):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=80,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def _transformer():
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=80,
        caption_projection_dim=16,
        pooled_projection_dim=80,
    ).eval()


@pytest.fixture(scope="module")
def sd3_parts() -> dict:
    torch.manual_seed(0)
    tok_l, tok_g, tok_t5 = _clip_tokenizer("<|endoftext|>"), _clip_tokenizer("!"), _t5_tokenizer()
    return {
        "text_encoder": _clip_model(tok_l, 32, 32),
        "tokenizer": tok_l,
        "text_encoder_2": _clip_model(tok_g, 40, 48),
        "tokenizer_2": tok_g,
        "text_encoder_3": _t5_model(tok_t5),
        "tokenizer_3": tok_t5,
        "transformer": _transformer(),
    }


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory, sd3_parts) -> Path:
    root = tmp_path_factory.mktemp("sd3")
    for name, part in sd3_parts.items():
        if name == "transformer":
            part.save_config(root / name)
        else:
            part.save_pretrained(root / name)
    return root


def _pipeline(parts: dict, use_t5: bool):
    from diffusers import StableDiffusion3Pipeline

    parts = dict(parts)
    if not use_t5:
        parts["text_encoder_3"] = parts["tokenizer_3"] = None
    return StableDiffusion3Pipeline(scheduler=None, vae=None, **parts)


def test_minilm_shapes_padding_and_normalised_pool(minilm):
    tokens, pooled = minilm.encode(PROMPTS)
    assert tokens.shape == (4, 16, 384) and pooled.shape == (4, 384)
    assert (minilm.token_dim, minilm.pooled_dim, minilm.seq_len) == (384, 384, 16)
    lengths = [len(minilm.tokenizer(p).input_ids) for p in PROMPTS]
    for row, n in zip(tokens, lengths, strict=True):
        assert row[:n].abs().sum(-1).min() > 0
        assert torch.all(row[n:] == 0)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(4))


def test_minilm_is_deterministic_and_separates_prompts(minilm):
    tokens, pooled = minilm.encode(PROMPTS)
    again, pooled_again = minilm.encode(PROMPTS)
    assert torch.equal(tokens, again) and torch.equal(pooled, pooled_again)
    alone, pooled_alone = minilm.encode(PROMPTS[:1])
    torch.testing.assert_close(alone[0], tokens[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled_alone[0], pooled[0], atol=1e-5, rtol=0)
    assert (pooled[0] - pooled[1]).abs().max() > 1e-2
    assert (tokens[0] - tokens[1]).abs().max() > 1e-2


def test_minilm_pooled_is_the_sentence_transformers_embedding(minilm):
    """Reference: SentenceTransformer(bundled folder).encode(..., normalize_embeddings=True), ST 6.2."""
    expected_head = torch.tensor(
        [
            [0.044298, 0.016633, -0.023878, 0.092955, 0.003678, -0.005121],
            [0.049890, 0.047562, 0.028465, -0.001014, 0.056821, -0.030792],
        ]
    )
    tokens, pooled = minilm.encode([PROMPTS[0], LONG])
    assert len(minilm.tokenizer(LONG).input_ids) > 16 and tokens.shape[1] == 16
    torch.testing.assert_close(pooled[:, :6], expected_head, atol=2e-6, rtol=0)
    assert abs(float(pooled[0] @ pooled[1]) - 0.422977) < 1e-5


def test_minilm_stays_frozen_in_eval_mode(minilm):
    torch.nn.ModuleDict({"text": minilm}).train()  # a parent switching to train mode
    assert not minilm.training and not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())


def test_minilm_bad_folder_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError) as info:
        MiniLMTextEncoder(tmp_path / "nowhere")
    assert "nowhere" in str(info.value)


@pytest.mark.parametrize("use_t5", [True, False])
def test_sd3_matches_diffusers_encode_prompt(sd3_parts, sd3_folder, use_t5):
    encoder = SD3TextEncoder.from_pretrained(sd3_folder, t5_max_length=24, use_t5=use_t5)
    prompts = ["a road next to a tree", "", "tree road tree"]
    tokens, pooled = encoder.encode(prompts)
    expected, _, expected_pooled, _ = _pipeline(sd3_parts, use_t5).encode_prompt(
        prompts, None, None, device=torch.device("cpu"), do_classifier_free_guidance=False, max_sequence_length=24
    )
    assert tokens.shape == (3, 77 + 24, 80) and pooled.shape == (3, 80)
    assert (encoder.seq_len, encoder.token_dim, encoder.pooled_dim) == (101, 80, 80)
    assert (tokens - expected).abs().max() <= 1e-6
    assert (pooled - expected_pooled).abs().max() <= 1e-6
    assert (tokens[0] - tokens[2]).abs().max() > 1e-3
    assert bool(torch.all(tokens[:, 77:] == 0)) is not use_t5


def test_sd3_factory_and_config_rebuild_the_same_encoder(sd3_folder):
    encoder = load_text_encoder("sd3", sd3_folder, t5_max_length=8)
    again = load_text_encoder(**encoder.config)
    assert again.identity == encoder.identity
    assert torch.equal(encoder.encode(["road"])[0], again.encode(["road"])[0])


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_training_loads_sd3_text_encoders_in_bf16_under_bf16(sd3_folder, precision):
    """The frozen SD3 encoders only fill the prompt cache: a bf16 run loads them in bf16, others in fp32."""
    from todsynth.config import build_config
    from todsynth.data.classes import ClassSpec
    from todsynth.generator.train import GeneratorTrainConfig, build_pipeline

    cfg = build_config(
        GeneratorTrainConfig,
        {
            "data": "x",
            "size": 16,
            "text_encoder": "sd3",
            "text_encoder_path": str(sd3_folder),
            "mixed_precision": precision,
            "model.num_layers": 1,
            "model.num_heads": 2,
            "model.head_dim": 8,
        },
    )
    pipe = build_pipeline(cfg, ClassSpec(("a", "b")))
    assert pipe.text_encoder.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())


@pytest.mark.parametrize("missing", ["text_encoder_2", "tokenizer_3", "text_encoder/config.json"])
def test_sd3_missing_part_is_named(sd3_folder, tmp_path, missing):
    root = tmp_path / "sd3"
    shutil.copytree(sd3_folder, root)
    target = root / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(CheckpointError) as info:
        SD3TextEncoder.from_pretrained(root)
    assert missing.split("/")[0] in str(info.value) and "text_encoder_3/" in str(info.value)


def test_sd3_pickle_weights_are_refused(sd3_parts, sd3_folder, tmp_path):
    root = tmp_path / "sd3"
    shutil.copytree(sd3_folder, root)
    (root / "text_encoder" / "model.safetensors").unlink()
    torch.save(sd3_parts["text_encoder"].state_dict(), root / "text_encoder" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        SD3TextEncoder.from_pretrained(root)


def test_sd3_without_folder_or_with_unknown_kind_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="SD3 folder not found"):
        SD3TextEncoder.from_pretrained(tmp_path / "absent")
    with pytest.raises(ConfigError, match="needs path"):
        load_text_encoder("sd3")
    with pytest.raises(ConfigError, match="unknown text encoder"):
        load_text_encoder("clip")


def test_cache_round_trip_holds_empty_prompt(minilm, tmp_path):
    path = tmp_path / "prompts.safetensors"
    cache = encode_prompts_cached(minilm, PROMPTS[:2] * 3, path)
    assert path.is_file() and len(cache) == 3 and "" in cache
    reread = PromptCache.load(path)
    assert reread.encoder is None and reread.prompts == cache.prompts
    tokens, pooled = reread.get(["", PROMPTS[1], PROMPTS[0]])
    expected_tokens, expected_pooled = minilm.encode(["", PROMPTS[1], PROMPTS[0]])
    torch.testing.assert_close(tokens, expected_tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, expected_pooled, atol=1e-5, rtol=0)


def test_cache_unknown_prompt_encoded_or_refused(minilm, tmp_path):
    path = tmp_path / "prompts.safetensors"
    cache = PromptCache.build(path, minilm, PROMPTS[:1])
    tokens, _ = cache.get([PROMPTS[3]])
    torch.testing.assert_close(tokens, minilm.encode([PROMPTS[3]])[0], atol=1e-5, rtol=0)
    assert PROMPTS[3] not in PromptCache.load(path)
    with pytest.raises(TodsynthError, match="not in the prompt cache"):
        PromptCache.load(path).get([PROMPTS[3]])
    cache.save()
    assert PROMPTS[3] in PromptCache.load(path)


def test_cache_is_reused_for_the_same_encoder(minilm, tmp_path):
    path = tmp_path / "prompts.safetensors"
    PromptCache.build(path, minilm, PROMPTS[:1])
    stamp = path.stat().st_mtime_ns
    PromptCache.build(path, minilm, PROMPTS[:1])
    assert path.stat().st_mtime_ns == stamp


def test_cache_from_another_encoder_is_rebuilt(minilm, sd3_folder, tmp_path):
    path = tmp_path / "prompts.safetensors"
    PromptCache.build(path, minilm, ["road"])
    sd3 = SD3TextEncoder.from_pretrained(sd3_folder, t5_max_length=8)
    cache = PromptCache.build(path, sd3, ["tree"])
    assert set(cache.prompts) == {"road", "", "tree"}
    reread = PromptCache.load(path)
    assert reread.identity == sd3.identity and reread.tokens.shape == (3, 85, 80)
    torch.testing.assert_close(reread.get(["road"])[0], sd3.encode(["road"])[0])


def test_cache_corrupt_file_is_rebuilt_and_bad_name_refused(minilm, tmp_path):
    path = tmp_path / "prompts.safetensors"
    path.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError):
        PromptCache.load(path)
    assert PromptCache.build(path, minilm, ["road"]).prompts == ["", "road"]
    with pytest.raises(ConfigError, match=".safetensors"):
        PromptCache.build(tmp_path / "prompts.pt", minilm)


def test_cache_file_is_byte_stable(minilm, tmp_path):
    """Same prompts, other insertion order, other instance: byte-identical file (one sorted JSON key)."""
    from safetensors import safe_open

    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    PromptCache.build(first, minilm, PROMPTS)
    cache = PromptCache.build(second, minilm, PROMPTS[3:0:-1])
    cache.add([PROMPTS[0]])
    cache.save()
    assert first.read_bytes() == second.read_bytes()
    assert cache.prompts == sorted(PROMPTS) and cache.get([PROMPTS[0]])[1].shape == (1, 384)
    with safe_open(str(first), framework="pt") as f:
        assert list(f.metadata()) == ["todsynth_prompt_cache"]


def test_cache_written_with_the_old_metadata_is_read(minilm, tmp_path):
    """Files from before the single metadata key (three keys) still load, and are kept as they are."""
    import json

    from todsynth.io import save_weights

    path = tmp_path / "prompts.safetensors"
    tokens, pooled = minilm.encode(["", "road"])
    meta = {
        "format": "todsynth-prompt-cache/1",
        "encoder": json.dumps(minilm.identity),
        "prompts": json.dumps(["", "road"]),
    }
    save_weights(path, {"tokens": tokens, "pooled": pooled}, metadata=meta)
    assert PromptCache.load(path).prompts == ["", "road"]
    stamp = path.stat().st_mtime_ns
    assert PromptCache.build(path, minilm, ["road"]).prompts == ["", "road"]
    assert path.stat().st_mtime_ns == stamp
