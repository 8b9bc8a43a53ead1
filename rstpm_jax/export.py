"""A self-contained ``jax.export`` artifact of a trained category's inference function.

    python -m rstpm_jax.export --workdir DIR --category C --output model.jaxexport

The artifact maps a batch of normalised images ``float32[b, H, W, 3]`` (any ``b``; H, W the
training size) to ``{"map": float32[b, H, W], "score": float32[b]}``, with every weight
closed over as a constant: loading and running it needs jax alone (``load`` below; no
flax, no rstpm_jax model code). A JSON sidecar ``<output>.json`` holds the preprocessing
(image size, ImageNet mean/std), the thresholds and the score normalisation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from rstpm_jax.ops import compile_options

DEFAULT_PLATFORMS = ("cpu", "cuda")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export lowers for


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
    """``platforms`` as a tuple; ValueError naming the valid ones for an unknown (e.g. "gpu")."""
    platforms = tuple(platforms)
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown or not platforms:
        hint = " (NVIDIA GPUs are 'cuda', AMD ones 'rocm')" if any(p == "gpu" for p in unknown) else ""
        raise ValueError(f"--platforms: unknown {unknown or 'empty list'}{hint}; choose from "
                         f"{', '.join(PLATFORMS)} (comma-separated).")
    return platforms
FORMAT = "rstpm-jax-export/1"


def export_category(workdir: str, category: str, platforms: Sequence[str] = DEFAULT_PLATFORMS,
                    image_threshold: float | None = None,
                    pixel_threshold: float | None = None) -> tuple[jax.export.Exported, dict]:
    """Trace and lower the trained ``category``'s inference function; returns it and its metadata."""
    import jax.numpy as jnp  # noqa: PLC0415

    from rstpm_jax import predict, sharding  # noqa: PLC0415
    from rstpm_jax import workdir as workdir_lib  # noqa: PLC0415
    from rstpm_jax.anomaly_maps import MapSpec  # noqa: PLC0415
    from rstpm_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD  # noqa: PLC0415
    from rstpm_jax.inference import make_infer_fn  # noqa: PLC0415

    platforms = check_platforms(platforms)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    workdir_lib.check_trained(workdir, category)
    config = workdir_lib.load_config(workdir)
    thresholds = predict.resolve_thresholds(workdir, category, image_threshold, pixel_threshold)
    # flax's own layers: portable across platforms and free of custom gradients.
    model, teacher_vars, student_vars = workdir_lib.load_trained(
        config, workdir, category, sharding.make_mesh(), fast_cpu_ops=False)
    teacher_vars, student_vars = jax.device_get((teacher_vars, student_vars))  # NumPy constants
    infer = make_infer_fn(model, MapSpec.from_config(config.maps), with_levels=False)

    def fn(images):
        return infer(teacher_vars, student_vars, images)

    h = w = int(config.data.image_size)
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {h}, {w}, 3"), jnp.float32)
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(spec)
    meta = {
        "format": FORMAT, "category": category, "model": str(config.name), "workdir": workdir,
        "image_size": [h, w],
        "input": {"shape": ["b", h, w, 3], "dtype": "float32", "layout": "NHWC",
                  "preprocessing": "RGB (grayscale replicated), resize to image_size (bilinear), "
                                   "x / 255, (x - mean) / std"},
        "mean": [float(v) for v in IMAGENET_MEAN], "std": [float(v) for v in IMAGENET_STD],
        "outputs": {"map": "float32[b, H, W] anomaly map at the input size",
                    "score": "float32[b] image score = max of the map"},
        "thresholds": thresholds, "normalization": thresholds["normalization"],
        "platforms": list(exported.platforms), "jax_version": jax.__version__,
        "calling_convention_version": int(exported.calling_convention_version),
    }
    return exported, meta


def save(exported: jax.export.Exported, meta: dict, path: str) -> None:
    """Write the serialised artifact to ``path`` and its metadata to ``path + ".json"``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(exported.serialize())
    with open(path + ".json", "w") as f:
        json.dump(meta, f, indent=2)


class ExportedModel:
    """A loaded artifact: ``model(images) -> {"map", "score"}`` as NumPy; ``model.meta``: the sidecar."""

    def __init__(self, exported: jax.export.Exported, meta: dict):
        self.exported, self.meta = exported, meta
        self._call = compile_options.jit(exported.call)

    def __call__(self, images: Any) -> dict[str, np.ndarray]:
        return jax.tree.map(np.asarray, self._call(np.asarray(images, np.float32)))

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        """(..., H, W, 3) uint8 RGB already at ``image_size`` -> normalised float32 input."""
        mean, std = np.asarray(self.meta["mean"], np.float32), np.asarray(self.meta["std"], np.float32)
        return (np.asarray(rgb, np.float32) / 255.0 - mean) / std

    def normalized_score(self, score: Any) -> np.ndarray:
        return np.asarray(score, np.float64) / float(self.meta["normalization"]["scale"])


def load(path: str) -> ExportedModel:
    """Deserialise an artifact written by ``save`` (and its sidecar, when present). Needs jax only."""
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    meta = {}
    if os.path.isfile(path + ".json"):
        with open(path + ".json") as f:
            meta = json.load(f)
    return ExportedModel(exported, meta)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rstpm_jax.export",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="The training run's --workdir.")
    parser.add_argument("--category", required=True, help="A trained category in the workdir.")
    parser.add_argument("--output", required=True, help="Artifact path, e.g. model.jaxexport.")
    parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                        help=f"Comma-separated platforms to lower for ({', '.join(PLATFORMS)}).")
    parser.add_argument("--image_threshold", type=float, default=None,
                        help="Recorded in the sidecar (default: thresholds.json).")
    parser.add_argument("--pixel_threshold", type=float, default=None,
                        help="Recorded in the sidecar (default: thresholds.json).")
    args = parser.parse_args(argv)
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    try:
        check_platforms(platforms)  # before jax, the model or the workdir is touched
        exported, meta = export_category(args.workdir, args.category, platforms,
                                         args.image_threshold, args.pixel_threshold)
    except (FileNotFoundError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    save(exported, meta, args.output)
    size = os.path.getsize(args.output)
    print(f"wrote {args.output} ({size / 2**20:.1f} MiB, platforms {','.join(meta['platforms'])}, "
          f"input float32[b, {meta['image_size'][0]}, {meta['image_size'][1]}, 3]) and "
          f"{args.output}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
