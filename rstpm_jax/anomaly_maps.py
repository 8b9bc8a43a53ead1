"""Anomaly maps as pure functions: per-level maps, resize, fusion, smoothing, image score.

Per level the map is ``maps.distance`` between teacher and student features (eq. 2's
1/2 ||t^ - s^||^2 by default), resized to the input size. A fusion rule (``maps.fusion``)
turns ``{student: {level: (B, H, W)}}`` into the final ``(B, H, W)`` map: the paper's
``multiply`` adds the students' maps of each resolution, then multiplies the resolutions.
Register more with ``@register_fusion("name")``; ``maps.kwargs`` are passed to the rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rstpm_jax import distances
from rstpm_jax.levels import sum_over_students
from rstpm_jax.registry import Bound, Registry

Array = jax.Array
LevelMaps = dict[str, dict[str, Array]]
Pairs = Mapping[str, Mapping[str, tuple[Array, Array]]]
FusionFn = Callable[..., Array]

FUSIONS = Registry("fusion rule", "maps.fusion")
register_fusion = FUSIONS.register


def level_maps(pairs: Pairs, distance: Callable[[Array, Array], Array] = distances.distance_map
               ) -> LevelMaps:
    """``{student: {level: (B, h, w)}}`` at each level's own resolution."""
    return {student: {lvl: distance(t, s) for lvl, (t, s) in levels.items()}
            for student, levels in pairs.items()}


def resize(maps: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize of (B, h, w) maps to (B, *size) (half-pixel centres, as torch align_corners=False)."""
    return jax.image.resize(maps, (maps.shape[0], *size), method="bilinear", antialias=False)


def resize_levels(maps: LevelMaps, size: tuple[int, int],
                  resize_fn: Callable[[Array, tuple[int, int]], Array] = resize) -> LevelMaps:
    return {s: {lvl: resize_fn(m, size) for lvl, m in levels.items()} for s, levels in maps.items()}


@register_fusion("multiply")
def multiply_levels(maps: Mapping[str, Mapping[str, Array]]) -> Array:
    """The paper's rule: students added per resolution, then the product over resolutions."""
    per_level = list(sum_over_students(maps).values())
    out = per_level[0]
    for m in per_level[1:]:
        out = out * m
    return out


@register_fusion("sum")
def sum_levels(maps: Mapping[str, Mapping[str, Array]]) -> Array:
    """Every map of every student and resolution added."""
    return sum(sum_over_students(maps).values())


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


@dataclasses.dataclass(frozen=True)
class MapSpec:
    """How maps are made: the distance, the fusion rule (both bound) and the smoothing sigma;
    ``resize`` and ``smooth`` are the implementations of :func:`resize` and
    :func:`gaussian_smooth` (an export may swap in numerically equal forms)."""

    fusion: Bound
    distance: Bound
    sigma: float = 0.0
    resize: Callable[[Array, tuple[int, int]], Array] = resize
    smooth: Callable[[Array, float], Array] = gaussian_smooth

    @classmethod
    def from_config(cls, maps_cfg: Any) -> MapSpec:
        return cls(FUSIONS.bind(str(maps_cfg.fusion), maps_cfg.get("kwargs")),
                   distances.from_config(maps_cfg), float(maps_cfg.smoothing_sigma))


def anomaly_maps(pairs: Pairs, size: tuple[int, int], spec: MapSpec) -> tuple[Array, LevelMaps]:
    """Final (B, H, W) map and the per-level maps resized to ``size``."""
    per_level = resize_levels(level_maps(pairs, spec.distance), size, spec.resize)
    final = spec.smooth(spec.fusion(per_level), spec.sigma)
    return final, per_level
