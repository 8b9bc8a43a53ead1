"""A training run's folder: its config, its teachers, which categories it has trained, and
the trained model of a category (for evaluation, predict and export).

    WORKDIR/config.json            resolved config (merged over the defaults when loaded)
    WORKDIR/teachers/              frozen teacher variables
    WORKDIR/teachers.json          what they are: per teacher the arch and the weight file's
                                   sha256, or "random" with the seed (checked on every use)
    WORKDIR/<category>/checkpoints orbax checkpoints of the students
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from rstpm_jax import checkpoints, config_checks, defaults, registry, sharding
from rstpm_jax.data.tiling import model_input_size
from rstpm_jax.models.rstpm import RSTPM, build_model
from rstpm_jax.state import TrainState, create_student_state

CONFIG_FILE = "config.json"
TEACHERS_RECORD = "teachers.json"


def category_dir(workdir: str, category: str) -> str:
    return os.path.join(workdir, category)


def checkpoint_dir(workdir: str, category: str) -> str:
    return os.path.join(workdir, category, "checkpoints")


def best_dir(workdir: str, category: str) -> str:
    """The students of the epoch ``train.select_epoch=best_holdout`` kept."""
    return os.path.join(workdir, category, "best")


def selected_checkpoint(config: ml_collections.ConfigDict, workdir: str, category: str) -> str:
    """The checkpoint folder evaluation, predict and export use: ``best/`` when the config
    selects the best held-out epoch (and training wrote it), else ``checkpoints/``."""
    selection = str(config.train.get("select_epoch", "last"))
    if selection not in config_checks.SELECTIONS:
        raise ValueError(f"config.train.select_epoch must be one of {config_checks.SELECTIONS}, "
                         f"got {selection!r}.")
    best = best_dir(workdir, category)
    if selection == "best_holdout" and os.path.isdir(best):
        return best
    return checkpoint_dir(workdir, category)


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


def fresh_state(config: ml_collections.ConfigDict, model: RSTPM) -> TrainState:
    """A fresh students' train state from ``config.seed`` (for inputs of the model's size:
    ``data.image_size``, or ``data.tile_size`` when tiling)."""
    return create_student_state(jax.random.key(config.seed), config, model, model_input_size(config.data))


def abstract_state(config: ml_collections.ConfigDict, model: RSTPM) -> TrainState:
    """The students' train state as ``jax.ShapeDtypeStruct`` leaves (a restore target; nothing is
    initialised)."""
    return jax.eval_shape(lambda: fresh_state(config, model))


def _random_teachers(config: ml_collections.ConfigDict, model: RSTPM) -> dict:
    size = model_input_size(config.data)
    return model.init_teachers(jax.random.key(config.seed), (1, size, size, 3))


def abstract_teachers(config: ml_collections.ConfigDict, model: RSTPM) -> dict:
    """The teacher variables' tree as ``jax.ShapeDtypeStruct`` leaves (nothing is initialised)."""
    return jax.eval_shape(lambda: _random_teachers(config, model))


def config_teachers(config: ml_collections.ConfigDict, model: RSTPM) -> dict:
    """The config's teacher variables (``checkpoints.teacher_variables``): the converted weight
    files, or with ``model.random_teachers`` random ones from ``config.seed`` (only then
    initialised)."""
    return checkpoints.teacher_variables(config.model, _random_teachers(config, model)
                                         if config.model.random_teachers else abstract_teachers(config, model))


# ----------------------------------------------------------------------------- teachers' identity

_SHA256: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> digest, once per process


def file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _SHA256[key] = h.hexdigest()
    return _SHA256[key]


def teachers_identity(config: ml_collections.ConfigDict, *, hash_files: bool = True) -> dict[str, Any]:
    """What the config's teachers are: ``{"teacher1": {"arch", "stages", "weights", "seed" |
    "sha256"}, "teacher2": ... or None}`` (``weights`` is "random" or the file's path).

    ``hash_files``: hash the weight files (they must exist); else ``sha256`` is None."""
    m = config.model
    student2 = bool(m.student2)

    def one(name: str, stages: int) -> dict[str, Any]:
        out: dict[str, Any] = {"arch": str(m[name]), "stages": stages}
        if m.random_teachers:
            return {**out, "weights": "random", "seed": int(config.seed)}
        path = os.path.abspath(os.path.expanduser(str(m[f"{name}_weights"])))
        if hash_files and not os.path.isfile(path):
            from rstpm_jax import config_checks  # noqa: PLC0415 (the message only)
            raise FileNotFoundError(config_checks.missing_weights_message(m, name))
        return {**out, "weights": path, "sha256": file_sha256(path) if hash_files else None}

    return {"teacher1": one("teacher1", 4 if student2 else 3),
            "teacher2": one("teacher2", 3) if student2 else None}


def read_teachers_record(workdir: str) -> dict[str, Any] | None:
    """``WORKDIR/teachers.json``, or None when the workdir predates it (or has no teachers)."""
    path = os.path.join(workdir, TEACHERS_RECORD)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}). It records which teachers {teachers_dir(workdir)} "
                         "holds; train into a new --workdir, or delete it to have it checked and "
                         "rewritten on the next training run.") from e
    return record


def write_teachers_record(workdir: str, identity: dict[str, Any]) -> None:
    """Write ``WORKDIR/teachers.json`` (host 0; atomically)."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, TEACHERS_RECORD)
    with open(path + ".tmp", "w") as f:
        json.dump(identity, f, indent=2)
    os.replace(path + ".tmp", path)


def _describe_teacher(t: dict[str, Any] | None) -> str:
    if t is None:
        return "none"
    what = f"{t.get('arch')} up to layer{t.get('stages')}"
    if t.get("weights") == "random":
        return f"random {what} (seed {t.get('seed')})"
    sha = t.get("sha256")
    return f"{what} from {t.get('weights')}" + (f" (sha256 {sha[:12]})" if sha else "")


def teacher_differences(recorded: dict[str, Any], wanted: dict[str, Any], *,
                        compare_files: bool = True) -> list[str]:
    """How the teachers ``wanted`` differ from those ``recorded`` (empty: the same). Weight
    files are compared by content (sha256; the path may change) when ``compare_files``."""
    diffs = []
    for name in ("teacher1", "teacher2"):
        r, w = recorded.get(name), wanted.get(name)
        if r is None and w is None:
            continue
        same = r is not None and w is not None and all(r.get(k) == w.get(k) for k in ("arch", "stages"))
        if same:
            r_random, w_random = r.get("weights") == "random", w.get("weights") == "random"
            if r_random or w_random:
                same = r_random and w_random and r.get("seed") == w.get("seed")
            elif compare_files and w.get("sha256") is not None:
                same = r.get("sha256") == w.get("sha256")
        if not same:
            diffs.append(f"{name}: the workdir holds {_describe_teacher(r)}, the config asks for "
                         f"{_describe_teacher(w)}")
    return diffs


def teachers_mismatch_error(workdir: str, diffs: list[str]) -> ValueError:
    return ValueError(
        f"The teachers in {teachers_dir(workdir)} are not the ones the config names: "
        + "; ".join(diffs) + ". Every checkpoint there was trained against the workdir's teachers, "
        "so it cannot be resumed, evaluated or served with other ones. Train with other teachers "
        "into a new --workdir (or delete WORKDIR/teachers, WORKDIR/teachers.json and the category "
        f"folders to start this one afresh); to keep using this workdir, use the model keys of "
        f"its {CONFIG_FILE} (e.g. config.model.random_teachers, config.model.teacher1_weights).")


def check_teachers(config: ml_collections.ConfigDict, workdir: str, *, compare_files: bool = True) -> bool:
    """Raise when ``WORKDIR/teachers.json`` records other teachers than ``config``'s (with
    ``compare_files`` the weight files' sha256 too, else arch, stages and random/seed only).
    Returns False when there is nothing to compare against (no record)."""
    record = read_teachers_record(workdir)
    if record is None or not os.path.isdir(teachers_dir(workdir)):
        return False
    diffs = teacher_differences(record, teachers_identity(config, hash_files=compare_files),
                                compare_files=compare_files)
    if diffs:
        raise teachers_mismatch_error(workdir, diffs)
    return True


def _same_values(a: Any, b: Any) -> bool:
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)))


def ensure_teachers(config: ml_collections.ConfigDict, workdir: str, teacher_vars: Any) -> None:
    """Before training: save the config's teachers (``teacher_vars``, replicated) and their
    record when the workdir has none; else check that they are the workdir's.

    A workdir written before ``teachers.json`` existed is checked by value (the saved
    teachers against the config's) and, when they agree, given its record."""
    directory = teachers_dir(workdir)
    identity = teachers_identity(config)
    if not os.path.isdir(directory):
        write_teachers_record(workdir, identity)  # first: a crash before the save leaves no teachers/
        checkpoints.save_variables(directory, teacher_vars)
        return
    record = read_teachers_record(workdir)
    if record is not None:
        diffs = teacher_differences(record, identity)
        if diffs:
            raise teachers_mismatch_error(workdir, diffs)
        return
    try:
        saved = checkpoints.load_variables(directory, teacher_vars)
        same = _same_values(saved, teacher_vars)
    except Exception as e:  # noqa: BLE001 - orbax raises several types for another tree
        logging.info("teachers/ does not restore into the config's teachers: %s", e)
        same = False
    if not same:
        raise teachers_mismatch_error(workdir, [
            f"{directory} (written before teachers.json was recorded) holds other values than "
            f"the config's teachers ({_describe_teacher(identity['teacher1'])}; teacher2: "
            f"{_describe_teacher(identity['teacher2'])})"])
    logging.info("%s: the saved teachers equal the config's; recorded them in %s.", directory, TEACHERS_RECORD)
    write_teachers_record(workdir, identity)


def check_teachers_before_training(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Before a training run writes anything: the config's teachers must be the workdir's
    (``check_teachers``; a workdir without the record is checked by value, as
    ``ensure_teachers`` does, and recorded when they agree)."""
    if check_teachers(config, workdir) or not os.path.isdir(teachers_dir(workdir)):
        return
    teachers = config_teachers(config, create_model(config))
    ensure_teachers(config, workdir, sharding.replicate(teachers, sharding.make_mesh()))


def load_teachers(config: ml_collections.ConfigDict, workdir: str, model: RSTPM,
                  mesh: jax.sharding.Mesh) -> Any:
    """The run's frozen teachers (``WORKDIR/teachers``, else from the config), replicated.

    ``WORKDIR/teachers.json`` must agree with the config's model keys (arch, stages,
    random/seed; the weight files need not be present). A workdir without the record is
    checked by value when the config's teachers can be built (random, or the weight files
    present), else used with a warning."""
    directory = teachers_dir(workdir)
    if not os.path.isdir(directory):
        return sharding.replicate(config_teachers(config, model), mesh)
    checked = check_teachers(config, workdir, compare_files=False)
    teachers = checkpoints.load_variables(directory,
                                          sharding.replicated_abstract(abstract_teachers(config, model), mesh))
    if checked:
        return teachers
    try:
        wanted = teachers_identity(config)  # raises when a weight file is missing
    except FileNotFoundError:
        logging.warning("%s has no %s (written by an earlier version) and the config's weight files "
                        "are absent: cannot check that its teachers are the config's.", workdir,
                        TEACHERS_RECORD)
        return teachers
    if not _same_values(teachers, config_teachers(config, model)):
        raise teachers_mismatch_error(workdir, [
            f"{directory} (written before teachers.json was recorded) holds other values than the "
            f"config's teachers ({_describe_teacher(wanted['teacher1'])}; teacher2: "
            f"{_describe_teacher(wanted['teacher2'])})"])
    return teachers


def selection_record(config: ml_collections.ConfigDict, workdir: str, category: str) -> dict[str, Any]:
    """Which epoch's students ``load_trained`` gives, and the held-out curve that chose it."""
    directory = selected_checkpoint(config, workdir, category)
    manager = checkpoints.checkpoint_manager(directory, 1)
    try:
        epoch = manager.latest_step()
        meta = checkpoints.restore_meta(manager, epoch) if epoch is not None else {}
    finally:
        manager.close()
    return {"select_epoch": str(config.train.get("select_epoch", "last")),
            "source": os.path.basename(directory), "epoch": epoch,
            "holdout_curve": meta.get("holdout_curve", [])}


def load_trained(config: ml_collections.ConfigDict, workdir: str, category: str,
                 mesh: jax.sharding.Mesh, **model_kwargs: Any) -> tuple[RSTPM, Any, dict]:
    """Model, teacher variables and the selected students (``selected_checkpoint``) of a
    trained category."""
    check_trained(workdir, category)
    model = create_model(config, **model_kwargs)
    teacher_vars = load_teachers(config, workdir, model, mesh)
    ckpt_dir = selected_checkpoint(config, workdir, category)
    manager = checkpoints.checkpoint_manager(ckpt_dir, config.train.keep_checkpoints)
    try:
        latest = manager.latest_step()
        if latest is None:
            raise FileNotFoundError(f"{ckpt_dir} holds no complete checkpoint; train {category!r} first.")
        state, _ = checkpoints.restore(manager, latest,
                                       sharding.replicated_abstract(abstract_state(config, model), mesh))
    finally:
        manager.close()
    return model, teacher_vars, {"params": state.params, "batch_stats": state.batch_stats}
