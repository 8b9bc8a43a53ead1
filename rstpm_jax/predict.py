"""Production inference: new images -> anomaly maps, scores and decisions (no TensorFlow).

    python -m rstpm_jax.predict --workdir DIR --category C --input PATH_OR_GLOB --output OUT \
        [--image_threshold X] [--pixel_threshold Y] [--batch_size N] [--map_format png16|npy] \
        [--overwrite]

Loads the trained category (config from ``WORKDIR/config.json``, teachers from
``WORKDIR/teachers``, students from the latest checkpoint), resizes every image that PIL
reads to the training size with the input pipeline's own code, runs them in padded batches
through one jitted inference function and writes, under OUT (which must be empty, or
``--overwrite`` replaces what an earlier predict wrote there; files under OUT are never
inputs):

- ``predictions.csv`` / ``predictions.json``: per image the score, the normalised score
  (``score / scale``, 1.0 = the model's own threshold), the decision, the threshold used and
  the original size; the JSON also holds the thresholds, the map encoding and ``skipped``
  (files that could not be read, with the error);
- ``maps/<name>.png`` (16-bit, ``map = value / 65535 * full_scale``, clipped at
  ``full_scale = MAP_FULL_SCALE * pixel_threshold``, the same for every image) or
  ``maps/<name>.npy`` (float32, raw); ``overlays/<name>.png``; ``masks/<name>.png``
  (255 where the map exceeds the pixel threshold). Maps are resized back to the original
  image size (bilinear).

Thresholds default to ``WORKDIR/<category>/thresholds.json`` (held-out normal training
images only); the F1-optimal threshold on the labelled test set (``results.json``) is only
reported, never used unless passed on the command line.
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

from rstpm_jax import workdir as workdir_lib
from rstpm_jax.data import preprocess as preprocessing
from rstpm_jax.data.mvtec import read_rgb

MAP_FULL_SCALE = 16.0  # 16-bit maps saturate at this multiple of the pixel threshold
OVERLAY_RANGE = 2.0  # overlay colours span [0, OVERLAY_RANGE * pixel threshold] (threshold mid-scale)
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
    scale = (saved.get("normalization") or {}).get("scale", saved.get("image_threshold"))
    out["normalization"] = {"normalized_score": "score / scale",
                            "scale": float(scale if scale is not None else out["image_threshold"]),
                            "source": "thresholds.json" if scale is not None else "command line"}
    f1 = (_read_json(os.path.join(cat_dir, "results.json")).get("metrics") or {}).get("image_f1_threshold")
    if f1 is not None:
        out["test_f1_optimal_image_threshold"] = float(f1)
    return out


# ----------------------------------------------------------------------------- model

class Predictor:
    """A trained category's inference function over fixed-size padded batches."""

    def __init__(self, workdir: str, category: str, batch_size: int = 8):
        import jax  # noqa: PLC0415

        from rstpm_jax import sharding  # noqa: PLC0415
        from rstpm_jax.anomaly_maps import MapSpec  # noqa: PLC0415
        from rstpm_jax.inference import compiled_infer  # noqa: PLC0415

        workdir = os.path.abspath(os.path.expanduser(workdir))
        self.config = workdir_lib.load_config(workdir)
        self.image_size = (int(self.config.data.image_size),) * 2
        mesh = sharding.make_mesh()
        n_dev = jax.device_count()
        self.batch_size = -(-max(1, int(batch_size)) // n_dev) * n_dev  # a multiple of the devices
        model, self.teacher_vars, self.student_vars = workdir_lib.load_trained(
            self.config, workdir, category, mesh)
        self._fn = compiled_infer(model, MapSpec.from_config(self.config.maps), mesh, with_levels=False)

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
    heat = _colormap(amap / overlay_max).astype(np.float32)
    overlay = (0.5 * rgb.astype(np.float32) + 0.5 * heat).round().astype(np.uint8)
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


def predict(workdir: str, category: str, inputs: str, output: str, *,
            image_threshold: float | None = None, pixel_threshold: float | None = None,
            batch_size: int = 8, map_format: str = "png16", progress: bool = True,
            overwrite: bool = False) -> dict[str, Any]:
    """Score every image ``inputs`` names (none under ``output``); write OUT's files (module
    docstring; a non-empty OUT needs ``overwrite``, which clears an earlier predict's files
    there); return the summary."""
    from tqdm import tqdm  # noqa: PLC0415

    t0 = time.time()
    if map_format not in MAP_FORMATS:
        raise ValueError(f"--map_format must be one of {MAP_FORMATS}, got {map_format!r}.")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    workdir_lib.check_trained(workdir, category)
    output = check_output(output, overwrite)
    files = list_inputs(inputs, exclude=output)
    thresholds = resolve_thresholds(workdir, category, image_threshold, pixel_threshold)
    model = Predictor(workdir, category, batch_size)
    if overwrite:
        clear_output(output)
    t_thr, p_thr = thresholds["image_threshold"], thresholds["pixel_threshold"]
    scale = thresholds["normalization"]["scale"]
    full_scale = MAP_FULL_SCALE * p_thr
    for sub in ("maps", "overlays", "masks"):
        os.makedirs(os.path.join(output, sub), exist_ok=True)
    names = output_names(files)
    rows, skipped = [], []
    bs = model.batch_size
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in tqdm(range(0, len(files), bs), desc=f"predict {category}", disable=not progress,
                          unit="batch"):
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
            maps, scores = model(np.stack([preprocess(img, model.image_size) for _, _, img in ok]))
            for (f, name, rgb), amap, score in zip(ok, maps, scores):
                full = resize_map(amap, rgb.shape[:2])
                mask = full > p_thr
                rel = _write_outputs(output, name, rgb, full, mask, map_format, full_scale,
                                     OVERLAY_RANGE * p_thr)
                rows.append({"file": f, "score": float(score), "normalized_score": float(score) / scale,
                             "decision": "anomalous" if score > t_thr else "normal",
                             "image_threshold": t_thr, "width": int(rgb.shape[1]),
                             "height": int(rgb.shape[0]),
                             "anomalous_pixel_fraction": float(mask.mean()), **rel})
    summary = {
        "workdir": workdir, "category": category, "model": str(model.config.name),
        "image_size": list(model.image_size), "input": inputs,
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
    parser.add_argument("--workdir", required=True, help="The training run's --workdir.")
    parser.add_argument("--category", required=True, help="A trained category in the workdir.")
    parser.add_argument("--input", required=True, help="Image file, folder or (quoted) glob.")
    parser.add_argument("--output", required=True, help="Output folder (created).")
    parser.add_argument("--image_threshold", type=float, default=None,
                        help="Image-score threshold (default: thresholds.json).")
    parser.add_argument("--pixel_threshold", type=float, default=None,
                        help="Pixel threshold for the masks (default: thresholds.json).")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--map_format", choices=MAP_FORMATS, default="png16")
    parser.add_argument("--no_progress", action="store_true", help="No progress bar.")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"Reuse a non-empty --output: first remove {', '.join(OUTPUTS)} there.")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        summary = predict(args.workdir, args.category, args.input, args.output,
                          image_threshold=args.image_threshold, pixel_threshold=args.pixel_threshold,
                          batch_size=args.batch_size, map_format=args.map_format,
                          progress=not args.no_progress, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    print(f"{summary['num_images']} image(s): {summary['num_anomalous']} anomalous "
          f"(image threshold {summary['thresholds']['image_threshold']:.6g}), "
          f"{summary['num_skipped']} skipped; wrote {os.path.join(args.output, 'predictions.csv')}")
    for s in summary["skipped"]:
        print(f"skipped {s['file']}: {s['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
