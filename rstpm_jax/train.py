"""Training: create_train_state, train_step and train_and_evaluate (flax imagenet style).

One ``jax.jit`` over a device ``Mesh``: the batch is split on the ``data`` axis over all
devices of all hosts, students' parameters and optimizer state are replicated, BatchNorm
statistics are those of the global batch. The frozen teachers run in inference mode and
receive no gradient; their features can be computed once and reused across epochs.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from rstpm_jax import checkpoints, losses, sharding
from rstpm_jax.models.rstpm import RSTPM, build_model, feature_pairs
from rstpm_jax.ops import compile_options

Array = jax.Array


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


def conv_fn_for_platform() -> Callable | None:
    """The CPU weight-gradient convolution on CPU, XLA's own elsewhere."""
    try:
        from rstpm_jax.ops import conv  # noqa: PLC0415
    except ImportError:
        return None
    return conv.platform_conv()


def create_model(config: ml_collections.ConfigDict) -> RSTPM:
    return build_model(config.model, conv_fn=conv_fn_for_platform())


def create_train_state(rng: Array, config: ml_collections.ConfigDict, model: RSTPM,
                       image_size: int) -> tuple[TrainState, dict]:
    """Fresh students' train state and randomly initialised teacher variables."""
    teacher_vars, student_vars = model.init(rng, (1, image_size, image_size, 3))
    # apply_fn stays None: it is part of the tree structure, and a bound method of a new model
    # object per category would retrace the train step.
    state = TrainState.create(apply_fn=None, params=student_vars["params"],
                              batch_stats=student_vars["batch_stats"], tx=make_optimizer(config.train))
    return state, teacher_vars


def train_step(state: TrainState, teacher_vars: Any, images: Array, teacher_feats: Any = None, *,
               model: RSTPM, loss_fn: losses.LossFn) -> tuple[TrainState, dict[str, Array]]:
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
def compile_train_step(model: RSTPM, loss_fn: losses.LossFn, mesh: jax.sharding.Mesh,
                       cached: bool) -> Callable:
    """``train_step`` jitted over ``mesh`` (batch sharded, the rest replicated, state donated).

    Memoised, so every category of a run reuses one compiled step."""
    repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    step = functools.partial(train_step, model=model, loss_fn=loss_fn)
    if cached:
        return compile_options.jit(step, in_shardings=(repl, repl, batch, batch),
                                   out_shardings=(repl, repl), donate_argnums=(0,))
    return compile_options.jit(lambda s, t, x: step(s, t, x), in_shardings=(repl, repl, batch),
                               out_shardings=(repl, repl), donate_argnums=(0,))


# ----------------------------------------------------------------------------- teacher cache

def teacher_feature_bytes(model: RSTPM, teacher_vars: Any, image_size: int) -> int:
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
        rows = np.asarray([self.row[int(i)] for i in indices])
        return jax.tree.map(lambda x: x[rows], self.features)


def _use_cache(config: ml_collections.ConfigDict, per_image: int, n_images: int) -> bool:
    mode = str(config.train.cache_teacher_features)
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"config.train.cache_teacher_features must be auto/on/off, got {mode!r}.")
    need = per_image * n_images
    if mode == "auto" and need > config.train.cache_max_bytes:
        logging.info("Teacher-feature cache off: %.2f GB > train.cache_max_bytes %.2f GB.",
                     need / 2**30, config.train.cache_max_bytes / 2**30)
    return mode == "on" or (mode == "auto" and need <= config.train.cache_max_bytes)


# ----------------------------------------------------------------------------- training loop

class MetricLog:
    """Loss per student and level as JSON lines and TensorBoard scalars (host 0 only)."""

    def __init__(self, directory: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(directory, "metrics.jsonl")
        self.writer = None
        if self.enabled:
            os.makedirs(directory, exist_ok=True)
            try:
                from flax.metrics import tensorboard  # noqa: PLC0415 (needs TensorFlow)
                self.writer = tensorboard.SummaryWriter(os.path.join(directory, "tensorboard"))
            except ImportError as e:  # pragma: no cover - TF is in the train extra
                logging.warning("TensorBoard logging off (%s).", e)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.scalar(f"train/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train_category(config: ml_collections.ConfigDict, workdir: str, root: str, category: str,
                   mesh: jax.sharding.Mesh) -> tuple[RSTPM, Any, TrainState]:
    """Train (or resume) the students for one category; returns model, teachers, final state."""
    from tqdm import tqdm  # noqa: PLC0415
    from rstpm_jax.data import input_pipeline  # noqa: PLC0415 (TensorFlow)

    size = int(config.data.image_size)
    gbs = int(config.train.batch_size)
    sharding.check_batch_size(gbs)
    pc, pi = jax.process_count(), jax.process_index()
    local_bs = gbs // pc
    cat_dir = os.path.join(workdir, category)
    model = create_model(config)
    loss_fn = losses.get_loss(config.loss.name)

    state, random_teachers = create_train_state(jax.random.key(config.seed), config, model, size)
    teacher_vars = checkpoints.teacher_variables(model, config.model, random_teachers)
    teacher_host, teacher_vars = teacher_vars, sharding.replicate(teacher_vars, mesh)
    teachers_dir = os.path.join(workdir, "teachers")
    if not os.path.isdir(teachers_dir):
        checkpoints.save_variables(teachers_dir, teacher_vars)
    state = sharding.replicate(state, mesh)

    manager = checkpoints.checkpoint_manager(os.path.join(cat_dir, "checkpoints"),
                                             config.train.keep_checkpoints)
    start_epoch = 0
    latest = manager.latest_step()
    if latest is not None:
        state, meta = checkpoints.restore(manager, latest, state)
        start_epoch = int(meta["epoch"])
        logging.info("%s: resumed from the checkpoint of epoch %d.", category, start_epoch)
    epochs = int(config.train.epochs)
    if start_epoch >= epochs:
        return model, teacher_vars, state

    holdout = float(config.data.holdout_fraction)
    n_train = input_pipeline.num_examples(root, category, "train", holdout, config.seed)
    steps_per_epoch = n_train // gbs
    if steps_per_epoch == 0:
        raise ValueError(f"{category}: {n_train} training images (after holding out "
                         f"data.holdout_fraction={holdout}) is fewer than config.train.batch_size={gbs}; "
                         "lower the batch size.")

    cache = None
    per_image = teacher_feature_bytes(model, teacher_vars, size)
    if _use_cache(config, per_image, n_train):
        # Every host caches the whole split: the global shuffle gives each host any image.
        t0 = time.time()
        images, indices = input_pipeline.load_images(
            root, category, "train", image_size=size, holdout_fraction=holdout, seed=config.seed,
            process_index=0, process_count=1)
        cache = TeacherCache(model, teacher_host, images, indices, local_bs)
        logging.info("%s: cached teacher features of %d images: %.1f MB in %.1f s.", category,
                     len(images), cache.nbytes / 2**20, time.time() - t0)
    step_fn = compile_train_step(model, loss_fn, mesh, cached=cache is not None)

    log = MetricLog(cat_dir)
    every = max(1, int(config.train.log_every_steps))
    bar = tqdm(total=epochs * steps_per_epoch, initial=start_epoch * steps_per_epoch,
               desc=category, disable=pi != 0, dynamic_ncols=True)
    step = start_epoch * steps_per_epoch
    try:
        for epoch in range(start_epoch, epochs):
            batches = input_pipeline.train_dataset(
                root, category, image_size=size, global_batch_size=gbs, seed=config.seed,
                epoch=epoch, holdout_fraction=holdout, process_index=pi, process_count=pc)
            pending, t_start = [], time.time()
            for _ in range(steps_per_epoch):
                batch = next(batches)
                images = sharding.to_global(batch["image"], mesh)
                if cache is not None:
                    feats = sharding.to_global(cache.lookup(batch["index"]), mesh)
                    state, metrics = step_fn(state, teacher_vars, images, feats)
                else:
                    state, metrics = step_fn(state, teacher_vars, images)
                pending.append(metrics)
                step += 1
                bar.update(1)
                if len(pending) == every or step % steps_per_epoch == 0:
                    values = _mean_metrics(pending)
                    _check_finite(values, category, epoch, step, manager)
                    values["images_per_s"] = len(pending) * gbs / max(time.time() - t_start, 1e-9)
                    values["epoch"] = epoch + 1
                    bar.set_postfix(epoch=epoch + 1, **{k: f"{values[k]:.4f}" for k in
                                                        ("student1", "student2") if k in values},
                                    img_s=f"{values['images_per_s']:.1f}")
                    log.write(step, values)
                    pending, t_start = [], time.time()
            if (epoch + 1) % int(config.train.checkpoint_every_epochs) == 0 or epoch + 1 == epochs:
                checkpoints.save(manager, epoch + 1, state, {"epoch": epoch + 1, "step": step})
    finally:
        bar.close()
        log.close()
        manager.close()
    logging.info("%s: process %d of %d: parameter fingerprint %s", category, pi, pc,
                 parameter_fingerprint(state.params))
    return model, teacher_vars, state


def parameter_fingerprint(params: Any) -> str:
    """A short hash of this host's copy of replicated parameters (hosts must agree)."""
    import hashlib  # noqa: PLC0415
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
    """Train (mode=train) and evaluate every requested category; write the reports."""
    from rstpm_jax import evaluate  # noqa: PLC0415

    if config.mode not in ("train", "eval"):
        raise ValueError(f"config.mode must be 'train' or 'eval', got {config.mode!r}.")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    root = evaluate.prepare_data_root(config, workdir)
    categories = evaluate.categories_of(config, root)
    sharding.check_batch_size(int(config.train.batch_size))
    sharding.check_batch_size(int(config.eval.batch_size), "eval.batch_size")
    mesh = sharding.make_mesh()
    if config.mode == "train" and jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    results = {}
    for category in categories:
        if config.mode == "train":
            model, teacher_vars, state = train_category(config, workdir, root, category, mesh)
            student_vars = {"params": state.params, "batch_stats": state.batch_stats}
        else:
            model, teacher_vars, student_vars = evaluate.load_trained(config, workdir, category, mesh)
        results[category] = evaluate.evaluate_category(config, workdir, root, category, model,
                                                       teacher_vars, student_vars, mesh)
    evaluate.write_summary(config, workdir, results)
    return results
