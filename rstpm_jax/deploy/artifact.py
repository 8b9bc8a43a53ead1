"""Building ONNX artifacts of a trained category: the graph, the optional OpenVINO int8 model
and the JSON sidecar; and the calibration images (held-out normal images of the category).

Shared by ``python -m rstpm_jax.export --format onnx``, by ``predict`` (an artifact exported
on the fly into ``WORKDIR/<category>/export/`` for the onnxruntime/openvino backends) and by
evaluation through an artifact (``eval.backend``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from rstpm_jax import checkpoints
from rstpm_jax import workdir as workdir_lib
from rstpm_jax.anomaly_maps import MapSpec, require_map_statistics, stats_arrays
from rstpm_jax.data import input_pipeline, mvtec, preprocess
from rstpm_jax.data.tiling import TileSpec, model_input_size, tile_image
from rstpm_jax.deploy import runtime

ONNX_FORMAT = "rstpm-onnx/1"
JAX_FORMAT = "rstpm-jax-export/1"
CALIBRATION_MAX = 300  # NNCF's default subset size


def latest_step(workdir: str, category: str, config: ml_collections.ConfigDict) -> int | None:
    """The epoch of the students the config selects (``workdir.selected_checkpoint``)."""
    manager = checkpoints.checkpoint_manager(workdir_lib.selected_checkpoint(config, workdir, category),
                                             config.train.keep_checkpoints)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def base_meta(config: ml_collections.ConfigDict, category: str, workdir: str | None,
              thresholds: dict | None, precision: str = "f32", checkpoint_step: int | None = None) -> dict:
    """The sidecar keys every format shares: preprocessing, input, outputs, thresholds,
    normalisation, tiling, precision."""
    tiling = TileSpec.from_config(config.data)
    h = w = model_input_size(config.data)
    if tiling:
        how = ("RGB (grayscale replicated), at the image's own resolution, x / 255, (x - mean) / std; "
               f"cut into {h}x{w} tiles every {tiling.stride} px (last tile at the far edge; images "
               "smaller than a tile edge-padded), each tile a batch row; the maps stitched back, "
               "overlaps averaged (rstpm_jax.data.tiling)")
    else:
        how = "RGB (grayscale replicated), resize to image_size (bilinear), x / 255, (x - mean) / std"
    meta = {
        "category": category, "model": str(config.name), "workdir": workdir, "image_size": [h, w],
        "input": {"shape": ["b", h, w, 3], "dtype": "float32", "layout": "NHWC", "preprocessing": how},
        "mean": [float(v) for v in preprocess.IMAGENET_MEAN], "std": [float(v) for v in preprocess.IMAGENET_STD],
        "outputs": {"map": "float32[b, H, W] anomaly map at the input size",
                    "score": "float32[b] image score = max of the map"},
        "tiling": tiling.to_dict() if tiling else None, "precision": precision,
        "checkpoint_step": checkpoint_step,
    }
    if thresholds is not None:
        meta["thresholds"] = thresholds
        meta["normalization"] = thresholds["normalization"]
        if thresholds.get("map_statistics"):
            meta["map_statistics"] = thresholds["map_statistics"]  # baked into the graph
    return meta


def versions() -> dict[str, str]:
    import importlib.metadata as md  # noqa: PLC0415

    out = {"jax": jax.__version__}
    for name in ("jax2onnx", "onnx", "onnxruntime", "openvino", "nncf"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def export_onnx_artifact(config: ml_collections.ConfigDict, teacher_vars: Any, student_vars: Any,
                         path: str, meta: dict, calibration: np.ndarray | None = None,
                         opset: int | None = None) -> dict:
    """Write the trained model's ONNX graph to ``path``, with ``calibration`` images also its
    OpenVINO int8 model (``<stem>.int8.xml``/``.bin``), and the sidecar ``path + ".json"``
    (``meta`` plus the format, files, precisions and versions). Returns the sidecar.
    ``meta["map_statistics"]`` (a fusion rule's held-out statistics) is baked into the graph."""
    require_map_statistics(config.maps, meta.get("map_statistics"))
    from rstpm_jax.deploy import onnx_export  # noqa: PLC0415 (jax2onnx)

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    size = (model_input_size(config.data),) * 2
    opset = int(opset or onnx_export.DEFAULT_OPSET)
    t0 = time.time()
    onnx_export.export_trained(config.model, MapSpec.from_config(config.maps), teacher_vars, student_vars,
                               size, path, opset, stats=stats_arrays(meta.get("map_statistics")))
    meta = {**meta, "format": ONNX_FORMAT, "opset": opset, "compute_dtype": "float32",
            "precision": "f32", "files": {"onnx": os.path.basename(path)},
            "precisions": {"onnxruntime": ["f32"], "openvino": ["f32", "bf16"]},
            "export_seconds": round(time.time() - t0, 1)}
    if calibration is not None:
        from rstpm_jax.deploy import quantize  # noqa: PLC0415 (nncf, openvino)

        ir = os.path.splitext(path)[0] + ".int8.xml"
        meta["int8"] = quantize.openvino_int8(path, calibration, ir,
                                              max_drop=float(config.eval.get("int8_max_drop", 0.0)),
                                              headroom=float(config.eval.get("int8_headroom", 2.0)))
        meta["int8"]["calibration"] = runtime.INT8_CALIBRATIONS[int8_calibration(config)]
        meta["files"]["openvino_int8"] = os.path.basename(ir)
        meta["precisions"]["openvino"].append("int8")
        meta["int8"]["thresholds"] = "the float32 model's (thresholds.json); eval.precision=int8 reports its own"
    meta["versions"] = versions()
    meta["sha256"] = _sha256(path)
    runtime.write_sidecar(path, meta)
    return meta


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def int8_calibration(config: ml_collections.ConfigDict) -> str:
    """``eval.int8_calibration`` (``holdout`` where a workdir's config predates it), checked."""
    which = str(config.eval.get("int8_calibration", "holdout"))
    if which not in runtime.INT8_CALIBRATIONS:
        raise ValueError(f"config.eval.int8_calibration must be one of {tuple(runtime.INT8_CALIBRATIONS)}, "
                         f"got {which!r}.")
    return which


def calibration_images(config: ml_collections.ConfigDict, root: str, category: str,
                       data_dir: str | None = None, limit: int = CALIBRATION_MAX) -> np.ndarray:
    """The category's normal images int8 quantisation calibrates on (``eval.int8_calibration``:
    ``holdout``, the ``data.holdout_fraction`` split that sets the thresholds, or ``train``,
    every image of train/good) preprocessed as the model's input: resized, or cut into tiles
    when tiling; at most ``limit``, spread evenly. Read with PIL when the files are on disk (no
    TensorFlow), else from the prepared TFDS data."""
    which = int8_calibration(config)
    tiling = TileSpec.from_config(config.data)
    holdout, seed = float(config.data.holdout_fraction), int(config.seed)
    files = None
    if not data_dir:
        good = mvtec.scan_category(root, category, verify=False).train
        files = good if which == "train" else input_pipeline.split_train_holdout(good, holdout, seed)[1]
    if files is None or not all(os.path.isfile(f) for f in files):
        splits = ("train", "holdout") if which == "train" and holdout > 0 else (which,)
        images = np.concatenate([input_pipeline.load_images(
            root, category, split, image_size=int(config.data.image_size), holdout_fraction=holdout, seed=seed,
            data_dir=data_dir, process_index=0, process_count=1, tiling=tiling)[0] for split in splits])
    else:
        out = []
        for f in files:
            rgb = mvtec.read_rgb(f)
            if tiling:
                tiles, _ = tile_image(rgb, tiling)
                out.extend(tiles.astype(np.float32) * preprocess.NORM_SCALE + preprocess.NORM_OFFSET)
            else:
                out.append(preprocess.preprocess_rgb(rgb, int(config.data.image_size)))
        images = np.stack(out) if out else np.zeros((0, 0, 0, 3), np.float32)
    if len(images) > limit:
        images = images[np.linspace(0, len(images) - 1, limit).round().astype(int)]
    return images


def workdir_artifact(workdir: str, category: str, config: ml_collections.ConfigDict, precision: str,
                     thresholds: dict, root: str | None = None) -> str:
    """``WORKDIR/<category>/export/model.onnx`` of the latest checkpoint (exported now if absent,
    older than the checkpoint, of another config, or lacking ``precision``); returns its path."""
    path = os.path.join(workdir_lib.category_dir(workdir, category), "export", "model.onnx")
    step = latest_step(workdir, category, config)
    key = _config_key(config)
    meta = runtime.read_sidecar(path)
    if (os.path.isfile(path) and meta.get("checkpoint_step") == step and meta.get("config_key") == key
            and precision in sum(meta.get("precisions", {}).values(), [])
            and meta.get("map_statistics") == thresholds.get("map_statistics")):
        return path
    from rstpm_jax import sharding  # noqa: PLC0415

    _, teacher_vars, student_vars = workdir_lib.load_trained(config, workdir, category, sharding.make_mesh(),
                                                             fast_cpu_ops=False)
    calibration = None
    if precision == "int8":
        calibration = calibration_images(config, root or data_root(config, workdir), category,
                                         _tfds_dir(config))
    meta = base_meta(config, category, workdir, thresholds, checkpoint_step=step)
    meta["config_key"] = key
    export_onnx_artifact(config, teacher_vars, student_vars, path, meta, calibration)
    return path


def data_root(config: ml_collections.ConfigDict, workdir: str) -> str:
    """``data.root`` as the run resolved it (relative to the workdir for the generated demo data)."""
    root = os.path.expanduser(str(config.data.root))
    if config.data.get("generate_synthetic") and not os.path.isabs(root):
        root = os.path.join(workdir, root)
    return os.path.abspath(root)


def _tfds_dir(config: ml_collections.ConfigDict) -> str | None:
    d = str(config.data.get("tfds_dir", "") or "")
    return os.path.abspath(os.path.expanduser(d)) if d else None


def evaluation_artifact(config: ml_collections.ConfigDict, root: str, data_dir: str | None, category: str,
                        teacher_vars: Any, student_vars: Any, backend: str, precision: str,
                        directory: str | None, map_statistics: dict | None = None) -> runtime.Artifact:
    """The artifact ``eval.backend``/``eval.precision`` evaluates: ``eval.artifact`` (its
    ``{category}`` replaced) when set, else the trained model exported now into ``directory``
    (a temporary folder when None), int8 calibrated on the category's held-out normal images."""
    import tempfile  # noqa: PLC0415

    runtime.check(backend, precision)
    given = str(config.eval.get("artifact", "") or "")
    if given:
        path = os.path.abspath(os.path.expanduser(given.replace("{category}", category)))
    else:
        path = os.path.join(directory or tempfile.mkdtemp(prefix="rstpm_eval_"), "model.onnx")
        calibration = calibration_images(config, root, category, data_dir) if precision == "int8" else None
        meta = base_meta(config, category, None, None)
        if map_statistics is not None:
            meta["map_statistics"] = map_statistics
        export_onnx_artifact(config, teacher_vars, student_vars, path, meta, calibration)
    model = runtime.load_artifact(path, backend, precision)
    want = (model_input_size(config.data),) * 2
    if model.input_size != want:
        raise ValueError(f"{path} takes {model.input_size} inputs; the config's model takes {want}.")
    return model


def _config_key(config: ml_collections.ConfigDict) -> str:
    """A hash of what the graph depends on: the model, maps and input (data) sections."""
    parts = {k: config[k].to_dict() for k in ("model", "maps")}
    parts["input"] = {"image_size": int(config.data.image_size), **(
        TileSpec.from_config(config.data).to_dict() if TileSpec.from_config(config.data) else {})}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
