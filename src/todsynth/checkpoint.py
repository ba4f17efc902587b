"""Model files without pickle: optimizer moments as flat tensors keyed by parameter name (so any accelerate layout
reads them), models built on the meta device and checked against their weights' header before loading (the
resumable run state itself: todsynth.runs)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.overrides import TorchFunctionMode

from todsynth.errors import CheckpointError
from todsynth.io import load_weights, weight_shapes

UNSTORED_BUDGET = 256 * 2**20  # bytes of buffers not in the weights (e.g. position tables) always allowed
M = TypeVar("M", bound=nn.Module)
OPTIM_PREFIX = "optim."


def optimizer_state(prepared: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Full optimizer state as flat tensors optim.<param name>.<key> and its param groups; call on all ranks."""
    raw = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch optimizer
    full = get_optimizer_state_dict(prepared, raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tensors = {
        f"{OPTIM_PREFIX}{name}.{key}": (v if isinstance(v, torch.Tensor) else torch.tensor(v))
        for name, state in full.get("state", {}).items()
        for key, v in state.items()
    }
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in full.get("param_groups", [])]
    return tensors, groups


def load_optimizer_state(prepared: nn.Module, optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """Restore what `optimizer_state` wrote, on every rank (each reads the full state and keeps its part)."""
    raw = getattr(optimizer, "optimizer", optimizer)
    state: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(OPTIM_PREFIX):
            param, key = name[len(OPTIM_PREFIX) :].rsplit(".", 1)
            state.setdefault(param, {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    set_optimizer_state_dict(
        prepared, raw, {"state": state, "param_groups": groups}, options=StateDictOptions(full_state_dict=True)
    )


class _ValuesOnCPU(TorchFunctionMode):
    """Inside `torch.device("meta")`: the factories whose values model code reads back stay on the CPU.

    smp's MiT encoder calls .item() on a torch.linspace, which meta tensors cannot answer; such small
    tensors made from Python numbers stay on the CPU, every other factory (weights, buffers) makes meta tensors.
    """

    VALUE_FACTORIES = frozenset(
        {torch.linspace, torch.logspace, torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor}
    )

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        """Send the value factories to the CPU; the meta device context below handles the rest."""
        kwargs = dict(kwargs or {})
        if func in self.VALUE_FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def build_on_meta(build: Callable[[], M]) -> M:
    """Run `build` with its weights and buffers on the meta device: the model's shapes, no memory for them."""
    with torch.device("meta"), _ValuesOnCPU():
        return build()


def check_against_header(model: nn.Module, weights_path: str | Path, config_path: str | Path) -> None:
    """Refuse, naming `config_path`, a model (built on meta from it) whose tensors differ from the weights' header.

    Also refuses buffers the weights do not hold (e.g. a position table) that would need more memory than
    the weights themselves and UNSTORED_BUDGET, since their sizes come from the config alone.
    """
    weights_path = Path(weights_path)
    found = weight_shapes(weights_path)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: config {list(expected[k])} vs weights {list(found[k])}"
        for k in sorted(set(expected) & set(found))
        if expected[k] != found[k]
    ]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{label}: {', '.join(items[:3])}{' …' if len(items) > 3 else ''}"
            for label, items in (
                ("shape mismatch", shapes),
                ("not in the weights", missing),
                ("not in the config's model", unexpected),
            )
            if items
        )
        raise CheckpointError(
            f"the sizes it gives do not match the weights in {weights_path} ({detail})",
            path=config_path,
            fix="use the config.json saved with these weights",
        )
    unstored = {name: b.numel() * b.element_size() for name, b in model.named_buffers() if name not in expected}
    limit = max(weights_path.stat().st_size, UNSTORED_BUDGET)
    if sum(unstored.values()) > limit:
        biggest = max(unstored, key=unstored.__getitem__)
        raise CheckpointError(
            f"the sizes it gives need {sum(unstored.values()) / 2**30:.1f} GiB of tensors the "
            f"weights do not hold (e.g. {biggest} {list(model.get_buffer(biggest).shape)})",
            path=config_path,
            fix="use the config.json saved with these weights",
        )


def load_pretrained(build: Callable[[], M], weights_path: str | Path, config_path: str | Path) -> M:
    """Build a model from its config and load its weights, checking the config against the weights' header first.

    The config's sizes are compared on the meta device, so a config.json edited to huge sizes is refused
    before its model is allocated.
    """
    check_against_header(build_on_meta(build), weights_path, config_path)
    model = build()
    model.load_state_dict(load_weights(weights_path))
    return model
