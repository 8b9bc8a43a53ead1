"""Running exported artifacts: JAX (``jax.export``), ONNX Runtime and OpenVINO, per precision.

    model = runtime.load_artifact("model.onnx", backend="openvino", precision="bf16")
    out = model(images)        # float32[b, H, W, 3] normalised -> {"map": [b, H, W], "score": [b]}
    model.meta                 # the JSON sidecar: thresholds, normalisation, preprocessing, tiling

An artifact is the file ``python -m rstpm_jax.export`` wrote and its sidecar ``<file>.json``:
``.jaxexport`` (needs jax alone) or ``.onnx`` (needs onnxruntime or openvino; the sidecar may
name an OpenVINO int8 IR beside it). Precisions: ``f32``; ``bf16`` (jax: an artifact exported
in bfloat16; openvino: its inference-precision hint, native on CPUs with AVX512-BF16 or AMX,
the distance kept float32);
``int8`` (openvino: the int8 IR, convolutions in int8, the rest float32). Nothing here imports
TensorFlow, flax or the model code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from typing import Any

import numpy as np

from rstpm_jax.data.preprocess import NORM_OFFSET, NORM_SCALE
from rstpm_jax.deploy import mixed_precision, openvino_core

BACKENDS = ("jax", "onnxruntime", "openvino")
PRECISIONS = ("f32", "bf16", "int8")
# The normal images int8 quantisation calibrates on (config.eval.int8_calibration), as the
# sidecar describes them.
INT8_CALIBRATIONS = {"holdout": "the held-out train/good images", "train": "every train/good image"}
# The precisions each backend runs.
SUPPORTED: dict[str, tuple[str, ...]] = {"jax": ("f32", "bf16"), "onnxruntime": ("f32",),
                                         "openvino": ("f32", "bf16", "int8")}
# Fastest first, per precision, from benchmarks/deploy.py at 256 px on 2-core x86 machines
# (benchmarks/README.md: AMX Xeon and AMD EPYCs; on the EPYCs OpenVINO f32 was ahead in some
# runs). ``choose_backend`` takes the first installed.
FASTEST_FIRST: dict[str, tuple[str, ...]] = {"f32": ("onnxruntime", "openvino", "jax"),
                                             "bf16": ("openvino", "jax"), "int8": ("openvino",)}
INPUT_NAME = "images"
OUTPUT_NAMES = ("map", "score")
_MODULES = {"jax": "jax", "onnxruntime": "onnxruntime", "openvino": "openvino"}


def installed(backend: str) -> bool:
    """Whether ``backend``'s package is importable (without importing it)."""
    return importlib.util.find_spec(_MODULES[backend]) is not None


def installed_backends() -> list[str]:
    return [b for b in BACKENDS if installed(b)]


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
    """The CPU computes bfloat16 natively (AVX512-BF16 or AMX): OpenVINO's bf16 is fast there."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def check(backend: str, precision: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}; choose from {BACKENDS}.")
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; choose from {PRECISIONS}.")
    if precision not in SUPPORTED[backend]:
        runs = [b for b in BACKENDS if precision in SUPPORTED[b]]
        raise ValueError(f"Backend {backend!r} does not run {precision}; {precision} runs on {runs}.")
    if not installed(backend):
        raise ValueError(f"Backend {backend!r} is not installed: pip install '.[export]' "
                         "(onnxruntime, openvino, nncf).")


def choose_backend(precision: str = "f32", candidates: tuple[str, ...] = BACKENDS) -> str:
    """The fastest installed backend of ``candidates`` that runs ``precision`` (FASTEST_FIRST)."""
    for backend in FASTEST_FIRST[precision]:
        if backend in candidates and installed(backend):
            return backend
    raise ValueError(f"No installed backend among {list(candidates)} runs {precision} "
                     f"(it runs on {list(FASTEST_FIRST[precision])}); pip install '.[export]'.")


def sidecar_path(path: str) -> str:
    return path + ".json"


def read_sidecar(path: str) -> dict:
    """The JSON sidecar of the artifact at ``path`` ({} when there is none)."""
    meta_path = sidecar_path(path)
    if not os.path.isfile(meta_path):
        return {}
    with open(meta_path) as f:
        return json.load(f)


def write_sidecar(path: str, meta: dict) -> None:
    with open(sidecar_path(path) + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(sidecar_path(path) + ".tmp", sidecar_path(path))


class Artifact:
    """A loaded artifact: ``model(images) -> {"map", "score"}`` (NumPy float32) plus its sidecar."""

    backend = ""
    precision = "f32"
    float32_ops = 0  # ops kept float32 under a lower precision (OpenVINO bf16: the distance)

    def __init__(self, meta: dict):
        self.meta = meta

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of the model's input (the tile size when the artifact tiles)."""
        h, w = self.meta["image_size"]
        return int(h), int(w)

    @property
    def tiling(self) -> dict | None:
        """``{"tile_size", "tile_stride"}`` when the model was trained on tiles, else None."""
        return self.meta.get("tiling") or None

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """(..., H, W, 3) uint8 RGB already at the input size -> normalised float32 input."""
        return np.asarray(rgb, np.float32) * NORM_SCALE + NORM_OFFSET

    def normalized_score(self, score: Any) -> np.ndarray:
        return np.asarray(score, np.float64) / float(self.meta["normalization"]["scale"])

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        raise NotImplementedError


class ExportedModel(Artifact):
    """A ``jax.export`` artifact (``rstpm_jax.export --format jax``); needs jax alone."""

    backend = "jax"

    def __init__(self, exported: Any, meta: dict):
        super().__init__(meta)
        from rstpm_jax.ops import compile_options  # noqa: PLC0415 (jax, only for this backend)

        self.exported = exported
        self.precision = str(meta.get("precision", "f32"))
        self._call = compile_options.jit(exported.call)

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        import jax  # noqa: PLC0415

        return jax.tree.map(lambda x: np.asarray(x, np.float32), self._call(np.asarray(images, np.float32)))


def load(path: str) -> ExportedModel:
    """Deserialise a ``jax.export`` artifact (and its sidecar, when present). Needs jax only."""
    import jax  # noqa: PLC0415

    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return ExportedModel(exported, read_sidecar(path))


class OnnxRuntimeModel(Artifact):
    """An ONNX graph through ONNX Runtime's CPU provider (all graph optimisations)."""

    backend = "onnxruntime"

    def __init__(self, path: str, meta: dict | None = None, threads: int = 0):
        super().__init__(read_sidecar(path) if meta is None else meta)
        import onnxruntime as ort  # noqa: PLC0415

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        m, s = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: np.asarray(images, np.float32)})
        return {"map": m, "score": s}


class OpenVINOModel(Artifact):
    """An ONNX graph or OpenVINO IR (``.xml``) through OpenVINO on the CPU.

    ``precision``: ``"f32"`` or ``"bf16"`` (OpenVINO's inference-precision hint; bfloat16 where
    the CPU has AVX512-BF16 or AMX) for the float model; ``"int8"`` for an int8 IR (its
    quantised convolutions in int8, the other ops float32). In bf16 the distance's channel sums
    and everything after them stay float32 (``mixed_precision.float32_distance``; their count is
    ``float32_ops``) unless ``float32_distance=False``.
    """

    backend = "openvino"

    def __init__(self, path: str, precision: str = "f32", meta: dict | None = None, threads: int = 0,
                 hint: str = "LATENCY", float32_distance: bool = True):
        super().__init__(read_sidecar(path) if meta is None else meta)
        if precision not in SUPPORTED["openvino"]:
            raise ValueError(f"OpenVINO precision must be one of {SUPPORTED['openvino']}, got {precision!r}.")
        self.precision = precision
        if precision == "bf16" and not bf16_capable():
            warnings.warn("This CPU has no native bfloat16 (AVX512-BF16 or AMX): OpenVINO's bf16 hint "
                          "may run in float32 or emulated, slower; f32 or int8 suit it better.", stacklevel=2)
        cfg: dict[str, Any] = {"PERFORMANCE_HINT": hint,
                               "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        if threads:
            cfg["INFERENCE_NUM_THREADS"] = threads
        core = openvino_core.core()
        model = core.read_model(path)
        if precision == "bf16" and float32_distance:
            model, self.float32_ops = mixed_precision.float32_distance(model)
        self.compiled = core.compile_model(model, "CPU", cfg)
        self.request = self.compiled.create_infer_request()
        self._outs = {o.get_any_name(): o for o in self.compiled.outputs}

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        res = self.request.infer({INPUT_NAME: np.asarray(images, np.float32)})
        return {k: np.array(res[self._outs[k]], np.float32) for k in OUTPUT_NAMES}


def artifact_format(path: str, meta: dict | None = None) -> str:
    """``"jax"`` or ``"onnx"`` (from the sidecar, else the file name)."""
    fmt = str((meta or {}).get("format", ""))
    if fmt.startswith("rstpm-onnx") or path.endswith(".onnx"):
        return "onnx"
    if fmt.startswith("rstpm-jax-export") or path.endswith(".jaxexport"):
        return "jax"
    raise ValueError(f"{path}: not an artifact of `python -m rstpm_jax.export` (a .jaxexport or .onnx "
                     "file with its .json sidecar).")


def backends_for(path: str, meta: dict | None = None) -> tuple[str, ...]:
    """The backends that run the artifact at ``path``."""
    return ("jax",) if artifact_format(path, meta) == "jax" else ("onnxruntime", "openvino")


def load_artifact(path: str, backend: str | None = None, precision: str = "f32") -> Artifact:
    """The artifact at ``path`` on ``backend`` (None: the fastest installed that runs it) in
    ``precision``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--artifact {path}: no such file (write one with "
                                "`python -m rstpm_jax.export`).")
    meta = read_sidecar(path)
    if not meta:
        raise FileNotFoundError(f"{sidecar_path(path)} not found: the artifact's sidecar (thresholds, "
                                "preprocessing) is written beside it by `python -m rstpm_jax.export`.")
    possible = backends_for(path, meta)
    backend = backend or choose_backend(precision, possible)
    check(backend, precision)
    if backend not in possible:
        raise ValueError(f"{path} runs on {list(possible)}, not {backend!r}.")
    if backend == "jax":
        model = load(path)
        if model.precision != precision:
            raise ValueError(f"{path} was exported in {model.precision}; export it again with "
                             f"--precision {precision} for {precision}.")
        return model
    if backend == "onnxruntime":
        return OnnxRuntimeModel(path, meta)
    if precision == "int8":
        ir = (meta.get("files") or {}).get("openvino_int8")
        if not ir:
            raise ValueError(f"{path} has no int8 model: export it with --precision int8 (NNCF "
                             "post-training quantisation, calibrated on held-out normal images).")
        return OpenVINOModel(os.path.join(os.path.dirname(os.path.abspath(path)), ir), "int8", meta)
    return OpenVINOModel(path, precision, meta)
