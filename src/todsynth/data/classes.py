"""Class definitions: names, ignore index, optional palette and ignore colours for colour-coded masks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from todsynth.errors import DataError

IGNORE_INDEX = 255
MAX_LABEL = 65535  # the largest value a 16-bit mask holds
YAML_BOOLEAN_WORDS = "yes/no/on/off/true/false"

LOVEDA_NAMES = ("background", "building", "road", "water", "barren", "forest", "agriculture")
# LoveDA's conventional colour map (used for previews and palette masks).
LOVEDA_PALETTE = (
    (255, 255, 255),
    (255, 0, 0),
    (255, 255, 0),
    (0, 0, 255),
    (159, 129, 183),
    (0, 255, 0),
    (255, 195, 128),
)


@dataclass(frozen=True)
class ClassSpec:
    """The label space of a dataset. Labels are 0..n-1; `ignore_index` marks no-data pixels.

    `ignore_colors` are mask colours (unlabelled areas) read as the ignore index; they need a palette.
    """

    names: tuple[str, ...]
    ignore_index: int = IGNORE_INDEX
    palette: tuple[tuple[int, int, int], ...] | None = field(default=None)
    ignore_colors: tuple[tuple[int, int, int], ...] = ()

    def __post_init__(self) -> None:
        if len(self.names) == 0:
            raise DataError("class list is empty", fix="name at least one class")
        if len(set(self.names)) != len(self.names):
            raise DataError(f"duplicate class names in {list(self.names)}", fix="give every class its own name")
        if self.palette is not None and len(self.palette) != len(self.names):
            raise DataError(
                f"palette has {len(self.palette)} colours for {len(self.names)} classes",
                fix="give one [r, g, b] colour per class",
            )
        if 0 <= self.ignore_index < len(self.names):
            raise DataError(
                f"ignore index {self.ignore_index} collides with a class label "
                f"({len(self.names)} classes use 0..{len(self.names) - 1})",
                fix=_free_ignore_fix(len(self.names)),
            )
        if self.ignore_colors and self.palette is None:
            raise DataError(
                "'ignore_colors' is given but no 'palette': colours map to classes only through a palette",
                fix="add 'palette' (one [r, g, b] per class) or remove 'ignore_colors'",
            )
        both = sorted(set(self.ignore_colors) & set(self.palette or ()))
        if both:
            raise DataError(
                f"colour(s) {[list(c) for c in both]} are both in 'palette' and in 'ignore_colors'",
                fix="keep each colour in one of the two lists",
            )

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict:
        """The classes.yaml mapping (ignore_colors only when there are some, so older readers stay valid)."""
        d = {
            "names": list(self.names),
            "ignore_index": self.ignore_index,
            "palette": None if self.palette is None else [list(c) for c in self.palette],
        }
        if self.ignore_colors:
            d["ignore_colors"] = [list(c) for c in self.ignore_colors]
        return d

    @classmethod
    def from_dict(cls, d: dict, path: str | Path | None = None) -> ClassSpec:
        """Build from a `classes.yaml`-style mapping; `path` names the file in errors.

        The class list is `names:` or, as mmseg and torchgeo users write it, `classes:` (one of the two).
        """
        if isinstance(d, dict) and "names" in d and "classes" in d:
            raise DataError(
                "both 'names' and 'classes' are given; they are the same list",
                path=path,
                fix="keep one of them: 'names: [...]' (or 'classes: [...]')",
            )
        if not isinstance(d, dict) or not ("names" in d or "classes" in d):
            raise DataError(
                "expected a mapping with a 'names' list (or 'classes')",
                path=path,
                fix="write e.g. 'names: [background, building]'",
            )
        key = "names" if "names" in d else "classes"
        names = d[key]
        if isinstance(names, dict):
            raise DataError(
                f"'{key}' is a mapping; todsynth wants the class names as a list in label order",
                path=path,
                fix=f"write e.g. '{key}: [background, building]' (label 0 first)",
            )
        if isinstance(names, list):
            _check_name_types(names, path, key)
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise DataError(f"'{key}' must be a list of non-empty strings", path=path)
        if "ignore_index" not in d and IGNORE_INDEX < len(names):
            raise DataError(
                f"the default ignore index {IGNORE_INDEX} collides with a class label "
                f"({len(names)} classes use 0..{len(names) - 1})",
                path=path,
                fix=f"set 'ignore_index' in the classes file: {_free_ignore_fix(len(names))}",
            )
        ignore = d.get("ignore_index", IGNORE_INDEX)
        if not isinstance(ignore, int) or isinstance(ignore, bool) or not 0 <= ignore <= MAX_LABEL:
            raise DataError(f"'ignore_index' must be an integer in 0..{MAX_LABEL}, got {ignore!r}", path=path)
        palette = d.get("palette")
        if palette is not None:
            ok = isinstance(palette, list) and all(
                isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                for c in palette
            )
            if not ok:
                raise DataError("'palette' must be a list of [r, g, b] integer triples", path=path)
            palette = tuple(tuple(c) for c in palette)
        ignore_colors = _colour_list(d.get("ignore_colors", []), "ignore_colors", path)
        try:
            return cls(tuple(names), ignore, palette, ignore_colors)
        except DataError as e:
            raise DataError(e.problem, path=path, fix=e.fix) from None


def _free_ignore_index(num_classes: int) -> int | None:
    """An ignore index no label of `num_classes` classes takes: 255 (fits 8-bit masks), else 65535 (16-bit)."""
    if num_classes <= IGNORE_INDEX:
        return IGNORE_INDEX
    return MAX_LABEL if num_classes <= MAX_LABEL else None


def _free_ignore_fix(num_classes: int) -> str:
    """What to do when the ignore index is a class label: a value that does not collide."""
    free = _free_ignore_index(num_classes)
    if free is None:
        return f"use at most {MAX_LABEL} classes: masks hold values up to {MAX_LABEL}"
    return f"use an ignore_index outside 0..{num_classes - 1}, e.g. {free}"


def _colour_list(value: object, key: str, path: str | Path | None) -> tuple[tuple[int, int, int], ...]:
    """A list of distinct [r, g, b] 0..255 triples from YAML, or a DataError naming `key`."""
    if not (
        isinstance(value, list)
        and all(
            isinstance(c, list)
            and len(c) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)
            for c in value
        )
    ):
        raise DataError(
            f"'{key}' must be a list of [r, g, b] integer triples (0..255), got {value!r}",
            path=path,
            fix=f"e.g. '{key}: [[128, 128, 128], [0, 0, 0]]'",
        )
    colours = tuple(tuple(c) for c in value)
    if len(set(colours)) != len(colours):
        raise DataError(f"'{key}' lists a colour twice", path=path, fix="list every colour once")
    return colours


def _check_name_types(names: list, path: str | Path | None, key: str = "names") -> None:
    """Raise DataError naming class names YAML read as booleans, numbers or null instead of strings."""
    flags = [i for i, n in enumerate(names) if isinstance(n, bool)]
    if flags:
        raise DataError(
            f"'{key}' entries {flags} (0-based) were read by YAML as booleans "
            f"{[names[i] for i in flags]}: unquoted {YAML_BOOLEAN_WORDS} are booleans in YAML",
            path=path,
            fix=f'quote them, e.g. {key}: ["no", "on", "off"]',
        )
    other = [i for i, n in enumerate(names) if not isinstance(n, str)]
    if other:
        raise DataError(
            f"'{key}' entries {other} (0-based) were read by YAML as "
            f"{[type(names[i]).__name__ for i in other]}, not strings",
            path=path,
            fix=f'quote them, e.g. {key}: ["1", "2", "null"]',
        )


LOVEDA = ClassSpec(LOVEDA_NAMES, IGNORE_INDEX, LOVEDA_PALETTE)


def class_difference(
    ours: list[str] | tuple[str, ...] | int, theirs: list[str] | tuple[str, ...] | int, shown: int = 5
) -> str:
    """`ours` (class names, or a count) described against `theirs`: the count, and at most `shown` names (those
    not in `theirs` first) when the counts differ; the whole list when they are equal in number (order differs)."""
    if isinstance(ours, int):
        return f"{ours} classes"
    count = len(theirs) if not isinstance(theirs, int) else theirs
    if len(ours) == count and len(ours) <= 2 * shown:
        return str(list(ours))
    other = set() if isinstance(theirs, int) else set(theirs)
    names = [n for n in ours if n not in other] + [n for n in ours if n in other]
    more = f", … {len(ours) - shown} more" if len(ours) > shown else ""
    return f"{len(ours)} classes ({', '.join(map(repr, names[:shown]))}{more})"
