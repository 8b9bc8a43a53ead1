"""Training and inference throughput of a config: images/s, compile time, memory, FLOPs.

  python benchmarks/throughput.py --config=configs/stpm.py --image_size=256 --batch_size=32 \
      --steps=5 --dtype=float32,bfloat16 --torch --out=stpm.json
  python benchmarks/throughput.py --config=configs/mvtec.py --peak_tflops=494,989 --out=rstpm.json

Per dtype, one JSON record (``--out``: a list of records) with
- train images/s: the whole step (teachers + students + update) and the step with the
  teachers' features precomputed (``cached``, as training reuses them across epochs); the
  median of ``--steps`` timed steps after the compile and one warm-up step;
- inference images/s at ``--batch_size`` and at batch 1 (final map + score);
- compile times, FLOPs per image from XLA's cost analysis, the achieved fraction of
  ``--peak_tflops`` (per dtype, if given), peak memory (device memory stats where the backend
  has them, else the process' peak RSS), XLA's own memory estimate of the train step;
- the epoch time of an MVTec-sized category (``--epoch_images``) with and without reusing
  the teachers' features, and the input pipeline's images/s (synthetic PNGs, tf.data).
``--torch`` also runs ``benchmarks/torch_stfpm.py`` (the PyTorch STFPM reference) in a
subprocess and prints the JAX / PyTorch ratio (meaningful for configs/stpm.py).
Any ``--config.<key>=value`` override works as in ``rstpm_jax.main``. Teachers are random:
speed does not depend on the weights.
"""

from __future__ import annotations

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

from rstpm_jax import inference, losses, sharding, teacher_cache, train  # noqa: E402
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


# ----------------------------------------------------------------------------- the measurement

def measure_model(config: ml_collections.ConfigDict, *, image_size: int, batch_size: int, dtype: str,
                  steps: int, peak_tflops: float | None = None, epoch_images: int = 250,
                  seed: int = 0) -> dict[str, Any]:
    """Every model figure of one record (see the module docstring); ``config`` is not modified."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = dtype
    sharding.check_batch_size(batch_size, "train.batch_size (--batch_size)")
    mesh = sharding.make_mesh()
    n_dev = mesh.devices.size
    model = build_model(config.model)
    loss_fn = losses.from_config(config.loss, config.maps)
    custom_conv = model.teachers.conv is not nn.Conv  # the fast CPU layers (rstpm_jax.ops.layers)
    t = time.perf_counter()
    state, teacher_vars = jax.jit(lambda k: train.create_train_state(k, config, model, image_size))(
        jax.random.key(seed))
    init_s = time.perf_counter() - t
    state, teacher_vars = sharding.replicate(state, mesh), sharding.replicate(teacher_vars, mesh)
    rng = np.random.default_rng(seed)
    host_images = rng.standard_normal((batch_size, image_size, image_size, 3)).astype(np.float32)
    images = sharding.to_global(host_images, mesh)
    rec: dict[str, Any] = {
        "model": str(config.name), "dtype": dtype, "image_size": image_size, "batch_size": batch_size,
        "steps": steps, "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "num_devices": n_dev, "conv": "rstpm_jax.ops.conv" if custom_conv else "xla",
        "compiler_options": compile_options.compiler_options(),
        "jax_version": jax.__version__, "cpu_count": os.cpu_count(), "load_avg": _load_avg(),
        "compilation_cache": bool(jax.config.jax_compilation_cache_dir),  # compile_s: cache loads
    }
    compile_s: dict[str, float] = {"init": init_s}

    # Train step, teachers inside.
    log(f"{rec['model']} {dtype}: compiling the train step")
    step = train.compile_train_step(model, loss_fn, mesh, cached=False)
    step_c, compile_s["train"] = compile_timed(step, state, teacher_vars, images)
    mem = step_c.memory_analysis()
    rec["train_step_xla_temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", 0) or 0) if mem else None
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = step_c(holder["state"], teacher_vars, images)
        return metrics

    t_train = time_calls(run_step, steps)
    rec["train_step_s"] = t_train
    rec["train_images_per_s"] = batch_size / t_train
    log(f"  train step {t_train:.3f} s = {rec['train_images_per_s']:.2f} images/s "
        f"(compile {compile_s['train']:.1f} s)")

    # Teachers alone (what the cache is built with) and the step with cached features.
    teach = teacher_cache.jitted_teachers(model)
    teach_c, compile_s["teacher"] = compile_timed(teach, teacher_vars, images)
    t_teacher = time_calls(lambda: teach_c(teacher_vars, images), steps)
    rec["teacher_images_per_s"] = batch_size / t_teacher
    feats = teach_c(teacher_vars, images)
    step_cached = train.compile_train_step(model, loss_fn, mesh, cached=True)
    step_cc, compile_s["train_cached"] = compile_timed(step_cached, holder["state"], teacher_vars, images, feats)

    def run_cached():
        holder["state"], metrics = step_cc(holder["state"], teacher_vars, images, feats)
        return metrics

    t_cached = time_calls(run_cached, steps)
    rec["train_cached_step_s"] = t_cached
    rec["train_cached_images_per_s"] = batch_size / t_cached
    rec["teacher_feature_bytes_per_image"] = teacher_cache.feature_bytes(model, teacher_vars, image_size)
    log(f"  cached step {t_cached:.3f} s = {rec['train_cached_images_per_s']:.2f} images/s; "
        f"teachers alone {rec['teacher_images_per_s']:.2f} images/s")

    # Inference (final map + score) at the batch size and at batch 1.
    state = holder["state"]
    student_vars = {"params": state.params, "batch_stats": state.batch_stats}
    infer = compile_options.jit(inference.make_infer_fn(model, MapSpec.from_config(config.maps),
                                                        with_levels=False))
    infer_c, compile_s["infer"] = compile_timed(infer, teacher_vars, student_vars, images)
    t_infer = time_calls(lambda: infer_c(teacher_vars, student_vars, images), steps)
    rec["infer_images_per_s"] = batch_size / t_infer
    one = jax.device_put(host_images[:1], sharding.replicated(mesh))
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
    if custom_conv:
        xla_model = build_model(config.model, fast_cpu_ops=False)
        ref_c = train.compile_train_step(xla_model, loss_fn, mesh, cached=False).lower(
            holder["state"], teacher_vars, images)
        ref_cc = train.compile_train_step(xla_model, loss_fn, mesh, cached=True).lower(
            holder["state"], teacher_vars, images, feats)
        rec["flops_source"] = "cost_analysis of the same step with XLA's convolutions (lowered)"
        flop_devices = 1  # a lowered program is the global one
    else:
        ref_c, ref_cc = step_c, step_cc
        rec["flops_source"] = "compiled cost_analysis of the timed step"
        flop_devices = n_dev
    rec["flops_per_image"] = _per_image(program_flops(ref_c, flop_devices), batch_size)
    rec["train_cached_flops_per_image"] = _per_image(program_flops(ref_cc, flop_devices), batch_size)
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
    epochs = int(config.train.epochs)
    rec["train_epochs"] = epochs
    rec["training_time_s"] = epochs * rec["epoch_time_s"]
    rec["training_time_cached_s"] = epochs * rec["epoch_time_cached_s"] + rec["teacher_cache_build_s"]
    return rec


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


def summary_line(rec: dict[str, Any]) -> str:
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
    records = []
    for dtype in dtypes:
        rec = measure_model(config, image_size=size, batch_size=batch, dtype=dtype, steps=f.steps,
                            peak_tflops=peaks[dtype], epoch_images=f.epoch_images)
        rec.update(extra)
        records.append(rec)
        if f.out:
            write_json(f.out, records)
    if f.torch:
        ref = run_torch(size, batch, f.steps)
        if ref is not None:
            records.append(ref)
            for rec in records[:-1]:
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
