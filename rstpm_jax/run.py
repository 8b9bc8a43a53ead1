"""A run: train (or load) every requested category, evaluate it, write its results and the
summary; and the ablation sweep over such runs. ``main`` and ``sweep`` call these."""

from __future__ import annotations

import copy
import logging as std_logging
import os
from collections.abc import Sequence

import jax
import ml_collections
from absl import logging

from rstpm_jax import artifacts, config_checks, evaluate, registry, reports, sharding, train
from rstpm_jax import workdir as workdir_lib
from rstpm_jax.ablations import ABLATIONS
from rstpm_jax.data import sources

MODES = ("train", "eval")


def quiet_library_logs() -> None:
    """Keep orbax's per-save INFO chatter out of the absl log; warnings and errors pass."""
    logging.get_absl_handler().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname)


def initialize(config: ml_collections.ConfigDict) -> None:
    """Once per process: ``jax.distributed`` when the run spans hosts, then the plugins."""
    sharding.initialize_distributed(config.distributed.coordinator_address,
                                    int(config.distributed.num_processes),
                                    int(config.distributed.process_id))
    registry.import_plugins(config.plugins)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    """Train (mode=train) and evaluate every requested category; write the reports.

    Returns ``{category: result row}`` (the metrics and thresholds)."""
    if config.mode not in MODES:
        raise ValueError(f"config.mode must be one of {MODES}, got {config.mode!r}.")
    initialize(config)
    config_checks.validate(config)  # every key, before any data is read
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if config.mode == "train":  # other teachers than the workdir's: refused before anything is written
        workdir_lib.check_teachers_before_training(config, workdir)
    os.makedirs(workdir, exist_ok=True)
    source, categories = sources.prepare(config, workdir)
    # Every image and mask of every category decoded, and each split big enough, before training.
    sources.check_categories(source, categories, config)
    mesh = sharding.make_mesh()
    if config.mode == "train":
        workdir_lib.save_config(workdir, config)
    rows = {}
    for category in categories:
        if config.mode == "train":
            model, teacher_vars, state = train.train_category(config, workdir, source, category, mesh)
            student_vars = {"params": state.params, "batch_stats": state.batch_stats}
        else:
            model, teacher_vars, student_vars = workdir_lib.load_trained(config, workdir, category, mesh)
        evaluation = evaluate.evaluate_category(config, source, category, model, teacher_vars,
                                                student_vars, mesh)
        artifacts.write_category(workdir, evaluation, config)
        rows[category] = artifacts.row(evaluation)
    artifacts.write_summary(workdir, rows)
    return rows


def sweep(config: ml_collections.ConfigDict, workdir: str, models: Sequence[str]) -> dict[str, dict]:
    """Run ``models`` (names in ABLATIONS) into ``WORKDIR/<model>/`` and write the comparison
    table ``WORKDIR/ablation.md``; returns their results."""
    unknown = [m for m in models if m not in ABLATIONS]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; choose from {list(ABLATIONS)}.")
    results = {}
    for name in models:
        cfg = copy.deepcopy(config)
        ABLATIONS[name](cfg)
        logging.info("sweep: %s", name)
        results[name] = train_and_evaluate(cfg, os.path.join(workdir, name))
    if jax.process_index() == 0:
        reports.write_ablation_table(workdir, {m: [{"category": c, **r} for c, r in res.items()]
                                               for m, res in results.items()})
    return results
