"""Training losses (paper eq. 3-4) as pure functions, found by ``loss.name``.

A loss takes ``pairs = {student: {level: (teacher_feature, student_feature)}}`` (NHWC
arrays), ``valid`` (``(B,)``, 1 = a real example, 0 = padding of a partial last batch, to be
left out; None = all real) and keyword arguments from ``loss.kwargs``, and returns
``(total, metrics)``: a scalar to minimise and a flat dict of scalars (``"student1"``,
``"student1/layer1"``, ...) for logging. A loss with a ``distance`` argument receives the
map distance (``maps.distance``) unless ``loss.kwargs`` names another. Add one with
``@register_loss("name")`` in a module that ``config.plugins`` names.

Three scales of one objective (eq. 3 = the mean over positions of eq. 2's 1/2 ||t^ - s^||^2):

- ``stpm`` (default): the official STPM code's (gdwang08/STFPM ``main.py``): per level the mean
  over (batch, h, w) of ``||t^ - s^||^2``, summed over levels, 2 x eq. 4. lr 0.4 was tuned,
  and the paper's numbers produced, with it.
- ``paper``: eq. 4 as written, ``1/2`` included: every update half the official one.
- ``anomalib_stfpm``: anomalib's ``STFPMLoss``, per level ``0.5 / (h w)`` times the sum over
  (batch, c, h, w): eq. 3 summed over the batch, ``batch / 2`` x the official loss.

Every one also logs eq. 4 (``eq4``, ``eq4/<student>``) when it optimises another scale.
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
Distance = Callable[[Array, Array], Array]

LOSSES = Registry("loss", "loss.name")
register_loss = LOSSES.register


def level_loss(teacher: Array, student: Array, distance: Distance = distance_map) -> Array:
    """Eq. 3: the distance map averaged over positions, one value per image (B,)."""
    return jnp.mean(distance(teacher, student), axis=(1, 2))


def batch_mean(values: Array, valid: Array | None = None) -> Array:
    """Mean of per-example ``values`` (B,) over the valid examples (all when ``valid`` is None)."""
    if valid is None:
        return jnp.mean(values)
    w = jnp.asarray(valid).astype(jnp.float32)
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def batch_sum(values: Array, valid: Array | None = None) -> Array:
    """Sum of per-example ``values`` (B,) over the valid examples."""
    if valid is None:
        return jnp.sum(values)
    return jnp.sum(values * jnp.asarray(valid).astype(jnp.float32))


def sum_of_levels(pairs: Pairs, per_image: Callable[[Array, Array], Array], valid: Array | None = None,
                  reduce: Callable[[Array, Array | None], Array] = batch_mean
                  ) -> tuple[Array, dict[str, Array]]:
    """Sum over students and levels of ``reduce(per_image(t, s), valid)`` (``per_image`` gives one
    value per example), with per-student and per-level metrics."""
    metrics: dict[str, Array] = {}
    total = jnp.zeros((), jnp.float32)
    for student, levels in pairs.items():
        student_total = jnp.zeros((), jnp.float32)
        for level, (t, s) in levels.items():
            value = reduce(per_image(t, s), valid)
            metrics[f"{student}/{level}"] = value
            student_total = student_total + value
        metrics[student] = student_total
        total = total + student_total
    metrics["loss"] = total
    return total, metrics


def _eq3_loss(pairs: Pairs, valid: Array | None, distance: Distance, scale: float,
              reduce: Callable) -> tuple[Array, dict[str, Array]]:
    """``scale`` x eq. 3 per image reduced over the batch; eq. 4 logged beside it unless it is eq. 4."""
    total, metrics = sum_of_levels(pairs, lambda t, s: scale * level_loss(t, s, distance), valid, reduce)
    if not (scale == 1.0 and reduce is batch_mean):
        eq4, parts = sum_of_levels(pairs, lambda t, s: level_loss(t, s, distance), valid)
        metrics["eq4"] = eq4
        metrics.update({f"eq4/{student}": parts[student] for student in pairs})
    return total, metrics


@register_loss("stpm")
def stpm_loss(pairs: Pairs, valid: Array | None = None, distance: Distance = distance_map
              ) -> tuple[Array, dict[str, Array]]:
    """The official STPM training loss: per level the mean over (batch, h, w) of
    ``||t^ - s^||^2`` (2 x eq. 3), summed over levels and students."""
    return _eq3_loss(pairs, valid, distance, 2.0, batch_mean)


@register_loss("paper")
def paper_loss(pairs: Pairs, valid: Array | None = None, distance: Distance = distance_map
               ) -> tuple[Array, dict[str, Array]]:
    """Eq. 4 for each student (sum over levels, mean over batch); total = sum over students."""
    return _eq3_loss(pairs, valid, distance, 1.0, batch_mean)


@register_loss("anomalib_stfpm")
def anomalib_stfpm_loss(pairs: Pairs, valid: Array | None = None, distance: Distance = distance_map
                        ) -> tuple[Array, dict[str, Array]]:
    """anomalib's ``STFPMLoss``: per level ``0.5 / (h w) * sum((t^ - s^)^2)`` over the batch
    (eq. 3 summed over the valid images), summed over levels and students."""
    return _eq3_loss(pairs, valid, distance, 1.0, batch_sum)


def from_config(loss_cfg: Any, maps_cfg: Any) -> Bound:
    """The loss ``loss.name`` names, bound to ``loss.kwargs`` (and the map distance)."""
    name = str(loss_cfg.name)
    kwargs = dict(loss_cfg.get("kwargs") or {})
    if "distance" in inspect.signature(LOSSES.get(name)).parameters:
        chosen = kwargs.pop("distance", None)  # a distance's name, else the map distance
        kwargs["distance"] = (distances.DISTANCES.bind(str(chosen)) if chosen
                              else distances.from_config(maps_cfg))
    return LOSSES.bind(name, kwargs)
