"""MaskControlMMDiT: shapes and masking per control scheme, initialisation, SD3 equivalence, persistence."""

from __future__ import annotations

import pytest
import torch

from todsynth.checkpoint import build_on_meta
from todsynth.errors import CheckpointError
from todsynth.generator.mmdit import MaskControlMMDiT, MMDiTConfig, sincos_2d, timestep_embedding

CONTROLS = ("triple", "siamese", "adapter", "none")


def tiny_config(**kw) -> MMDiTConfig:
    base = dict(
        in_channels=3,
        patch_size=2,
        sample_size=16,
        pos_embed_max_size=16,
        num_layers=2,
        num_heads=2,
        head_dim=8,
        joint_attention_dim=12,
        pooled_projection_dim=10,
        num_classes=4,
    )
    base.update(kw)
    return MMDiTConfig(**base)


def randomize(model: torch.nn.Module, seed: int = 0, skip: tuple[str, ...] = ()) -> None:
    """Random weights everywhere (the DiT init zeroes gates and the output, which would hide bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(s in name for s in skip):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def inputs(b: int = 2, seed: int = 1, num_classes: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 16, 16, generator=g)
    t = torch.rand(b, generator=g)
    text = torch.randn(b, 5, 12, generator=g)
    pooled = torch.randn(b, 10, generator=g)
    mask = torch.randint(0, num_classes, (b, 16, 16), generator=g)
    mask[:, :2] = 255  # ignore pixels are a valid input
    return x, t, text, pooled, mask


@pytest.mark.parametrize("control", CONTROLS)
def test_output_shape_and_mask_dependence(control):
    model = MaskControlMMDiT(tiny_config(control=control))
    randomize(model)
    x, t, text, pooled, mask = inputs()
    v = model(x, t, text, pooled, mask if control != "none" else None)
    assert v.shape == x.shape
    other = torch.roll(mask, 5, dims=-1)
    v2 = model(x, t, text, pooled, other if control != "none" else None)
    if control == "none":
        assert torch.equal(v, v2)
    else:
        assert (v - v2).abs().max() > 1e-3, "the mask must change the prediction"
    text2 = text + 1.0
    assert (model(x, t, text2, pooled, mask if control != "none" else None) - v).abs().max() > 1e-3


def test_mask_is_needed_when_controlled():
    model = MaskControlMMDiT(tiny_config(control="triple"))
    x, t, text, pooled, _ = inputs()
    with pytest.raises(ValueError, match="needs a mask"):
        model(x, t, text, pooled, None)


def test_triple_mask_stream_starts_as_copy_of_image_stream():
    """Stated init: the triple model at init computes exactly what the siamese model computes."""
    triple = MaskControlMMDiT(tiny_config(control="triple"))
    randomize(triple, skip=(".mask.",))
    triple.copy_image_stream_to_mask_stream()
    siamese = MaskControlMMDiT(tiny_config(control="siamese"))
    shared = {k: v for k, v in triple.state_dict().items() if ".mask." not in k}
    siamese.load_state_dict(shared)
    args = inputs()
    torch.testing.assert_close(triple(*args), siamese(*args), rtol=1e-5, atol=1e-5)
    assert any(".mask." in k for k in triple.state_dict())


def test_adapter_starts_as_the_text_only_model():
    """Zero-initialised adapter projections: at init the adapter model equals the `none` model."""
    adapter = MaskControlMMDiT(tiny_config(control="adapter"))
    randomize(adapter, skip=("zero_proj",))
    none = MaskControlMMDiT(tiny_config(control="none"))
    none.load_state_dict({k: v for k, v in adapter.state_dict().items() if not k.startswith(("adapter", "mask_embed"))})
    x, t, text, pooled, mask = inputs()
    torch.testing.assert_close(adapter(x, t, text, pooled, mask), none(x, t, text, pooled), rtol=0, atol=0)


def test_dit_init_outputs_zero():
    """adaLN-Zero + zero output layer: an untrained model predicts v = 0 (a stable start)."""
    model = MaskControlMMDiT(tiny_config())
    assert model(*inputs()).abs().max() == 0


@pytest.mark.parametrize("qk_norm,dual", [(False, ()), (True, (0,))])
def test_sd3_equivalence(tmp_path, qk_norm, dual):
    """from_sd3 on a saved tiny diffusers SD3 transformer: same output as diffusers, fp32, ≤ 1e-5."""
    from diffusers import SD3Transformer2DModel

    from todsynth.generator.sd3 import from_sd3

    torch.manual_seed(0)
    ref = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=24,
        out_channels=4,
        pos_embed_max_size=32,
        qk_norm="rms_norm" if qk_norm else None,
        dual_attention_layers=dual,
    )
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.1)
    ref.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    ours = from_sd3(tmp_path, control="none")
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([0.25, 0.8])
    text, pooled = torch.randn(2, 7, 32, generator=g), torch.randn(2, 24, generator=g)
    with torch.no_grad():
        expected = ref(x, text, pooled, t * 1000).sample
        got = ours(x, t, text, pooled)
    assert (expected - got).abs().max().item() <= 1e-5
    # the triple model built from the same folder keeps the SD3 weights and adds a mask stream
    triple = from_sd3(tmp_path, control="triple", num_classes=3, mask_downscale=1)
    blk = triple.blocks[0]
    assert torch.equal(blk.mask.qkv.weight, blk.image.qkv.weight)


def test_sd3_folder_errors(tmp_path):
    from todsynth.generator.sd3 import from_sd3

    with pytest.raises(CheckpointError, match="config.json"):
        from_sd3(tmp_path)
    (tmp_path / "config.json").write_text('{"num_attention_heads": 2}')
    (tmp_path / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError):
        from_sd3(tmp_path)


def test_position_and_timestep_embeddings_match_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding

    ours = sincos_2d(32, 12, 4)
    ref = get_2d_sincos_pos_embed(32, 12, base_size=4, output_type="pt").float()
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    t = torch.tensor([0.0, 13.5, 999.0])
    torch.testing.assert_close(
        timestep_embedding(t, 256),
        get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0),
        rtol=0,
        atol=1e-5,
    )


@pytest.mark.parametrize("control", ["triple", "adapter"])
def test_save_load_round_trip(tmp_path, control):
    model = MaskControlMMDiT(tiny_config(control=control, qk_norm=True))
    randomize(model)
    model.save_pretrained(tmp_path / "m")
    loaded = MaskControlMMDiT.from_pretrained(tmp_path / "m")
    args = inputs()
    assert torch.equal(model(*args), loaded(*args))


def test_from_pretrained_refuses_mismatch(tmp_path):
    MaskControlMMDiT(tiny_config(num_layers=2)).save_pretrained(tmp_path / "a")
    MaskControlMMDiT(tiny_config(num_layers=3)).save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").replace(tmp_path / "b" / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not match"):
        MaskControlMMDiT.from_pretrained(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(CheckpointError, match="not a MaskControlMMDiT"):
        MaskControlMMDiT.from_pretrained(tmp_path / "c")


def test_freezing_policy_keeps_text_stream_fixed():
    model = MaskControlMMDiT(tiny_config(control="triple"))
    randomize(model)
    model.set_trainable(text=False, image=True, mask=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(*inputs()).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    text_keys = [k for k, _ in model.stream_parameters("text")]
    assert text_keys and all(torch.equal(before[k], after[k]) for k in text_keys)
    for group in ("image", "mask"):
        keys = [k for k, _ in model.stream_parameters(group)]
        assert any(not torch.equal(before[k], after[k]) for k in keys), group


def test_lora_trains_adapters_only():
    from todsynth.generator.lora import add_lora

    model = MaskControlMMDiT(tiny_config(control="triple"))
    randomize(model)
    add_lora(model, rank=2, streams=["image", "mask"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".image." in n for n in trainable) and any(".mask." in n for n in trainable)
    assert not any(".text." in n for n in trainable)
    base = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(*inputs()).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(base[n], p) for n, p in model.named_parameters() if n in base)


def test_grid_errors():
    model = MaskControlMMDiT(tiny_config())
    x, t, text, pooled, mask = inputs()
    with pytest.raises(ValueError, match="multiple of patch size"):
        model(x[..., :15], t, text, pooled, mask)
    with pytest.raises(ValueError, match="does not match image grid"):
        model(x, t, text, pooled, mask[..., :8, :8])


def test_bf16_autocast_matches_fp32_without_dtype_warnings():
    import warnings

    model = MaskControlMMDiT(tiny_config(control="triple", qk_norm=True))
    randomize(model)
    x, t, text, pooled, mask = inputs()
    ref = model(x, t, text, pooled, mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. RMSNorm's "mismatch dtype ... cannot dispatch to fused"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, text, pooled, mask)
        out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() < 0.05 * ref.norm()
    norm = model.blocks[0].mask.q_norm.weight
    assert norm.dtype == torch.float32 and norm.grad is not None and norm.grad.abs().sum() > 0


def test_positions_are_computed_per_grid_without_a_buffer():
    """No position table is registered (SD3.5's would be 864 MiB, broadcast by DDP every forward); the positions
    computed for a grid equal the centre crop of the full table bit for bit, cached per grid."""
    model = MaskControlMMDiT(tiny_config(pos_embed_max_size=12, sample_size=8))
    assert dict(model.named_buffers()) == {}
    table = sincos_2d(model.config.hidden_size, 12, 8 // model.config.patch_size).view(12, 12, -1)
    for h, w in ((4, 4), (6, 2), (12, 12)):
        top, left = (12 - h) // 2, (12 - w) // 2
        assert torch.equal(model.positions(h, w), table[top : top + h, left : left + w].reshape(1, h * w, -1))
    assert model.positions(4, 4) is model.positions(4, 4)
    huge = build_on_meta(lambda: MaskControlMMDiT(tiny_config(pos_embed_max_size=200_000)))
    assert dict(huge.named_buffers()) == {}
