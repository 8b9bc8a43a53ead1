"""orbax checkpoints of the students (with resume) and teacher-weight loading."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from rstpm_jax import config_checks
from rstpm_jax.models import pretrained


def checkpoint_manager(directory: str, keep: int) -> ocp.CheckpointManager:
    """Epoch-numbered checkpoints of the train state; keeps the last ``keep``."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max(1, int(keep)), create=True,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, epoch: int, state: Any, meta: dict) -> None:
    manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()


def restore(manager: ocp.CheckpointManager, epoch: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restore ``epoch`` into the structure, dtypes and shardings of ``abstract_state``."""
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = manager.restore(epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                         meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]


def restore_meta(manager: ocp.CheckpointManager, epoch: int) -> dict:
    """The JSON metadata saved with ``epoch``."""
    return manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def save_variables(directory: str, variables: Any) -> None:
    """Write a variables tree once (e.g. the frozen teachers) beside the checkpoints."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(directory), variables, force=True)


def load_variables(directory: str, abstract: Any) -> Any:
    with ocp.StandardCheckpointer() as ckptr:
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
        return ckptr.restore(os.path.abspath(directory), target)


def teacher_variables(model_cfg: ml_collections.ConfigDict, random_vars: dict) -> dict:
    """Teacher variables: converted torchvision weights, or ``random_vars`` if allowed.

    ``random_vars`` is the randomly initialised teacher tree; its structure is the target.
    """
    if model_cfg.random_teachers:
        logging.warning("!" * 72)
        logging.warning("model.random_teachers=True: the teachers are RANDOMLY INITIALISED, not "
                        "ImageNet-pretrained. Results mean nothing for real inspection (demo/tests only).")
        logging.warning("!" * 72)
        return random_vars
    params, stats = {}, {}
    for name, key in (("teacher1", "teacher1_weights"), ("teacher2", "teacher2_weights")):
        if name not in random_vars["params"]:
            continue
        path = os.path.expanduser(str(model_cfg[key]))
        if not os.path.isfile(path):
            raise FileNotFoundError(config_checks.missing_weights_message(model_cfg, name))
        full = pretrained.load_pretrained(path)
        depth = sum(1 for k in random_vars["params"][name] if k.startswith("layer") and k.endswith("_0"))
        loaded = pretrained.truncate_variables(full, depth)
        _check_same_structure(random_vars, name, loaded, path, key, full, str(model_cfg[name]))
        params[name], stats[name] = loaded["params"], loaded["batch_stats"]
    return {"params": params, "batch_stats": stats}


def _check_same_structure(random_vars: dict, name: str, loaded: dict, path: str, key: str,
                          full: dict | None = None, arch: str = "") -> None:
    for col in ("params", "batch_stats"):
        want = jax.tree.map(lambda a: tuple(a.shape), random_vars[col][name])
        got = jax.tree.map(lambda a: tuple(a.shape), loaded[col])
        if want != got:
            held = pretrained.describe(path, full)
            raise ValueError(
                f"config.model.{key}={path!r} does not match config.model.{name}={arch!r}: the file "
                f"holds {held or 'weights of another architecture'} (different {col} tree or shapes). "
                f"Set config.model.{name} to the file's architecture, or point config.model.{key} at "
                f"converted {arch} weights (pretrained_conversion.convert_torchvision --arch {arch}).")
