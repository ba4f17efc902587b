"""The one sample type every reader returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    """One labelled tile. `image` is HxWxC samples in the file's dtype (HxWx3 uint8 RGB for 8-bit data; None for
    label-only layouts), made model input by `todsynth.data.bands.image_tensor`; `label` is HxW int64 with values
    in 0..C-1 or the ignore index; `nodata` marks HxW image pixels without a measurement (or is None)."""

    image: np.ndarray | None
    label: np.ndarray
    prompt: str
    id: str
    nodata: np.ndarray | None = None
