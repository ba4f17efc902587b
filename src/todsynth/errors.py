"""The project's own error types: every expected failure is one of these, with a file and a fix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class TodsynthError(Exception):
    """Base class: a problem the user can fix. The CLI prints it without a traceback and exits 2."""

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        self.path = None if path is None else Path(path)
        self.problem = message
        self.fix = fix
        text = f"{self.path}: {message}" if self.path is not None else message
        if fix:
            text += f" ({fix})"
        super().__init__(text)


class DataError(TodsynthError):
    """A dataset file or layout is unusable."""


MAX_LISTED = 20


class DatasetProblems(DataError):
    """Several data problems found by validation, reported together."""

    def __init__(self, root: str | Path, problems: Sequence[TodsynthError]):
        self.problems = problems
        shown = problems[:MAX_LISTED]
        lines = "\n".join(f"  - {p}" for p in shown)
        more = f"\n  … and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        super().__init__(
            f"{len(problems)} problem(s) found:\n{lines}{more}",
            path=root,
            fix="run `todsynth data check` for the full list" if more else None,
        )


class ConfigError(TodsynthError):
    """A configuration value or file is invalid."""


class CheckpointError(TodsynthError):
    """A checkpoint is missing, corrupt, in a refused format, or from another model configuration."""
