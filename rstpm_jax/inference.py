"""The inference function: images -> final anomaly map, image score and per-level maps.

Shared by evaluation, the predict CLI and the exported artifacts. No TensorFlow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from rstpm_jax import anomaly_maps, sharding
from rstpm_jax.anomaly_maps import MapSpec
from rstpm_jax.models.rstpm import RSTPM, attention_maps, feature_pairs
from rstpm_jax.ops import compile_options

Array = jax.Array
InferFn = Callable[..., dict[str, Any]]


def make_infer_fn(model: RSTPM, spec: MapSpec, with_levels: bool = True,
                  with_attention: bool = False) -> InferFn:
    """``fn(teacher_vars, student_vars, images, stats=None) -> {"map", "score"[, "levels"][,
    "attention"]}`` (pure, jittable); ``attention`` needs a model with gates; ``stats``: the
    held-out map statistics of a fusion rule that needs them (``anomaly_maps.stats_arrays``)."""

    def infer(teacher_vars: Any, student_vars: Any, images: Array, stats: Any = None) -> dict[str, Any]:
        teacher = model.teacher_features(teacher_vars, images)
        student, sown = model.student_features(student_vars, images, teacher, train=False,
                                               capture_attention=with_attention)
        final, levels = anomaly_maps.anomaly_maps(feature_pairs(teacher, student),
                                                  images.shape[1:3], spec, stats)
        out = {"map": final, "score": anomaly_maps.image_score(final)}
        if with_levels:
            out["levels"] = levels
        if with_attention:
            out["attention"] = attention_maps(sown["intermediates"])
        return out

    return infer


@functools.lru_cache(maxsize=8)
def compiled_infer(model: RSTPM, spec: MapSpec, mesh: jax.sharding.Mesh, with_levels: bool = True,
                   with_attention: bool = False) -> Callable:
    """:func:`make_infer_fn` jitted over ``mesh``: variables and statistics replicated, images
    and outputs batch-sharded (memoised, so every category of a run shares one compiled
    function; the statistics are an argument, not a constant)."""
    repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    jitted = compile_options.jit(make_infer_fn(model, spec, with_levels, with_attention),
                                 in_shardings=(repl, repl, batch, repl), out_shardings=batch)

    def call(teacher_vars: Any, student_vars: Any, images: Array, stats: Any = None) -> dict[str, Any]:
        return jitted(teacher_vars, student_vars, images, stats)

    return call


def bind_stats(infer: Callable, stats: Any) -> Callable:
    """``infer(teacher_vars, student_vars, images)`` with the map statistics given (``None``:
    ``infer`` itself)."""
    if stats is None:
        return infer
    return lambda teacher_vars, student_vars, images: infer(teacher_vars, student_vars, images, stats)
