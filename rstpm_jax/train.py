"""Training: create_train_state, train_step and the loop over a group of jobs (flax imagenet
style, many models at once).

A group's jobs (same architecture; one per category and seed) are stacked on a leading axis
sharded over the mesh's ``model`` axis and trained by one jitted, vmapped step; each job's
batch is split over its ``data`` devices, its BatchNorm statistics are those of its own batch.
A job that has run out of steps this epoch (categories differ in size), has finished, or has
failed waits, masked: its state is left untouched. The frozen teachers run in inference mode
and receive no gradient; their features can be computed once and reused across epochs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from rstpm_jax import checkpoints, fleet, guards, losses, sharding, teacher_cache
from rstpm_jax import workdir as workdir_lib
from rstpm_jax.anomaly_maps import MapSpec
from rstpm_jax.data.sources import Source
from rstpm_jax.data.tiling import TileSpec, model_input_size
from rstpm_jax.inference import compiled_infer
from rstpm_jax.jobs import Job
from rstpm_jax.metric_log import MetricLog
from rstpm_jax.models import layers
from rstpm_jax.models.rstpm import RSTPM, feature_pairs
from rstpm_jax.ops import compile_options
from rstpm_jax.registry import Bound
from rstpm_jax.state import TrainState, create_train_state  # noqa: F401 - the train API

Array = jax.Array
# Test-only: "SLOT:STEP" makes that slot's images NaN at that step of the group (1-based).
INJECT_NAN_ENV = "RSTPM_TEST_INJECT_NAN"


def train_step(state: TrainState, teacher_vars: Any, images: Array, teacher_feats: Any = None,
               valid: Array | None = None, *, model: RSTPM,
               loss_fn: Callable) -> tuple[TrainState, dict[str, Array]]:
    """One SGD step of one job's students on its batch; returns the new state and metrics.

    ``valid`` (``(B,)``, 0 = padding of a partial last batch): padded examples count nowhere,
    neither in the loss (a mean over the valid examples) nor in any BatchNorm's statistics.
    """
    if teacher_feats is None:
        teacher_feats = model.teacher_features(teacher_vars, images)

    def loss_of(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        if valid is not None:
            variables[layers.MASK_COLLECTION] = layers.batch_norm_masks(state.batch_stats, valid)
        student, updates = model.student_features(variables, images, teacher_feats, train=True)
        loss, metrics = loss_fn(feature_pairs(teacher_feats, student), valid)
        return loss, (metrics, updates["batch_stats"])

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics["grad_norm"] = optax.tree.norm(grads)
    # A finite loss with a non-finite gradient still poisons the parameters: check both.
    metrics["finite"] = (jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])).astype(jnp.float32)
    return state, metrics


def stack_mode(mode: str = "auto") -> str:
    """How a device runs its slots: ``vmap`` (one batched program; accelerators), ``each`` (one
    compiled slot step called for each slot in turn: CPU, where batched convolutions over
    stacked weights are slower; compiles once for any number of slots), ``unroll`` (the slots'
    steps written out one after another in one program: compile time grows with the slots) or
    ``map`` (a loop in one program; on XLA:CPU a convolution inside a loop runs ~15x slower)."""
    if mode not in sharding.STACKS:
        raise ValueError(f"config.mesh.stack must be one of {sharding.STACKS}, got {mode!r}.")
    if mode == "auto":
        return "each" if jax.default_backend() == "cpu" else "vmap"
    return mode


def _slot_step(state, tv, x, v, a, feats, *, model, loss_fn):
    """``train_step`` of one slot; a slot that is not active (``a``), or whose step is not
    finite, keeps its state."""
    new, metrics = train_step(state, tv, x, feats, v, model=model, loss_fn=loss_fn)
    keep = a & (metrics["finite"] > 0)
    return jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, state), metrics


def group_step(states: TrainState, teacher_vars: Any, images: Array, valid: Array, active: Array,
               teacher_feats: Any = None, *, model: RSTPM, loss_fn: Callable, shared_teachers: bool,
               stack: str = "vmap") -> tuple[TrainState, dict[str, Array]]:
    """``train_step`` of every slot (the leading axis), vmapped, unrolled or mapped (``stack``);
    a slot that is not ``active``, or whose step is not finite, keeps its state."""
    def one(state, tv, x, v, a, feats):
        return _slot_step(state, teacher_vars if shared_teachers else tv, x, v, a, feats,
                          model=model, loss_fn=loss_fn)

    tv = None if shared_teachers else teacher_vars
    args = (states, tv, images, valid, active, teacher_feats)
    if stack == "unroll":
        outs = [one(*jax.tree.map(lambda x, i=i: x[i], args)) for i in range(active.shape[0])]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    if stack == "map":
        return jax.lax.map(lambda a: one(*a), args)
    return jax.vmap(one)(*args)


def group_slot_step(states: TrainState, teacher_vars: Any, images: Array, valid: Array, active: Array,
                    teacher_feats: Any = None, k: Array | None = None, *, model: RSTPM, loss_fn: Callable,
                    shared_teachers: bool) -> tuple[TrainState, dict[str, Array]]:
    """``train_step`` of slot ``k`` (a traced index) of the leading axis only, its new state
    written back in place; every other slot is untouched. Metrics: that slot's, with a leading
    axis of 1."""
    pick = lambda tree: jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, k, keepdims=False), tree)
    tv = teacher_vars if shared_teachers else pick(teacher_vars)
    new, metrics = _slot_step(pick(states), tv, *pick((images, valid, active, teacher_feats)),
                              model=model, loss_fn=loss_fn)
    states = jax.tree.map(lambda s, n: jax.lax.dynamic_update_index_in_dim(s, n, k, 0), states, new)
    return states, jax.tree.map(lambda m: m[None], metrics)


class _EachSlot:
    """The ``each`` group step: one program (``run``: jitted, or compiled) trains slot ``k`` of
    every device's slots; a call runs it for ``k = 0 .. slots per device - 1`` and gathers the
    slots' metrics. ``lower(...).compile()`` gives the same call on the compiled program."""

    def __init__(self, run: Any, merge: Any, model_axis: int):
        self.run, self.merge, self.model_axis = run, merge, model_axis

    def calls(self, active: Any) -> int:
        """Programs run per group step: the slots one device holds."""
        return int(active.shape[0]) // self.model_axis

    def __call__(self, states, teachers, images, valid, active, *feats):
        metrics = []
        for k in range(self.calls(active)):
            states, m = self.run(states, teachers, images, valid, active, *feats, np.int32(k))
            metrics.append(m)
        return states, self.merge(metrics)

    def lower(self, *args) -> _Program:
        """The slot program lowered for these arguments (``.compile()``: the call compiled)."""
        return _Program(self, self.run.lower(*args, np.int32(0)), self.calls(args[4]))


class _Program:
    """A lowered or compiled ``each`` step: ``compile()`` and calls like the group step; its
    cost analysis is the slot program's times the calls per group step, its memory analysis and
    text the slot program's."""

    def __init__(self, each: _EachSlot, program: Any, calls: int):
        self.each, self.program, self.calls_per_step = each, program, calls

    def compile(self) -> _Program:
        compiled = self.program.compile()
        return _Program(_EachSlot(compiled, self.each.merge, self.each.model_axis), compiled,
                        self.calls_per_step)

    def __call__(self, *args):
        return self.each(*args)

    def cost_analysis(self):
        cost = self.program.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else None
        return {k: v * self.calls_per_step for k, v in cost.items()} if cost else cost

    def memory_analysis(self):
        return self.program.memory_analysis()

    def as_text(self) -> str:
        return self.program.as_text()


@functools.lru_cache(maxsize=8)
def compile_group_step(model: RSTPM, loss_fn: Bound, mesh: jax.sharding.Mesh, cached: bool,
                       shared_teachers: bool, stack: str = "auto") -> Callable:
    """:func:`group_step` jitted over a ``(model, data)`` mesh: slots over ``model`` (each
    device runs its own slots: ``shard_map`` manual over ``model``), each slot's examples over
    ``data`` (automatic: XLA inserts the BatchNorm and gradient sums); states donated; metrics
    replicated. Manual over ``model``, XLA never partitions a stacked (grouped) convolution
    across devices, which its SPMD partitioner gets wrong. ``stack="each"`` (CPU's ``auto``):
    :func:`group_slot_step` compiled once and called for each slot a device holds.

    Arguments ``(states, teachers, images, valid, active[, teacher_feats])``. Memoised (the
    model and the bound loss compare by value): every group of one architecture shares it."""
    slots, batch = sharding.job_sharding(mesh), sharding.job_batch_sharding(mesh)
    teachers = sharding.replicated(mesh) if shared_teachers else slots
    mode = stack_mode(stack)
    m = P(sharding.MODEL_AXIS)
    specs = (m, P() if shared_teachers else m, m, m, m) + ((m,) if cached else ())
    ins = (slots, teachers, batch, batch, slots) + ((batch,) if cached else ())
    if mode == "each":
        def body(*args):
            feats, k = (args[5], args[6]) if cached else (None, args[5])
            return group_slot_step(*args[:5], feats, k, model=model, loss_fn=loss_fn,
                                   shared_teachers=shared_teachers)

        local = jax.shard_map(body, mesh=mesh, in_specs=specs + (P(),), out_specs=(m, m),
                              axis_names={sharding.MODEL_AXIS}, check_vma=False)
        step = compile_options.jit(local, in_shardings=ins + (sharding.replicated(mesh),),
                                   out_shardings=(slots, slots), donate_argnums=(0,))
        model_axis = mesh.shape[sharding.MODEL_AXIS]
        # Call k's metrics are those of slots k, k + s, k + 2s, ... (s: slots per device).
        merge = compile_options.jit(
            lambda ms: jax.tree.map(lambda *xs: jnp.stack(xs, 1).reshape(-1, *xs[0].shape[1:]), *ms),
            out_shardings=sharding.replicated(mesh))
        return _EachSlot(step, merge, model_axis)
    step = functools.partial(group_step, model=model, loss_fn=loss_fn, shared_teachers=shared_teachers,
                             stack=mode)
    local = jax.shard_map(step, mesh=mesh, in_specs=specs, out_specs=(m, m),
                          axis_names={sharding.MODEL_AXIS}, check_vma=False)
    return compile_options.jit(local, in_shardings=ins, out_shardings=(slots, sharding.replicated(mesh)),
                               donate_argnums=(0,))


# ----------------------------------------------------------------------------- one job


@dataclasses.dataclass
class JobRun:
    """A job's side of a group: where it resumes, how many steps its epochs have, its logs."""

    job: Job
    state: TrainState  # host copy (NumPy) at start
    teacher_host: Any
    start_epoch: int
    steps: int  # per epoch
    manager: Any  # orbax CheckpointManager
    log: MetricLog
    best: Any = None  # CheckpointManager of the selected epoch (train.select_epoch=best_holdout)
    curve: list = dataclasses.field(default_factory=list)  # [[epoch, mean held-out map], ...]
    cache: teacher_cache.TeacherCache | None = None
    failed: str | None = None
    final_state: Any = None

    @property
    def epochs(self) -> int:
        return int(self.job.config.train.epochs)

    def active_in(self, epoch: int) -> bool:
        return self.failed is None and self.start_epoch <= epoch < self.epochs


def num_train_images(config: ml_collections.ConfigDict, source: Source, category: str) -> int:
    from rstpm_jax.data import input_pipeline  # noqa: PLC0415 (TensorFlow)
    return input_pipeline.num_examples(source.root, category, "train", float(config.data.holdout_fraction),
                                       int(config.seed), source.tfds_dir, TileSpec.from_config(config.data))


def steps_per_epoch(config: ml_collections.ConfigDict, source: Source, category: str) -> int:
    from rstpm_jax.data import input_pipeline  # noqa: PLC0415 (TensorFlow)

    n, gbs = num_train_images(config, source, category), int(config.train.batch_size)
    drop = bool(config.train.get("drop_last", False))
    steps = input_pipeline.train_steps(n, gbs, drop)
    if steps == 0:
        raise ValueError(f"{category}: {n} training images (after holding out data.holdout_fraction="
                         f"{config.data.holdout_fraction}) is fewer than config.train.batch_size={gbs} "
                         "with train.drop_last=True; lower the batch size or set train.drop_last=False.")
    return steps


def restore_or_init(job: Job, model: RSTPM, source: Source, mesh: jax.sharding.Mesh) -> JobRun:
    """A job's fresh state (its run's teachers saved once, with their record; the config's
    teachers must be the run's: ``workdir.ensure_teachers``) or its latest checkpoint, on the host."""
    config = job.config
    teacher_host = jax.device_get(workdir_lib.config_teachers(config, model))
    workdir_lib.ensure_teachers(config, job.workdir, sharding.replicate(teacher_host, mesh))
    manager = checkpoints.checkpoint_manager(workdir_lib.checkpoint_dir(job.workdir, job.category),
                                             config.train.keep_checkpoints)
    start_epoch, curve = 0, []
    latest = manager.latest_step()
    if latest is not None:
        target = sharding.replicated_abstract(workdir_lib.abstract_state(config, model), mesh)
        restored, meta = checkpoints.restore(manager, latest, target)
        state, start_epoch = fleet.host_copy(restored), int(meta["epoch"])
        curve = [list(c) for c in meta.get("holdout_curve", []) if c[0] <= start_epoch]
        logging.info("%s: resumed from the checkpoint of epoch %d.", job.name, start_epoch)
    else:
        state = jax.device_get(workdir_lib.fresh_state(config, model))
    best = None
    if str(config.train.select_epoch) == "best_holdout":
        best = checkpoints.checkpoint_manager(workdir_lib.best_dir(job.workdir, job.category), 1)
    steps = steps_per_epoch(config, source, job.category)
    # metrics.jsonl continues from the resumed step (a killed run's later lines are dropped).
    return JobRun(job, state, teacher_host, start_epoch, steps, manager,
                  MetricLog(job.directory, resume_step=start_epoch * steps), best, curve)


def build_teacher_cache(run: JobRun, model: RSTPM, source: Source) -> teacher_cache.TeacherCache:
    """The teachers' features of every training image of the job (on this host)."""
    from rstpm_jax.data import input_pipeline  # noqa: PLC0415 (TensorFlow)

    cfg, t0 = run.job.config, time.time()
    # Every host caches the whole split: the job's shuffle gives each host any image.
    images, indices = input_pipeline.load_images(
        source.root, run.job.category, "train", image_size=int(cfg.data.image_size),
        holdout_fraction=float(cfg.data.holdout_fraction), seed=int(cfg.seed), process_index=0,
        process_count=1, data_dir=source.tfds_dir, tiling=TileSpec.from_config(cfg.data))
    cache = teacher_cache.TeacherCache(model, run.teacher_host, images, indices,
                                       int(cfg.train.batch_size))
    logging.info("%s: cached teacher features of %d images: %.1f MB in %.1f s.", run.job.name,
                 len(images), cache.nbytes / 2**20, time.time() - t0)
    return cache


# ----------------------------------------------------------------------------- a group


def _same_tree(a: Any, b: Any) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _per_device_bytes(runs: list[JobRun], layout: fleet.Layout, shared: bool) -> dict[str, float]:
    """What the group holds per device (stacked states and teachers) and on this host (caches)."""
    per_state = sum(np.asarray(x).nbytes for x in jax.tree.leaves(runs[0].state))
    per_teacher = sum(np.asarray(x).nbytes for x in jax.tree.leaves(runs[0].teacher_host))
    slots_per_device = layout.slots // layout.model
    return {"states": per_state * slots_per_device,
            "teachers": per_teacher * (1 if shared else slots_per_device),
            "host_caches": float(sum(r.cache.nbytes for r in runs if r.cache is not None))}


def device_memory_bytes() -> int:
    """Memory of one device: the accelerator's own limit, or on CPU the host's RAM shared by
    its devices."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(ram // max(1, jax.local_device_count()))


def job_device_bytes(model: RSTPM, config: ml_collections.ConfigDict) -> int:
    """An estimate of what one job holds on a device while it trains: its state (parameters,
    momentum, statistics; x3 for the update's temporaries), its teachers, and its batch's
    activations (4 x the teachers' features of the batch: the students' forward and backward)."""
    size, batch = int(config.data.image_size), int(config.train.batch_size)
    state, teachers = workdir_lib.abstract_state(config, model), workdir_lib.abstract_teachers(config, model)
    nbytes = lambda tree: sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
                              if hasattr(x, "shape"))
    per_image = teacher_cache.feature_bytes(model, teachers, size)
    return 3 * nbytes(state) + nbytes(teachers) + 4 * batch * per_image


def jobs_at_once(num_jobs: int, per_job: int, devices: int, device_bytes: int, share: float = 0.8) -> int:
    """How many of ``num_jobs`` jobs fit ``devices`` devices of ``device_bytes`` at once (at most
    ``share`` of their memory), at least one."""
    per_device = max(1, int(share * device_bytes) // max(1, per_job))
    return max(1, min(num_jobs, per_device * devices))


def train_group(jobs: list[Job], source: Source, mesh_cfg: Any) -> dict[str, str | None]:
    """Train (or resume) every job of a group side by side; returns ``{job name: failure or None}``
    (the students are in each job's checkpoints). When the group would not fit the devices'
    memory, its jobs train in chunks of as many as fit, one chunk after another."""
    config = jobs[0].config
    model = workdir_lib.create_model(config)
    per_job = job_device_bytes(model, config)
    fit = jobs_at_once(len(jobs), per_job, jax.device_count(), device_memory_bytes())
    if fit < len(jobs):
        logging.warning("%d jobs need ~%.2f GB each per device: %d fit at once (%.1f GB per device); "
                        "training them in %d chunks.", len(jobs), per_job / 2**30, fit,
                        device_memory_bytes() / 2**30, -(-len(jobs) // fit))
        failures: dict[str, str | None] = {}
        for start in range(0, len(jobs), fit):
            failures.update(_train_group(jobs[start:start + fit], source, mesh_cfg, model))
        return failures
    return _train_group(jobs, source, mesh_cfg, model)


def _train_group(jobs: list[Job], source: Source, mesh_cfg: Any, model: RSTPM) -> dict[str, str | None]:
    config = jobs[0].config
    batch = int(config.train.batch_size)
    layout = fleet.make_layout(len(jobs), batch, mesh_cfg)
    runs = [restore_or_init(job, model, source, layout.mesh) for job in jobs]
    try:
        if any(r.start_epoch < r.epochs for r in runs):
            _train(runs, model, source, layout)
    finally:
        for r in runs:
            for m in (r.manager, r.best):
                if m is not None:
                    m.close()
            r.log.close()
    for r in runs:
        if not r.failed:
            params = r.final_state.params if r.final_state is not None else r.state.params
            logging.info("%s: process %d of %d: parameter fingerprint %s", r.job.name, jax.process_index(),
                         jax.process_count(), parameter_fingerprint(params))
    return {r.job.name: r.failed for r in runs}


def _train(runs: list[JobRun], model: RSTPM, source: Source, layout: fleet.Layout) -> None:
    from tqdm import tqdm  # noqa: PLC0415

    config = runs[0].job.config
    shared = all(_same_tree(r.teacher_host, runs[0].teacher_host) for r in runs)
    per_image = teacher_cache.feature_bytes(model, runs[0].teacher_host, model_input_size(config.data))
    total_images = sum(num_train_images(r.job.config, source, r.job.category) for r in runs)
    cached = teacher_cache.use_cache(config.train, per_image, total_images)
    if cached:
        for r in runs:
            r.cache = build_teacher_cache(r, model, source)
    held = _per_device_bytes(runs, layout, shared)
    logging.info("group of %d job(s) on a %d x %d (model x data) mesh, %d slot(s): per device %.1f MB "
                 "of stacked states and %.1f MB of teachers; %.1f MB of teacher-feature caches on this host.",
                 len(runs), layout.model, layout.data, layout.slots, held["states"] / 2**20,
                 held["teachers"] / 2**20, held["host_caches"] / 2**20)
    pad = [runs[0]] * (layout.slots - len(runs))  # padding slots: copies, never active
    states = fleet.put_slots(fleet.stack([r.state for r in runs + pad]), layout)
    teachers = (sharding.replicate(runs[0].teacher_host, layout.mesh) if shared else
                fleet.put_slots(fleet.stack([r.teacher_host for r in runs + pad]), layout))
    step_fn = compile_group_step(model, losses.from_config(config.loss, config.maps), layout.mesh,
                                 cached, shared, str(config.mesh.get("stack", "auto")))
    local = layout.local_rows()
    first = min(r.start_epoch for r in runs)
    last = max(r.epochs for r in runs)
    max_steps = max(r.steps for r in runs)
    bar = tqdm(total=sum(r.steps * (r.epochs - r.start_epoch) for r in runs),
               desc=f"{len(runs)} job(s)", disable=jax.process_index() != 0, dynamic_ncols=True)
    inject = _injected_nan()
    group_step_index = 0
    try:
        with guards.StopOnSignal() as stop:
            for epoch in range(first, last):
                states = _epoch(runs, epoch, states, teachers, step_fn, layout, local, source, model,
                                max_steps, bar, inject, group_step_index, stop)
                group_step_index += max_steps
                _select(runs, epoch, states, layout, model, source)
                _save(runs, epoch, states, layout, force=stop.requested)
                if stop.requested:
                    logging.warning("%s: stopped after epoch %d, every job saved; rerun the same command "
                                    "to resume.", stop.signal_name, epoch + 1)
                    raise KeyboardInterrupt(f"{stop.signal_name}: stopped after epoch {epoch + 1}, saved.")
    finally:
        bar.close()
    for slot, r in enumerate(runs):
        r.final_state = fleet.host_copy(fleet.take(states, slot, layout))


def _injected_nan() -> tuple[int, int] | None:
    spec = os.environ.get(INJECT_NAN_ENV)
    if not spec:
        return None
    slot, step = spec.split(":")
    return int(slot), int(step)


def _epoch(runs, epoch, states, teachers, step_fn, layout, local, source, model, max_steps, bar,
           inject, step_offset, stop):
    """One epoch of the group: ``max_steps`` steps; a job with fewer steps waits for the rest.
    A stop request (Ctrl-C, SIGTERM) lets the epoch finish, so that it can be saved."""
    from rstpm_jax.data import input_pipeline  # noqa: PLC0415 (TensorFlow)

    config = runs[0].job.config
    size, batch = model_input_size(config.data), int(config.train.batch_size)
    every = max(1, int(config.train.log_every_steps))
    drop = bool(config.train.get("drop_last", False))
    iters = {}
    for slot, r in enumerate(runs):
        if slot in local and r.active_in(epoch):
            cfg = r.job.config
            iters[slot] = input_pipeline.train_dataset(
                source.root, r.job.category, image_size=size, global_batch_size=batch, seed=int(cfg.seed),
                epoch=epoch, holdout_fraction=float(cfg.data.holdout_fraction), rows=local[slot],
                data_dir=source.tfds_dir, drop_last=drop, tiling=TileSpec.from_config(cfg.data))
    like = {"image": jax.ShapeDtypeStruct((batch, size, size, 3), np.float32),
            "valid": jax.ShapeDtypeStruct((batch,), np.float32)}
    cached = runs[0].cache is not None
    if cached:
        like["feats"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct((batch, *x.shape[1:]), x.dtype),
                                     runs[0].cache.features)
    pending: dict[int, list] = {slot: [] for slot in range(len(runs))}
    t_start = time.time()
    announced = False
    for i in range(max_steps):
        if stop.requested and not announced:
            logging.warning("%s: finishing epoch %d, then saving and stopping (Ctrl-C again: stop now, "
                            "unsaved).", stop.signal_name, epoch + 1)
            announced = True
        active = np.zeros(layout.slots, bool)
        host = {}
        for slot, r in enumerate(runs):
            active[slot] = r.active_in(epoch) and i < r.steps
            if active[slot] and slot in iters:
                b = next(iters[slot])
                host[slot] = {"image": b["image"], "valid": b["valid"].astype(np.float32)}
                if inject and inject == (slot, step_offset + i + 1):
                    host[slot]["image"] = np.full_like(b["image"], np.nan)
                if cached:
                    host[slot]["feats"] = r.cache.lookup(b["index"])
        arrays = fleet.put_batches(host, like, layout)
        act = fleet.put_slots(active, layout)
        if cached:
            states, metrics = step_fn(states, teachers, arrays["image"], arrays["valid"], act, arrays["feats"])
        else:
            states, metrics = step_fn(states, teachers, arrays["image"], arrays["valid"], act)
        for slot in np.flatnonzero(active[:len(runs)]):
            pending[slot].append(metrics)
        bar.update(int(active[:len(runs)].sum()))
        ends = [s for s, r in enumerate(runs) if active[s] and (len(pending[s]) == every or i + 1 == r.steps)]
        if ends:
            jax.block_until_ready([pending[s] for s in ends])  # steps run asynchronously: time them done
            t = time.time()
            values = _log(runs, ends, pending, epoch, i, t - t_start, batch)
            bar.set_postfix_str(_postfix(runs, values), refresh=False)
            t_start = t
    return states


def _log(runs: list[JobRun], slots: list[int], pending: dict, epoch: int, i: int, seconds: float,
         batch: int) -> dict[int, dict[str, float]]:
    """Mean metrics of each slot's pending steps -> its metrics.jsonl; marks non-finite jobs failed."""
    out = {}
    for slot in slots:
        r = runs[slot]
        host = jax.device_get(pending[slot])
        values = {k: float(np.mean([m[k][slot] for m in host])) for k in host[0]}
        finite = values.pop("finite") >= 1.0 and np.isfinite(values["loss"])
        step = epoch * r.steps + i + 1
        if not finite:
            last = r.manager.latest_step()
            kept = f"the last good checkpoint (epoch {last}) is kept" if last else "no checkpoint was saved yet"
            r.failed = (f"the training loss or gradient became NaN/inf at epoch {epoch + 1}, step {step}; "
                        f"{kept} in {r.manager.directory}; the job stopped there, the others went on. "
                        "Lower config.train.learning_rate or check the input data.")
            logging.error("%s: %s", r.job.name, r.failed)
        values["images_per_s"] = len(host) * batch / max(seconds, 1e-9)
        values["epoch"] = epoch + 1
        with guards.no_space_errors(r.job.workdir, "writing metrics.jsonl"):
            r.log.write(step, values)
        pending[slot] = []
        out[slot] = values
    return out


def _postfix(runs: list[JobRun], values: dict[int, dict[str, float]]) -> str:
    """``epoch E, N img/s, loss job=... job=...`` (images/s summed over the jobs just logged)."""
    shown = sorted(values.items())
    losses_ = " ".join(f"{runs[s].job.name}={v['loss']:.4f}" for s, v in shown[:6])
    more = f" (+{len(shown) - 6})" if len(shown) > 6 else ""
    rate = sum(v["images_per_s"] for v in values.values())
    return f"epoch {max(v['epoch'] for v in values.values()):.0f}, {rate:.1f} img/s, loss {losses_}{more}"


def _save(runs: list[JobRun], epoch: int, states: Any, layout: fleet.Layout, force: bool = False) -> None:
    """Each job active this epoch saves a checkpoint every ``train.checkpoint_every_epochs``, at
    its last epoch, and when ``force`` (a stop was requested)."""
    for slot, r in enumerate(runs):
        cfg = r.job.config.train
        if not r.active_in(epoch):
            continue
        if force or (epoch + 1) % int(cfg.checkpoint_every_epochs) == 0 or epoch + 1 == r.epochs:
            with guards.no_space_errors(r.job.workdir, f"saving {r.job.name}'s checkpoint"):
                checkpoints.save(r.manager, epoch + 1, fleet.take(states, slot, layout),
                                 {"epoch": epoch + 1, "step": (epoch + 1) * r.steps, "holdout_curve": r.curve})


def _select(runs: list[JobRun], epoch: int, states: Any, layout: fleet.Layout, model: RSTPM,
            source: Source) -> None:
    """``train.select_epoch=best_holdout``: every ``select_every_epochs`` (and at a job's last
    epoch) its mean final map over the held-out images; the lowest so far is saved to ``best/``."""
    from rstpm_jax import evaluate  # noqa: PLC0415 (TensorFlow)

    flat = sharding.make_mesh()
    for slot, r in enumerate(runs):
        cfg = r.job.config
        if r.best is None or not r.active_in(epoch):
            continue
        if (epoch + 1) % max(1, int(cfg.train.select_every_epochs)) and epoch + 1 != r.epochs:
            continue
        state = fleet.host_copy(fleet.take(states, slot, layout))
        infer = compiled_infer(model, MapSpec.from_config(cfg.maps), flat, with_levels=False)
        score = evaluate.holdout_score(cfg, source, r.job.category, infer,
                                       sharding.replicate(r.teacher_host, flat),
                                       sharding.replicate({"params": state.params,
                                                           "batch_stats": state.batch_stats}, flat), flat)
        best = min((s for _, s in r.curve), default=float("inf"))
        r.curve.append([epoch + 1, score])
        logging.info("%s: epoch %d: mean held-out map %.6g (best so far %.6g).", r.job.name, epoch + 1,
                     score, best)
        if score < best or r.best.latest_step() not in [e for e, _ in r.curve]:
            for old in r.best.all_steps():
                r.best.delete(old)
            with guards.no_space_errors(r.job.workdir, f"saving {r.job.name}'s best epoch"):
                checkpoints.save(r.best, epoch + 1, sharding.replicate(state, layout.mesh),
                                 {"epoch": epoch + 1, "holdout_score": score, "holdout_curve": r.curve})


def parameter_fingerprint(params: Any) -> str:
    """A short hash of this host's copy of parameters (hosts must agree)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        x = leaf.addressable_shards[0].data if hasattr(leaf, "addressable_shards") else leaf
        digest.update(np.ascontiguousarray(x).tobytes())
    return digest.hexdigest()[:16]
