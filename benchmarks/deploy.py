"""Inference images/s of this project's exported model in every installed backend and precision,
and (``--torch``) of the PyTorch STFPM the same ways, in one run.

  python benchmarks/deploy.py --config=configs/stpm.py --image_size=256 --batch_sizes=1,32 \
      --rounds=10 [--torch] [--out=deploy.json]

Random weights (speed does not depend on them). This project's model is exported to ONNX
(``rstpm_jax.deploy.onnx_export``, as ``python -m rstpm_jax.export --format onnx`` does) and to
``jax.export``, in a temporary folder, and timed as:

- ``jax f32`` / ``jax bf16``: the in-process model as ``predict`` runs it (``build_model``'s CPU
  layers, ``compile_options.jit``; bf16 = ``model.dtype`` bfloat16);
- ``onnxruntime f32``: ONNX Runtime's CPU provider, all graph optimisations;
- ``openvino f32`` / ``bf16`` (the inference-precision hint; native where the CPU has
  AVX512-BF16 or AMX, printed; the distance kept float32, as ``runtime.OpenVINOModel`` does) /
  ``int8`` (NNCF, convolutions only, calibrated on ``--calib_images`` random images, as
  ``--precision int8`` exports);
- ``openvino bf16, bf16 distance``: bf16 with the distance in bfloat16 too, what keeping it
  float32 costs.

``--torch`` adds the PyTorch STFPM of ``benchmarks/torch_stfpm.py`` (ResNet18 teacher and
student to layer3, the STFPM map): ``torch eager f32`` (denormals flushed), and the same
network exported with ``torch.onnx.export`` in ``torch onnxruntime f32`` and ``torch openvino
f32/bf16/int8`` (int8 by the same NNCF scope). Every path gets the same NHWC float32 batch
(the torch paths transpose to NCHW inside the timed call, as a caller would).

Timing: per batch size, two warm-up calls per path, then ``--rounds`` rounds in which every
path runs a burst of ``--burst`` consecutive calls (round robin, so that a change in the
machine's other load hits all paths alike; default: as many calls as make 16 images, so one
at batch 32 and 16 at batch 1, as a line calls one model again and again); the median per
path of a burst's time per call. Memory per path (all models stay loaded throughout): ``load``,
the resident set's growth while the path was built (weights, compiled code); ``first call``
and ``call``, the peak resident set above the one before the call during its first call at
that batch size (arenas, compilation) and during its timed calls (``/proc/self/clear_refs``
resets the peak); and the whole run's peak. Accuracy: the map's max
relative deviation from ``jax f32`` (this project's paths) or ``torch eager f32`` (torch's).
File sizes of every artifact. Everything runs back to back in one process: on a shared
machine the figures move with the other load (the 1-minute load average is printed at the
start and the end); compare paths within one run, not across runs.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (REPO, os.path.dirname(os.path.abspath(__file__))):
    if p not in sys.path:
        sys.path.insert(0, p)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_memory import peak_rss_bytes  # noqa: E402

Runner = Callable[[np.ndarray], np.ndarray]  # NHWC float32 batch -> (B, H, W) map
# OpenVINO bf16 with the distance in bfloat16 too (runtime.OpenVINOModel(float32_distance=False)):
# what keeping it float32, the default, costs.
BF16_DISTANCE = "openvino bf16, bf16 distance"


def log(msg: str) -> None:
    print(f"[deploy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rel(a: Any, ref: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / np.max(np.abs(ref)))


def _mib(*paths: str) -> float:
    return sum(os.path.getsize(p) for p in paths) / 2**20


def load_config(path: str) -> Any:
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("bench_cfg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.model.random_teachers = True
    return config


def project_paths(config: Any, image_size: int, tmp: str, calib: np.ndarray, rec: dict,
                  seed: int = 0) -> dict[str, Runner]:
    """This project's model in every installed backend and precision."""
    from rstpm_jax import inference  # noqa: PLC0415
    from rstpm_jax.anomaly_maps import MapSpec  # noqa: PLC0415
    from rstpm_jax.deploy import onnx_export, quantize, runtime  # noqa: PLC0415
    from rstpm_jax.models.rstpm import build_model  # noqa: PLC0415
    from rstpm_jax.ops import compile_options  # noqa: PLC0415

    spec = MapSpec.from_config(config.maps)
    model = build_model(config.model)  # the project's CPU layers, as predict runs it
    tv, sv = jax.device_get(jax.jit(lambda k: model.init(k, (1, image_size, image_size, 3)))(jax.random.key(seed)))
    runners: dict[str, Runner] = {}
    for prec, dtype in (("f32", "float32"), ("bf16", "bfloat16")):
        cfg = config.model.copy_and_resolve_references()
        cfg.dtype = dtype
        fn = _built(rec, f"jax {prec}", lambda cfg=cfg: compile_options.jit(
            inference.make_infer_fn(build_model(cfg), spec, with_levels=False)))
        runners[f"jax {prec}"] = lambda x, fn=fn: np.asarray(jax.block_until_ready(fn(tv, sv, x))["map"])

    t = time.perf_counter()
    jax_path = os.path.join(tmp, "model.jaxexport")
    plain = inference.make_infer_fn(onnx_export.export_model(config.model), spec, with_levels=False)
    shape = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {image_size}, {image_size}, 3"), np.float32)
    exported = jax.export.export(jax.jit(lambda x: plain(tv, sv, x)), platforms=("cpu",))(shape)
    with open(jax_path, "wb") as f:
        f.write(exported.serialize())
    rec["file_mib"]["jaxexport"] = _mib(jax_path)
    rec["export_s"] = {"jax": time.perf_counter() - t}
    try:
        t = time.perf_counter()
        onnx_path = os.path.join(tmp, "model.onnx")
        onnx_export.export_trained(config.model, spec, tv, sv, (image_size, image_size), onnx_path)
        rec["export_s"]["onnx"] = time.perf_counter() - t
        rec["file_mib"]["onnx"] = _mib(onnx_path)
        log(f"exported {onnx_path} in {rec['export_s']['onnx']:.1f} s ({rec['file_mib']['onnx']:.1f} MiB)")
    except ImportError as e:
        log(f"no ONNX export ({e}): jax paths only")
        return runners
    if runtime.installed("onnxruntime"):
        runners["onnxruntime f32"] = _map_of(_built(rec, "onnxruntime f32",
                                                    lambda: runtime.OnnxRuntimeModel(onnx_path, {})))
    if runtime.installed("openvino"):
        for prec in ("f32", "bf16"):
            runners[f"openvino {prec}"] = _map_of(_built(rec, f"openvino {prec}",
                                                         lambda p=prec: runtime.OpenVINOModel(onnx_path, p, {})))
        runners[BF16_DISTANCE] = _map_of(_built(rec, BF16_DISTANCE, lambda: runtime.OpenVINOModel(
            onnx_path, "bf16", {}, float32_distance=False)))
        ir = _int8(quantize, onnx_path, calib, os.path.join(tmp, "model.int8.xml"), rec, "int8")
        if ir:
            runners["openvino int8"] = _map_of(_built(rec, "openvino int8",
                                                      lambda: runtime.OpenVINOModel(ir, "int8", {})))
    return runners


def _built(rec: dict, name: str, make: Callable[[], Any]) -> Any:
    """``make()``, recording the resident set's growth while it ran as ``name``'s load memory."""
    before = _rss()
    out = make()
    rec["load_mib"][name] = max(_rss() - before, 0) / 2**20
    return out


def _map_of(model: Callable[[np.ndarray], dict]) -> Runner:
    return lambda x: model(x)["map"]


def _int8(quantize: Any, onnx_path: str, calib: np.ndarray, out: str, rec: dict, key: str) -> str | None:
    try:
        t = time.perf_counter()
        quantize.openvino_int8(onnx_path, calib, out)
    except ImportError:
        log("nncf not installed: no int8")
        return None
    rec["export_s"][key] = time.perf_counter() - t
    rec["file_mib"][key] = _mib(out, out[:-4] + ".bin")
    return out


def torch_paths(image_size: int, tmp: str, calib: np.ndarray, rec: dict) -> dict[str, Runner]:
    """The PyTorch STFPM (random weights) eager and exported to ONNX Runtime / OpenVINO."""
    import torch  # noqa: PLC0415
    import torch_stfpm  # noqa: PLC0415  (benchmarks/ is the script's folder)

    from rstpm_jax.deploy import quantize, runtime  # noqa: PLC0415

    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    net = _built(rec, "torch eager f32", lambda: torch_stfpm.STFPM().eval())

    class Infer(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            amap = torch_stfpm.anomaly_map(*self.m(x), tuple(x.shape[2:]))
            return amap, amap.flatten(1).amax(1)

    path = os.path.join(tmp, "torch_stfpm.onnx")
    t = time.perf_counter()
    torch.onnx.export(Infer(net), (torch.randn(1, 3, image_size, image_size),), path,
                      input_names=["images"], output_names=["map", "score"],
                      dynamic_axes={"images": {0: "batch"}, "map": {0: "batch"}, "score": {0: "batch"}},
                      opset_version=17, dynamo=False)
    rec["export_s"]["torch_onnx"] = time.perf_counter() - t
    rec["file_mib"]["torch_onnx"] = _mib(path)

    def nchw(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    runners: dict[str, Runner] = {
        "torch eager f32": lambda x: torch_stfpm.infer(net, torch.from_numpy(nchw(x)))[0].numpy()}
    if runtime.installed("onnxruntime"):
        ort_model = _built(rec, "torch onnxruntime f32", lambda: runtime.OnnxRuntimeModel(path, {}))
        runners["torch onnxruntime f32"] = lambda x: ort_model(nchw(x))["map"]
    if runtime.installed("openvino"):
        for prec in ("f32", "bf16"):
            m = _built(rec, f"torch openvino {prec}", lambda p=prec: runtime.OpenVINOModel(path, p, {}))
            runners[f"torch openvino {prec}"] = lambda x, m=m: m(nchw(x))["map"]
        ir = _int8(quantize, path, nchw(calib), os.path.join(tmp, "torch_stfpm.int8.xml"), rec, "torch_int8")
        if ir:
            m = _built(rec, "torch openvino int8", lambda: runtime.OpenVINOModel(ir, "int8", {}))
            runners["torch openvino int8"] = lambda x, m=m: m(nchw(x))["map"]
    return runners


def time_paths(runners: dict[str, Runner], x: np.ndarray, rounds: int, burst: int = 1) -> dict[str, dict[str, Any]]:
    """Round-robin timing of every path on ``x``, ``burst`` consecutive calls a round; median
    seconds a call, peak memory, the maps."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    peak: dict[str, int] = {name: 0 for name in runners}
    first: dict[str, int | None] = {}
    maps: dict[str, np.ndarray] = {}
    resettable = _reset_peak()
    for name, fn in runners.items():  # warm-up (compiles, allocates)
        before = _rss()
        _reset_peak()
        maps[name] = np.asarray(fn(x), np.float64)
        first[name] = peak_rss_bytes() - before if resettable else None
        fn(x)
    for _ in range(rounds):
        for name, fn in runners.items():
            before = _rss()
            if resettable:
                _reset_peak()
            t = time.perf_counter()
            for _ in range(burst):
                fn(x)
            times[name].append((time.perf_counter() - t) / burst)
            if resettable:
                peak[name] = max(peak[name], peak_rss_bytes() - before)
    mib = (lambda v: None if v is None or not resettable else max(v, 0) / 2**20)
    return {name: {"seconds": statistics.median(times[name]), "seconds_all": times[name],
                   "first_call_mib": mib(first[name]), "call_mib": mib(peak[name]), "map": maps[name]}
            for name in runners}


def run(config_path: str, image_size: int, batch_sizes: list[int], rounds: int, with_torch: bool,
        calib_images: int, seed: int = 0, burst: int = 0) -> dict[str, Any]:
    from rstpm_jax.deploy import runtime  # noqa: PLC0415

    config = load_config(config_path)
    rng = np.random.default_rng(seed)
    tmp = tempfile.mkdtemp(prefix="deploy_bench_")
    rec: dict[str, Any] = {"config": config_path, "image_size": image_size, "rounds": rounds, "burst": burst,
                           "cpu_count": os.cpu_count(), "bf16_native": runtime.bf16_capable(),
                           "load_avg_start": os.getloadavg()[0], "paths": [], "file_mib": {}, "load_mib": {},
                           "backends_installed": runtime.installed_backends()}
    log(f"{config_path} at {image_size}px; backends {rec['backends_installed']}; bf16 native: "
        f"{rec['bf16_native']}; load average {rec['load_avg_start']:.2f}")
    calib = rng.standard_normal((calib_images, image_size, image_size, 3)).astype(np.float32)
    runners = project_paths(config, image_size, tmp, calib, rec, seed)
    if with_torch:
        runners.update(torch_paths(image_size, tmp, calib, rec))
    for b in batch_sizes:
        x = rng.standard_normal((b, image_size, image_size, 3)).astype(np.float32)
        calls = burst or max(1, 16 // b)
        results = time_paths(runners, x, rounds, calls)
        for name, r in results.items():
            ref_name = "torch eager f32" if name.startswith("torch") else "jax f32"
            entry = {"path": name, "batch_size": b, "burst": calls, "images_per_s": b / r["seconds"],
                     "seconds": r["seconds"],
                     "load_mib": rec["load_mib"].get(name), "first_call_mib": r["first_call_mib"],
                     "call_mib": r["call_mib"],
                     "map_rel_err": None if name == ref_name else _rel(r["map"], results[ref_name]["map"]),
                     "map_rel_err_vs": ref_name}
            rec["paths"].append(entry)
            err = "" if entry["map_rel_err"] is None else f", map rel err vs {ref_name} {entry['map_rel_err']:.1e}"
            mem = "" if entry["call_mib"] is None else (
                f", MiB: load {entry['load_mib']:.0f} first call +{entry['first_call_mib']:.0f} "
                f"call +{entry['call_mib']:.0f}")
            log(f"batch {b:3d} {name:22s} {entry['images_per_s']:8.2f} images/s{mem}{err}")
    rec["peak_rss_mib"] = peak_rss_bytes() / 2**20
    rec["load_avg_end"] = os.getloadavg()[0]
    rec["ratios"] = ratios(rec)
    for b, rs in rec["ratios"].items():
        log(f"batch {b}: " + ", ".join(f"{k} {v:.2f}x" for k, v in rs.items()))
    log(f"load average {rec['load_avg_start']:.2f} -> {rec['load_avg_end']:.2f}; peak RSS "
        f"{rec['peak_rss_mib']:.0f} MiB; sizes (MiB) " + ", ".join(f"{k} {v:.1f}" for k, v in rec["file_mib"].items()))
    return rec


def ratios(rec: dict) -> dict[int, dict[str, float]]:
    """Per batch size: this project's fastest float32 path over torch eager, and each runtime's
    ours / torch's (same runtime, same precision)."""
    out: dict[int, dict[str, float]] = {}
    for b in sorted({p["batch_size"] for p in rec["paths"]}):
        by = {p["path"]: p["images_per_s"] for p in rec["paths"] if p["batch_size"] == b}
        r: dict[str, float] = {}
        ours_f32 = [k for k in by if not k.startswith("torch") and k.endswith("f32")]
        if "torch eager f32" in by and ours_f32:
            best = max(ours_f32, key=by.get)
            r[f"ours fastest f32 ({best}) / torch eager"] = by[best] / by["torch eager f32"]
        for k in by:
            if not k.startswith("torch") and f"torch {k}" in by:
                r[f"{k}: ours / torch"] = by[k] / by[f"torch {k}"]
        out[b] = r
    return out


def main() -> None:
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "stpm.py"))
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch_sizes", default="1,32")
    p.add_argument("--rounds", type=int, default=10, help="Timed rounds (every path one burst per round).")
    p.add_argument("--burst", type=int, default=0,
                   help="Consecutive calls of a path per round (0: enough for 16 images).")
    p.add_argument("--calib_images", type=int, default=8, help="Random images calibrating int8.")
    p.add_argument("--torch", action="store_true", help="Also the PyTorch STFPM (eager, ORT, OpenVINO).")
    p.add_argument("--out", default="", help="Write the record as JSON here.")
    a = p.parse_args()
    rec = run(a.config, a.image_size, [int(b) for b in a.batch_sizes.split(",")], a.rounds, a.torch,
              a.calib_images, burst=a.burst)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=2, default=float)


if __name__ == "__main__":
    main()
