"""The inference function: images -> final anomaly map, image score and per-level maps.

Shared by evaluation, the predict CLI and the ``jax.export`` artifact. No TensorFlow.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections

from rstpm_jax import anomaly_maps
from rstpm_jax.models.rstpm import RSTPM, feature_pairs

Array = jax.Array


def make_infer_fn(model: RSTPM, maps_cfg: ml_collections.ConfigDict,
                  with_levels: bool = True) -> Callable[[Any, Any, Array], dict[str, Any]]:
    """``fn(teacher_vars, student_vars, images) -> {"map", "score"[, "levels"]}`` (pure, jittable)."""
    fusion, sigma = str(maps_cfg.fusion), float(maps_cfg.smoothing_sigma)
    anomaly_maps.get_fusion(fusion)

    def infer(teacher_vars: Any, student_vars: Any, images: Array) -> dict[str, Any]:
        teacher = model.teacher_features(teacher_vars, images)
        student, _ = model.student_features(student_vars, images, teacher, train=False)
        final, levels = anomaly_maps.anomaly_maps(feature_pairs(teacher, student), images.shape[1:3],
                                                  fusion, sigma)
        out = {"map": final, "score": anomaly_maps.image_score(final)}
        if with_levels:
            out["levels"] = levels
        return out

    return infer
