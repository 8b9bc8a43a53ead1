"""Anomaly maps as pure functions: per-level maps, resize, fusion, smoothing, image score.

Per level the map is ``maps.distance`` between teacher and student features (eq. 2's
1/2 ||t^ - s^||^2 by default), resized to the input size. A fusion rule (``maps.fusion``)
turns ``{student: {level: (B, H, W)}}`` into the final ``(B, H, W)`` map: the paper's
``multiply`` adds the students' maps of each resolution, then multiplies the resolutions.
Register more with ``@register_fusion("name")``; ``maps.kwargs`` are passed to the rule.

A rule marked :func:`uses_map_statistics` also receives ``stats``: per student and level the
``(q_low, q_high)`` quantiles of that map over the held-out normal images
(:func:`map_statistics`, computed by evaluation and stored in ``thresholds.json``). They are
arrays given to the inference function, not part of the (hashable) bound rule, so one compiled
function serves every category.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rstpm_jax import distances
from rstpm_jax.levels import sum_over_students
from rstpm_jax.registry import Bound, Registry

Array = jax.Array
LevelMaps = dict[str, dict[str, Array]]
Pairs = Mapping[str, Mapping[str, tuple[Array, Array]]]
FusionFn = Callable[..., Array]
MapStats = Mapping[str, Mapping[str, Any]]  # {student: {level: (2,) [q_low, q_high]}}

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


def uses_map_statistics(fn: FusionFn) -> FusionFn:
    """Mark a fusion rule as one taking ``stats`` (per-map held-out quantiles): evaluation
    computes them before the thresholds; ``q_low``/``q_high`` in ``maps.kwargs`` choose them."""
    fn.needs_map_statistics = True
    return fn


def needs_map_statistics(fusion: Callable) -> bool:
    """Whether the (bound) fusion rule takes held-out map statistics."""
    return bool(getattr(getattr(fusion, "fn", fusion), "needs_map_statistics", False))


def normalize_levels(maps: Mapping[str, Mapping[str, Array]], stats: MapStats | None) -> LevelMaps:
    """Each map ``m`` -> ``(m - q_low) / (q_high - q_low)`` with its own quantiles (EfficientAD's
    normalisation); ``stats=None`` leaves the maps as they are (before statistics exist)."""
    if stats is None:
        return {s: dict(levels) for s, levels in maps.items()}
    return {s: {lvl: (m - stats[s][lvl][0]) / (stats[s][lvl][1] - stats[s][lvl][0])
                for lvl, m in levels.items()} for s, levels in maps.items()}


@register_fusion("normalized_sum")
@uses_map_statistics
def normalized_sum(maps: Mapping[str, Mapping[str, Array]], stats: MapStats | None = None,
                   q_low: float = 0.9, q_high: float = 0.995) -> Array:
    """Every map normalised by its held-out quantiles, then all added (``q_low``/``q_high``
    choose the statistics; the rule itself reads only ``stats``)."""
    del q_low, q_high
    return sum(sum_over_students(normalize_levels(maps, stats)).values())


@register_fusion("normalized_multiply")
@uses_map_statistics
def normalized_multiply(maps: Mapping[str, Mapping[str, Array]], stats: MapStats | None = None,
                        q_low: float = 0.9, q_high: float = 0.995) -> Array:
    """Every map normalised, students added per resolution, then the product over resolutions
    of ``softplus`` of those sums (normalised maps go below 0 over normal pixels; softplus keeps
    the factors positive and their order, and is ~x above the ``q_high`` level)."""
    del q_low, q_high
    per_level = [jax.nn.softplus(m) for m in sum_over_students(normalize_levels(maps, stats)).values()]
    out = per_level[0]
    for m in per_level[1:]:
        out = out * m
    return out


def map_statistics(batches: Iterable[Mapping[str, Mapping[str, Any]]], q_low: float = 0.9,
                   q_high: float = 0.995, pixels_per_map: int = 16384) -> dict[str, dict[str, list[float]]]:
    """``{student: {level: [q_low quantile, q_high quantile]}}`` of each per-level map's values
    over ``batches`` of ``{student: {level: (B, H, W)}}`` (held-out normal images only; at most
    ``pixels_per_map`` evenly strided pixels of each image). ``q_high``'s value is kept above
    ``q_low``'s so that the normalisation never divides by zero."""
    values: dict[str, dict[str, list[np.ndarray]]] = {}
    for batch in batches:
        for s, levels in batch.items():
            for lvl, m in levels.items():
                m = np.asarray(m, np.float32).reshape(len(m), -1)
                values.setdefault(s, {}).setdefault(lvl, []).append(
                    m[:, :: max(1, m.shape[1] // pixels_per_map)].reshape(-1))
    if not values:
        raise ValueError("map_statistics: no held-out maps (data.holdout_fraction=0?); the fusion rule "
                         "needs normal images to normalise each map.")
    out: dict[str, dict[str, list[float]]] = {}
    for s, levels in values.items():
        for lvl, chunks in levels.items():
            lo, hi = (float(v) for v in np.quantile(np.concatenate(chunks).astype(np.float64), [q_low, q_high]))
            out.setdefault(s, {})[lvl] = [lo, max(hi, lo + max(1e-12, abs(lo) * 1e-6))]
    return out


def stats_arrays(record: Mapping[str, Any] | None) -> dict[str, dict[str, np.ndarray]] | None:
    """The ``stats`` argument of the inference function from ``thresholds.json``'s
    ``"map_statistics"`` record (``{"maps": {student: {level: [lo, hi]}}, ...}``), or None."""
    if not record:
        return None
    return {s: {lvl: np.asarray(v, np.float32) for lvl, v in levels.items()}
            for s, levels in record["maps"].items()}


def require_map_statistics(maps_cfg: Any, record: Mapping[str, Any] | None) -> None:
    """ValueError when ``maps.fusion`` needs held-out map statistics and ``record`` (the
    ``"map_statistics"`` of ``thresholds.json``) has none, e.g. a workdir evaluated before."""
    if not record and needs_map_statistics(FUSIONS.get(str(maps_cfg.fusion))):
        raise ValueError(f"maps.fusion={maps_cfg.fusion!r} needs the held-out map statistics, but "
                         "thresholds.json has no \"map_statistics\": evaluate the category again "
                         "(--config.mode=eval) to compute them.")


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


def anomaly_maps(pairs: Pairs, size: tuple[int, int], spec: MapSpec,
                 stats: MapStats | None = None) -> tuple[Array, LevelMaps]:
    """Final (B, H, W) map and the per-level maps resized to ``size`` (the raw ones, before
    any normalisation); ``stats`` go to a rule that :func:`needs_map_statistics`."""
    per_level = resize_levels(level_maps(pairs, spec.distance), size, spec.resize)
    fused = spec.fusion(per_level, stats=stats) if needs_map_statistics(spec.fusion) else spec.fusion(per_level)
    final = spec.smooth(fused, spec.sigma)
    return final, per_level
