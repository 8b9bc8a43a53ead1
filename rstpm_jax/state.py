"""The students' train state and optimizer (SGD as the reference STPM code)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import optax
from flax.training import train_state

from rstpm_jax.models.rstpm import RSTPM


class TrainState(train_state.TrainState):
    """Students' parameters, BatchNorm statistics and optimizer state (no teachers)."""

    batch_stats: Any = None


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with momentum and torch-style (coupled) weight decay, constant learning rate."""
    return _sgd(float(train_cfg.learning_rate), float(train_cfg.momentum), float(train_cfg.weight_decay))


@functools.lru_cache(maxsize=8)
def _sgd(learning_rate: float, momentum: float, weight_decay: float) -> optax.GradientTransformation:
    # One object per setting: the optimizer is part of the train state's tree structure, so a
    # new one per category would retrace and recompile the train step.
    return optax.chain(optax.add_decayed_weights(weight_decay),
                       optax.sgd(learning_rate, momentum=momentum))


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict, model: RSTPM,
                       image_size: int) -> tuple[TrainState, dict]:
    """Fresh students' train state and randomly initialised teacher variables."""
    return (create_student_state(rng, config, model, image_size),
            model.init_teachers(rng, (1, image_size, image_size, 3)))


def create_student_state(rng: jax.Array, config: ml_collections.ConfigDict, model: RSTPM,
                         image_size: int) -> TrainState:
    """``create_train_state``'s students' train state alone (the teachers are not initialised)."""
    student_vars = model.init_students(rng, (1, image_size, image_size, 3))
    # apply_fn stays None: it is part of the tree structure, and a bound method of a new model
    # object per category would retrace the train step.
    return TrainState.create(apply_fn=None, params=student_vars["params"],
                             batch_stats=student_vars["batch_stats"], tx=make_optimizer(config.train))
