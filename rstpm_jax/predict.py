"""Production inference: new images -> anomaly maps, scores and decisions (no TensorFlow).

    python -m rstpm_jax.predict --workdir DIR --category C --input PATH_OR_GLOB --output OUT \
        [--backend jax|onnxruntime|openvino] [--precision f32|bf16|int8] \
        [--image_threshold X] [--pixel_threshold Y] [--batch_size N] [--map_format png16|npy] \
        [--overwrite]
    python -m rstpm_jax.predict --artifact model.onnx --input ... --output OUT [--backend ...]

Loads the trained category (config from ``WORKDIR/config.json``, teachers from
``WORKDIR/teachers``, the students the config selects) or an exported artifact alone
(``--artifact``: ``python -m rstpm_jax.export``'s file; preprocessing, tiling and thresholds
from its sidecar), decodes and resizes every image that PIL reads to the training size with
the input pipeline's own code, runs them in batches and writes, under OUT (which must be
empty, or ``--overwrite`` replaces what an earlier predict wrote there; files under OUT are
never inputs):

- ``predictions.csv`` / ``predictions.json``: per image the score, the normalised score
  (``score / scale``, 1.0 = the model's own threshold), the decision, the threshold used and
  the original size; the JSON also holds the thresholds, the map encoding, the backend and
  ``skipped`` (files that could not be read, with the error);
- ``maps/<name>.png`` (16-bit, ``map = value / 65535 * full_scale``, clipped at
  ``full_scale = MAP_FULL_SCALE * pixel_threshold``, the same for every image) or
  ``maps/<name>.npy`` (float32, raw); ``overlays/<name>.png``; ``masks/<name>.png``
  (255 where the map exceeds the pixel threshold). Maps are resized back to the original
  image size (bilinear).

Backends (``--backend``; default: the fastest installed for ``--precision``, printed):
``jax`` (in process, or a ``.jaxexport``), ``onnxruntime`` and ``openvino`` (an ``.onnx``
artifact; from a workdir one is exported once into ``WORKDIR/<category>/export/``).
Precisions: ``f32``; ``bf16`` (jax, openvino); ``int8`` (openvino: int8 convolutions).

A model trained on tiles (``data.tile_size``) predicts each image at its own resolution:
its tiles are streamed through the model ``--batch_size`` at a time and the maps stitched
back (overlaps averaged), so memory is bounded by one batch of tiles and the image's maps.

Thresholds default to ``WORKDIR/<category>/thresholds.json`` (held-out normal training
images only; with ``--artifact``, the sidecar's copy of them); the F1-optimal threshold on
the labelled test set (``results.json``) is only reported, never used unless passed on the
command line.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from rstpm_jax.data import preprocess as preprocessing
from rstpm_jax.data.mvtec import read_rgb
from rstpm_jax.data.tiling import TileAccumulator, TileSpec, model_input_size, tile_batches
from rstpm_jax.deploy import runtime

MAP_FULL_SCALE = 16.0  # 16-bit maps saturate at this multiple of the pixel threshold
OVERLAY_RANGE = 2.0  # overlay colours span [0, OVERLAY_RANGE * pixel threshold] (threshold mid-scale)
OVERLAY_ROWS = 256  # overlays are coloured this many rows at a time
MAP_FORMATS = ("png16", "npy")
OUTPUTS = ("maps", "overlays", "masks", "predictions.csv", "predictions.json")  # what --overwrite clears
_GLOB_CHARS = "*?["


# ----------------------------------------------------------------------------- inputs

def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def list_inputs(spec: str, exclude: str | None = None) -> list[str]:
    """Files named by ``spec``: a file, a folder (every file below it) or a glob (``**`` recursive);
    none below the folder ``exclude`` (predict's own output)."""
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        files = []
        for folder, dirs, names in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [os.path.join(folder, n) for n in sorted(names) if not n.startswith(".")]
    elif os.path.isfile(path):
        files = [path]
    elif any(c in path for c in _GLOB_CHARS):
        files = sorted(glob.glob(path, recursive=True))
    else:
        raise FileNotFoundError(f"--input {spec!r}: no such file or folder (and not a glob pattern).")
    files = [f for f in files if os.path.isfile(f)]
    excluded = {f for f in files if exclude and _inside(f, exclude)}
    files = [f for f in files if f not in excluded]
    if not files:
        why = (f" outside --output {exclude} ({len(excluded)} file(s) there are predict's output, "
               "never inputs)") if excluded else ""
        raise FileNotFoundError(f"--input {spec!r} matches no file{why}. Give an image file, a folder "
                                "of images or a quoted glob such as 'images/**/*.png'.")
    return files


def check_output(output: str, overwrite: bool) -> str:
    """``output`` as an absolute path; refused when it is a file, or a non-empty folder without
    ``overwrite``."""
    out = os.path.abspath(os.path.expanduser(output))
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--output {out} is a file; give a folder (it is created).")
    held = sorted(os.listdir(out)) if os.path.isdir(out) else []
    if held and not overwrite:
        shown = ", ".join(held[:8]) + (f", ... ({len(held) - 8} more)" if len(held) > 8 else "")
        raise FileExistsError(
            f"--output {out} is not empty (it holds {shown}). Choose an empty or new folder, or pass "
            f"--overwrite to replace what an earlier predict wrote there ({', '.join(OUTPUTS)}; "
            "nothing else is touched).")
    return out


def clear_output(out: str) -> list[str]:
    """Remove what an earlier predict wrote in ``out`` (``OUTPUTS`` only); returns what was removed."""
    import shutil  # noqa: PLC0415 (only when overwriting)
    removed = []
    for name in OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        else:
            continue
        removed.append(name)
    return removed


def output_names(files: Sequence[str]) -> list[str]:
    """Unique output stems: paths relative to the inputs' common folder, '/' -> '__'."""
    common = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    stems = [os.path.splitext(os.path.relpath(os.path.abspath(f), common))[0].replace(os.sep, "__")
             for f in files]
    seen: dict[str, int] = {}
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
    names = [s + "_" + os.path.splitext(f)[1].lstrip(".").lower() if seen[s] > 1 else s
             for s, f in zip(stems, files)]
    used: set[str] = set()
    for i, name in enumerate(names):  # any remaining clash (e.g. x.png beside x_png.png) gets a number
        k, unique = 1, name
        while unique in used:
            k, unique = k + 1, f"{name}_{k}"
        used.add(unique)
        names[i] = unique
    return names


def preprocess(rgb: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 -> (h, w, 3) float32 with the input pipeline's own code (the same pixels)."""
    return preprocessing.preprocess_rgb(rgb, image_size)


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float32 map -> (height, width) = ``size`` (bilinear)."""
    if amap.shape == tuple(size):
        return amap.astype(np.float32)
    im = Image.fromarray(amap.astype(np.float32))  # mode "F"
    return np.asarray(im.resize((size[1], size[0]), Image.BILINEAR), np.float32)


# ----------------------------------------------------------------------------- thresholds

def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read {path}: {e}. Re-run the evaluation "
                         "(--config.mode=eval) to rewrite it.") from e


def _positive(value: float, flag: str) -> float:
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{flag} must be a positive finite number, got {value}.")
    return float(value)


def resolve_thresholds(workdir: str, category: str, image_threshold: float | None = None,
                       pixel_threshold: float | None = None) -> dict[str, Any]:
    """Thresholds used (command line over ``thresholds.json``), the normalisation scale and,
    when ``results.json`` has it, the test set's F1-optimal image threshold (reported only)."""
    cat_dir = os.path.join(workdir, category)
    saved = _read_json(os.path.join(cat_dir, "thresholds.json"))
    out: dict[str, Any] = {"percentile": saved.get("percentile")}
    for key, value in (("image_threshold", image_threshold), ("pixel_threshold", pixel_threshold)):
        if value is not None:
            out[key], out[key + "_source"] = _positive(value, "--" + key), "command line"
        elif saved.get(key) is not None:
            out[key], out[key + "_source"] = float(saved[key]), "thresholds.json (normal images)"
        else:
            raise ValueError(f"No {key}: {cat_dir}/thresholds.json lacks it (trained with "
                             "data.holdout_fraction=0, or not evaluated yet); pass --" + key + ".")
    if saved.get("map_statistics"):  # the fusion rule's held-out statistics (maps.fusion normalized_*)
        out["map_statistics"] = saved["map_statistics"]
    scale = (saved.get("normalization") or {}).get("scale", saved.get("image_threshold"))
    out["normalization"] = {"normalized_score": "score / scale",
                            "scale": float(scale if scale is not None else out["image_threshold"]),
                            "source": "thresholds.json" if scale is not None else "command line"}
    f1 = (_read_json(os.path.join(cat_dir, "results.json")).get("metrics") or {}).get("image_f1_threshold")
    if f1 is not None:
        out["test_f1_optimal_image_threshold"] = float(f1)
    return out


def artifact_thresholds(meta: dict, image_threshold: float | None = None,
                        pixel_threshold: float | None = None) -> dict[str, Any]:
    """An artifact's thresholds: the command line over its sidecar's."""
    saved = meta.get("thresholds") or {}
    out = dict(saved)
    for key, value in (("image_threshold", image_threshold), ("pixel_threshold", pixel_threshold)):
        if value is not None:
            out[key], out[key + "_source"] = _positive(value, "--" + key), "command line"
        elif saved.get(key) is not None:
            out[key], out[key + "_source"] = float(saved[key]), "artifact sidecar"
        else:
            raise ValueError(f"No {key}: the artifact's sidecar lacks it; pass --{key}.")
    scale = (saved.get("normalization") or {}).get("scale")
    out["normalization"] = {"normalized_score": "score / scale",
                            "scale": float(scale if scale is not None else out["image_threshold"]),
                            "source": "artifact sidecar" if scale is not None else "command line"}
    return out


# ----------------------------------------------------------------------------- model

class Predictor:
    """A trained category's inference function (jax, in process) over fixed-size padded batches."""

    backend = "jax"

    def __init__(self, workdir: str, category: str, batch_size: int = 8, precision: str = "f32"):
        import jax  # noqa: PLC0415

        from rstpm_jax import sharding  # noqa: PLC0415
        from rstpm_jax import workdir as workdir_lib  # noqa: PLC0415
        from rstpm_jax.anomaly_maps import MapSpec, require_map_statistics, stats_arrays  # noqa: PLC0415
        from rstpm_jax.inference import bind_stats, compiled_infer  # noqa: PLC0415

        if precision not in runtime.SUPPORTED["jax"]:
            raise ValueError(f"--backend jax runs {runtime.SUPPORTED['jax']}, not {precision!r}.")
        workdir = os.path.abspath(os.path.expanduser(workdir))
        self.config = workdir_lib.load_config(workdir)
        if precision == "bf16":
            self.config.model.dtype = "bfloat16"
        self.precision = precision
        self.name = str(self.config.name)
        self.tiling = TileSpec.from_config(self.config.data)
        self.image_size = (model_input_size(self.config.data),) * 2
        mesh = sharding.make_mesh()
        n_dev = jax.device_count()
        self.batch_size = -(-max(1, int(batch_size)) // n_dev) * n_dev  # a multiple of the devices
        model, self.teacher_vars, self.student_vars = workdir_lib.load_trained(
            self.config, workdir, category, mesh)
        stats = _read_json(os.path.join(workdir, category, "thresholds.json")).get("map_statistics")
        require_map_statistics(self.config.maps, stats)
        self._fn = bind_stats(compiled_infer(model, MapSpec.from_config(self.config.maps), mesh,
                                             with_levels=False), stats_arrays(stats))

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, h, w, 3) normalised images, n <= batch_size -> maps (n, h, w), scores (n,)."""
        import jax  # noqa: PLC0415
        n = len(images)
        if n > self.batch_size:
            raise ValueError(f"{n} images exceed the batch size {self.batch_size}.")
        padded = np.zeros((self.batch_size, *self.image_size, 3), np.float32)
        padded[:n] = images
        out = jax.device_get(self._fn(self.teacher_vars, self.student_vars, padded))
        return np.asarray(out["map"][:n], np.float32), np.asarray(out["score"][:n], np.float32)


class ArtifactPredictor:
    """An exported artifact (``runtime.Artifact``) over batches of at most ``batch_size``
    (padded to it for jax artifacts, which compile per batch size)."""

    def __init__(self, artifact: runtime.Artifact, batch_size: int = 8):
        self.artifact, self.batch_size = artifact, max(1, int(batch_size))
        self.backend, self.precision = artifact.backend, artifact.precision
        self.name = str(artifact.meta.get("model", ""))
        self.image_size = artifact.input_size
        self.tiling = TileSpec(artifact.tiling["tile_size"], artifact.tiling["tile_stride"]) \
            if artifact.tiling else None

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = len(images)
        if n > self.batch_size:
            raise ValueError(f"{n} images exceed the batch size {self.batch_size}.")
        if self.backend == "jax" and n < self.batch_size:
            images = np.concatenate([images, np.zeros((self.batch_size - n, *images.shape[1:]), np.float32)])
        out = self.artifact(images)
        return np.asarray(out["map"][:n], np.float32), np.asarray(out["score"][:n], np.float32)


def _has_onnx_export() -> bool:
    import importlib.util  # noqa: PLC0415
    return importlib.util.find_spec("jax2onnx") is not None and importlib.util.find_spec("onnx") is not None


def open_model(workdir: str | None, category: str | None, artifact: str | None = None,
               backend: str | None = None, precision: str | None = None, batch_size: int = 8,
               image_threshold: float | None = None, pixel_threshold: float | None = None
               ) -> tuple[Predictor | ArtifactPredictor, dict[str, Any], dict[str, Any]]:
    """The model to predict with, its thresholds and what was chosen (backend, precision, why).
    ``precision`` None: f32 (a ``.jaxexport`` artifact: the precision it was exported in)."""
    meta: dict = {}
    if artifact:
        path = os.path.abspath(os.path.expanduser(artifact))
        meta = runtime.read_sidecar(path) if os.path.isfile(path) else {}
        candidates = runtime.backends_for(path, meta) if meta else runtime.BACKENDS
        if precision is None and candidates == ("jax",):
            precision = str(meta.get("precision", "f32"))
    else:
        if not (workdir and category):
            raise ValueError("Give --workdir and --category, or --artifact.")
        candidates = runtime.BACKENDS if _has_onnx_export() else ("jax",)
    precision = precision or "f32"
    if precision not in runtime.PRECISIONS:
        raise ValueError(f"--precision must be one of {runtime.PRECISIONS}, got {precision!r}.")
    chosen = backend or runtime.choose_backend(precision, candidates)
    runtime.check(chosen, precision)
    how = "--backend" if backend else ("the fastest installed for " + precision + " (order " +
                                       " > ".join(runtime.FASTEST_FIRST[precision]) + ")")
    info = {"backend": chosen, "precision": precision, "chosen_by": how}
    if artifact:
        model = runtime.load_artifact(path, chosen, precision)
        info["artifact"] = path
        return (ArtifactPredictor(model, batch_size),
                artifact_thresholds(model.meta, image_threshold, pixel_threshold), info)
    from rstpm_jax import workdir as workdir_lib  # noqa: PLC0415 (jax, flax, orbax: not for --artifact)

    workdir = os.path.abspath(os.path.expanduser(workdir))
    workdir_lib.check_trained(workdir, category)
    thresholds = resolve_thresholds(workdir, category, image_threshold, pixel_threshold)
    if chosen == "jax":
        return Predictor(workdir, category, batch_size, precision), thresholds, info
    if not _has_onnx_export():
        raise ValueError(f"--backend {chosen} from a workdir exports the model to ONNX first: install "
                         "the export extra and jax2onnx (README), or pass an exported --artifact.")
    from rstpm_jax.deploy import artifact as artifact_lib  # noqa: PLC0415 (jax2onnx)

    config = workdir_lib.load_config(workdir)
    path = artifact_lib.workdir_artifact(workdir, category, config, precision, thresholds)
    info["artifact"] = path
    return ArtifactPredictor(runtime.load_artifact(path, chosen, precision), batch_size), thresholds, info


# ----------------------------------------------------------------------------- outputs

def _colormap(values: np.ndarray) -> np.ndarray:
    """[0, 1] values -> RGB uint8 with matplotlib's jet."""
    from matplotlib import colormaps  # noqa: PLC0415
    return (colormaps["jet"](np.clip(values, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def _write_outputs(out_dir: str, name: str, rgb: np.ndarray, amap: np.ndarray, mask: np.ndarray,
                   map_format: str, full_scale: float, overlay_max: float) -> dict[str, str]:
    rel = {"map": os.path.join("maps", name + (".png" if map_format == "png16" else ".npy")),
           "overlay": os.path.join("overlays", name + ".png"),
           "mask": os.path.join("masks", name + ".png")}
    if map_format == "png16":
        levels = np.round(np.clip(amap / full_scale, 0, 1) * 65535).astype(np.uint16)
        Image.fromarray(levels).save(os.path.join(out_dir, rel["map"]))  # mode I;16
    else:
        np.save(os.path.join(out_dir, rel["map"]), amap.astype(np.float32))
    overlay = np.empty_like(rgb)
    for r in range(0, len(rgb), OVERLAY_ROWS):  # in strips: bounded memory for large images
        heat = _colormap(amap[r:r + OVERLAY_ROWS] / overlay_max).astype(np.float32)
        overlay[r:r + OVERLAY_ROWS] = (0.5 * rgb[r:r + OVERLAY_ROWS].astype(np.float32) + 0.5 * heat).round()
    Image.fromarray(overlay).save(os.path.join(out_dir, rel["overlay"]))
    Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(out_dir, rel["mask"]))
    return rel


def _load(path: str) -> np.ndarray | Exception:
    try:
        return read_rgb(path)
    except Exception as e:  # noqa: BLE001 - reported per file, the run goes on
        return e


CSV_FIELDS = ("file", "score", "normalized_score", "decision", "image_threshold", "width", "height",
              "anomalous_pixel_fraction", "map", "overlay", "mask")


def tiled_map(model: Predictor | ArtifactPredictor, rgb: np.ndarray) -> np.ndarray:
    """The (H, W) map of a whole image from its tiles, ``model.batch_size`` at a time, stitched
    (overlaps averaged)."""
    acc = TileAccumulator(*rgb.shape[:2], model.tiling)
    for tiles, positions in tile_batches(rgb, model.tiling, model.batch_size):
        maps, _ = model(tiles.astype(np.float32) * preprocessing.NORM_SCALE + preprocessing.NORM_OFFSET)
        acc.add(maps, positions)
    return acc.result()


def predict(workdir: str | None, category: str | None, inputs: str, output: str, *,
            image_threshold: float | None = None, pixel_threshold: float | None = None,
            batch_size: int = 8, map_format: str = "png16", progress: bool = True,
            overwrite: bool = False, backend: str | None = None, precision: str | None = None,
            artifact: str | None = None) -> dict[str, Any]:
    """Score every image ``inputs`` names (none under ``output``); write OUT's files (module
    docstring; a non-empty OUT needs ``overwrite``, which clears an earlier predict's files
    there); return the summary."""
    from tqdm import tqdm  # noqa: PLC0415

    t0 = time.time()
    if map_format not in MAP_FORMATS:
        raise ValueError(f"--map_format must be one of {MAP_FORMATS}, got {map_format!r}.")
    if workdir and not artifact:
        from rstpm_jax import workdir as workdir_lib  # noqa: PLC0415 (jax, flax, orbax: not for --artifact)

        workdir = os.path.abspath(os.path.expanduser(workdir))
        workdir_lib.check_trained(workdir, category)
    output = check_output(output, overwrite)
    files = list_inputs(inputs, exclude=output)
    model, thresholds, chosen = open_model(workdir, category, artifact, backend, precision, batch_size,
                                           image_threshold, pixel_threshold)
    category = category or (model.artifact.meta.get("category") if artifact else None)
    if overwrite:
        clear_output(output)
    t_thr, p_thr = thresholds["image_threshold"], thresholds["pixel_threshold"]
    scale = thresholds["normalization"]["scale"]
    full_scale = MAP_FULL_SCALE * p_thr
    for sub in ("maps", "overlays", "masks"):
        os.makedirs(os.path.join(output, sub), exist_ok=True)
    names = output_names(files)
    rows, skipped = [], []
    # Tiled: one image at a time (its tiles are the batches), else batches of images.
    bs = 1 if model.tiling else model.batch_size
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in tqdm(range(0, len(files), bs), desc=f"predict {category}", disable=not progress,
                          unit="image" if model.tiling else "batch"):
            chunk = list(zip(files[start:start + bs], names[start:start + bs]))
            loaded = list(pool.map(_load, [f for f, _ in chunk]))
            ok = []
            for (f, name), img in zip(chunk, loaded):
                if isinstance(img, Exception):
                    skipped.append({"file": f, "error": str(img)})
                else:
                    ok.append((f, name, img))
            if not ok:
                continue
            if model.tiling:
                fulls = [tiled_map(model, img) for _, _, img in ok]
                scores = [float(m.max()) for m in fulls]
            else:
                maps, scores = model(np.stack([preprocess(img, model.image_size) for _, _, img in ok]))
                fulls = [resize_map(amap, rgb.shape[:2]) for (_, _, rgb), amap in zip(ok, maps)]
            for (f, name, rgb), full, score in zip(ok, fulls, scores):
                mask = full > p_thr
                rel = _write_outputs(output, name, rgb, full, mask, map_format, full_scale,
                                     OVERLAY_RANGE * p_thr)
                rows.append({"file": f, "score": float(score), "normalized_score": float(score) / scale,
                             "decision": "anomalous" if score > t_thr else "normal",
                             "image_threshold": t_thr, "width": int(rgb.shape[1]),
                             "height": int(rgb.shape[0]),
                             "anomalous_pixel_fraction": float(mask.mean()), **rel})
            del fulls
    summary = {
        "workdir": workdir if not artifact else None, "category": category, "model": model.name,
        "image_size": list(model.image_size), "input": inputs,
        **chosen, "tiling": model.tiling.to_dict() if model.tiling else None,
        "num_images": len(rows), "num_anomalous": sum(r["decision"] == "anomalous" for r in rows),
        "num_skipped": len(skipped), "thresholds": thresholds,
        "normalization": thresholds["normalization"],
        "map_encoding": ({"format": "png16", "full_scale": full_scale,
                          "decode": "map = png_value / 65535 * full_scale (saturates at full_scale)",
                          "full_scale_is": f"{MAP_FULL_SCALE} * pixel_threshold"}
                         if map_format == "png16" else
                         {"format": "npy", "decode": "float32 anomaly map at the original size"}),
        "overlay": {"colormap": "jet", "alpha": 0.5, "range": [0.0, OVERLAY_RANGE * p_thr]},
        "mask": "255 where the map (at the original size) > pixel_threshold",
        "predictions": rows, "skipped": skipped, "seconds": time.time() - t0,
    }
    with open(os.path.join(output, "predictions.json"), "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(output, "predictions.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rstpm_jax.predict",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="The training run's --workdir.")
    parser.add_argument("--category", default=None, help="A trained category in the workdir.")
    parser.add_argument("--artifact", default=None,
                        help="An exported artifact (.jaxexport or .onnx with its .json sidecar) "
                             "instead of --workdir/--category.")
    parser.add_argument("--input", required=True, help="Image file, folder or (quoted) glob.")
    parser.add_argument("--output", required=True, help="Output folder (created).")
    parser.add_argument("--backend", choices=runtime.BACKENDS, default=None,
                        help="Default: the fastest installed that runs --precision (printed).")
    parser.add_argument("--precision", choices=runtime.PRECISIONS, default=None,
                        help="f32 (default; a .jaxexport: its own); bf16 (jax, openvino); int8 (openvino).")
    parser.add_argument("--image_threshold", type=float, default=None,
                        help="Image-score threshold (default: thresholds.json / the sidecar).")
    parser.add_argument("--pixel_threshold", type=float, default=None,
                        help="Pixel threshold for the masks (default: thresholds.json / the sidecar).")
    parser.add_argument("--batch_size", type=int, default=8, help="Images (tiles when tiling) per batch.")
    parser.add_argument("--map_format", choices=MAP_FORMATS, default="png16")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"Reuse a non-empty --output: first remove {', '.join(OUTPUTS)} there.")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not args.artifact and not (args.workdir and args.category):
        parser.error("give --workdir and --category, or --artifact")
    try:
        summary = predict(args.workdir, args.category, args.input, args.output,
                          image_threshold=args.image_threshold, pixel_threshold=args.pixel_threshold,
                          batch_size=args.batch_size, map_format=args.map_format,
                          progress=not args.no_progress, overwrite=args.overwrite, backend=args.backend,
                          precision=args.precision, artifact=args.artifact)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    print(f"backend {summary['backend']} ({summary['precision']}; {summary['chosen_by']})"
          + (f", artifact {summary['artifact']}" if summary.get("artifact") else ""))
    print(f"{summary['num_images']} image(s): {summary['num_anomalous']} anomalous "
          f"(image threshold {summary['thresholds']['image_threshold']:.6g}), "
          f"{summary['num_skipped']} skipped; wrote {os.path.join(args.output, 'predictions.csv')}")
    for s in summary["skipped"]:
        print(f"skipped {s['file']}: {s['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
