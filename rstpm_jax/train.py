"""Training: create_train_state, train_step and the per-category loop (flax imagenet style).

One ``jax.jit`` over a device ``Mesh``: the batch is split on the ``data`` axis over all
devices of all hosts, students' parameters and optimizer state are replicated, BatchNorm
statistics are those of the global batch. The frozen teachers run in inference mode and
receive no gradient; their features can be computed once and reused across epochs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from rstpm_jax import checkpoints, losses, sharding, teacher_cache
from rstpm_jax import workdir as workdir_lib
from rstpm_jax.data.sources import Source
from rstpm_jax.metric_log import MetricLog
from rstpm_jax.models.rstpm import RSTPM, feature_pairs
from rstpm_jax.ops import compile_options
from rstpm_jax.registry import Bound
from rstpm_jax.state import TrainState, create_train_state  # noqa: F401 - the train API

Array = jax.Array


def train_step(state: TrainState, teacher_vars: Any, images: Array, teacher_feats: Any = None, *,
               model: RSTPM, loss_fn: Callable) -> tuple[TrainState, dict[str, Array]]:
    """One SGD step of the students on a global batch; returns the new state and metrics."""
    if teacher_feats is None:
        teacher_feats = model.teacher_features(teacher_vars, images)

    def loss_of(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        student, updates = model.student_features(variables, images, teacher_feats, train=True)
        loss, metrics = loss_fn(feature_pairs(teacher_feats, student))
        return loss, (metrics, updates["batch_stats"])

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics["grad_norm"] = optax.tree.norm(grads)
    # A finite loss with a non-finite gradient still poisons the parameters: check both.
    metrics["finite"] = (jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])).astype(jnp.float32)
    return state, metrics


@functools.lru_cache(maxsize=8)
def compile_train_step(model: RSTPM, loss_fn: Bound, mesh: jax.sharding.Mesh,
                       cached: bool) -> Callable:
    """``train_step`` jitted over ``mesh`` (batch sharded, the rest replicated, state donated).

    Memoised (the model and the bound loss compare by value), so every category of a run
    reuses one compiled step."""
    repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    step = functools.partial(train_step, model=model, loss_fn=loss_fn)
    if cached:
        return compile_options.jit(step, in_shardings=(repl, repl, batch, batch),
                                   out_shardings=(repl, repl), donate_argnums=(0,))
    return compile_options.jit(lambda s, t, x: step(s, t, x), in_shardings=(repl, repl, batch),
                               out_shardings=(repl, repl), donate_argnums=(0,))


@dataclasses.dataclass
class Run:
    """What training one category needs: its model, teachers, state and where it writes."""

    config: ml_collections.ConfigDict
    source: Source
    category: str
    mesh: jax.sharding.Mesh
    model: RSTPM
    teacher_vars: Any  # replicated over the mesh
    teacher_host: Any  # the same on the host (for the feature cache)
    state: TrainState
    start_epoch: int
    manager: Any  # orbax CheckpointManager of the category

    @property
    def epochs(self) -> int:
        return int(self.config.train.epochs)


def restore_or_init(config: ml_collections.ConfigDict, workdir: str, source: Source, category: str,
                    mesh: jax.sharding.Mesh) -> Run:
    """A fresh state (teachers saved to the workdir once, with their record) or the category's
    latest checkpoint; the config's teachers must be the workdir's (``workdir.ensure_teachers``)."""
    model = workdir_lib.create_model(config)
    state, random_teachers = workdir_lib.init_state(config, model)
    teacher_host = checkpoints.teacher_variables(config.model, random_teachers)
    teacher_vars = sharding.replicate(teacher_host, mesh)
    workdir_lib.ensure_teachers(config, workdir, teacher_vars)
    state = sharding.replicate(state, mesh)
    manager = checkpoints.checkpoint_manager(workdir_lib.checkpoint_dir(workdir, category),
                                             config.train.keep_checkpoints)
    start_epoch = 0
    latest = manager.latest_step()
    if latest is not None:
        state, meta = checkpoints.restore(manager, latest, state)
        start_epoch = int(meta["epoch"])
        logging.info("%s: resumed from the checkpoint of epoch %d.", category, start_epoch)
    return Run(config, source, category, mesh, model, teacher_vars, teacher_host, state,
               start_epoch, manager)


def steps_per_epoch(run: Run) -> int:
    from rstpm_jax.data import input_pipeline  # noqa: PLC0415 (TensorFlow)

    holdout, gbs = float(run.config.data.holdout_fraction), int(run.config.train.batch_size)
    n_train = input_pipeline.num_examples(run.source.root, run.category, "train", holdout,
                                          run.config.seed, run.source.tfds_dir)
    if n_train < gbs:
        raise ValueError(f"{run.category}: {n_train} training images (after holding out "
                         f"data.holdout_fraction={holdout}) is fewer than config.train.batch_size={gbs}; "
                         "lower the batch size.")
    return n_train // gbs


def build_teacher_cache(run: Run) -> teacher_cache.TeacherCache | None:
    """The teachers' features of every training image, when ``train.cache_teacher_features`` allows."""
    from rstpm_jax.data import input_pipeline  # noqa: PLC0415 (TensorFlow)

    cfg, size = run.config, int(run.config.data.image_size)
    holdout = float(cfg.data.holdout_fraction)
    n_train = input_pipeline.num_examples(run.source.root, run.category, "train", holdout, cfg.seed,
                                          run.source.tfds_dir)
    per_image = teacher_cache.feature_bytes(run.model, run.teacher_vars, size)
    if not teacher_cache.use_cache(cfg.train, per_image, n_train):
        return None
    # Every host caches the whole split: the global shuffle gives each host any image.
    t0 = time.time()
    images, indices = input_pipeline.load_images(
        run.source.root, run.category, "train", image_size=size, holdout_fraction=holdout,
        seed=cfg.seed, process_index=0, process_count=1, data_dir=run.source.tfds_dir)
    cache = teacher_cache.TeacherCache(run.model, run.teacher_host, images, indices,
                                       int(cfg.train.batch_size) // jax.process_count())
    logging.info("%s: cached teacher features of %d images: %.1f MB in %.1f s.", run.category,
                 len(images), cache.nbytes / 2**20, time.time() - t0)
    return cache


def train_epoch(run: Run, epoch: int, steps: int, step_fn: Callable,
                cache: teacher_cache.TeacherCache | None, log: MetricLog, bar: Any) -> None:
    """One epoch of ``steps`` steps on this host's shard of the (seed, epoch) order; updates
    ``run.state`` and logs every ``train.log_every_steps`` steps and at the epoch's end."""
    from rstpm_jax.data import input_pipeline  # noqa: PLC0415 (TensorFlow)

    cfg = run.config
    gbs, every = int(cfg.train.batch_size), max(1, int(cfg.train.log_every_steps))
    batches = input_pipeline.train_dataset(
        run.source.root, run.category, image_size=int(cfg.data.image_size), global_batch_size=gbs,
        seed=cfg.seed, epoch=epoch, holdout_fraction=float(cfg.data.holdout_fraction),
        process_index=jax.process_index(), process_count=jax.process_count(),
        data_dir=run.source.tfds_dir)
    pending, t_start = [], time.time()
    for i in range(steps):
        batch = next(batches)
        images = sharding.to_global(batch["image"], run.mesh)
        if cache is not None:
            feats = sharding.to_global(cache.lookup(batch["index"]), run.mesh)
            run.state, metrics = step_fn(run.state, run.teacher_vars, images, feats)
        else:
            run.state, metrics = step_fn(run.state, run.teacher_vars, images)
        pending.append(metrics)
        bar.update(1)
        if len(pending) == every or i + 1 == steps:
            step = epoch * steps + i + 1
            values = _mean_metrics(pending)
            _check_finite(values, run.category, epoch, step, run.manager)
            values["images_per_s"] = len(pending) * gbs / max(time.time() - t_start, 1e-9)
            values["epoch"] = epoch + 1
            bar.set_postfix(epoch=epoch + 1, **{k: f"{values[k]:.4f}" for k in
                                                ("student1", "student2") if k in values},
                            img_s=f"{values['images_per_s']:.1f}")
            log.write(step, values)
            pending, t_start = [], time.time()


def train_category(config: ml_collections.ConfigDict, workdir: str, source: Source, category: str,
                   mesh: jax.sharding.Mesh) -> tuple[RSTPM, Any, TrainState]:
    """Train (or resume) the students for one category; returns model, teachers, final state."""
    sharding.check_batch_size(int(config.train.batch_size))
    run = restore_or_init(config, workdir, source, category, mesh)
    try:
        if run.start_epoch < run.epochs:
            _train(run, workdir)
    finally:
        run.manager.close()
    logging.info("%s: process %d of %d: parameter fingerprint %s", category, jax.process_index(),
                 jax.process_count(), parameter_fingerprint(run.state.params))
    return run.model, run.teacher_vars, run.state


def _train(run: Run, workdir: str) -> None:
    from tqdm import tqdm  # noqa: PLC0415

    steps = steps_per_epoch(run)
    cache = build_teacher_cache(run)
    step_fn = compile_train_step(run.model, losses.from_config(run.config.loss, run.config.maps),
                                 run.mesh, cached=cache is not None)
    log = MetricLog(workdir_lib.category_dir(workdir, run.category))
    bar = tqdm(total=run.epochs * steps, initial=run.start_epoch * steps, desc=run.category,
               disable=jax.process_index() != 0, dynamic_ncols=True)
    every = int(run.config.train.checkpoint_every_epochs)
    try:
        for epoch in range(run.start_epoch, run.epochs):
            train_epoch(run, epoch, steps, step_fn, cache, log, bar)
            if (epoch + 1) % every == 0 or epoch + 1 == run.epochs:
                checkpoints.save(run.manager, epoch + 1, run.state,
                                 {"epoch": epoch + 1, "step": (epoch + 1) * steps})
    finally:
        bar.close()
        log.close()


def parameter_fingerprint(params: Any) -> str:
    """A short hash of this host's copy of replicated parameters (hosts must agree)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        digest.update(np.ascontiguousarray(leaf.addressable_shards[0].data).tobytes())
    return digest.hexdigest()[:16]


def _mean_metrics(pending: list[dict]) -> dict[str, float]:
    host = jax.device_get(pending)
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


def _check_finite(values: dict[str, float], category: str, epoch: int, step: int, manager) -> None:
    if values.pop("finite") < 1.0 or not np.isfinite(values["loss"]):
        last = manager.latest_step()
        kept = f"the last good checkpoint (epoch {last}) is kept" if last else "no checkpoint was saved yet"
        raise FloatingPointError(
            f"{category}: the training loss or gradient became NaN/inf at epoch {epoch + 1}, step {step}; {kept} "
            f"in {manager.directory}. Lower config.train.learning_rate or check the input data.")
