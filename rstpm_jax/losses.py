"""Paper eq. 1-4 as pure functions, and a registry so a config can name the loss.

A loss takes ``pairs = {student: {level: (teacher_feature, student_feature)}}`` (NHWC
arrays) and returns ``(total, metrics)``: a scalar to minimise and a flat dict of scalars
(``"student1"``, ``"student1/layer1"``, ...) for logging. Add one with
``@register_loss("name")`` and select it with ``--config.loss.name=name``.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

Array = jax.Array
Pairs = Mapping[str, Mapping[str, tuple[Array, Array]]]
LossFn = Callable[[Pairs], tuple[Array, dict[str, Array]]]

_LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    def wrap(fn: LossFn) -> LossFn:
        _LOSSES[name] = fn
        return fn
    return wrap


def get_loss(name: str) -> LossFn:
    if name not in _LOSSES:
        raise ValueError(f"Unknown loss.name {name!r}; registered: {sorted(_LOSSES)}.")
    return _LOSSES[name]


def available_losses() -> list[str]:
    return sorted(_LOSSES)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """Eq. 1: features divided by their L2 norm along channels (as torch F.normalize)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def distance_map(teacher: Array, student: Array) -> Array:
    """Eq. 2 per position: 1/2 ||t^ - s^||^2, shape (B, H, W)."""
    d = l2_normalize(teacher) - l2_normalize(student)
    return 0.5 * jnp.sum(d * d, axis=-1)


def level_loss(teacher: Array, student: Array) -> Array:
    """Eq. 3: the distance map averaged over positions, one value per image (B,)."""
    return jnp.mean(distance_map(teacher, student), axis=(1, 2))


@register_loss("paper")
def paper_loss(pairs: Pairs) -> tuple[Array, dict[str, Array]]:
    """Eq. 4 for each student (sum over levels, mean over batch); total = sum over students."""
    metrics: dict[str, Array] = {}
    total = jnp.zeros((), jnp.float32)
    for student, levels in pairs.items():
        student_total = jnp.zeros((), jnp.float32)
        for level, (t, s) in levels.items():
            value = jnp.mean(level_loss(t, s))
            metrics[f"{student}/{level}"] = value
            student_total = student_total + value
        metrics[student] = student_total
        total = total + student_total
    metrics["loss"] = total
    return total, metrics
