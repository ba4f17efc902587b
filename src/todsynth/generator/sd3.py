"""Build a MaskControlMMDiT from a diffusers SD3 / SD3.5 transformer folder (config + safetensors).

Text and image streams take SD3's weights one to one (fused QKV = concatenated q, k, v); the mask
stream starts as a copy of the image stream; the mask patch embedding is new.
"""

from __future__ import annotations

from pathlib import Path

import torch

from todsynth.errors import CheckpointError
from todsynth.generator.mmdit import MaskControlMMDiT, MMDiTConfig


def _transformer_dir(path: Path) -> Path:
    """Accept a pipeline folder (with transformer/) or a bare transformer folder."""
    for cand in (path / "transformer", path):
        if (cand / "config.json").is_file():
            return cand
    raise CheckpointError(
        "no config.json found here or in transformer/",
        path=path,
        fix="give a diffusers SD3 pipeline folder or its transformer/ subfolder",
    )


def _load_sd3_state(folder: Path) -> dict[str, torch.Tensor]:
    """Read all safetensors shards of a diffusers model folder (pickle .bin files are refused)."""
    from todsynth.io import load_weights

    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found pickle weights {pickles}, which are never loaded)" if pickles else ""
        raise CheckpointError(
            f"no .safetensors weights{hint}", path=folder, fix="save the transformer with safe_serialization=True"
        )
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_weights(shard))
    return state


def config_from_sd3(sd3: dict, **overrides) -> MMDiTConfig:
    """Translate a diffusers SD3Transformer2DModel config into ours (control etc. from overrides)."""
    required = (
        "in_channels",
        "patch_size",
        "sample_size",
        "pos_embed_max_size",
        "num_layers",
        "num_attention_heads",
        "attention_head_dim",
        "joint_attention_dim",
        "pooled_projection_dim",
    )
    missing = [k for k in required if k not in sd3]
    if missing:
        raise CheckpointError(f"SD3 transformer config lacks {missing}")
    dim = sd3["num_attention_heads"] * sd3["attention_head_dim"]
    if sd3.get("caption_projection_dim", dim) != dim:
        raise CheckpointError(f"caption_projection_dim {sd3['caption_projection_dim']} != hidden size {dim}")
    qk = sd3.get("qk_norm")
    if qk not in (None, "rms_norm"):
        raise CheckpointError(f"qk_norm {qk!r} is not supported (only rms_norm)")
    values = dict(
        in_channels=sd3["in_channels"],
        out_channels=sd3.get("out_channels"),
        patch_size=sd3["patch_size"],
        sample_size=sd3["sample_size"],
        pos_embed_max_size=sd3["pos_embed_max_size"],
        num_layers=sd3["num_layers"],
        num_heads=sd3["num_attention_heads"],
        head_dim=sd3["attention_head_dim"],
        joint_attention_dim=sd3["joint_attention_dim"],
        pooled_projection_dim=sd3["pooled_projection_dim"],
        qk_norm=qk == "rms_norm",
        dual_attention_layers=tuple(sd3.get("dual_attention_layers") or ()),
    )
    values.update(overrides)
    cfg = MMDiTConfig(**values)
    cfg.validate()
    return cfg


def _linear(state: dict, src: str, dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = state[f"{src}.weight"]
    out[f"{dst}.bias"] = state[f"{src}.bias"]


def _fused_qkv(state: dict, names: tuple[str, str, str], dst: str, out: dict) -> None:
    out[f"{dst}.weight"] = torch.cat([state[f"{n}.weight"] for n in names], 0)
    out[f"{dst}.bias"] = torch.cat([state[f"{n}.bias"] for n in names], 0)


def _norms(state: dict, pairs: tuple[tuple[str, str], ...], out: dict) -> None:
    for src, dst in pairs:
        if f"{src}.weight" in state:
            out[f"{dst}.weight"] = state[f"{src}.weight"]


def convert_sd3_state_dict(state: dict[str, torch.Tensor], cfg: MMDiTConfig) -> dict[str, torch.Tensor]:
    """Map diffusers SD3Transformer2DModel keys onto our text/image streams and embedders."""
    out: dict[str, torch.Tensor] = {}
    _linear(state, "pos_embed.proj", "patch_embed", out)
    _linear(state, "time_text_embed.timestep_embedder.linear_1", "cond_embed.time.0", out)
    _linear(state, "time_text_embed.timestep_embedder.linear_2", "cond_embed.time.2", out)
    _linear(state, "time_text_embed.text_embedder.linear_1", "cond_embed.text.0", out)
    _linear(state, "time_text_embed.text_embedder.linear_2", "cond_embed.text.2", out)
    _linear(state, "context_embedder", "context_embed", out)
    _linear(state, "norm_out.linear", "norm_out", out)
    _linear(state, "proj_out", "proj_out", out)
    for i in range(cfg.num_layers):
        s, d = f"transformer_blocks.{i}", f"blocks.{i}"
        last = i == cfg.num_layers - 1
        _linear(state, f"{s}.norm1.linear", f"{d}.image.ada", out)
        _linear(state, f"{s}.norm1_context.linear", f"{d}.text.ada", out)
        _fused_qkv(state, (f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"), f"{d}.image.qkv", out)
        _fused_qkv(
            state, (f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj"), f"{d}.text.qkv", out
        )
        _norms(
            state,
            (
                (f"{s}.attn.norm_q", f"{d}.image.q_norm"),
                (f"{s}.attn.norm_k", f"{d}.image.k_norm"),
                (f"{s}.attn.norm_added_q", f"{d}.text.q_norm"),
                (f"{s}.attn.norm_added_k", f"{d}.text.k_norm"),
            ),
            out,
        )
        _linear(state, f"{s}.attn.to_out.0", f"{d}.image.out", out)
        _linear(state, f"{s}.ff.net.0.proj", f"{d}.image.mlp.0", out)
        _linear(state, f"{s}.ff.net.2", f"{d}.image.mlp.2", out)
        if not last:
            _linear(state, f"{s}.attn.to_add_out", f"{d}.text.out", out)
            _linear(state, f"{s}.ff_context.net.0.proj", f"{d}.text.mlp.0", out)
            _linear(state, f"{s}.ff_context.net.2", f"{d}.text.mlp.2", out)
        if i in cfg.dual_attention_layers:
            _fused_qkv(state, (f"{s}.attn2.to_q", f"{s}.attn2.to_k", f"{s}.attn2.to_v"), f"{d}.image.qkv2", out)
            _norms(
                state, ((f"{s}.attn2.norm_q", f"{d}.image.q_norm2"), (f"{s}.attn2.norm_k", f"{d}.image.k_norm2")), out
            )
            _linear(state, f"{s}.attn2.to_out.0", f"{d}.image.out2", out)
    return out


def from_sd3(path: str | Path, **overrides) -> MaskControlMMDiT:
    """Our model with SD3/SD3.5 weights on the text and image streams; `overrides` set control etc."""
    from todsynth.io import read_json

    folder = _transformer_dir(Path(path))
    raw = read_json(folder / "config.json")
    if not isinstance(raw, dict) or "num_attention_heads" not in raw:
        raise CheckpointError(
            "not an SD3Transformer2DModel config",
            path=folder / "config.json",
            fix="give a diffusers SD3 pipeline folder or its transformer/ subfolder",
        )
    try:
        cfg = config_from_sd3(raw, **overrides)
    except CheckpointError as e:
        raise CheckpointError(e.problem, path=folder / "config.json", fix=e.fix) from None
    model = MaskControlMMDiT(cfg)
    state = _load_sd3_state(folder)
    try:
        mapped = convert_sd3_state_dict(state, cfg)
    except KeyError as e:
        raise CheckpointError(
            f"weights lack {e.args[0]!r} required by its config",
            path=folder,
            fix="the folder's config.json and safetensors do not belong together",
        ) from None
    own = model.state_dict()
    bad = sorted(k for k, v in mapped.items() if k not in own or own[k].shape != v.shape)
    if bad:
        raise CheckpointError(f"weights do not fit the config: {bad[:3]}", path=folder)
    model.load_state_dict(mapped, strict=False)
    model.copy_image_stream_to_mask_stream()
    return model
