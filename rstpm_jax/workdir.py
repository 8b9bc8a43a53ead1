"""A training run's folder: its config, its teachers, which categories it has trained, and
the trained model of a category (for evaluation, predict and export).

    WORKDIR/config.json            resolved config (merged over the defaults when loaded)
    WORKDIR/teachers/              frozen teacher variables
    WORKDIR/<category>/checkpoints orbax checkpoints of the students
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from rstpm_jax import checkpoints, defaults, registry, sharding
from rstpm_jax.data.tiling import model_input_size
from rstpm_jax.models.rstpm import RSTPM, build_model
from rstpm_jax.state import TrainState, create_train_state

CONFIG_FILE = "config.json"


def category_dir(workdir: str, category: str) -> str:
    return os.path.join(workdir, category)


def checkpoint_dir(workdir: str, category: str) -> str:
    return os.path.join(workdir, category, "checkpoints")


def teachers_dir(workdir: str) -> str:
    return os.path.join(workdir, "teachers")


def merge_defaults(saved: dict) -> ml_collections.ConfigDict:
    """``saved`` (a config as a dict) over the current defaults: keys added since it was
    written get their default; its own values (and keys the defaults lack) are kept."""
    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merge(base[key], value) if isinstance(base.get(key), dict) and isinstance(
                value, dict) else value
        return out
    return ml_collections.ConfigDict(merge(defaults.get_config().to_dict(), saved))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a training run wrote to ``WORKDIR/config.json``, merged over the defaults,
    with the modules its ``plugins`` names imported (their registered parts are then known)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        held = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else None
        where = f"it holds: {held or 'nothing'}" if held is not None else "the folder does not exist"
        raise FileNotFoundError(f"{path} not found ({where}). Point --workdir at the folder a "
                                "`python -m rstpm_jax.main` training run wrote.")
    with open(path) as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); rerun the training command to "
                             "rewrite it.") from e
    config = merge_defaults(saved)
    registry.import_plugins(config.plugins)
    return config


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Write ``config`` to ``WORKDIR/config.json`` (host 0; atomically)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)


def trained_categories(workdir: str) -> list[str]:
    """Categories with a checkpoint folder in ``workdir``."""
    if not os.path.isdir(workdir):
        return []
    return sorted(d for d in os.listdir(workdir) if os.path.isdir(checkpoint_dir(workdir, d)))


def check_trained(workdir: str, category: str) -> None:
    """A clear error when ``workdir`` holds no trained ``category`` (naming what it holds)."""
    if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
        load_config(workdir)  # raises, naming what the folder holds
    if not os.path.isdir(checkpoint_dir(workdir, category)):
        raise FileNotFoundError(
            f"No trained model for category {category!r} in {workdir} (trained categories there: "
            f"{trained_categories(workdir) or 'none'}). Train it first or fix --category.")


def create_model(config: ml_collections.ConfigDict, **kwargs: Any) -> RSTPM:
    """The model of ``config`` (``build_model(config.model, **kwargs)``)."""
    return build_model(config.model, **kwargs)


def init_state(config: ml_collections.ConfigDict, model: RSTPM) -> tuple[TrainState, dict]:
    """A fresh train state and random teacher variables from ``config.seed`` (for inputs of the
    model's size: ``data.image_size``, or ``data.tile_size`` when tiling)."""
    return create_train_state(jax.random.key(config.seed), config, model, model_input_size(config.data))


def load_teachers(config: ml_collections.ConfigDict, workdir: str, random_teachers: dict,
                  mesh: jax.sharding.Mesh) -> Any:
    """The run's frozen teachers (``WORKDIR/teachers``, else from the config), replicated."""
    directory = teachers_dir(workdir)
    if os.path.isdir(directory):
        return checkpoints.load_variables(directory, sharding.replicate(random_teachers, mesh))
    return sharding.replicate(checkpoints.teacher_variables(config.model, random_teachers), mesh)


def load_trained(config: ml_collections.ConfigDict, workdir: str, category: str,
                 mesh: jax.sharding.Mesh, **model_kwargs: Any) -> tuple[RSTPM, Any, dict]:
    """Model, teacher variables and the latest students' checkpoint of a trained category."""
    check_trained(workdir, category)
    model = create_model(config, **model_kwargs)
    state, random_teachers = init_state(config, model)
    teacher_vars = load_teachers(config, workdir, random_teachers, mesh)
    ckpt_dir = checkpoint_dir(workdir, category)
    manager = checkpoints.checkpoint_manager(ckpt_dir, config.train.keep_checkpoints)
    try:
        latest = manager.latest_step()
        if latest is None:
            raise FileNotFoundError(f"{ckpt_dir} holds no complete checkpoint; train {category!r} first.")
        state, _ = checkpoints.restore(manager, latest, sharding.replicate(state, mesh))
    finally:
        manager.close()
    return model, teacher_vars, {"params": state.params, "batch_stats": state.batch_stats}
