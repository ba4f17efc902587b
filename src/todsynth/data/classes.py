"""Class definitions: names, ignore index and optional palette for colour-coded masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from todsynth.errors import DataError

IGNORE_INDEX = 255

LOVEDA_NAMES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
# LoveDA's conventional colour map (used for previews and palette masks).
LOVEDA_PALETTE = (
    (255, 255, 255), (255, 0, 0), (255, 255, 0), (0, 0, 255),
    (159, 129, 183), (0, 255, 0), (255, 195, 128),
)


@dataclass(frozen=True)
class ClassSpec:
    """The label space of a dataset. Labels are 0..n-1; `ignore_index` marks no-data pixels."""

    names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX
    palette: tuple[tuple[int, int, int], ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if len(self.names) == 0:
            raise DataError("class list is empty", fix="name at least one class")
        if len(set(self.names)) != len(self.names):
            raise DataError(f"duplicate class names in {list(self.names)}", fix="give every class its own name")
        if self.palette is not None and len(self.palette) != len(self.names):
            raise DataError(f"palette has {len(self.palette)} colours for {len(self.names)} classes",
                            fix="give one [r, g, b] colour per class")
        if 0 <= self.ignore_index < len(self.names):
            raise DataError(f"ignore index {self.ignore_index} collides with a class label",
                            fix=f"use an ignore_index outside 0..{len(self.names) - 1}, e.g. 255")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict:
        return {"names": list(self.names), "ignore_index": self.ignore_index,
                "palette": None if self.palette is None else [list(c) for c in self.palette]}

    @classmethod
    def from_dict(cls, d: dict, path: str | Path | None = None) -> "ClassSpec":
        """Build from a `classes.yaml`-style mapping; `path` names the file in errors."""
        if not isinstance(d, dict) or "names" not in d:
            raise DataError("expected a mapping with a 'names' list", path=path,
                            fix="write e.g. 'names: [background, building]'")
        names = d["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise DataError("'names' must be a list of non-empty strings", path=path)
        ignore = d.get("ignore_index", IGNORE_INDEX)
        if not isinstance(ignore, int) or isinstance(ignore, bool) or not 0 <= ignore <= 65535:
            raise DataError(f"'ignore_index' must be an integer in 0..65535, got {ignore!r}", path=path)
        palette = d.get("palette")
        if palette is not None:
            ok = isinstance(palette, list) and all(
                isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                for c in palette)
            if not ok:
                raise DataError("'palette' must be a list of [r, g, b] integer triples", path=path)
            palette = tuple(tuple(c) for c in palette)
        try:
            return cls(tuple(names), ignore, palette)
        except DataError as e:
            raise DataError(e.problem, path=path, fix=e.fix) from None


LOVEDA = ClassSpec(LOVEDA_NAMES, IGNORE_INDEX, LOVEDA_PALETTE)
