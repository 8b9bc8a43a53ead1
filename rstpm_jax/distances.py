"""Per-position distances between teacher and student features (paper eq. 1-2), by name.

A distance maps NHWC ``(teacher, student)`` features to ``(B, H, W)``; the anomaly maps use
``maps.distance`` and the built-in losses follow it, so a new distance changes both.
Register one with ``@register_distance("name")``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from rstpm_jax.registry import Bound, Registry

Array = jax.Array
DistanceFn = Callable[[Array, Array], Array]

DISTANCES = Registry("distance", "maps.distance")
register_distance = DISTANCES.register


NORM_EPS = 1e-12  # the smallest norm l2_normalize divides by (torch F.normalize's default)


def l2_normalize(x: Array, eps: float = NORM_EPS) -> Array:
    """Eq. 1: features divided by their L2 norm along channels (as torch F.normalize)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    # A product with the reciprocal, not a division: XLA rewrites a division so only on some
    # meshes, and then one job trained on N devices would differ from it on 1 by an ulp.
    return x * (1.0 / jnp.maximum(norm, eps))


@register_distance("squared_l2")
def distance_map(teacher: Array, student: Array) -> Array:
    """Eq. 2 per position: 1/2 ||t^ - s^||^2, shape (B, H, W)."""
    d = l2_normalize(teacher) - l2_normalize(student)
    return 0.5 * jnp.sum(d * d, axis=-1)


def from_config(maps_cfg: Any) -> Bound:
    """The distance ``maps.distance`` names, with ``maps.distance_kwargs``."""
    return DISTANCES.bind(str(maps_cfg.get("distance", "squared_l2")),
                          maps_cfg.get("distance_kwargs"))
