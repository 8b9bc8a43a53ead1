"""Teacher features of the training images, computed once and looked up by image index."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rstpm_jax.models.rstpm import RSTPM
from rstpm_jax.ops import compile_options


def feature_bytes(model: RSTPM, teacher_vars: Any, image_size: int) -> int:
    """Bytes of the teachers' features for one image."""
    shapes = jax.eval_shape(model.teacher_features, teacher_vars,
                            jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
    return int(sum(np.prod(s.shape) * s.dtype.itemsize for s in jax.tree.leaves(shapes)))


@functools.lru_cache(maxsize=4)
def jitted_teachers(model: RSTPM) -> Callable:
    """``model.teacher_features`` jitted as the feature cache runs it (memoised)."""
    return compile_options.jit(model.teacher_features)


class TeacherCache:
    """Teacher features of the training images, looked up by image index."""

    def __init__(self, model: RSTPM, teacher_vars: Any, images: np.ndarray, indices: np.ndarray,
                 batch_size: int):
        fn = jitted_teachers(model)
        chunks = [jax.device_get(fn(teacher_vars, images[i:i + batch_size]))
                  for i in range(0, len(images), batch_size)]
        self.features = jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)
        self.row = {int(i): r for r, i in enumerate(indices)}
        self.nbytes = int(sum(x.nbytes for x in jax.tree.leaves(self.features)))

    def lookup(self, indices: np.ndarray) -> Any:
        """Features of the images ``indices``; zeros for padding rows (index -1)."""
        rows = np.asarray([self.row.get(int(i), 0) for i in indices])
        pad = np.asarray(indices) < 0

        def take(x):
            out = x[rows]
            out[pad] = 0
            return out

        return jax.tree.map(take, self.features)


def use_cache(train_cfg: ml_collections.ConfigDict, per_image: int, n_images: int) -> bool:
    """Whether ``train.cache_teacher_features`` (auto/on/off) caches ``n_images`` images."""
    mode = str(train_cfg.cache_teacher_features)
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"config.train.cache_teacher_features must be auto/on/off, got {mode!r}.")
    need = per_image * n_images
    fits = need <= train_cfg.cache_max_bytes
    if mode == "auto" and not fits:
        logging.info("Teacher-feature cache off: %.2f GB > train.cache_max_bytes %.2f GB.",
                     need / 2**30, train_cfg.cache_max_bytes / 2**30)
    return mode == "on" or (mode == "auto" and fits)
