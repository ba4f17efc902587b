"""Mask-controlled MM-DiT: text, image and mask token streams in one joint ("triple") attention.

Follows Stable Diffusion 3's MM-DiT (arXiv 2403.03206) block for block, so SD3/SD3.5 weights map onto
the text and image streams (see `sd3.py`). Each stream has its own adaLN-Zero modulation, fused QKV
(with optional q/k RMSNorm), output projection and MLP; one `scaled_dot_product_attention` runs over
the concatenated [text | image | mask] tokens. Control schemes (TODSynth, arXiv 2512.16740):

- ``triple``:  the mask stream has its own weights (initialised as a copy of the image stream);
- ``siamese``: mask tokens run through the image stream's weights;
- ``adapter``: no mask tokens in attention; a side branch adds mask features to the image tokens
  through zero-initialised projections (ControlNet-style: at init the model equals ``none``);
- ``none``:    text-only, for ablations and for the SD3 equivalence test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from todsynth.config import require, setting
from todsynth.errors import CheckpointError

Control = Literal["triple", "siamese", "adapter", "none"]
MaskEncoding = Literal["onehot", "rgb"]
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class MMDiTArch:
    """The generator's architecture as a run chooses it (MMDiTConfig adds what follows from the data and the
    encoders); `PRESETS` holds the named sizes (`model: sd3.5-medium`)."""

    PRESETS: ClassVar[dict[str, MMDiTArch]]
    patch_size: int = setting(2, help="latent cells per token side")
    num_layers: int = setting(4, help="joint transformer blocks")
    num_heads: int = setting(4, help="attention heads (width = num_heads x head_dim)")
    head_dim: int = setting(32, help="width of one attention head (a multiple of 4)")
    mlp_ratio: float = setting(4.0, help="feed-forward width / model width")
    qk_norm: bool = setting(True, help="RMSNorm on q and k (SD3.5)")
    dual_attention_layers: tuple[int, ...] = setting(
        (), help="blocks with SD3.5's extra per-stream self-attention (MMDiT-X)"
    )
    control: Control = setting(
        "triple",
        help="how masks steer the image stream: a third stream (triple), the "
        "image stream's weights (siamese), a side adapter, or none",
    )
    mask_encoding: MaskEncoding = setting("onehot", help="one-hot label map, or the reference's RGB-coded mask latent")

    def validate(self) -> None:
        for name in ("patch_size", "num_layers", "num_heads", "head_dim"):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(self.head_dim % 4 == 0, "head_dim must be a multiple of 4 (2-D sin-cos positions)")
        require(math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0, "mlp_ratio must be > 0")
        require(
            all(0 <= i < self.num_layers for i in self.dual_attention_layers),
            "dual_attention_layers must index existing layers",
        )


# Generator sizes by name, in the style of DiT's model registry; SD3.5's are diffusers' transformer configs.
MMDiTArch.PRESETS = {
    "demo": MMDiTArch(patch_size=4),  # the experiment cells' default (the demo, paper-tables, foundation)
    "sd3.5-medium": MMDiTArch(
        patch_size=2, num_layers=24, num_heads=24, head_dim=64, dual_attention_layers=tuple(range(13))
    ),
    "sd3.5-large": MMDiTArch(patch_size=2, num_layers=38, num_heads=38, head_dim=64),
}


@dataclass
class MMDiTConfig(MMDiTArch):
    """Architecture of the generator: the chosen one and what the data and encoders fix. Sizes follow SD3's names
    where one exists."""

    in_channels: int = 3  # latent channels (3 for the pixel autoencoder, 16 for SD3's VAE)
    out_channels: int | None = None
    sample_size: int = 32  # latent side used to scale the position grid (SD3: 128)
    pos_embed_max_size: int = 64  # position table side, cropped at the centre for smaller inputs
    joint_attention_dim: int = 384  # width of the text encoder's token embeddings
    pooled_projection_dim: int = 384  # width of the pooled text embedding
    num_classes: int = 7
    ignore_index: int = 255
    mask_downscale: int = 1  # pixels per latent cell (the autoencoder's downscale factor)
    mask_channels: int | None = None  # latent channels of an RGB-coded mask (defaults to in_channels)

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    def validate(self) -> None:
        super().validate()
        for name in (
            "in_channels",
            "sample_size",
            "pos_embed_max_size",
            "joint_attention_dim",
            "pooled_projection_dim",
            "num_classes",
            "mask_downscale",
        ):
            require(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        require(
            self.sample_size // self.patch_size <= self.pos_embed_max_size,
            f"sample_size {self.sample_size} gives a {self.sample_size // self.patch_size}-token grid side, more "
            f"than the position table holds (pos_embed_max_size {self.pos_embed_max_size})",
        )
        require(self.ignore_index >= 0, f"ignore_index must be >= 0, got {self.ignore_index}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dual_attention_layers"] = list(self.dual_attention_layers)
        return d


# ---------------------------------------------------------------------------------------------
# Embeddings


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of timesteps t (SD3 feeds sigma·1000), as cos|sin: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_2d(dim: int, grid_size: int, base_size: int) -> Tensor:
    """SD3's 2-D sin-cos position table for a grid_size² grid scaled to base_size: [grid², dim]."""
    return sincos_window(dim, grid_size, base_size, 0, 0, grid_size, grid_size)


def sincos_window(dim: int, grid_size: int, base_size: int, top: int, left: int, h: int, w: int) -> Tensor:
    """Rows top..top+h, columns left..left+w of `sincos_2d(dim, grid_size, base_size)`, bit for bit, computed
    for that window alone (an SD3.5 table is 192² positions, 864 MiB at width 1536 in fp32): [h·w, dim]."""
    step = grid_size / base_size
    ys = torch.arange(top, top + h, dtype=torch.float32) / step
    xs = torch.arange(left, left + w, dtype=torch.float32) / step
    ys, xs = torch.meshgrid(ys, xs, indexing="ij")

    def one_axis(p: Tensor) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
        out = p.reshape(-1).double()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_axis(xs), one_axis(ys)], dim=1).float()


class MLP(nn.Sequential):
    """Transformer feed-forward: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, dim: int, ratio: float = 4.0):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class CondEmbedder(nn.Module):
    """c = MLP(timestep embedding) + MLP(pooled text): the vector every adaLN is modulated by."""

    def __init__(self, dim: int, pooled_dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.time = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text = nn.Sequential(nn.Linear(pooled_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor, pooled: Tensor) -> Tensor:
        temb = timestep_embedding(t * 1000.0, self.freq_dim).to(pooled.dtype)
        return self.time(temb) + self.text(pooled)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x·(1 + scale) + shift per sample (scale, shift [B, D]), as one fused op."""
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])


def gated(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """Gated residual x + gate·y per sample (gate [B, D]), as one fused op."""
    return torch.addcmul(x, gate[:, None], y)


MATMUL_ATTENTION_MAX = 1 << 26  # largest B·H·Nq·Nk score matrix (128 MiB in bf16) for the two-matmul CPU path


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q·kᵀ/√d)·v over [B, H, N, d].

    On CPU in bf16 the plain two-matmul form (bf16 matrix units) trains 2-3× faster than the fused flash
    kernel, whose backward is slow there; elsewhere, and for large score matrices, the fused kernel runs.
    """
    b, h, nq, d = q.shape
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and b * h * nq * k.shape[2] <= MATMUL_ATTENTION_MAX:
        return torch.softmax((q * d**-0.5) @ k.transpose(-2, -1), dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


def rms_norm(x: Tensor, norm: nn.RMSNorm) -> Tensor:
    """`norm(x)` with its weight in x's dtype: under bf16 autocast the fused kernel runs (not the slower
    composite a dtype mismatch falls back to, with a warning per call)."""
    return F.rms_norm(x, norm.normalized_shape, norm.weight.to(x.dtype), norm.eps)


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters (the adaLN supplies scale and shift)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


# ---------------------------------------------------------------------------------------------
# One stream's weights in one block


class Stream(nn.Module):
    """One stream's parameters in one block: adaLN, fused QKV (+ q/k RMSNorm), out projection, MLP.

    `pre_only` (the text/mask stream of the last block) keeps only adaLN (scale, shift) and QKV, since
    its outputs are never read. `dual` adds SD3.5's second, stream-internal self-attention.
    """

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, pre_only: bool = False, dual: bool = False
    ):
        super().__init__()
        self.heads, self.pre_only, self.dual = heads, pre_only, dual
        head_dim = dim // heads
        n_mod = 2 if pre_only else (9 if dual else 6)
        self.ada = nn.Linear(dim, n_mod * dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
        if not pre_only:
            self.out = nn.Linear(dim, dim)
            self.mlp = MLP(dim, mlp_ratio)
        if dual:
            self.qkv2 = nn.Linear(dim, 3 * dim)
            self.q_norm2 = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
            self.k_norm2 = nn.RMSNorm(head_dim, eps=1e-6) if qk_norm else None
            self.out2 = nn.Linear(dim, dim)

    def modulation(self, c: Tensor) -> list[Tensor]:
        """adaLN parameters from c: (scale, shift) if pre_only, else shift/scale/gate for msa and mlp (+msa2)."""
        return list(self.ada(F.silu(c)).chunk(self.ada.out_features // self.ada.in_features, dim=1))

    def split_heads(self, qkv: Tensor, q_norm: nn.RMSNorm | None, k_norm: nn.RMSNorm | None) -> tuple[Tensor, ...]:
        """[B, N, 3D] -> q, k, v each [B, H, N, D/H], with q/k RMSNorm when enabled.

        Unbinding the q|k|v axis before moving heads forward lets backward stack the three gradients
        straight into qkv's [B, N, 3, H, D/H] layout (one copy, not a stack plus a reshape copy).
        """
        b, n, _ = qkv.shape
        q, k, v = (t.transpose(1, 2) for t in qkv.view(b, n, 3, self.heads, -1).unbind(2))
        if q_norm is not None and k_norm is not None:  # both or neither (qk_norm)
            q, k = rms_norm(q, q_norm), rms_norm(k, k_norm)
        return q, k, v


def self_attention(stream: Stream, h: Tensor, segments: int) -> Tensor:
    """SD3.5's MMDiT-X attention inside one stream; `segments` equal parts attend separately."""
    b, n, d = h.shape
    h = h.reshape(b * segments, n // segments, d)
    q, k, v = stream.split_heads(stream.qkv2(h), stream.q_norm2, stream.k_norm2)
    o = attention(q, k, v)
    return stream.out2(o.transpose(1, 2).reshape(b, n, d))


# ---------------------------------------------------------------------------------------------
# Joint block


@dataclass
class _Group:
    """Tokens that run through one Stream's weights in a block (siamese puts image+mask in one group)."""

    stream: Stream
    x: Tensor
    segments: int = 1
    queries: int = 0  # leading tokens that ask attention queries (those whose output is read)
    mod: list[Tensor] = field(default_factory=list)
    normed: Tensor = field(init=False)  # LN(x), shared by the joint and the dual attention; set before use


class JointBlock(nn.Module):
    """One MM-DiT block: per-stream adaLN and QKV, one attention over all tokens, per-stream out + MLP.

    Only tokens whose output is read ask queries: in the last block that is the image tokens alone
    (text and mask tokens there only supply keys and values, as in SD3's context_pre_only block).
    """

    def __init__(self, cfg: MMDiTConfig, last: bool, dual: bool):
        super().__init__()
        dim, heads, r, qk = cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm
        self.text = Stream(dim, heads, r, qk, pre_only=last)
        self.image = Stream(dim, heads, r, qk, dual=dual)
        self.mask = Stream(dim, heads, r, qk, pre_only=last, dual=dual) if cfg.control == "triple" else None

    def forward(
        self, txt: Tensor, img: Tensor, msk: Tensor | None, c: Tensor
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        n_img, last = img.shape[1], self.text.pre_only
        groups = [_Group(self.text, txt)]
        if msk is None:
            groups.append(_Group(self.image, img))
        elif self.mask is None:  # siamese: image weights for both, one matmul each
            groups.append(_Group(self.image, torch.cat([img, msk], dim=1), segments=2))
        else:  # triple
            groups += [_Group(self.image, img), _Group(self.mask, msk)]

        qs, ks, vs = [], [], []
        for g in groups:
            s = g.stream
            g.mod = s.modulation(c)
            g.queries = n_img if last and s is self.image else g.x.shape[1]
            if s.pre_only and s.q_norm is None:  # keys and values only; an unread q_norm would starve DDP
                g.queries = 0
            scale, shift = g.mod[:2] if s.pre_only else (g.mod[1], g.mod[0])
            g.normed = layer_norm(g.x)
            q, k, v = s.split_heads(s.qkv(modulate(g.normed, shift, scale)), s.q_norm, s.k_norm)
            if g.queries:
                qs.append(q[:, :, : g.queries])
            ks.append(k)
            vs.append(v)

        o = attention(torch.cat(qs, 2), torch.cat(ks, 2), torch.cat(vs, 2))  # [B, H, N_queries, D/H]
        outs = iter(o.split([g.queries for g in groups if g.queries], dim=2))
        res: list[Tensor | None] = []  # None for pre-only streams: their tokens end here
        for g in groups:
            attn = next(outs).transpose(1, 2).flatten(2) if g.queries else None  # [B, N_g, D]
            res.append(None if attn is None or g.stream.pre_only else self._residual(g, attn))
        img_res = res[1]
        assert img_res is not None  # the image stream is never pre-only
        if msk is None:
            return res[0], img_res, None
        if self.mask is None:
            return res[0], img_res[:, :n_img], None if last else img_res[:, n_img:]
        return res[0], img_res, res[2]

    @staticmethod
    def _residual(g: _Group, attn: Tensor) -> Tensor:
        """x + gate·out(attn) [+ gate2·attn2] + gate·MLP(modulated LN(x)), for the group's query tokens."""
        s, n, total = g.stream, g.queries, g.x.shape[1]
        x, normed = (g.x, g.normed) if n == total else (g.x[:, :n], g.normed[:, :n])
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = g.mod[:6]
        x = gated(x, gate_msa, s.out(attn))
        if s.dual:
            shift2, scale2, gate2 = g.mod[6:]
            x = gated(x, gate2, self_attention(s, modulate(normed, shift2, scale2), g.segments * n // total))
        return gated(x, gate_mlp, s.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp)))


# ---------------------------------------------------------------------------------------------
# Adapter branch (control = "adapter")


class AdapterBlock(nn.Module):
    """ControlNet-style side branch layer: adaLN-modulated MLP on mask tokens, zero-init output to image."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        self.ada = nn.Linear(dim, 3 * dim)
        self.mlp = MLP(dim, mlp_ratio)
        self.zero_proj = nn.Linear(dim, dim)

    def forward(self, m: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        shift, scale, gate = self.ada(F.silu(c)).chunk(3, dim=1)
        m = gated(m, gate, self.mlp(modulate(layer_norm(m), shift, scale)))
        return m, self.zero_proj(m)


# ---------------------------------------------------------------------------------------------
# The model


class MaskControlMMDiT(nn.Module):
    """SD3-style MM-DiT with a mask stream. forward(x_t, t, text, pooled, mask) -> velocity."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        config.validate()
        self.config = cfg = config
        dim, p = cfg.hidden_size, cfg.patch_size
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.patch_embed = nn.Conv2d(cfg.in_channels, dim, p, stride=p)
        self._positions: dict[tuple, Tensor] = {}  # per (grid, device): no buffer to allocate, move or broadcast
        self.cond_embed = CondEmbedder(dim, cfg.pooled_projection_dim)
        self.context_embed = nn.Linear(cfg.joint_attention_dim, dim)
        self.blocks = nn.ModuleList(
            JointBlock(cfg, last=i == cfg.num_layers - 1, dual=i in cfg.dual_attention_layers)
            for i in range(cfg.num_layers)
        )
        self.norm_out = nn.Linear(dim, 2 * dim)  # (scale, shift) for the final adaLN
        self.proj_out = nn.Linear(dim, p * p * self.out_channels)
        if cfg.control != "none":
            if cfg.mask_encoding == "onehot":
                k = p * cfg.mask_downscale
                self.mask_embed = nn.Conv2d(cfg.num_classes + 1, dim, k, stride=k)
            else:
                self.mask_embed = nn.Conv2d(cfg.mask_channels or cfg.in_channels, dim, p, stride=p)
        if cfg.control == "adapter":
            self.adapter = nn.ModuleList(AdapterBlock(dim, cfg.mlp_ratio) for _ in range(cfg.num_layers))
        self.gradient_checkpointing = False
        self.initialize_weights()

    # -- initialisation ------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        """DiT init: Xavier linears, zero adaLN (blocks start as identity), zero output layer.

        The mask stream (triple) starts as a copy of the image stream, so at step 0 triple == siamese;
        the adapter's output projections start at zero, so at step 0 adapter == none.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for conv in (self.patch_embed, getattr(self, "mask_embed", None)):
            if conv is not None:
                nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
        for m in self.modules():
            if isinstance(m, (Stream, AdapterBlock)):
                nn.init.zeros_(m.ada.weight)
                nn.init.zeros_(m.ada.bias)
            if isinstance(m, AdapterBlock):
                nn.init.zeros_(m.zero_proj.weight)
                nn.init.zeros_(m.zero_proj.bias)
        for layer in (self.norm_out, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for lin in self.cond_embed.time:
            if isinstance(lin, nn.Linear):
                nn.init.normal_(lin.weight, std=0.02)
        self.copy_image_stream_to_mask_stream()

    @torch.no_grad()
    def copy_image_stream_to_mask_stream(self) -> None:
        """Triple: initialise each block's mask stream from its image stream (shared tensors excluded)."""
        for blk in self.modules():
            if not isinstance(blk, JointBlock) or blk.mask is None:
                continue
            src = blk.image.state_dict()
            for k, v in blk.mask.state_dict().items():
                if k in src and src[k].shape == v.shape:
                    v.copy_(src[k])
                elif k.startswith("ada."):  # pre-only last block: (scale, shift) from the image's msa shift/scale
                    dim = self.config.hidden_size
                    shift, scale = src[k][:dim], src[k][dim : 2 * dim]
                    v.copy_(torch.cat([scale, shift], dim=0))

    # -- tokens ---------------------------------------------------------------------------------
    def positions(self, h: int, w: int, device: torch.device | str = "cpu") -> Tensor:
        """Centre crop of SD3's position table for an h×w token grid, computed for that grid and cached: [1, h·w, D]."""
        cfg = self.config
        size = cfg.pos_embed_max_size
        if h > size or w > size:
            raise ValueError(f"token grid {h}x{w} exceeds pos_embed_max_size {size}")
        key = (h, w, str(device))
        if key not in self._positions:
            top, left = (size - h) // 2, (size - w) // 2
            table = sincos_window(cfg.hidden_size, size, cfg.sample_size // cfg.patch_size, top, left, h, w)
            self._positions[key] = table[None].to(device)
        return self._positions[key]

    def embed_image(self, x: Tensor) -> Tensor:
        """Latent [B, C, H, W] -> tokens [B, (H/p)(W/p), D] with positions."""
        tokens = self.patch_embed(x)
        h, w = tokens.shape[-2:]
        return tokens.flatten(2).transpose(1, 2) + self.positions(h, w, tokens.device).to(tokens.dtype)

    def embed_mask(self, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        """Mask -> tokens on the image's grid. Long [B, H, W] labels (one-hot) or a float mask latent."""
        cfg = self.config
        if cfg.mask_encoding == "onehot":
            if mask.dtype.is_floating_point:
                raise ValueError("mask_encoding='onehot' expects a long label map [B, H, W]")
            idx = torch.where((mask >= 0) & (mask < cfg.num_classes), mask, cfg.num_classes)
            mask = F.one_hot(idx, cfg.num_classes + 1).permute(0, 3, 1, 2).to(self.patch_embed.weight.dtype)
        tokens = self.mask_embed(mask)
        if tuple(tokens.shape[-2:]) != grid:
            raise ValueError(f"mask grid {tuple(tokens.shape[-2:])} does not match image grid {grid}")
        return tokens.flatten(2).transpose(1, 2) + self.positions(*grid, device=tokens.device).to(tokens.dtype)

    def unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        """[B, h·w, p·p·C] -> [B, C, h·p, w·p]."""
        p, c = self.config.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, text: Tensor, pooled: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: latent [B, C, H, W]; t: sigma in [0, 1] [B]; text [B, L, Dt]; pooled [B, Dp];
        mask: label map [B, H·f, W·f] or mask latent [B, Cm, H, W]. Returns the velocity [B, C, H, W]."""
        cfg = self.config
        p = cfg.patch_size
        h, w = x.shape[-2] // p, x.shape[-1] // p
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"latent size {tuple(x.shape[-2:])} is not a multiple of patch size {p}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        img = self.embed_image(x)
        c = self.cond_embed(t, pooled)
        txt = self.context_embed(text)
        msk = None
        if cfg.control != "none":
            if mask is None:
                raise ValueError(f"control={cfg.control!r} needs a mask")
            msk = self.embed_mask(mask, (h, w))
        side = msk if cfg.control == "adapter" else None
        if cfg.control == "adapter":
            msk = None
        for i, blk in enumerate(self.blocks):
            if side is not None:
                side, residual = self.adapter[i](side, c)
                img = img + residual
            if self.gradient_checkpointing and torch.is_grad_enabled():
                txt, img, msk = torch.utils.checkpoint.checkpoint(blk, txt, img, msk, c, use_reentrant=False)
            else:
                txt, img, msk = blk(txt, img, msk, c)
        scale, shift = self.norm_out(F.silu(c)).chunk(2, dim=1)
        img = self.proj_out(modulate(layer_norm(img), shift, scale))
        return self.unpatchify(img, h, w)

    # -- parameter groups (freezing policy, LoRA targets) ---------------------------------------
    def stream_parameters(self, stream: str) -> list[tuple[str, nn.Parameter]]:
        """Named parameters of one group: 'text', 'image', 'mask' or 'cond' (timestep/pooled embedder)."""
        prefixes = {
            "text": ("context_embed.", "blocks.*.text."),
            "image": ("patch_embed.", "blocks.*.image.", "norm_out.", "proj_out."),
            "mask": ("mask_embed.", "blocks.*.mask.", "adapter."),
            "cond": ("cond_embed.",),
        }[stream]
        out = []
        for name, param in self.named_parameters():
            parts = name.split(".")
            generic = ".".join("*" if (i == 1 and parts[0] == "blocks") else s for i, s in enumerate(parts))
            if any(generic.startswith(pre) for pre in prefixes):
                out.append((name, param))
        return out

    def set_trainable(self, text: bool = False, image: bool = True, mask: bool = True, cond: bool = True) -> None:
        """Freezing policy per stream (paper's best: text frozen, image and mask trained)."""
        for group, flag in (("text", text), ("image", image), ("mask", mask), ("cond", cond)):
            for _, param in self.stream_parameters(group):
                param.requires_grad_(flag)

    # -- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """Write config.json and model.safetensors (atomically) into `directory`."""
        from todsynth.io import save_weights, write_json

        directory = Path(directory)
        write_json(directory / CONFIG_NAME, {"_class_name": type(self).__name__, **self.config.to_dict()})
        save_weights(directory / WEIGHTS_NAME, self.state_dict(), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> MaskControlMMDiT:
        """Load a model written by save_pretrained; a foreign or mismatching checkpoint is a CheckpointError.

        config.json is type-checked like any config and compared with the weights' header before the model
        is built, so its sizes cannot make the loader allocate more than the weights hold.
        """
        from todsynth.checkpoint import load_pretrained
        from todsynth.config import config_from_file
        from todsynth.io import read_json, weight_shapes

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        raw = read_json(config_path)
        if not isinstance(raw, dict) or raw.get("_class_name") != cls.__name__:
            raise CheckpointError(
                f"not a {cls.__name__} config",
                path=config_path,
                fix="point to a folder written by MaskControlMMDiT.save_pretrained",
            )
        config = config_from_file(
            MMDiTConfig,
            {k: v for k, v in raw.items() if k != "_class_name"},
            config_path,
            fix="use the config.json saved with these weights, or fix the setting",
        )
        tensors = len(weight_shapes(weights_path))
        if config.num_layers > tensors:  # each layer holds tensors; refused before looping over the layers
            raise CheckpointError(
                f"num_layers {config.num_layers} but the weights in {weights_path} hold only {tensors} tensors",
                path=config_path,
                fix="use the config.json saved with these weights",
            )
        return load_pretrained(lambda: cls(config), weights_path, config_path)


def load_state_strict(model: nn.Module, state: dict, path: Path) -> None:
    """load_state_dict(strict) that reports missing/unexpected/mis-shaped keys as a CheckpointError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{name}: {keys[:3]}{'…' if len(keys) > 3 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
            if keys
        )
        raise CheckpointError(
            f"weights do not match the model configuration ({detail})",
            path=path,
            fix="use the config.json saved with these weights",
        )
    model.load_state_dict(state)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
