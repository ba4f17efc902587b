"""Procedural toy land-cover tiles: LoveDA's seven classes drawn as miniature satellite imagery.

The project ships no downloaded data, so tests, demos and smoke runs use these tiles. A label layout
is drawn first (`generate_layout`), then any label map is rendered to RGB (`render_image`) with
class textures, cast shadows, scene illumination and sensor noise. Pure numpy; deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from todsynth.data.classes import IGNORE_INDEX, LOVEDA, ClassSpec
from todsynth.errors import ConfigError, DataError
from todsynth.io import atomic_path, write_text

TOY_CLASSES: ClassSpec = LOVEDA
DOMAINS = ("urban", "rural")
LAYOUTS = ("loveda", "folder")
MIN_SIZE = 16
MAX_SIZE = 4096
BACKGROUND, BUILDING, ROAD, WATER, BARREN, FOREST, AGRICULTURE = range(7)

Colour = tuple[float, float, float]
ROOF_COLOURS: tuple[Colour, ...] = (
    (0.56, 0.55, 0.53),
    (0.74, 0.73, 0.71),
    (0.62, 0.36, 0.30),
    (0.33, 0.33, 0.35),
    (0.45, 0.55, 0.66),
    (0.52, 0.45, 0.37),
)
ROOF_PROBS = (0.3, 0.2, 0.18, 0.12, 0.1, 0.1)
CROP_COLOURS: tuple[Colour, ...] = (
    (0.38, 0.52, 0.26),
    (0.50, 0.58, 0.34),
    (0.70, 0.64, 0.42),
    (0.24, 0.40, 0.19),
    (0.58, 0.49, 0.37),
    (0.50, 0.42, 0.32),
)
CROP_PROBS = (0.25, 0.17, 0.16, 0.14, 0.16, 0.12)
WATER_COLOURS: tuple[Colour, ...] = ((0.10, 0.18, 0.28), (0.12, 0.23, 0.25), (0.22, 0.25, 0.24))
WATER_PROBS = (0.5, 0.35, 0.15)


# ---------------------------------------------------------------- validation


def _check_size(size: int) -> int:
    """Tile side in pixels; tiny tiles cannot hold the shapes, huge ones would exhaust memory."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ConfigError(f"toy tile size must be an integer in {MIN_SIZE}..{MAX_SIZE}, got {size!r}")
    return int(size)


def _check_domain(domain: str) -> str:
    """Domain name, one of DOMAINS."""
    if domain not in DOMAINS:
        raise ConfigError(f"unknown toy domain {domain!r}", fix=f"use one of {list(DOMAINS)}")
    return domain


def _check_nonneg(name: str, value: int) -> int:
    """A non-negative integer such as a seed or an index (numpy seeding refuses negatives)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"'{name}' must be a non-negative integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------- numpy image helpers


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (yy, xx) as float arrays."""
    yy, xx = np.mgrid[0:h, 0:w]
    return yy.astype(np.float64), xx.astype(np.float64)


def _gauss_filter(shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Frequency response of a Gaussian blur for an rfft2 of the given spatial shape."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    return np.exp(-2.0 * np.pi**2 * sigma**2 * (fy**2 + fx**2))


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of an HxW or HxWxC array via FFT with reflect padding (no scipy needed)."""
    x = np.asarray(x, dtype=np.float64)
    if sigma <= 0:
        return x
    h, w = x.shape[:2]
    pad = int(np.ceil(3 * sigma))
    p = np.pad(x, [(pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 2), mode="reflect")
    k = _gauss_filter(p.shape[:2], sigma)
    if x.ndim == 3:
        k = k[..., None]
    out = np.fft.irfft2(np.fft.rfft2(p, axes=(0, 1)) * k, s=p.shape[:2], axes=(0, 1))
    return out[pad : pad + h, pad : pad + w]


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean unit-std noise with correlation length ~sigma px (periodic FFT filter, fast)."""
    white = rng.standard_normal(shape)
    if sigma > 0.3:
        white = np.fft.irfft2(np.fft.rfft2(white) * _gauss_filter(shape, sigma), s=shape)
    white -= white.mean()
    return white / (white.std() + 1e-8)


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift a 2-D array by whole pixels, filling the uncovered border with zeros."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    if abs(dy) >= h or abs(dx) >= w:
        return out
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = mask[ys, xs]
    return out


def _rotate(
    yy: np.ndarray, xx: np.ndarray, angle: float, cy: float = 0.0, cx: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (along, across) of each pixel in a frame rotated by `angle` around (cy, cx)."""
    c, s = np.cos(angle), np.sin(angle)
    dy, dx = yy - cy, xx - cx
    return dx * c + dy * s, -dx * s + dy * c


def _voronoi(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, n: int, angle: float = 0.0, stretch: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-seed cell index per pixel and the distance gap to the next seed (small on cell edges).

    `stretch` > 1 elongates cells along `angle`, like long farm parcels.
    """
    h, w = yy.shape
    pts = rng.uniform(-0.1, 1.1, (n, 2)) * (h, w)
    along, across = (c.astype(np.float32) for c in _rotate(yy, xx, angle))
    seed_along, seed_across = _rotate(pts[:, 0], pts[:, 1], angle)
    best = np.full((h, w), np.inf, np.float32)
    second = best.copy()
    cell = np.zeros((h, w), np.int64)
    for i in range(n):
        d = ((along - seed_along[i]) / stretch) ** 2 + (across - seed_across[i]) ** 2
        closer = d < best
        second = np.where(closer, best, np.minimum(second, d))
        cell[closer] = i
        best = np.minimum(best, d)
    return cell, np.sqrt(second) - np.sqrt(best)


def _mix(a: Colour | np.ndarray, b: Colour | np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel blend of two colours (or colour images) with weight map t in [0, 1]."""
    t = np.clip(t, 0.0, 1.0)[..., None]
    return np.asarray(a) * (1.0 - t) + np.asarray(b) * t


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic squashing, used to turn noise into soft mixing weights."""
    return 1.0 / (1.0 + np.exp(-x))


# ---------------------------------------------------------------- layout shapes


def _band(
    rng: np.random.Generator,
    yy: np.ndarray,
    xx: np.ndarray,
    width: float,
    wiggle: float,
    angle: float | None = None,
    offset: float | None = None,
) -> np.ndarray:
    """A band crossing the tile (road or river); `wiggle` is the meander amplitude in px."""
    h, w = yy.shape
    angle = rng.uniform(0, np.pi) if angle is None else angle
    offset = rng.uniform(-0.3, 0.3) * min(h, w) if offset is None else offset
    along, across = _rotate(yy, xx, angle, h / 2, w / 2)
    period = rng.uniform(0.6, 1.4) * max(h, w)
    phase = rng.uniform(0, 2 * np.pi, 2)
    centre = offset + wiggle * (
        np.sin(2 * np.pi * along / period + phase[0]) + 0.4 * np.sin(4.7 * np.pi * along / period + phase[1])
    )
    local_width = width * (1.0 + 0.15 * np.sin(2 * np.pi * along / (0.7 * period) + phase[1]))
    return np.abs(across - centre) < local_width / 2


def _blob(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, radius: float) -> np.ndarray:
    """An irregular patch (park, pond, wood) of roughly the given radius at a random place."""
    h, w = yy.shape
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    aspect = rng.uniform(0.6, 1.6)
    dist = np.sqrt(((yy - cy) * aspect) ** 2 + ((xx - cx) / aspect) ** 2) / radius
    return dist + 0.3 * _noise(rng, (h, w), max(radius / 3, 1.0)) < 1.0


def _rect(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, hh: float, hw: float, angle: float) -> np.ndarray:
    """A rotated rectangle with half-sizes (hh, hw) centred at (cy, cx)."""
    along, across = _rotate(yy, xx, angle, cy, cx)
    return (np.abs(along) < hw) & (np.abs(across) < hh)


def _building_grid(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, angle: float, spacing: tuple[float, float], keep: float
) -> np.ndarray:
    """Rows of rectangular buildings aligned with `angle`: one optional footprint per grid cell."""
    along, across = _rotate(yy, xx, angle)
    sa, sb = rng.uniform(*spacing, 2)
    a, b = along - rng.uniform(0, sa), across - rng.uniform(0, sb)
    ia, ib = np.floor(a / sa).astype(int), np.floor(b / sb).astype(int)
    fa, fb = a - ia * sa, b - ib * sb
    ia, ib = ia - ia.min(), ib - ib.min()
    table = rng.random((5, ia.max() + 1, ib.max() + 1))
    wa, wb = sa * (0.42 + 0.4 * table[1]), sb * (0.42 + 0.4 * table[2])
    ca = sa / 2 + (sa - wa) / 2 * (2 * table[3] - 1)
    cb = sb / 2 + (sb - wb) / 2 * (2 * table[4] - 1)
    inside = (np.abs(fa - ca[ia, ib]) < wa[ia, ib] / 2) & (np.abs(fb - cb[ia, ib]) < wb[ia, ib] / 2)
    return inside & (table[0] < keep)[ia, ib]


def _road_buffer(roads: np.ndarray, u: float) -> np.ndarray:
    """Pixels near a road, kept free of buildings (kerbs, pavements)."""
    return _blur(roads.astype(np.float64), 1.2 * u) > 0.04


# ---------------------------------------------------------------- layouts


def _scale(size: int) -> tuple[float, float]:
    """(u, k): object scale in px per 64-px unit, and linear scene extent in those units.

    Larger tiles show both a larger area and more detail: sizes grow with sqrt(size/64).
    """
    u = float(np.sqrt(size / 64))
    return u, size / (64 * u)


def _urban_grid_roads(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, angle: float, u: float, k: float
) -> np.ndarray:
    """A street grid: parallel streets in two perpendicular directions, plus maybe an arterial."""
    size = yy.shape[0]
    roads = np.zeros(yy.shape, bool)
    for direction in (angle, angle + np.pi / 2):
        count = max(1, round(rng.integers(1, 3) * k))
        offsets = ((np.arange(count) + rng.uniform(0.25, 0.75, count)) / count - 0.5) * size
        for off in offsets:
            roads |= _band(rng, yy, xx, rng.uniform(2.0, 3.5) * u, 0.0, direction + rng.normal(0, 0.02), off)
    if rng.random() < 0.3:
        roads |= _band(rng, yy, xx, rng.uniform(3.5, 5.5) * u, rng.uniform(0, 4) * u)
    return roads


def _urban_layout(size: int, rng: np.random.Generator) -> np.ndarray:
    """Dense city blocks: street grid, rows of buildings, some parks, sites, water and fields."""
    u, k = _scale(size)
    yy, xx = _grid(size, size)
    label = np.full((size, size), BACKGROUND, np.int64)
    angle = rng.normal(0, 0.04) if rng.random() < 0.5 else rng.uniform(0, np.pi)
    if rng.random() < 0.25:
        label[
            _rect(
                yy,
                xx,
                rng.uniform(0, size),
                rng.uniform(0, size),
                rng.uniform(10, 22) * u,
                rng.uniform(10, 22) * u,
                angle,
            )
        ] = AGRICULTURE
    for _ in range(rng.poisson(0.7 * k * k)):
        label[_blob(rng, yy, xx, rng.uniform(5, 12) * u)] = FOREST
    if rng.random() < 0.45:
        label[
            _rect(
                yy,
                xx,
                rng.uniform(0, size),
                rng.uniform(0, size),
                rng.uniform(5, 12) * u,
                rng.uniform(6, 14) * u,
                angle,
            )
        ] = BARREN
    if rng.random() < 0.3:
        label[_band(rng, yy, xx, rng.uniform(5, 11) * u, rng.uniform(1, 6) * u)] = WATER
    elif rng.random() < 0.15:
        label[_blob(rng, yy, xx, rng.uniform(4, 9) * u)] = WATER
    roads = _urban_grid_roads(rng, yy, xx, angle, u, k)
    houses = _building_grid(rng, yy, xx, angle, (6.5 * u, 12 * u), rng.uniform(0.55, 0.9))
    label[houses & (label == BACKGROUND) & ~_road_buffer(roads, u)] = BUILDING
    label[roads] = ROAD
    return label


def _rural_parcels(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, k: float) -> np.ndarray:
    """Farmland partitioned into elongated parcels of fields, woods, bare land and grass."""
    n = max(2, round(rng.integers(5, 12) * k * k))
    cell, _ = _voronoi(rng, yy, xx, n, rng.uniform(0, np.pi), rng.uniform(1.0, 2.5))
    kinds = rng.choice([AGRICULTURE, FOREST, BARREN, BACKGROUND], size=n, p=[0.6, 0.16, 0.12, 0.12])
    return kinds[cell].astype(np.int64)


def _village(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, label: np.ndarray, roads: np.ndarray, u: float
) -> None:
    """A small cluster of houses in yards (background), drawn into `label` in place."""
    area = _blob(rng, yy, xx, rng.uniform(7, 14) * u)
    houses = _building_grid(rng, yy, xx, rng.uniform(0, np.pi), (5.5 * u, 8.5 * u), rng.uniform(0.4, 0.7))
    label[area & (label != WATER)] = BACKGROUND
    label[houses & area & (label == BACKGROUND) & ~_road_buffer(roads, u)] = BUILDING


def _farmsteads(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, label: np.ndarray, u: float) -> None:
    """One to three isolated farm buildings, drawn into `label` in place."""
    h, w = yy.shape
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    angle = rng.uniform(0, np.pi)
    for _ in range(rng.integers(1, 4)):
        y, x = cy + rng.normal(0, 4 * u), cx + rng.normal(0, 4 * u)
        yard = _rect(yy, xx, y, x, 3.5 * u, 4.5 * u, angle) & (label != WATER)
        label[yard] = BACKGROUND
        house = _rect(yy, xx, y, x, rng.uniform(1.2, 2.2) * u, rng.uniform(1.5, 3.0) * u, angle)
        label[house & yard] = BUILDING


def _rural_layout(size: int, rng: np.random.Generator) -> np.ndarray:
    """Countryside: field parcels, woods, rivers or ponds, a few roads, rare villages."""
    u, k = _scale(size)
    yy, xx = _grid(size, size)
    label = _rural_parcels(rng, yy, xx, k)
    if rng.random() < 0.5:
        label[_noise(rng, label.shape, 5 * u) > rng.uniform(0.6, 1.2)] = FOREST
    if rng.random() < 0.35:
        label[_band(rng, yy, xx, rng.uniform(4, 10) * u, rng.uniform(2, 8) * u)] = WATER
    elif rng.random() < 0.35:
        label[_blob(rng, yy, xx, rng.uniform(4, 10) * u)] = WATER
    roads = np.zeros(label.shape, bool)
    for _ in range(rng.choice([0, 1, 1, 2])):
        roads |= _band(rng, yy, xx, rng.uniform(1.6, 3.0) * u, rng.uniform(0, 5) * u)
    if rng.random() < 0.35:
        _village(rng, yy, xx, label, roads, u)
    if rng.random() < 0.35:
        _farmsteads(rng, yy, xx, label, u)
    label[roads] = ROAD
    return label


def generate_layout(size: int, domain: str, rng: np.random.Generator) -> np.ndarray:
    """Draw a size x size label map (int64, values 0..6) for the "urban" or "rural" domain."""
    size = _check_size(size)
    builder = _urban_layout if _check_domain(domain) == "urban" else _rural_layout
    return builder(size, rng)


# ---------------------------------------------------------------- rendering


@dataclass
class _Scene:
    """What every class painter may use: the label map, coordinates, scale, domain and sun."""

    label: np.ndarray
    yy: np.ndarray
    xx: np.ndarray
    u: float
    domain: str
    sun: tuple[float, float]

    @property
    def shape(self) -> tuple[int, int]:
        """Height and width of the tile."""
        return self.label.shape

    def mask(self, cls: int) -> np.ndarray:
        """Boolean mask of one class."""
        return self.label == cls


def _grain(rng: np.random.Generator, s: _Scene, amount: float, sigma: float = 0.6) -> np.ndarray:
    """Fine luminance texture (HxWx1) shared across channels, `amount` in reflectance units."""
    return (amount * _noise(rng, s.shape, sigma * s.u))[..., None]


def _paint_background(rng: np.random.Generator, s: _Scene) -> np.ndarray:
    """Urban clutter: patchy grey paving mixed with green verges, plus small dark/bright objects."""
    grey = np.array((0.52, 0.51, 0.49)) * rng.uniform(0.88, 1.1)
    urban = s.domain == "urban"
    green = (0.34, 0.41, 0.27) if urban or rng.random() < 0.6 else (0.55, 0.50, 0.40)
    bias = rng.uniform(-1.2, 0.2) if urban else rng.uniform(0.3, 1.5)
    img = _mix(grey, green, _sigmoid(2.0 * _noise(rng, s.shape, 2.5 * s.u) + bias))
    img = img * (1 + 0.08 * _noise(rng, s.shape, 1.0 * s.u))[..., None] + _grain(rng, s, 0.03)
    clutter = rng.random(s.shape) < 0.04
    return img * np.where(clutter, rng.uniform(0.6, 1.4, s.shape), 1.0)[..., None]


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component ids of a boolean mask (-1 outside), by min-label propagation."""
    big = np.iinfo(np.int64).max
    ids = np.where(mask, np.arange(mask.size).reshape(mask.shape), big)
    while True:
        padded = np.pad(ids, 1, constant_values=big)
        neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        nearest = np.minimum.reduce([ids, *neighbours])
        nearest = np.where(mask, nearest, big)
        if np.array_equal(nearest, ids):
            return np.where(mask, ids, -1)
        ids = nearest


def _roof_colours(rng: np.random.Generator, s: _Scene) -> np.ndarray:
    """One roof colour per building (connected footprint), some close to the paving grey."""
    ids = _components(s.mask(BUILDING))
    _, which = np.unique(ids, return_inverse=True)
    which = which.reshape(ids.shape)
    pick = rng.choice(len(ROOF_COLOURS), size=which.max() + 1, p=ROOF_PROBS)
    colours = np.asarray(ROOF_COLOURS)[pick] * rng.uniform(0.85, 1.15, (pick.size, 1))
    return colours[which]


def _paint_building(rng: np.random.Generator, s: _Scene) -> np.ndarray:
    """Roofs: per-building colour, a sunlit and a shaded side, darker eaves."""
    soft = _blur(s.mask(BUILDING).astype(np.float64), 1.6 * s.u)
    gy, gx = np.gradient(soft)
    facing = -(gy * s.sun[0] + gx * s.sun[1]) * 3.0 * s.u
    shade = np.clip(1.0 + facing, 0.65, 1.3) * (0.85 + 0.15 * np.clip(soft * 2, 0, 1))
    return _roof_colours(rng, s) * shade[..., None] + _grain(rng, s, 0.02)


def _paint_road(rng: np.random.Generator, s: _Scene) -> np.ndarray:
    """Asphalt (or rural dirt track) with grain, and on some scenes dashed lane markings."""
    dirt = s.domain == "rural" and rng.random() < 0.5
    v = rng.uniform(0.36, 0.5)
    base = np.array((0.58, 0.53, 0.44) if dirt else (v, v, v * 1.04))
    img = base * (1 + 0.05 * _noise(rng, s.shape, 3 * s.u))[..., None] + _grain(rng, s, 0.025)
    if not dirt and rng.random() < 0.6:
        core = _blur(s.mask(ROAD).astype(np.float64), 0.9 * s.u) > 0.88
        period = rng.uniform(2.5, 4) * s.u
        dash = np.sin(2 * np.pi * (s.xx + s.yy) / period) > 0.2
        img = np.where((core & dash)[..., None], _mix(img, (0.8, 0.8, 0.76), np.full(s.shape, 0.35)), img)
    return img


def _paint_water(rng: np.random.Generator, s: _Scene) -> np.ndarray:
    """Water: deep-to-shallow colour gradient, lighter turbid shores and faint ripples."""
    deep = np.asarray(WATER_COLOURS)[rng.choice(len(WATER_COLOURS), p=WATER_PROBS)] * rng.uniform(0.85, 1.15)
    shallow = deep * 1.25 + (0.03, 0.05, 0.03)
    along, _ = _rotate(s.yy, s.xx, rng.uniform(0, 2 * np.pi), *np.array(s.shape) / 2)
    t = 0.5 + along / max(s.shape) + 0.25 * _noise(rng, s.shape, 6 * s.u)
    shore = 1.0 - _blur(s.mask(WATER).astype(np.float64), 1.5 * s.u)
    img = _mix(deep, shallow, 0.4 * t + 0.5 * shore)
    ripple_axis, _ = _rotate(s.yy, s.xx, rng.uniform(0, np.pi))
    ripple = np.sin(2 * np.pi * ripple_axis / (1.8 * s.u) + 2 * _noise(rng, s.shape, 3 * s.u))
    return img * (1 + 0.04 * ripple)[..., None] + _grain(rng, s, 0.01)


def _paint_barren(rng: np.random.Generator, s: _Scene) -> np.ndarray:
    """Bare ground: sandy to brown mottled soil; some scenes show ploughed stripes."""
    sand = np.array((0.67, 0.59, 0.47)) * rng.uniform(0.9, 1.1)
    brown = (0.52, 0.43, 0.33) if rng.random() < 0.7 else (0.58, 0.56, 0.52)
    img = _mix(sand, brown, _sigmoid(1.8 * _noise(rng, s.shape, 4 * s.u) + rng.uniform(-1, 1)))
    mottle = 0.07 * _noise(rng, s.shape, 1.2 * s.u)
    if rng.random() < 0.3:
        along, _ = _rotate(s.yy, s.xx, rng.uniform(0, np.pi))
        mottle += 0.06 * np.sin(2 * np.pi * along / (rng.uniform(2, 4) * s.u))
    return img * (1 + mottle)[..., None] + _grain(rng, s, 0.035)


def _paint_forest(rng: np.random.Generator, s: _Scene) -> np.ndarray:
    """Tree crowns: blobby dark greens, lit on the sun side, with dark gaps between crowns."""
    crowns = _noise(rng, s.shape, 0.9 * s.u)
    gy, gx = np.gradient(crowns)
    lit = np.clip(-(gy * s.sun[0] + gx * s.sun[1]) * 0.8, -0.25, 0.25)
    dark, light = np.array((0.13, 0.24, 0.12)), np.array((0.25, 0.37, 0.18))
    patches = _sigmoid(_noise(rng, s.shape, 6 * s.u) + rng.uniform(-1, 1))
    img = _mix(dark, light * rng.uniform(0.9, 1.1), patches)
    crown_light = 0.78 + 0.22 * np.tanh(crowns) + lit
    return img * np.where(crowns < -0.9, 0.65, crown_light)[..., None]


def _paint_agriculture(rng: np.random.Generator, s: _Scene) -> np.ndarray:
    """Fields: parcels with per-crop hue, stripe period and orientation; darker hedges between."""
    h, w = s.shape
    n = max(2, round(rng.uniform(5, 10) * h * w / (64 * s.u) ** 2))
    cell, gap = _voronoi(rng, s.yy, s.xx, n, rng.uniform(0, np.pi), rng.uniform(1.0, 2.0))
    crop = rng.choice(len(CROP_COLOURS), size=n, p=CROP_PROBS)
    colour = np.asarray(CROP_COLOURS)[crop] * rng.uniform(0.88, 1.12, (n, 1))
    base_angle = rng.uniform(0, np.pi)
    angle = np.where(rng.random(n) < 0.6, base_angle, rng.uniform(0, np.pi, n))[cell]
    period = rng.uniform(1.8, 4.5, n)[cell] * s.u
    amp = rng.uniform(0.03, 0.14, n)[cell]
    stripes = amp * np.sin(2 * np.pi * (s.xx * np.cos(angle) + s.yy * np.sin(angle)) / period)
    img = colour[cell] * (1 + stripes + 0.04 * _noise(rng, s.shape, 2 * s.u))[..., None]
    hedge = np.where(gap < 0.9 * s.u, 0.82, 1.0)
    return img * hedge[..., None] + _grain(rng, s, 0.02)


PAINTERS: dict[int, Callable[[np.random.Generator, _Scene], np.ndarray]] = {
    BACKGROUND: _paint_background,
    BUILDING: _paint_building,
    ROAD: _paint_road,
    WATER: _paint_water,
    BARREN: _paint_barren,
    FOREST: _paint_forest,
    AGRICULTURE: _paint_agriculture,
}


def _cast_shadows(rng: np.random.Generator, s: _Scene, img: np.ndarray) -> np.ndarray:
    """Darken ground behind buildings (long shadows) and trees (short ones), away from the sun."""
    tall = s.mask(BUILDING)
    length = rng.uniform(1.5, 3.5) * s.u
    shadow = np.zeros(s.shape, bool)
    for t in np.arange(1.0, length + 0.5):
        shadow |= _shift(tall, int(round(-s.sun[0] * t)), int(round(-s.sun[1] * t)))
    trees = _shift(s.mask(FOREST), int(round(-s.sun[0] * s.u)), int(round(-s.sun[1] * s.u)))
    darkness = np.ones(s.shape)
    darkness[trees & ~s.mask(FOREST)] = 0.72
    darkness[shadow & ~tall] = rng.uniform(0.42, 0.58)
    tint = np.where((darkness < 1)[..., None], (0.95, 0.97, 1.08), 1.0)
    return img * darkness[..., None] * tint


def _illuminate(rng: np.random.Generator, s: _Scene, img: np.ndarray) -> np.ndarray:
    """Per-scene sensor look: optics blur, brightness, contrast, colour tint, haze and noise."""
    img = 0.6 * img + 0.4 * _blur(img, 0.6 * s.u)
    warm = (1.03, 1.0, 0.95) if s.domain == "rural" else (0.99, 1.0, 1.02)
    img = img * rng.uniform(0.85, 1.15) * np.asarray(warm) * (1 + rng.normal(0, 0.04, 3))
    mean = img.mean(axis=(0, 1))
    img = (img - mean) * rng.uniform(0.8, 1.2) + mean
    haze = rng.uniform(0, 0.22) * _sigmoid(_noise(rng, s.shape, 12 * s.u) + 0.5)
    img = _mix(img, (0.72, 0.76, 0.82), haze)
    return img + rng.normal(0, rng.uniform(0.006, 0.022), img.shape)


def render_image(label: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
    """Render any HxW label map to an HxWx3 uint8 image; 255 and unknown values render as background.

    Each class texture has its own random stream, so editing one region leaves the others unchanged.
    """
    _check_domain(domain)
    label = np.asarray(label)
    if label.ndim != 2 or min(label.shape) < 2:
        raise DataError(f"render_image needs a 2-D label map of at least 2x2 pixels, got shape {label.shape}")
    classes = np.where((label >= 0) & (label < TOY_CLASSES.num_classes), label, BACKGROUND).astype(np.int64)
    yy, xx = _grid(*classes.shape)
    sun = rng.uniform(0, 2 * np.pi)
    s = _Scene(classes, yy, xx, float(np.sqrt(max(classes.shape) / 64)), domain, (np.sin(sun), np.cos(sun)))
    img = np.zeros(classes.shape + (3,))
    shadow_rng, light_rng, *painter_rngs = rng.spawn(2 + len(PAINTERS))
    for (cls, paint), paint_rng in zip(PAINTERS.items(), painter_rngs, strict=True):
        where = s.mask(cls)
        if where.any():
            img[where] = paint(paint_rng, s)[where]
    img = _illuminate(light_rng, s, _cast_shadows(shadow_rng, s, img))
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- samples and datasets


def toy_sample(
    index: int, size: int = 64, seed: int = 0, domain: str | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Tile `index` of the toy dataset `seed`: (HxWx3 uint8 image, HxW int64 label, domain).

    Depends only on (seed, index, size, domain); with domain None, even indices are urban, odd rural.
    """
    index, seed, size = _check_nonneg("index", index), _check_nonneg("seed", seed), _check_size(size)
    domain = DOMAINS[index % 2] if domain is None else _check_domain(domain)
    label = generate_layout(size, domain, np.random.default_rng([seed, index, 0]))
    image = render_image(label, domain, np.random.default_rng([seed, index, 1]))
    return image, label, domain


def _add_nodata(rng: np.random.Generator, image: np.ndarray, label: np.ndarray) -> None:
    """Blank a strip along one tile edge (label 255, black pixels), like LoveDA's scene borders."""
    size = label.shape[0]
    width = int(rng.integers(2, max(3, size // 6)))
    region = [np.s_[:width, :], np.s_[-width:, :], np.s_[:, :width], np.s_[:, -width:]][rng.integers(4)]
    label[region] = IGNORE_INDEX
    image[region] = 0


def _save_png(path: Path, array: np.ndarray) -> None:
    """Write an 8-bit PNG (HxWx3 -> RGB, HxW -> single-channel 'L') atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="PNG")


def _classes_yaml() -> str:
    """classes.yaml text for the generic folder layout."""
    names = ", ".join(TOY_CLASSES.names)
    palette = ", ".join(f"[{r}, {g}, {b}]" for r, g, b in TOY_CLASSES.palette or ())
    return f"names: [{names}]\nignore_index: {TOY_CLASSES.ignore_index}\npalette: [{palette}]\n"


def _check_dataset_args(
    n: int, size: int, seed: int, split: str, layout: str, start: int, nodata_fraction: float
) -> None:
    """Reject bad write_toy_dataset arguments before anything is written."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"number of toy tiles must be an integer >= 1, got {n!r}")
    _check_size(size)
    _check_nonneg("seed", seed)
    _check_nonneg("start", start)
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown dataset layout {layout!r}", fix=f"use one of {list(LAYOUTS)}")
    if not isinstance(split, str) or not split or split in (".", "..") or "/" in split or "\\" in split:
        raise ConfigError(f"split must be a plain folder name such as 'Train', got {split!r}")
    if not 0.0 <= nodata_fraction <= 1.0:
        raise ConfigError(f"nodata_fraction must be in [0, 1], got {nodata_fraction!r}")


def write_toy_dataset(
    out: str | Path,
    n: int,
    size: int = 64,
    seed: int = 0,
    split: str = "Train",
    label_only: bool = False,
    layout: str = "loveda",
    start: int = 0,
    nodata_fraction: float = 0.0,
) -> Path:
    """Write tiles start..start+n-1 as a LoveDA-style or generic-folder dataset; returns `out`.

    loveda: out/{split}/{Urban,Rural}/{images_png,masks_png}/toy_NNNNN.png, masks = label + 1, 0 = no-data.
    folder: out/images, out/masks (raw labels, 255 ignore) and out/classes.yaml; `split` is unused.
    `nodata_fraction` of tiles get a blank (ignore) strip along one edge.
    """
    _check_dataset_args(n, size, seed, split, layout, start, nodata_fraction)
    root = Path(out)
    for index in range(start, start + n):
        image, label, domain = toy_sample(index, size, seed)
        nodata_rng = np.random.default_rng([seed, index, 2])
        if nodata_rng.random() < nodata_fraction:
            _add_nodata(nodata_rng, image, label)
        name = f"toy_{index:05d}.png"
        if layout == "loveda":
            folder = root / split / domain.capitalize()
            mask = np.where(label == IGNORE_INDEX, 0, label + 1)
            image_path, mask_path = folder / "images_png" / name, folder / "masks_png" / name
        else:
            mask, image_path, mask_path = label, root / "images" / name, root / "masks" / name
        _save_png(mask_path, mask)
        if not label_only:
            _save_png(image_path, image)
    if layout == "folder":
        write_text(root / "classes.yaml", _classes_yaml())
    return root
