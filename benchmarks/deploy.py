"""Inference images/s of the exported model in every installed runtime and precision (prototype).

  python benchmarks/deploy.py --config=configs/stpm.py --image_size=256 --batch_sizes=1,8 \
      --steps=10 [--torch] [--out=deploy.json]

Random weights (speed does not depend on them). The model is exported to ONNX in a temporary
folder (``rstpm_jax.deploy.onnx_export``) and timed through: JAX (the project's own CPU path,
``train.create_model`` + ``compile_options.jit``, as ``predict`` runs it), ONNX Runtime (CPU
provider, all graph optimisations), OpenVINO float32, OpenVINO bfloat16 (the inference-precision
hint, where the CPU has AVX512-BF16 or AMX) and OpenVINO int8 (NNCF post-training quantisation of
the convolutions, calibrated on ``--calib_images`` random images; everything else in float).
``--torch`` adds the PyTorch STFPM of ``benchmarks/torch_stfpm.py``: eager, and exported with
``torch.onnx.export`` to ONNX Runtime and OpenVINO, in the same process. Per path: the median of
``--steps`` calls after two warm-ups, the paths timed round robin; the map's max relative deviation from JAX's (float32 paths
of this project's model); file sizes. Back to back in one process: on a shared machine the
figures move with the other load (the 1-minute load average is printed).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402


def log(msg: str) -> None:
    print(f"[deploy {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_capable() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _map_of(model: Callable[[np.ndarray], dict]) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: model(x)["map"]


def _nchw_request(model: Any) -> Callable[[np.ndarray], Any]:
    return lambda x: model.request.infer({"images": x.transpose(0, 3, 1, 2).copy()})


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / np.max(np.abs(ref)))


def openvino_int8(onnx_path: str, calib: np.ndarray, out_path: str) -> str:
    """NNCF post-training int8 quantisation of ``onnx_path`` (OpenVINO IR at ``out_path``)."""
    import nncf  # noqa: PLC0415
    import openvino as ov  # noqa: PLC0415

    model = ov.Core().read_model(onnx_path)
    data = nncf.Dataset([calib[i:i + 1] for i in range(len(calib))])
    # Convolutions only: NNCF's default also quantises the residual Adds, the max-pool and the
    # distance/resize ops of the maps, which moved the demo STPM's image AUROC 0.979 -> 0.917;
    # convs alone kept it (pixel AUROC -0.003).
    others = sorted({op.get_type_name() for op in model.get_ordered_ops()}
                    - {"Convolution", "Parameter", "Result", "Constant"})
    q = nncf.quantize(model, data, subset_size=len(calib),
                      ignored_scope=nncf.IgnoredScope(types=others, validate=False))
    ov.save_model(q, out_path)
    return out_path


def torch_onnx(path: str, image_size: int) -> Any:
    """The PyTorch STFPM (random weights) exported to ONNX (map, score; dynamic batch); the model."""
    import torch  # noqa: PLC0415
    import torch_stfpm  # noqa: PLC0415  (benchmarks/ is the script's folder)

    torch.manual_seed(0)
    net = torch_stfpm.STFPM().eval()

    class Infer(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            amap = torch_stfpm.anomaly_map(*self.m(x), tuple(x.shape[2:]))
            return amap, amap.flatten(1).amax(1)

    x = torch.randn(1, 3, image_size, image_size)
    torch.onnx.export(Infer(net), (x,), path, input_names=["images"], output_names=["map", "score"],
                      dynamic_axes={"images": {0: "batch"}, "map": {0: "batch"}, "score": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return net


def run(config_path: str, image_size: int, batch_sizes: list[int], steps: int, with_torch: bool,
        calib_images: int, seed: int = 0) -> dict[str, Any]:
    import importlib.util  # noqa: PLC0415

    from rstpm_jax import inference, train  # noqa: PLC0415
    from rstpm_jax.deploy import onnx_export as ox  # noqa: PLC0415
    from rstpm_jax.models.rstpm import build_model  # noqa: PLC0415
    from rstpm_jax.ops import compile_options  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("cfg", config_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.model.random_teachers = True
    rng = np.random.default_rng(seed)
    tmp = tempfile.mkdtemp(prefix="deploy_bench_")
    rec: dict[str, Any] = {"config": config_path, "image_size": image_size, "steps": steps,
                           "cpu_count": os.cpu_count(), "bf16_capable": bf16_capable(),
                           "load_avg_start": os.getloadavg()[0], "paths": [], "file_mib": {}}

    jax_model = train.create_model(config)  # the project's CPU ops, as predict runs it
    tv, sv = jax_model.init(jax.random.key(seed), (1, image_size, image_size, 3))
    tv, sv = jax.device_get((tv, sv))
    t = time.perf_counter()
    onnx_path = os.path.join(tmp, "model.onnx")
    ox.export_model(build_model(config.model), tv, sv, config.maps, (image_size,) * 2, onnx_path)
    rec["export_s"] = time.perf_counter() - t
    rec["file_mib"]["onnx"] = os.path.getsize(onnx_path) / 2**20
    log(f"exported {onnx_path} in {rec['export_s']:.1f} s ({rec['file_mib']['onnx']:.1f} MiB)")

    infer = compile_options.jit(inference.make_infer_fn(jax_model, config.maps, with_levels=False))
    runners: dict[str, Callable[[np.ndarray], Any]] = {
        "jax": lambda x: jax.block_until_ready(infer(tv, sv, x))["map"]}
    try:
        runners["onnxruntime"] = _map_of(ox.OnnxRuntimeModel(onnx_path))
    except ImportError:
        log("onnxruntime not installed")
    try:
        runners["openvino f32"] = _map_of(ox.OpenVINOModel(onnx_path, "f32"))
        if bf16_capable():
            runners["openvino bf16"] = _map_of(
                ox.OpenVINOModel(onnx_path, "bf16"))
        try:
            calib = rng.standard_normal((calib_images, image_size, image_size, 3)).astype(np.float32)
            t = time.perf_counter()
            ir = openvino_int8(onnx_path, calib, os.path.join(tmp, "model_int8.xml"))
            rec["int8_quantize_s"] = time.perf_counter() - t
            rec["file_mib"]["openvino_int8"] = (os.path.getsize(ir) + os.path.getsize(ir[:-4] + ".bin")) / 2**20
            runners["openvino int8"] = _map_of(ox.OpenVINOModel(ir, None))
        except ImportError:
            log("nncf not installed: no int8")
    except ImportError:
        log("openvino not installed")

    if with_torch:
        import torch  # noqa: PLC0415

        torch.set_flush_denormal(True)
        import torch_stfpm  # noqa: PLC0415

        tpath = os.path.join(tmp, "torch_stfpm.onnx")
        net = torch_onnx(tpath, image_size)
        rec["file_mib"]["torch_onnx"] = os.path.getsize(tpath) / 2**20
        runners["torch eager"] = lambda x: torch_stfpm.infer(net, torch.from_numpy(x.transpose(0, 3, 1, 2)))
        if "onnxruntime" in runners:
            import onnxruntime as ort  # noqa: PLC0415
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            ts = ort.InferenceSession(tpath, so, providers=["CPUExecutionProvider"])
            runners["torch onnxruntime"] = lambda x: ts.run(None, {"images": x.transpose(0, 3, 1, 2).copy()})
        if "openvino f32" in runners:
            for prec in ("f32", "bf16") if bf16_capable() else ("f32",):
                runners[f"torch openvino {prec}"] = _nchw_request(ox.OpenVINOModel(tpath, prec))

    for b in batch_sizes:
        x = rng.standard_normal((b, image_size, image_size, 3)).astype(np.float32)
        ref = np.asarray(runners["jax"](x), np.float64)
        # Round robin (every path once per round) so that a change in the machine's other load
        # hits all paths alike; the median per path.
        n = steps if b == 1 else max(3, steps // 2)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for fn in runners.values():
            fn(x)
            fn(x)
        for _ in range(n):
            for name, fn in runners.items():
                t = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t)
        for name, fn in runners.items():
            s = statistics.median(times[name])
            entry = {"path": name, "batch_size": b, "images_per_s": b / s, "seconds": s}
            if not name.startswith("torch"):
                entry["map_rel_err_vs_jax"] = _rel(fn(x), ref)
            rec["paths"].append(entry)
            extra = f", map rel err vs jax {entry['map_rel_err_vs_jax']:.1e}" if "map_rel_err_vs_jax" in entry else ""
            log(f"batch {b:3d} {name:22s} {entry['images_per_s']:7.2f} images/s{extra}")
    rec["load_avg_end"] = os.getloadavg()[0]
    for b in batch_sizes:
        by = {p["path"]: p["images_per_s"] for p in rec["paths"] if p["batch_size"] == b}
        if "torch onnxruntime" in by and "onnxruntime" in by:
            log(f"batch {b}: ours / torch in ONNX Runtime = {by['onnxruntime'] / by['torch onnxruntime']:.2f}x; "
                f"fastest float32 of ours / torch eager = "
                f"{max(by[k] for k in ('jax', 'onnxruntime', 'openvino f32') if k in by) / by['torch eager']:.2f}x")
    log(f"load average {rec['load_avg_start']:.2f} -> {rec['load_avg_end']:.2f}; sizes {rec['file_mib']}")
    return rec


def main() -> None:
    import argparse  # noqa: PLC0415

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(REPO, "configs", "stpm.py"))
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch_sizes", default="1,32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--calib_images", type=int, default=8)
    p.add_argument("--torch", action="store_true")
    p.add_argument("--out", default="")
    a = p.parse_args()
    rec = run(a.config, a.image_size, [int(b) for b in a.batch_sizes.split(",")], a.steps, a.torch,
              a.calib_images)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=2)


if __name__ == "__main__":
    main()
