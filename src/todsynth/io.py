"""Crash-safe file writing (temp name + rename) and safetensors-only weight loading."""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from todsynth.errors import CheckpointError, TodsynthError

REFUSED_WEIGHT_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    Readers never see a half-written file: either the old file or the complete new one exists.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise TodsynthError(
            f"cannot write here: {e.strerror}", path=path.parent, fix="choose a writable output folder"
        ) from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and writers that replace the file (safetensors) do too: finished files get the
        # mode the umask gives, like any other file
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise TodsynthError(
            f"writing failed: {e.strerror}", path=path, fix="check free disk space and permissions"
        ) from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Write a JSON file atomically (indented, keys in insertion order)."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, turning a missing or corrupt file into a TodsynthError that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise TodsynthError("file not found", path=path, fix="check the path") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TodsynthError(f"not valid JSON: {e}", path=path, fix="delete or regenerate it") from e


def save_weights(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors, atomically."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as e:
            raise _as_os_error(e) from e


def _as_os_error(e: Exception) -> Exception:
    """The OSError inside a safetensors I/O failure ('... (os error 28)'), so it is reported like any write failure."""
    found = re.search(r"\(os error (\d+)\)", str(e))
    if found is None:
        return e
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


def _weights_file(path: str | Path) -> Path:
    """`path` as a Path, refusing pickle formats and missing files with a CheckpointError naming it."""
    path = Path(path)
    if path.suffix.lower() in REFUSED_WEIGHT_SUFFIXES:
        raise CheckpointError(
            f"'{path.suffix}' is a pickle format, which todsynth never loads",
            path=path,
            fix="convert it to .safetensors",
        )
    if not path.is_file():
        raise CheckpointError(
            "weight file not found", path=path, fix="check the path (weights are read from .safetensors files only)"
        )
    return path


def load_weights(path: str | Path) -> dict:
    """Load a safetensors state dict; pickle formats are refused, corrupt files named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _weights_file(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"not a readable safetensors file: {e}", path=path, fix="re-save the weights with safetensors"
        ) from e


def weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header (no tensor data is loaded)."""
    from safetensors import SafetensorError, safe_open

    path = _weights_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"not a readable safetensors file: {e}", path=path, fix="re-save the weights with safetensors"
        ) from e
