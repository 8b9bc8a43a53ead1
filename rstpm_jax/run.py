"""A run: train (or load) every requested category, evaluate it, write its results and the
summary; and the ablation sweep over such runs. ``main`` and ``sweep`` call these."""

from __future__ import annotations

import contextlib
import copy
import logging as std_logging
import os
from collections.abc import Sequence

import jax
import ml_collections
from absl import logging

from rstpm_jax import artifacts, config_checks, evaluate, guards, registry, reports, sharding, train
from rstpm_jax import jobs as jobs_lib
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
    """Train (mode=train) and evaluate every job (category x seed); write the reports.

    Returns ``{job name: result row}`` (the metrics and thresholds, or the failure)."""
    if config.mode not in MODES:
        raise ValueError(f"config.mode must be one of {MODES}, got {config.mode!r}.")
    initialize(config)
    config_checks.validate(config)  # every key, before any data is read
    workdir = os.path.abspath(os.path.expanduser(workdir))
    # Other teachers than the workdir's: refused before anything is trained, evaluated or written.
    for _, run_dir, cfg in jobs_lib.runs(config, workdir):
        if config.mode == "train":
            workdir_lib.check_teachers_before_training(cfg, run_dir)
        else:
            workdir_lib.check_teachers(cfg, run_dir, compare_files=False)
    os.makedirs(workdir, exist_ok=True)
    # One run per workdir at a time (process 0 holds WORKDIR/.lock).
    lock = guards.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    source, categories = sources.prepare(config, workdir)
    # Every image and mask of every category decoded, and each split big enough, before training.
    sources.check_categories(source, categories, config)
    planned = jobs_lib.plan(config, workdir, categories)
    if config.mode == "train":
        if len(jobs_lib.seeds_of(config)) > 1:
            workdir_lib.save_config(workdir, config)
        for run_dir, cfg in jobs_lib.run_dirs(planned).items():
            os.makedirs(run_dir, exist_ok=True)
            workdir_lib.save_config(run_dir, cfg)
        failures = train.train_group(planned, source, config.mesh)
    else:
        failures = {}
    rows = {}
    mesh = sharding.make_mesh()
    for job in planned:
        if failures.get(job.name):
            rows[job.name] = artifacts.failed(failures[job.name])
            artifacts.write_failure(job.directory, job.category, failures[job.name], job.config)
            continue
        try:
            # The students the config selects (train.select_epoch), as predict and export load them.
            model, teacher_vars, student_vars = workdir_lib.load_trained(job.config, job.workdir,
                                                                         job.category, mesh)
            evaluation = evaluate.evaluate_category(
                job.config, source, job.category, model, teacher_vars, student_vars, mesh,
                artifact_dir=artifacts.category_dir(job.workdir, job.category, job.config))
            evaluation.selection = workdir_lib.selection_record(job.config, job.workdir, job.category)
            if artifacts.eval_subdir(job.config):  # through an artifact: its cost against float32
                vs = artifacts.compare_with_float32(job.workdir, evaluation)
                evaluation.deployment[reports.VS_FLOAT32] = vs
                if vs:
                    logging.info("%s against float32: image AUROC %+.4f (%g of %d normal/defect pairs swapped), "
                                 "pixel AUROC %+.4f, scores within %.2g (closest pair %.2g apart)", job.name,
                                 vs["image_auroc"], vs["swapped_pairs"], vs["pairs"], vs["pixel_auroc"],
                                 vs["max_rel_score_change"], vs["closest_pair_gap"])
            artifacts.write_category(job.workdir, evaluation, job.config)
            rows[job.name] = artifacts.row(evaluation)
        except (OSError, ValueError, RuntimeError) as e:  # the others' evaluations go on
            if isinstance(e, guards.NoSpaceError):
                raise
            logging.exception("%s: evaluation failed", job.name)
            rows[job.name] = artifacts.failed(e)
            artifacts.write_failure(job.directory, job.category, str(e), job.config)
    artifacts.write_summary(workdir, rows, config)
    failed = [name for name, r in rows.items() if reports.is_failed(r)]
    if failed:
        raise JobsFailedError(f"{len(failed)} of {len(rows)} job(s) failed ({', '.join(failed)}); the others' "
                         f"results are in {workdir}. " + " ".join(f"{n}: {rows[n]['error']}" for n in failed),
                         rows)
    return rows


class JobsFailedError(RuntimeError):
    """Some jobs of a run failed; the others finished and were written (``rows``: all of them)."""

    def __init__(self, message: str, rows: dict[str, dict]):
        super().__init__(message)
        self.rows = rows


def sweep(config: ml_collections.ConfigDict, workdir: str, models: Sequence[str]) -> dict[str, dict]:
    """Run ``models`` (names in ABLATIONS) into ``WORKDIR/<model>/`` and write the comparison
    table ``WORKDIR/ablation.md``; returns their results."""
    unknown = [m for m in models if m not in ABLATIONS]
    if unknown:
        raise ValueError(f"--models: unknown {unknown}; choose from {list(ABLATIONS)}.")
    results, errors = {}, []
    for name in models:
        cfg = copy.deepcopy(config)
        ABLATIONS[name](cfg)
        logging.info("sweep: %s", name)
        try:
            results[name] = train_and_evaluate(cfg, os.path.join(workdir, name))
        except JobsFailedError as e:  # the ablation's other jobs finished: keep them, go on
            results[name], errors = e.rows, errors + [f"{name}: {e}"]
    if jax.process_index() == 0:
        reports.write_ablation_table(workdir, {
            m: [{"category": c, **r} for c, r in res.items() if not reports.is_failed(r)]
            for m, res in results.items()})
    if errors:
        raise JobsFailedError(" ".join(errors), {})
    return results
