"""One-shot accelerator check (under ~8 minutes on one GPU): throughput of one model and of
N stacked models, and GPU vs CPU numerics.

  python benchmarks/gpu_check.py                     # STPM + RSTPM, 256x256, batch 32, f32 + bf16
  python benchmarks/gpu_check.py --image_size=64 --batch_size=4 --steps=2 --models=1,2   # smoke run (CPU too)

Parts, in this order, each in its own try/except; none is started once ``--budget_s`` has
passed or when a part of its kind that already ran says it would end after ``--budget_s``
(the JSON is rewritten after every part, so a killed run keeps what it finished). Per config
in ``--configs``, float32 first:
1. ``benchmarks/throughput.py``'s one-job record (training through the fleet's group step);
2. ``--models`` (counts above 1): that many stacked copies of the job trained by one group step
   on the default layout for that many jobs (``throughput.measure_models``): images/s summed
   over the jobs against one job, memory per device;
3. parity: the same weights and inputs through one train step (the group step with one slot:
   teachers, students, loss, SGD update) and through inference, on ``jax.devices()[0]`` and on
   ``jax.devices("cpu")[0]``, float32, the same layers on both (flax's own where an
   accelerator is the default backend; the fast CPU layers on a CPU-only machine); the
   accelerator side once per ``--precisions`` entry (``default``: XLA's choice, TF32 on recent
   NVIDIA GPUs; ``highest``: full float32). Reported: loss, new parameters, the parameter
   update (new - old), BatchNorm statistics, the final map, the per-level maps and the image
   score, each as max |accelerator - cpu| / max |cpu|;
then 1-2 for the other ``--dtypes`` (bfloat16), 4. the tf.data input pipeline's images/s,
5. the PyTorch STFPM reference (``--torch``). ``parts_s`` records each part's seconds.
Writes ``$OUT/gpu_check.json`` if ``$OUT`` is set, else ``./gpu_check.json`` (or ``--out``).
Without an accelerator it still runs (CPU against CPU), which is how the tests check it.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # throughput.py
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import throughput  # noqa: E402  (puts the repository root on sys.path too)
from jax.sharding import Mesh  # noqa: E402

from rstpm_jax import fleet, inference, losses, sharding, train  # noqa: E402
from rstpm_jax.anomaly_maps import MapSpec  # noqa: E402
from rstpm_jax.models.rstpm import build_model  # noqa: E402

# Dense peak TFLOP/s by dtype (NVIDIA data sheets; float32 as TF32, XLA's default precision).
KNOWN_PEAKS = {"H200": {"float32": 494.7, "bfloat16": 989.4},
               "H100": {"float32": 494.7, "bfloat16": 989.4},
               "A100": {"float32": 156.0, "bfloat16": 312.0}}


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_config(name: str) -> ml_collections.ConfigDict:
    """``configs/<name>.py``'s config (``stpm``, ``mvtec`` = full RSTPM, ...)."""
    try:
        module = importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"--configs: no configs/{name}.py ({e}).") from e
    return module.get_config()


def default_peaks(device_kind: str) -> dict[str, float]:
    for key, peaks in KNOWN_PEAKS.items():
        if key.lower() in device_kind.lower():
            return peaks
    return {}


# ----------------------------------------------------------------------------- parity

def _max_rel(a: Any, b: Any) -> float:
    """max over leaves of max|a - b| / max|b| (float64 on the host)."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = max(float(np.max(np.abs(y))), 1e-30) if y.size else 1.0
        worst = max(worst, float(np.max(np.abs(x - y))) / scale if y.size else 0.0)
    return worst


def one_device_layout(device: Any, batch_size: int) -> fleet.Layout:
    """One job's layout on ``device`` alone (a 1 x 1 model x data mesh)."""
    return fleet.Layout(Mesh(np.asarray([device]).reshape(1, 1), (sharding.MODEL_AXIS, sharding.DATA_AXIS)),
                        1, batch_size)


def parity(config: ml_collections.ConfigDict, image_size: int, batch_size: int,
           precisions: list[str], seed: int = 0) -> dict[str, Any]:
    """One train step (the group step, one slot) and inference on the default device and on
    the CPU; relative differences."""
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = "float32"
    accel, cpu = jax.devices()[0], jax.devices("cpu")[0]
    loss_fn = losses.from_config(config.loss, config.maps)
    # build_model picks the fast CPU layers only on a CPU default backend: on a CPU-only
    # machine both sides get them; with an accelerator, flax's own layers, run on both devices.
    model = build_model(config.model)
    cpu_conv = model.teachers.conv is not nn.Conv
    with jax.default_device(cpu):
        state, teacher_vars = jax.jit(lambda k: train.create_train_state(k, config, model, image_size))(
            jax.random.key(seed))
    state, teacher_vars = jax.device_get((state, teacher_vars))
    images = np.random.default_rng(seed).standard_normal((batch_size, image_size, image_size, 3),
                                                         dtype=np.float32)
    student_vars = {"params": state.params, "batch_stats": state.batch_stats}
    infer = jax.jit(inference.make_infer_fn(model, MapSpec.from_config(config.maps)))

    def run(device) -> dict[str, Any]:
        group = throughput.make_group(1, state, teacher_vars, images, one_device_layout(device, batch_size))
        step = train.compile_group_step(model, loss_fn, group.layout.mesh, False, True)
        states, metrics = step(*group.args(False))
        new_state = fleet.host_copy(fleet.take(states, 0, group.layout))
        put = functools.partial(jax.device_put, device=device)
        out = infer(put(teacher_vars), put(student_vars), put(images))
        return jax.device_get({"loss": metrics["loss"][0], "finite": metrics["finite"][0],
                               "params": new_state.params, "batch_stats": new_state.batch_stats,
                               "step": new_state.step, "out": out})

    t = time.perf_counter()
    ref = run(cpu)
    if int(ref["step"]) != 1 or float(ref["finite"]) != 1.0:
        raise RuntimeError(f"the CPU train step did not apply (step {ref['step']}, finite {ref['finite']}).")
    result: dict[str, Any] = {"model": str(config.name), "image_size": image_size, "batch_size": batch_size,
                              "accelerator": f"{accel.platform}:{accel.device_kind}",
                              "cpu_conv": "rstpm_jax.ops.conv" if cpu_conv else "xla",
                              "cpu_loss": float(ref["loss"]), "cpu_s": time.perf_counter() - t}
    update_ref = jax.tree.map(lambda n, o: n - o, ref["params"], state.params)
    if accel.platform == "cpu" and len(precisions) > 1:
        result["note"] = f"CPU only: precisions {precisions[1:]} skipped (XLA:CPU computes float32 fully)"
        precisions = precisions[:1]
    for precision in precisions:
        t = time.perf_counter()
        if precision == "default":
            got = run(accel)
        else:
            with jax.default_matmul_precision(precision):
                got = run(accel)
        update = jax.tree.map(lambda n, o: n - o, got["params"], state.params)
        result[precision] = {
            "loss": float(got["loss"]),
            "step_applied": int(got["step"]) == 1 and float(got["finite"]) == 1.0,
            "loss_rel_diff": abs(float(got["loss"]) - float(ref["loss"])) / max(abs(float(ref["loss"])), 1e-30),
            "params_max_rel_diff": _max_rel(got["params"], ref["params"]),
            "update_max_rel_diff": _max_rel(update, update_ref),
            "batch_stats_max_rel_diff": _max_rel(got["batch_stats"], ref["batch_stats"]),
            "map_max_rel_diff": _max_rel(got["out"]["map"], ref["out"]["map"]),
            "levels_max_rel_diff": _max_rel(got["out"]["levels"], ref["out"]["levels"]),
            "score_max_rel_diff": _max_rel(got["out"]["score"], ref["out"]["score"]),
            "seconds": time.perf_counter() - t,
        }
        r = result[precision]
        log(f"  parity {config.name} [{precision}]: loss {r['loss_rel_diff']:.2e}, update "
            f"{r['update_max_rel_diff']:.2e}, params {r['params_max_rel_diff']:.2e}, map "
            f"{r['map_max_rel_diff']:.2e}, levels {r['levels_max_rel_diff']:.2e}")
    return result


# ----------------------------------------------------------------------------- driver

def main(argv: list[str]) -> None:
    from absl import app, flags  # noqa: PLC0415

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    start = time.perf_counter()
    out_path = f.out or os.path.join(os.environ.get("OUT") or ".", "gpu_check.json")
    report: dict[str, Any] = {"throughput": [], "models": [], "parity": [], "errors": [], "skipped": [],
                              "parts_s": {}}
    took: dict[str, float] = {}  # seconds of the last part of each kind: what the next one may take

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - start
        throughput.write_json(out_path, report)  # atomic rewrite

    def part(name: str, fn: Callable[[], Any], kind: str | None = None) -> Any:
        elapsed = time.perf_counter() - start
        expect = took.get(kind, 0.0) if kind else 0.0
        if elapsed + expect > f.budget_s:
            log(f"skip {name}: {elapsed:.0f} s" + (f" + ~{expect:.0f} s" if expect else "")
                + f" > --budget_s={f.budget_s}")
            report["skipped"].append(name)
            save()
            return None
        log(f"start {name} (at {elapsed:.0f} s)")
        t = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - every part is independent; report and go on
            log(f"FAILED {name}: {type(e).__name__}: {e}")
            report["errors"].append({"part": name, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-4000:]})
            value = None
        report["parts_s"][name] = time.perf_counter() - t
        if kind:
            took[kind] = report["parts_s"][name]
        save()
        return value

    def env() -> dict[str, Any]:
        dev = jax.devices()[0]
        info = {"jax": jax.__version__, "backend": jax.default_backend(), "device_kind": dev.device_kind,
                "devices": [str(d) for d in jax.devices()], "python": platform.python_version(),
                "cpu_model": throughput._cpu_model(), "cpu_count": os.cpu_count(),
                "load_avg": throughput._load_avg()}
        if dev.platform == "cpu":
            info["note"] = "no accelerator: throughput is the CPU's and parity compares the CPU with itself"
        log(json.dumps(info))
        return info

    report["env"] = part("env", env) or {}
    kind = str(report["env"].get("device_kind", ""))
    dtypes = [d.strip() for d in f.dtypes if d.strip()]
    peaks = throughput.peaks_for(dtypes, f.peak_tflops) if f.peak_tflops else {
        d: default_peaks(kind).get(d) for d in dtypes}
    configs = [c.strip() for c in f.configs if c.strip()]
    stacked = [n for n in throughput.parse_models(f.models) if n > 1]
    train_steps = tuple(k.strip() for k in f.models_train if k.strip())
    benches: dict[tuple[str, str], throughput.Bench] = {}
    base: dict[tuple[str, str], dict[str, Any]] = {}

    def measure(name: str, dtype: str) -> None:
        bench = throughput.Bench.create(load_config(name), image_size=f.image_size, batch_size=f.batch_size,
                                        dtype=dtype)
        rec = throughput.measure_model(bench, steps=f.steps, peak_tflops=peaks.get(dtype))
        rec["config"] = name
        benches[name, dtype], base[name, dtype] = bench, rec
        report["throughput"].append(rec)
        log(throughput.summary_line(rec))

    def models(name: str, dtype: str, jobs: int) -> None:
        if (name, dtype) not in benches:
            raise RuntimeError(f"no one-job record of {name} {dtype} to compare with (its part failed or was skipped).")
        rec = throughput.measure_models(benches[name, dtype], jobs, steps=f.steps, base=base[name, dtype],
                                        train_steps=train_steps, peak_tflops=peaks.get(dtype))
        rec["config"] = name
        report["models"].append(rec)
        log(throughput.summary_line(rec))

    def check(name: str) -> None:
        report["parity"].append(parity(load_config(name), f.image_size, f.parity_batch_size,
                                       [p.strip() for p in f.precisions if p.strip()]))

    def throughput_parts(name: str, dtype: str) -> None:
        part(f"throughput {name} {dtype}", functools.partial(measure, name, dtype), f"throughput {name}")
        for jobs in stacked:  # the largest count is expected to take longest: estimated by the last
            part(f"models {name} {dtype} x{jobs}", functools.partial(models, name, dtype, jobs),
                 f"models {name}")
        benches.pop((name, dtype), None)  # host copies of the states

    first, rest = dtypes[:1], dtypes[1:]
    for name in configs:
        for dtype in first:
            throughput_parts(name, dtype)
        part(f"parity {name}", functools.partial(check, name))
    for dtype in rest:
        for name in configs:
            throughput_parts(name, dtype)
    if f.pipeline:
        pipe = part("input pipeline", lambda: throughput.measure_pipeline(f.image_size, f.batch_size,
                                                                          f.pipeline_images))
        report["pipeline"] = pipe
    if f.torch:
        device = "cuda" if jax.default_backend() == "gpu" else "cpu"
        ref = part("torch", lambda: throughput.run_torch(f.image_size, f.batch_size, f.steps, device))
        report["torch"] = ref
        if ref:
            for rec in report["throughput"]:
                if rec.get("config") == "stpm":
                    throughput.add_torch_ratio(rec, ref)
                    log(f"JAX {rec['dtype']} / PyTorch {device}: train {rec['train_speedup_vs_torch']:.2f}x, "
                        f"inference {rec['infer_speedup_vs_torch']:.2f}x")
    save()
    log(f"done in {time.perf_counter() - start:.0f} s: {len(report['throughput'])} throughput records, "
        f"{len(report['models'])} stacked-models records, {len(report['parity'])} parity checks, "
        f"{len(report['errors'])} errors, {len(report['skipped'])} skipped -> {out_path}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_list("configs", ["stpm", "mvtec"], "configs/<name>.py to run (mvtec = full RSTPM).")
    flags.DEFINE_integer("image_size", 256, "Image side.")
    flags.DEFINE_integer("batch_size", 32, "Global batch of one job in the throughput runs.")
    flags.DEFINE_integer("steps", 3, "Timed steps per throughput measurement.")
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes of the throughput runs.")
    flags.DEFINE_list("models", ["1", "4", "15"], "Stacked job counts (1 = the one-job record; each count "
                      "above 1 is a part of its own).")
    flags.DEFINE_list("models_train", ["whole"], "Train steps the stacked records time: whole (teachers "
                      "inside: a fleet whose teacher features exceed train.cache_max_bytes), cached.")
    flags.DEFINE_list("peak_tflops", [], "Peak TFLOP/s (one, or one per dtype); default: known GPUs.")
    flags.DEFINE_integer("parity_batch_size", 4, "Batch of the GPU-vs-CPU comparison.")
    flags.DEFINE_list("precisions", ["default", "highest"], "Accelerator matmul precisions to compare.")
    flags.DEFINE_bool("pipeline", True, "Time the tf.data input pipeline.")
    flags.DEFINE_integer("pipeline_images", 128, "Synthetic images for the pipeline timing.")
    flags.DEFINE_bool("torch", True, "Run the PyTorch STFPM reference (skipped if torch is missing).")
    flags.DEFINE_float("budget_s", 360.0, "Start no part after this many seconds, nor one that the last "
                       "part of its kind says would end after it.")
    flags.DEFINE_string("out", "", "JSON path (default: $OUT/gpu_check.json or ./gpu_check.json).")
    app.run(main)
