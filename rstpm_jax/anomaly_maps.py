"""Anomaly maps as pure functions: per-level maps, resize, fusion, smoothing, image score.

Per level the map is eq. 2's 1/2 ||t^ - s^||^2 at each position. Maps of one resolution
from the students are added; the resolutions are then combined by the fusion rule
(``multiply``: the paper's; ``sum``: an alternative). Register more with
``@register_fusion``.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from rstpm_jax.losses import Pairs, distance_map

Array = jax.Array
LevelMaps = dict[str, dict[str, Array]]
FusionFn = Callable[[Mapping[str, Array]], Array]

_FUSIONS: dict[str, FusionFn] = {}


def register_fusion(name: str) -> Callable[[FusionFn], FusionFn]:
    def wrap(fn: FusionFn) -> FusionFn:
        _FUSIONS[name] = fn
        return fn
    return wrap


def get_fusion(name: str) -> FusionFn:
    if name not in _FUSIONS:
        raise ValueError(f"Unknown maps.fusion {name!r}; registered: {sorted(_FUSIONS)}.")
    return _FUSIONS[name]


def level_maps(pairs: Pairs) -> LevelMaps:
    """``{student: {level: (B, h, w)}}`` at each level's own resolution."""
    return {student: {lvl: distance_map(t, s) for lvl, (t, s) in levels.items()}
            for student, levels in pairs.items()}


def resize(maps: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize of (B, h, w) maps to (B, *size) (half-pixel centres, as torch align_corners=False)."""
    return jax.image.resize(maps, (maps.shape[0], *size), method="bilinear", antialias=False)


def resize_levels(maps: LevelMaps, size: tuple[int, int]) -> LevelMaps:
    return {s: {lvl: resize(m, size) for lvl, m in levels.items()} for s, levels in maps.items()}


def add_students(maps: LevelMaps) -> dict[str, Array]:
    """Same-resolution maps of all students added: ``{level: (B, H, W)}``."""
    out: dict[str, Array] = {}
    for levels in maps.values():
        for lvl, m in levels.items():
            out[lvl] = out[lvl] + m if lvl in out else m
    return out


@register_fusion("multiply")
def multiply_levels(per_level: Mapping[str, Array]) -> Array:
    """The paper's rule: product over resolutions."""
    maps = list(per_level.values())
    out = maps[0]
    for m in maps[1:]:
        out = out * m
    return out


@register_fusion("sum")
def sum_levels(per_level: Mapping[str, Array]) -> Array:
    return sum(per_level.values())


def gaussian_smooth(maps: Array, sigma: float) -> Array:
    """Separable Gaussian blur of (B, H, W) maps, kernel radius ``max(1, int(4 sigma + 0.5))``.

    Edges mirror about the border pixel without repeating it (``jnp.pad`` mode
    ``reflect``), i.e. ``scipy.ndimage.gaussian_filter(m, sigma, mode="mirror",
    truncate=4.0)`` per map (scipy's own ``reflect`` repeats the border pixel).
    """
    if sigma <= 0:
        return maps
    radius = max(1, int(4.0 * sigma + 0.5))
    x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    k = jnp.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    padded = jnp.pad(maps, ((0, 0), (radius, radius), (radius, radius)), mode="reflect")
    rows = jax.vmap(lambda r: jnp.convolve(r, k, mode="valid"))
    blur_w = jax.vmap(rows)(padded)
    blur_h = jax.vmap(rows)(blur_w.transpose(0, 2, 1)).transpose(0, 2, 1)
    return blur_h


def image_score(final_map: Array) -> Array:
    """Image-level score: the maximum of the final map, (B,)."""
    return jnp.max(final_map, axis=(1, 2))


def anomaly_maps(pairs: Pairs, size: tuple[int, int], fusion: str = "multiply",
                 sigma: float = 0.0) -> tuple[Array, LevelMaps]:
    """Final (B, H, W) map and the per-level maps resized to ``size``."""
    per_level = resize_levels(level_maps(pairs), size)
    final = gaussian_smooth(get_fusion(fusion)(add_students(per_level)), sigma)
    return final, per_level
