"""Training and inference throughput of a config: images/s, compile time, memory, FLOPs.

  python benchmarks/throughput.py --config=configs/stpm.py --image_size=256 --batch_size=32 \
      --steps=5 --dtype=float32,bfloat16 --torch --out=stpm.json
  python benchmarks/throughput.py --config=configs/mvtec.py --peak_tflops=494,989 --out=rstpm.json
  python benchmarks/throughput.py --config=configs/stpm.py --models=1,4,15 --out=fleet.json

Training runs what ``rstpm_jax.train`` runs: the fleet's group step (``compile_group_step``),
here with one job on the default layout for one job. Per dtype, one JSON record (``--out``: a
list of records) with
- train images/s: the whole step (teachers + students + update) and the step with the
  teachers' features precomputed (``cached``, as training reuses them across epochs); the
  median of ``--steps`` timed steps after the compile and one warm-up step;
- inference images/s at ``--batch_size`` and at batch 1 (final map + score);
- compile times, FLOPs per image from XLA's cost analysis, the achieved fraction of
  ``--peak_tflops`` (per dtype, if given), peak memory (device memory stats where the backend
  has them, else the process' peak RSS), XLA's own memory estimate of the train step;
- the epoch time of an MVTec-sized category (``--epoch_images``) with and without reusing
  the teachers' features, and the input pipeline's images/s (synthetic PNGs, tf.data).
``--models=N[,M...]``: per count above 1, one more record (``record: "models"``) of N stacked
copies of the job trained by one vmapped step on the default layout for N jobs
(``sharding.plan_mesh(N, batch)``: one device per job, jobs beyond the devices stacked on
them): ``train_images_per_s_total`` (summed over the N jobs), ``speedup_vs_one_model``
(against the one-job record), the same for the cached step (``--models_train``), the images
each step trained (from the slots' step counters), states/teachers/features held per device,
XLA's memory estimate of the step and the process' peak memory.
``--torch`` also runs ``benchmarks/torch_stfpm.py`` (the PyTorch STFPM reference) in a
subprocess and prints the JAX / PyTorch ratio (meaningful for configs/stpm.py).
Any ``--config.<key>=value`` override works as in ``rstpm_jax.main``. Teachers are random:
speed does not depend on the weights.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # `configs` imports `configs.mvtec`

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from bench_memory import peak_rss_bytes  # noqa: E402  (benchmarks/ is the script's folder)

from rstpm_jax import fleet, inference, losses, sharding, teacher_cache, train  # noqa: E402
from rstpm_jax.anomaly_maps import MapSpec  # noqa: E402
from rstpm_jax.models.rstpm import build_model  # noqa: E402
from rstpm_jax.ops import compile_options  # noqa: E402

REQUIRED_KEYS = ("model", "dtype", "image_size", "batch_size", "train_images_per_s",
                 "infer_images_per_s", "flops_per_image", "peak_memory_bytes")


def log(msg: str) -> None:
    print(f"[throughput {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- timing helpers

def time_calls(fn: Callable[[], Any], steps: int) -> float:
    """Median wall time (s) of ``steps`` calls of ``fn`` (each waited for), after one warm-up."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(max(1, steps)):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def compile_timed(jitted: Any, *args: Any) -> tuple[Any, float]:
    """``jitted.lower(*args).compile()`` and the seconds it took (tracing included)."""
    t = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t


def program_flops(compiled_or_lowered: Any, num_devices: int = 1) -> float | None:
    """FLOPs of a compiled (per-device SPMD program: times ``num_devices``) or lowered program."""
    cost = compiled_or_lowered.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"]) * num_devices


def peak_memory() -> tuple[int, str]:
    """Peak bytes so far: the device allocator's where it reports one, else the process' peak RSS."""
    stats = None
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if stats and stats.get("peak_bytes_in_use"):
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return peak_rss_bytes(), "process peak RSS"


def _per_image(x: float | None, batch: int) -> float | None:
    return None if x is None else x / batch


def _utilization(flops_per_image: float | None, images_per_s: float, peak_tflops: float | None) -> float | None:
    if not flops_per_image or not peak_tflops:
        return None
    return flops_per_image * images_per_s / (peak_tflops * 1e12)


# ----------------------------------------------------------------------------- a group of jobs

@dataclasses.dataclass
class Group:
    """``jobs`` stacked copies of one job's state on the default layout for that many jobs
    (``fleet.make_layout``: ``sharding.plan_mesh(jobs, batch)``), with one batch per slot."""

    layout: fleet.Layout
    jobs: int
    states: Any
    teachers: Any
    images: Any
    valid: Any
    active: Any
    feats: Any = None

    def args(self, cached: bool) -> tuple:
        base = (self.states, self.teachers, self.images, self.valid, self.active)
        return base + (self.feats,) if cached else base


def _tile(tree: Any, n: int) -> Any:
    """``n`` copies of a host tree on a new leading axis (a broadcast view: no host copies)."""
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), tree)


def make_group(jobs: int, state_host: Any, teacher_host: Any, host_images: np.ndarray,
               layout: fleet.Layout | None = None) -> Group:
    """The group of ``jobs`` copies of ``state_host``, every slot training on ``host_images``;
    the teachers shared (replicated), as a run's are. ``layout``: default, the one training
    gives ``jobs`` jobs (``fleet.make_layout`` with ``mesh.*=auto``). Padding slots (``jobs``
    rounded up to the ``model`` axis) are inactive, as in training."""
    batch = int(host_images.shape[0])
    if layout is None:
        layout = fleet.make_layout(jobs, batch, {"model": "auto", "data": "auto"})
    arrays = _put_rows(layout, {"image": host_images, "valid": np.ones(batch, np.float32)})
    return Group(layout, jobs, fleet.put_slots(_tile(state_host, layout.slots), layout),
                 sharding.replicate(teacher_host, layout.mesh), arrays["image"], arrays["valid"],
                 fleet.put_slots(np.arange(layout.slots) < jobs, layout))


def put_feats(group: Group, feats_host: Any) -> Any:
    """One batch's teacher features (host) as every slot's ``[slots, batch, ...]`` input."""
    return _put_rows(group.layout, feats_host)


def _put_rows(layout: fleet.Layout, batch_tree: Any) -> Any:
    """One full batch (host tree, leading axis = examples) -> ``[slots, batch, ...]`` global
    arrays holding it in every slot, each process putting the rows its devices hold."""
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), batch_tree)
    host = {slot: jax.tree.map(lambda x, lo=lo, hi=hi: np.asarray(x)[lo:hi], batch_tree)
            for slot, (lo, hi) in layout.local_rows().items()}
    return fleet.put_batches(host, like, layout)


def device_bytes(tree: Any) -> int:
    """Bytes of ``tree`` on one device (its first shard of each leaf)."""
    return int(sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree)))


def _slot_steps(states: Any, jobs: int) -> list[int]:
    return [int(s) for s in np.asarray(jax.device_get(states.step))[:jobs]]


def time_group_step(group: Group, step: Any, steps: int, cached: bool) -> dict[str, Any]:
    """Compile ``step`` for ``group`` and time it (median of ``steps`` after one warm-up);
    ``group.states`` is advanced (the step donates it). Returns the seconds, the compiled
    program, XLA's memory estimate and the images each call trained, read from the slots'
    step counters (every active slot that took a finite step counts its batch)."""
    compiled, compile_s = compile_timed(step, *group.args(cached))
    mem = compiled.memory_analysis()
    before = _slot_steps(group.states, group.jobs)

    def run():
        group.states, metrics = compiled(*group.args(cached))
        return metrics

    seconds = time_calls(run, steps)
    calls = max(1, steps) + 1
    trained = sum(b - a for a, b in zip(before, _slot_steps(group.states, group.jobs)))
    return {"seconds": seconds, "compiled": compiled, "compile_s": compile_s,
            "images_per_step": trained * group.layout.batch / calls,
            "xla_temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem else None,
            "xla_argument_bytes": int(getattr(mem, "argument_size_in_bytes", 0) or 0) if mem else None}


# ----------------------------------------------------------------------------- the measurement

@dataclasses.dataclass
class Bench:
    """What every measurement of one (config, dtype) shares: the model, the loss, one job's
    random state and teachers on the host, and one batch of random images."""

    config: ml_collections.ConfigDict
    model: Any
    loss_fn: Any
    state: Any  # TrainState, NumPy leaves
    teachers: Any
    images: np.ndarray  # [batch, size, size, 3]
    init_s: float
    feats: Any = None  # the teachers' features of ``images`` (host), once measure_model ran

    @classmethod
    def create(cls, config: ml_collections.ConfigDict, *, image_size: int, batch_size: int, dtype: str,
               seed: int = 0) -> Bench:
        config = ml_collections.ConfigDict(config.to_dict())  # the caller's is not modified
        config.model.dtype = dtype
        model = build_model(config.model)
        t = time.perf_counter()
        state, teachers = jax.jit(lambda k: train.create_train_state(k, config, model, image_size))(
            jax.random.key(seed))
        state, teachers = jax.device_get((state, teachers))
        init_s = time.perf_counter() - t
        images = np.random.default_rng(seed).standard_normal(
            (batch_size, image_size, image_size, 3)).astype(np.float32)
        return cls(config, model, losses.from_config(config.loss, config.maps), state, teachers, images,
                   init_s)

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    @property
    def custom_conv(self) -> bool:
        """Whether the model runs the fast CPU layers (``rstpm_jax.ops.layers``)."""
        return self.model.teachers.conv is not nn.Conv


def _header(bench: Bench, steps: int) -> dict[str, Any]:
    return {
        "model": str(bench.config.name), "dtype": str(bench.config.model.dtype),
        "image_size": bench.image_size, "batch_size": bench.batch_size, "steps": steps,
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(), "conv": "rstpm_jax.ops.conv" if bench.custom_conv else "xla",
        "compiler_options": compile_options.compiler_options(), "jax_version": jax.__version__,
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "load_avg": _load_avg(),
        "compilation_cache": bool(jax.config.jax_compilation_cache_dir),  # compile_s: cache loads
    }


def _group_fields(group: Group) -> dict[str, Any]:
    return {"models": group.jobs, "mesh_model": group.layout.model, "mesh_data": group.layout.data,
            "slots": group.layout.slots, "state_bytes_per_device": device_bytes(group.states),
            "teacher_bytes_per_device": device_bytes(group.teachers)}


def measure_model(config: ml_collections.ConfigDict | Bench, *, image_size: int | None = None,
                  batch_size: int | None = None, dtype: str = "float32", steps: int,
                  peak_tflops: float | None = None, epoch_images: int = 250, seed: int = 0) -> dict[str, Any]:
    """Every figure of one job's record (see the module docstring). ``config``: a config (then
    ``image_size``, ``batch_size`` and ``dtype`` say what to build) or a :class:`Bench`, whose
    ``feats`` this fills in. Training runs the fleet's group step with one slot on the default
    layout for one job; inference, the evaluation's function on a flat mesh of every device."""
    if isinstance(config, Bench):
        bench = config
    elif image_size and batch_size:
        bench = Bench.create(config, image_size=image_size, batch_size=batch_size, dtype=dtype, seed=seed)
    else:
        raise ValueError("measure_model(config, ...) needs image_size and batch_size.")
    model, loss_fn, batch_size = bench.model, bench.loss_fn, bench.batch_size
    rec = _header(bench, steps)
    dtype = rec["dtype"]
    compile_s: dict[str, float] = {"init": bench.init_s}

    # Teachers alone, as the feature cache runs them (default device, host arrays in and out).
    teach = teacher_cache.jitted_teachers(model)
    teacher_dev, images_dev = jax.device_put(bench.teachers), jax.device_put(bench.images)
    teach_c, compile_s["teacher"] = compile_timed(teach, teacher_dev, images_dev)
    t_teacher = time_calls(lambda: teach_c(teacher_dev, images_dev), steps)
    rec["teacher_images_per_s"] = batch_size / t_teacher
    bench.feats = jax.device_get(teach_c(teacher_dev, images_dev))
    rec["teacher_feature_bytes_per_image"] = teacher_cache.feature_bytes(model, bench.teachers, bench.image_size)

    # The train step (teachers inside), one slot.
    group = make_group(1, bench.state, bench.teachers, bench.images)
    rec.update(_group_fields(group))
    log(f"{rec['model']} {dtype}: compiling the train step (1 job on a {group.layout.model} x "
        f"{group.layout.data} mesh)")
    step = train.compile_group_step(model, loss_fn, group.layout.mesh, False, True)
    whole = time_group_step(group, step, steps, cached=False)
    compile_s["train"] = whole["compile_s"]
    rec["train_step_xla_temp_bytes"] = whole["xla_temp_bytes"]
    rec["train_step_s"] = whole["seconds"]
    rec["train_images_per_s"] = batch_size / whole["seconds"]
    rec["images_per_step"] = whole["images_per_step"]
    log(f"  train step {whole['seconds']:.3f} s = {rec['train_images_per_s']:.2f} images/s "
        f"(compile {compile_s['train']:.1f} s)")

    # The step with the teachers' features precomputed.
    group.feats = put_feats(group, bench.feats)
    step_cached = train.compile_group_step(model, loss_fn, group.layout.mesh, True, True)
    cached = time_group_step(group, step_cached, steps, cached=True)
    compile_s["train_cached"] = cached["compile_s"]
    rec["train_cached_step_s"] = cached["seconds"]
    rec["train_cached_images_per_s"] = batch_size / cached["seconds"]
    rec["train_cached_images_per_step"] = cached["images_per_step"]
    rec["train_images_per_s_total"] = rec["train_images_per_s"]  # one job: the --models fields
    rec["train_cached_images_per_s_total"] = rec["train_cached_images_per_s"]
    rec["speedup_vs_one_model"] = rec["cached_speedup_vs_one_model"] = 1.0
    log(f"  cached step {cached['seconds']:.3f} s = {rec['train_cached_images_per_s']:.2f} images/s; "
        f"teachers alone {rec['teacher_images_per_s']:.2f} images/s")

    # Inference (final map + score) at the batch size and at batch 1, as evaluation runs it.
    sharding.check_batch_size(batch_size, "train.batch_size (--batch_size)")
    mesh = sharding.make_mesh()
    n_dev = mesh.devices.size
    state = fleet.host_copy(fleet.take(group.states, 0, group.layout))
    teacher_vars = sharding.replicate(bench.teachers, mesh)
    student_vars = sharding.replicate({"params": state.params, "batch_stats": state.batch_stats}, mesh)
    images = sharding.to_global(bench.images, mesh)
    infer = compile_options.jit(inference.make_infer_fn(model, MapSpec.from_config(bench.config.maps),
                                                        with_levels=False))
    infer_c, compile_s["infer"] = compile_timed(infer, teacher_vars, student_vars, images)
    t_infer = time_calls(lambda: infer_c(teacher_vars, student_vars, images), steps)
    rec["infer_images_per_s"] = batch_size / t_infer
    one = jax.device_put(bench.images[:1], sharding.replicated(mesh))
    infer1_c, compile_s["infer_batch1"] = compile_timed(infer, teacher_vars, student_vars, one)
    t_infer1 = time_calls(lambda: infer1_c(teacher_vars, student_vars, one), max(steps, 5))
    rec["infer_batch1_images_per_s"] = 1.0 / t_infer1
    rec["infer_batch1_latency_s"] = t_infer1
    rec["compile_s"] = compile_s
    rec["compile_time_s"] = compile_s["train"]
    log(f"  inference {rec['infer_images_per_s']:.2f} images/s at batch {batch_size}, "
        f"{rec['infer_batch1_images_per_s']:.2f} at batch 1")

    # FLOPs: XLA's cost analysis. It counts a loop body once, so where the train step uses the
    # CPU weight-gradient op (a scan over kernel taps) the count comes from the same step with
    # XLA's own convolutions (the same arithmetic), lowered only: its estimate is within ~1% of
    # the compiled program's, and compiling it would double the CPU compile time.
    if bench.custom_conv:
        xla_model = build_model(bench.config.model, fast_cpu_ops=False)
        ref_c = train.compile_group_step(xla_model, loss_fn, group.layout.mesh, False, True).lower(
            *group.args(False))
        ref_cc = train.compile_group_step(xla_model, loss_fn, group.layout.mesh, True, True).lower(
            *group.args(True))
        rec["flops_source"] = "cost_analysis of the same step with XLA's convolutions (lowered)"
        flop_devices = 1  # a lowered program is the global one
    else:
        ref_c, ref_cc = whole["compiled"], cached["compiled"]
        rec["flops_source"] = "compiled cost_analysis of the timed step"
        flop_devices = group.layout.mesh.devices.size
    train_images = group.layout.slots * batch_size  # what one call computes
    rec["flops_per_image"] = _per_image(program_flops(ref_c, flop_devices), train_images)
    rec["train_cached_flops_per_image"] = _per_image(program_flops(ref_cc, flop_devices), train_images)
    rec["infer_flops_per_image"] = _per_image(program_flops(infer_c, n_dev), batch_size)
    rec["peak_tflops"] = peak_tflops
    rec["achieved_train_tflops"] = (rec["flops_per_image"] or 0) * rec["train_images_per_s"] / 1e12
    rec["train_peak_fraction"] = _utilization(rec["flops_per_image"], rec["train_images_per_s"], peak_tflops)
    rec["train_cached_peak_fraction"] = _utilization(rec["train_cached_flops_per_image"],
                                                     rec["train_cached_images_per_s"], peak_tflops)
    rec["infer_peak_fraction"] = _utilization(rec["infer_flops_per_image"], rec["infer_images_per_s"],
                                              peak_tflops)
    rec["peak_memory_bytes"], rec["peak_memory_source"] = peak_memory()

    # Epoch of an MVTec-sized category (remainder dropped, as training does).
    n = (epoch_images // batch_size) * batch_size
    rec["epoch_images"] = epoch_images
    rec["epoch_time_s"] = n / rec["train_images_per_s"]
    rec["epoch_time_cached_s"] = n / rec["train_cached_images_per_s"]
    rec["teacher_cache_build_s"] = epoch_images / rec["teacher_images_per_s"]
    epochs = int(bench.config.train.epochs)
    rec["train_epochs"] = epochs
    rec["training_time_s"] = epochs * rec["epoch_time_s"]
    rec["training_time_cached_s"] = epochs * rec["epoch_time_cached_s"] + rec["teacher_cache_build_s"]
    return rec


MODEL_STEPS = ("whole", "cached")


def measure_models(bench: Bench, jobs: int, *, steps: int, base: dict[str, Any] | None = None,
                   train_steps: tuple[str, ...] = MODEL_STEPS,
                   peak_tflops: float | None = None) -> dict[str, Any]:
    """``--models``: ``jobs`` stacked copies of the bench's job trained by one group step on the
    default layout for ``jobs`` jobs; images/s summed over the jobs, against ``base`` (the
    one-job record of :func:`measure_model`, same bench), memory per device. ``train_steps``:
    ``whole`` (teachers inside) and/or ``cached`` (``bench.feats``, which measure_model fills)."""
    unknown = set(train_steps) - set(MODEL_STEPS)
    if unknown or not train_steps:
        raise ValueError(f"train_steps must name some of {MODEL_STEPS}, got {train_steps}.")
    model, loss_fn, batch_size = bench.model, bench.loss_fn, bench.batch_size
    rec = _header(bench, steps)
    group = make_group(jobs, bench.state, bench.teachers, bench.images)
    rec.update(_group_fields(group))
    rec["record"] = "models"
    rec["compile_s"] = {}
    log(f"{rec['model']} {rec['dtype']}: {jobs} stacked job(s), {group.layout.slots} slot(s) on a "
        f"{group.layout.model} x {group.layout.data} mesh; {rec['state_bytes_per_device'] / 2**20:.1f} MB "
        "of states per device")
    base = base or {}
    per_image_flops = base.get("flops_per_image")
    for kind in train_steps:
        cached = kind == "cached"
        prefix = "train_cached" if cached else "train"
        if cached:
            if bench.feats is None:
                raise ValueError("train_steps=cached needs bench.feats: run measure_model on the bench first.")
            group.feats = put_feats(group, bench.feats)
            rec["feature_bytes_per_device"] = device_bytes(group.feats)
        step = train.compile_group_step(model, loss_fn, group.layout.mesh, cached, True)
        got = time_group_step(group, step, steps, cached=cached)
        total = jobs * batch_size / got["seconds"]
        rec["compile_s"][prefix] = got["compile_s"]
        rec[f"{prefix}_step_s"] = got["seconds"]
        rec[f"{prefix}_images_per_s_total"] = total
        rec[f"{prefix}_images_per_s_per_model"] = total / jobs
        rec[f"{prefix}_step_xla_temp_bytes"] = got["xla_temp_bytes"]
        rec[f"{prefix}_step_xla_argument_bytes"] = got["xla_argument_bytes"]
        rec["images_per_step" if not cached else "train_cached_images_per_step"] = got["images_per_step"]
        one = base.get(f"{prefix}_images_per_s")
        rec[("cached_" if cached else "") + "speedup_vs_one_model"] = total / one if one else None
        if not cached:
            if not bench.custom_conv:  # the timed program's own count (free once compiled)
                per_image_flops = _per_image(program_flops(got["compiled"], group.layout.mesh.devices.size),
                                             group.layout.slots * batch_size)
                rec["flops_source"] = "compiled cost_analysis of the timed step"
            else:
                rec["flops_source"] = "the one-job record's (the CPU ops' scans are counted once)"
            rec["flops_per_image"] = per_image_flops
            rec["achieved_train_tflops"] = (per_image_flops or 0) * total / 1e12
            rec["train_peak_fraction"] = _utilization(per_image_flops, total, peak_tflops)
        log(f"  {kind} step {got['seconds']:.3f} s = {total:.2f} images/s over {jobs} job(s)"
            + (f", {total / one:.2f}x one job's" if one else "") + f" (compile {got['compile_s']:.1f} s)")
        del got
    rec["peak_memory_bytes"], rec["peak_memory_source"] = peak_memory()
    return rec


def _cpu_model() -> str | None:
    """The CPU's model name (``lscpu``'s "Model name"), where /proc/cpuinfo has one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def measure_pipeline(image_size: int, batch_size: int, num_images: int, epochs: int = 2) -> dict[str, float]:
    """tf.data ``train_dataset`` images/s on synthetic PNGs written to a temporary directory.

    The first epoch decodes the files (and fills the pipeline's in-memory pixel cache); later
    epochs are what training sees from the second epoch on.
    """
    from rstpm_jax.data import input_pipeline, synthetic  # noqa: PLC0415 (TensorFlow)

    num_images = max(num_images, batch_size)
    with tempfile.TemporaryDirectory() as root:
        synthetic.generate(root, 0, image_size=image_size, categories=("fabric",), num_train=num_images)

        def epoch(e: int) -> tuple[int, float]:
            t = time.perf_counter()
            it = input_pipeline.train_dataset(root, "fabric", image_size=image_size,
                                              global_batch_size=batch_size, seed=0, epoch=e,
                                              holdout_fraction=0.0, process_index=0, process_count=1)
            n = sum(int(b["image"].shape[0]) for b in it)
            return n, time.perf_counter() - t

        n0, t0 = epoch(0)
        runs = [epoch(e) for e in range(1, epochs + 1)]
    n, t = sum(r[0] for r in runs), sum(r[1] for r in runs)
    return {"pipeline_images_per_s": n / t, "pipeline_first_epoch_images_per_s": n0 / t0,
            "pipeline_images": num_images}


def run_torch(image_size: int, batch_size: int, steps: int, device: str = "auto",
              timeout: float = 1800) -> dict[str, Any] | None:
    """``benchmarks/torch_stfpm.py`` in a subprocess; None (with a note) if torch is missing."""
    # Only looked up here: importing torch into a process that holds TensorFlow can crash it.
    missing = [m for m in ("torch", "torchvision") if importlib.util.find_spec(m) is None]
    if missing:
        log(f"--torch skipped: {', '.join(missing)} not installed (pip install -e '.[convert]').")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "torch.json")
        cmd = [sys.executable, os.path.join(REPO, "benchmarks", "torch_stfpm.py"),
               f"--image_size={image_size}", f"--batch_size={batch_size}", f"--steps={steps}",
               f"--device={device}", f"--out={out}"]
        log("running " + " ".join(cmd[1:]))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"torch_stfpm.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


def add_torch_ratio(rec: dict[str, Any], ref: dict[str, Any]) -> None:
    """JAX / PyTorch ratios of train and inference images/s into ``rec``."""
    rec["torch_train_images_per_s"] = ref["train_images_per_s"]
    rec["torch_infer_images_per_s"] = ref["infer_images_per_s"]
    rec["train_speedup_vs_torch"] = rec["train_images_per_s"] / ref["train_images_per_s"]
    rec["infer_speedup_vs_torch"] = rec["infer_images_per_s"] / ref["infer_images_per_s"]


def peaks_for(dtypes: list[str], peak_tflops: list[str]) -> dict[str, float | None]:
    """``--peak_tflops``: empty, one value for every dtype, or one per ``--dtype``."""
    vals = [float(v) for v in peak_tflops if str(v).strip()]
    if not vals:
        return {d: None for d in dtypes}
    if len(vals) == 1:
        vals = vals * len(dtypes)
    if len(vals) != len(dtypes) or min(vals) <= 0:
        raise ValueError(f"--peak_tflops needs one positive value or one per --dtype {dtypes}, got {peak_tflops}.")
    return dict(zip(dtypes, vals))


def parse_models(values: list[str]) -> list[int]:
    """``--models``: job counts (``1,4``), each >= 1, in increasing order without repeats."""
    try:
        models = sorted({int(str(v).strip()) for v in values if str(v).strip()})
    except ValueError as e:
        raise ValueError(f"--models takes job counts like 1,4, got {values}.") from e
    if not models or models[0] < 1:
        raise ValueError(f"--models takes job counts >= 1, got {values}.")
    return models


def models_line(rec: dict[str, Any]) -> str:
    """One line of a ``--models`` record."""
    parts = [f"{rec['model']:>10} {rec['dtype']:>8} {rec['image_size']}px b{rec['batch_size']} x "
             f"{rec['models']} models ({rec['mesh_model']} x {rec['mesh_data']} mesh, {rec['slots']} slots):"]
    for prefix, name in (("train", "train"), ("train_cached", "cached")):
        total = rec.get(f"{prefix}_images_per_s_total")
        if total is not None:
            speedup = rec.get(("cached_" if prefix == "train_cached" else "") + "speedup_vs_one_model")
            parts.append(f"{name} {total:.2f} img/s total" + (f" ({speedup:.2f}x one model)" if speedup else ""))
    parts.append(f"states {rec['state_bytes_per_device'] / 2**20:.1f} MB/device, "
                 f"peak mem {rec['peak_memory_bytes'] / 2**30:.2f} GiB")
    return " ".join(parts[:1]) + " " + ", ".join(parts[1:])


def summary_line(rec: dict[str, Any]) -> str:
    if rec.get("record") == "models":
        return models_line(rec)
    frac = rec.get("train_peak_fraction")
    frac_s = f", {100 * frac:.1f}% of peak" if frac else ""
    return (f"{rec['model']:>10} {rec['dtype']:>8} {rec['image_size']}px b{rec['batch_size']}: "
            f"train {rec['train_images_per_s']:.2f} img/s (cached {rec['train_cached_images_per_s']:.2f}), "
            f"infer {rec['infer_images_per_s']:.2f} img/s (b1 {rec['infer_batch1_images_per_s']:.2f}), "
            f"{(rec['flops_per_image'] or 0) / 1e9:.1f} GFLOP/img train{frac_s}, "
            f"peak mem {rec['peak_memory_bytes'] / 2**30:.2f} GiB, "
            f"epoch({rec['epoch_images']} img) {rec['epoch_time_s']:.1f} s / cached {rec['epoch_time_cached_s']:.1f} s")


def write_json(path: str, records: list[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=2)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- command line

def main(argv: list[str]) -> None:
    from absl import app  # noqa: PLC0415

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = FLAGS
    config = f.config
    size = int(f.image_size or config.data.image_size)
    batch = int(f.batch_size or config.train.batch_size)
    dtypes = [d.strip() for d in f.dtype if d.strip()]
    peaks = peaks_for(dtypes, f.peak_tflops)
    extra: dict[str, Any] = {}
    if f.pipeline:
        log(f"input pipeline: {f.pipeline_images} synthetic {size}px images")
        extra.update(measure_pipeline(size, batch, f.pipeline_images))
        log(f"  {extra['pipeline_images_per_s']:.1f} images/s "
            f"(first epoch, decoding: {extra['pipeline_first_epoch_images_per_s']:.1f})")
    stacked = [n for n in parse_models(f.models) if n > 1]  # 1: the one-job record itself
    train_steps = tuple(k.strip() for k in f.models_train if k.strip())
    records = []
    for dtype in dtypes:
        bench = Bench.create(config, image_size=size, batch_size=batch, dtype=dtype)
        rec = measure_model(bench, steps=f.steps, peak_tflops=peaks[dtype], epoch_images=f.epoch_images)
        rec.update(extra)
        records.append(rec)
        if f.out:
            write_json(f.out, records)
        for jobs in stacked:
            records.append(measure_models(bench, jobs, steps=f.steps, base=rec, train_steps=train_steps,
                                          peak_tflops=peaks[dtype]))
            if f.out:
                write_json(f.out, records)
    if f.torch:
        ref = run_torch(size, batch, f.steps)
        if ref is not None:
            records.append(ref)
            for rec in records[:-1]:
                if rec.get("record") != "models":
                    add_torch_ratio(rec, ref)
            if str(config.name) != "stpm":
                log(f"note: the PyTorch reference is STPM; config {config.name!r} is a different model.")
    for rec in records:
        log(summary_line(rec) if rec["model"] != "torch_stfpm" else
            f"PyTorch STFPM {rec['device']}: train {rec['train_images_per_s']:.2f} img/s, "
            f"infer {rec['infer_images_per_s']:.2f} img/s (b1 {rec['infer_batch1_images_per_s']:.2f})")
        if "train_speedup_vs_torch" in rec:
            log(f"  JAX/PyTorch: train {rec['train_speedup_vs_torch']:.2f}x, "
                f"inference {rec['infer_speedup_vs_torch']:.2f}x")
    if f.out:
        write_json(f.out, records)
        log(f"wrote {len(records)} records to {f.out}")


def _define_flags() -> Any:
    from absl import flags  # noqa: PLC0415
    from ml_collections import config_flags  # noqa: PLC0415

    config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs", "stpm.py"),
                                    "A configs/*.py file (STPM by default).", lock_config=True)
    flags.DEFINE_integer("image_size", None, "Image side (default: config.data.image_size).")
    flags.DEFINE_integer("batch_size", None, "Global batch (default: config.train.batch_size).")
    flags.DEFINE_integer("steps", 5, "Timed steps per measurement (median), after one warm-up.")
    flags.DEFINE_list("dtype", ["float32"], "Compute dtypes: float32, bfloat16.")
    flags.DEFINE_list("peak_tflops", [], "Peak TFLOP/s of the device: one value, or one per --dtype.")
    flags.DEFINE_list("models", ["1"], "Job counts to train stacked (e.g. 1,4): per count > 1 one record "
                      "of images/s summed over the jobs, against one job, and memory.")
    flags.DEFINE_list("models_train", list(MODEL_STEPS), "Train steps the --models records time: whole "
                      "(teachers inside), cached (teachers' features precomputed).")
    flags.DEFINE_integer("epoch_images", 250, "Training images of the category whose epoch time is given.")
    flags.DEFINE_bool("pipeline", True, "Also time the tf.data input pipeline.")
    flags.DEFINE_integer("pipeline_images", 128, "Synthetic images for the pipeline timing.")
    flags.DEFINE_bool("torch", False, "Also run benchmarks/torch_stfpm.py and print JAX/PyTorch.")
    flags.DEFINE_string("out", "", "Write the records as a JSON list here.")
    return flags.FLAGS


if __name__ == "__main__":
    from absl import app

    FLAGS = _define_flags()
    app.run(main)
