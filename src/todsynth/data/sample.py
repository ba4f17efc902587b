"""The one sample type every reader returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    """One labelled tile. `image` is HxWx3 uint8 RGB (None for label-only layouts);
    `label` is HxW int64 with values in 0..C-1 or the ignore index."""

    image: np.ndarray | None
    label: np.ndarray
    prompt: str
    id: str
