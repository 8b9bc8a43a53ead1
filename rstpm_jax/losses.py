"""Training losses (paper eq. 3-4) as pure functions, found by ``loss.name``.

A loss takes ``pairs = {student: {level: (teacher_feature, student_feature)}}`` (NHWC
arrays) and keyword arguments from ``loss.kwargs``, and returns ``(total, metrics)``: a
scalar to minimise and a flat dict of scalars (``"student1"``, ``"student1/layer1"``, ...)
for logging. A loss with a ``distance`` argument receives the map distance
(``maps.distance``) unless ``loss.kwargs`` sets it. Add one with ``@register_loss("name")``
in a module that ``config.plugins`` names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from rstpm_jax import distances
from rstpm_jax.distances import distance_map, l2_normalize  # noqa: F401 - re-exported
from rstpm_jax.registry import Bound, Registry

Array = jax.Array
Pairs = Mapping[str, Mapping[str, tuple[Array, Array]]]
LossFn = Callable[..., tuple[Array, dict[str, Array]]]

LOSSES = Registry("loss", "loss.name")
register_loss = LOSSES.register


def level_loss(teacher: Array, student: Array,
               distance: Callable[[Array, Array], Array] = distance_map) -> Array:
    """Eq. 3: the distance map averaged over positions, one value per image (B,)."""
    return jnp.mean(distance(teacher, student), axis=(1, 2))


def sum_of_levels(pairs: Pairs, level_value: Callable[[Array, Array], Array]
                  ) -> tuple[Array, dict[str, Array]]:
    """``sum over students and levels of level_value(t, s)`` with per-student and per-level metrics."""
    metrics: dict[str, Array] = {}
    total = jnp.zeros((), jnp.float32)
    for student, levels in pairs.items():
        student_total = jnp.zeros((), jnp.float32)
        for level, (t, s) in levels.items():
            value = level_value(t, s)
            metrics[f"{student}/{level}"] = value
            student_total = student_total + value
        metrics[student] = student_total
        total = total + student_total
    metrics["loss"] = total
    return total, metrics


@register_loss("paper")
def paper_loss(pairs: Pairs, distance: Callable[[Array, Array], Array] = distance_map
               ) -> tuple[Array, dict[str, Array]]:
    """Eq. 4 for each student (sum over levels, mean over batch); total = sum over students."""
    return sum_of_levels(pairs, lambda t, s: jnp.mean(level_loss(t, s, distance)))


def from_config(loss_cfg: Any, maps_cfg: Any) -> Bound:
    """The loss ``loss.name`` names, bound to ``loss.kwargs`` (and the map distance)."""
    name = str(loss_cfg.name)
    kwargs = dict(loss_cfg.get("kwargs") or {})
    if "distance" in inspect.signature(LOSSES.get(name)).parameters:
        chosen = kwargs.pop("distance", None)  # a distance's name, else the map distance
        kwargs["distance"] = (distances.DISTANCES.bind(str(chosen)) if chosen
                              else distances.from_config(maps_cfg))
    return LOSSES.bind(name, kwargs)
