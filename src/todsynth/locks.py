"""Lock files holding their owner (host:pid): synthesis claims and the one-run-per-folder lock of the trainers.

A lock appears with its owner already in it (hard link of a written temp file, or O_EXCL create where the
file system has no hard links), so a process starting meanwhile never sees an empty lock and takes it for a
dead one. A lock whose process no longer runs on this host is stale; another host's locks are presumed alive.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from todsynth.errors import ConfigError, TodsynthError

RUN_LOCK = "run.lock"
# What shows that a run progressed or finished in a folder (model snapshots included: a run killed before its
# first full state is refused too, not silently mixed with a new one)
RUN_MARKERS = ("model", "results.json", "checkpoint/state.safetensors", "checkpoint.old", "checkpoints")


def owner_tag() -> str:
    """This process as '<host>:<pid>', the content of its lock files."""
    return f"{socket.gethostname()}:{os.getpid()}"


def create_exclusive(path: Path, owner: str) -> bool:
    """Atomically create the lock file `path` holding `owner`; False if it already exists."""
    data = owner.encode()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # no hard links on this file system: O_EXCL create, then write
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def owner_alive(lock: Path) -> bool:
    """True if the process named in `lock` may still run (another host's, or an unreadable owner, counts as alive)."""
    try:
        return process_alive(lock.read_text())
    except OSError:  # gone meanwhile, or unreadable: not known to be dead
        return True


def process_alive(owner: str) -> bool:
    """True if the process '<host>:<pid>' may still run; False for a dead pid on this host or a garbled owner."""
    try:
        host, pid = owner.rsplit(":", 1)
        if host != socket.gethostname():
            return True
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except OSError:  # PermissionError: the pid runs under another user
        return True
    return True


def read_owner(lock: Path) -> str:
    """The owner written in `lock`, or '?' when it cannot be read."""
    try:
        return lock.read_text().strip() or "?"
    except OSError:
        return "?"


def check_run_folder(
    folder: Path, resume: bool | Literal["auto"], overwrite: bool, outputs: Iterable[str], remove: bool = True
) -> None:
    """Refuse to start a new run over an earlier one unless asked: with `overwrite`, its `outputs` are removed.

    Called with the folder's run lock held. A folder holding a checkpoint or a finished model is continued
    (resume) or replaced (overwrite), never silently overwritten; `remove=False` only checks (non-main processes).
    """
    if overwrite and resume is not False:
        raise ConfigError(
            "overwrite and resume exclude each other",
            fix="give --resume to continue the run in --out, or --overwrite to replace it",
        )
    found = [name for name in RUN_MARKERS if (folder / name).exists()]  # a run was checkpointed or finished there
    if found and resume is False and not overwrite:
        raise ConfigError(
            f"the folder holds an earlier run ({', '.join(found)}), which a new run would overwrite",
            path=folder,
            fix="continue it with --resume, replace it with --overwrite, or choose another --out",
        )
    if overwrite and remove:
        for name in outputs:
            path = folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(folder: str | Path, enabled: bool = True) -> Iterator[Path]:
    """Hold `folder/run.lock` for the life of a training run; a second run on the folder is refused.

    The folder is created if needed; a lock left by a dead process on this host is taken over. The lock is
    released on any exit (errors, Ctrl-C), and folders created here are removed again if the run left them empty.
    `enabled=False` (non-main processes of a multi-process run) only yields the folder.
    """
    folder = Path(folder)
    if not enabled:
        yield folder
        return
    created = _make_folder(folder)
    lock = folder / RUN_LOCK
    try:
        _acquire(lock)
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield folder
    finally:
        if read_owner(lock) == owner_tag():
            lock.unlink(missing_ok=True)
        _remove_empty(created)


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` and missing parents; returns the folders created, deepest first."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TodsynthError(
            f"cannot create the output folder: {e.strerror}", path=folder, fix="choose a writable output folder"
        ) from None
    return missing


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders this lock created if nothing was written into them."""
    for path in created:
        try:
            path.rmdir()
        except OSError:
            return


def _acquire(lock: Path) -> None:
    """Create `lock` for this process, taking over a stale one; refuse while a live process holds it."""
    owner = owner_tag()
    for attempt in range(3):
        try:
            if create_exclusive(lock, owner):
                return
        except OSError as e:
            raise TodsynthError(
                f"cannot write here: {e.strerror}", path=lock.parent, fix="choose a writable output folder"
            ) from None
        holder = read_owner(lock)
        if process_alive(holder):
            break
        _take_over(lock, holder)
        time.sleep(0.05 * attempt)
    holder = read_owner(lock)
    raise TodsynthError(
        f"another run is using this folder (lock held by process {holder})",
        path=lock,
        fix=f"wait for it to finish, or use another --out; if process {holder} no longer runs, delete {lock}",
    )


def _take_over(lock: Path, stale: str) -> None:
    """Remove `lock` if it still holds the dead owner `stale`.

    Only a holder of the guard lock removes a stale lock, so two runs starting together never both remove it
    (one of them would otherwise delete the lock the other had just created).
    """
    guard = lock.with_name(lock.name + ".takeover")
    if not create_exclusive(guard, owner_tag()):
        if not owner_alive(guard):
            guard.unlink(missing_ok=True)  # a process died while taking over: its guard is stale too
        return
    try:
        if read_owner(lock) == stale:
            lock.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)
