"""A self-contained artifact of a trained category's inference function: ``jax.export`` or ONNX.

    python -m rstpm_jax.export --workdir DIR --category C --output model.jaxexport   # --format jax
    python -m rstpm_jax.export --workdir DIR --category C --output model.onnx --format onnx \
        [--precision int8]

The artifact maps a batch of normalised images ``float32[b, H, W, 3]`` (any ``b``; H, W the
training size, or the tile size of a model trained on tiles) to ``{"map": float32[b, H, W],
"score": float32[b]}``, with every weight inside. ``jax``: a ``jax.export`` file; loading
and running it needs jax alone (``load`` below; no flax, no rstpm_jax model code); precision
f32 or bf16 (``model.dtype`` bfloat16). ``onnx``: one ONNX graph (opset 17, dynamic batch;
``rstpm_jax.deploy.onnx_export``) for ONNX Runtime and OpenVINO (bf16 there is a load-time
hint); ``--precision int8`` also writes ``<stem>.int8.xml``/``.bin``, an OpenVINO model with
int8 convolutions (NNCF, calibrated on the category's held-out normal images). A JSON sidecar
``<output>.json`` holds the preprocessing (image size, ImageNet mean/std, tiling), the
thresholds and the score normalisation (not in the graph), the format, precision and versions.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import jax

from rstpm_jax.deploy.runtime import ExportedModel, load  # noqa: F401 - the artifact API
from rstpm_jax.deploy.runtime import write_sidecar as _write_sidecar

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
FORMATS = ("jax", "onnx")


def _trained(workdir: str, category: str, image_threshold: float | None, pixel_threshold: float | None,
             dtype: str | None = None):
    from rstpm_jax import predict, sharding  # noqa: PLC0415
    from rstpm_jax import workdir as workdir_lib  # noqa: PLC0415
    from rstpm_jax.deploy import artifact  # noqa: PLC0415

    workdir = os.path.abspath(os.path.expanduser(workdir))
    workdir_lib.check_trained(workdir, category)
    config = workdir_lib.load_config(workdir)
    if dtype:
        config.model.dtype = dtype
    thresholds = predict.resolve_thresholds(workdir, category, image_threshold, pixel_threshold)
    # flax's own layers: portable across platforms and free of custom gradients.
    model, teacher_vars, student_vars = workdir_lib.load_trained(
        config, workdir, category, sharding.make_mesh(), fast_cpu_ops=False)
    teacher_vars, student_vars = jax.device_get((teacher_vars, student_vars))  # NumPy constants
    step = artifact.latest_step(workdir, category, config)
    return workdir, config, thresholds, model, teacher_vars, student_vars, step


def export_category(workdir: str, category: str, platforms: Sequence[str] = DEFAULT_PLATFORMS,
                    image_threshold: float | None = None, pixel_threshold: float | None = None,
                    precision: str = "f32") -> tuple[jax.export.Exported, dict]:
    """Trace and lower the trained ``category``'s inference function; returns it and its metadata."""
    import jax.numpy as jnp  # noqa: PLC0415

    from rstpm_jax.anomaly_maps import MapSpec, require_map_statistics, stats_arrays  # noqa: PLC0415
    from rstpm_jax.deploy import artifact  # noqa: PLC0415
    from rstpm_jax.inference import make_infer_fn  # noqa: PLC0415

    platforms = check_platforms(platforms)
    if precision not in ("f32", "bf16"):
        raise ValueError(f"--format jax exports f32 or bf16, not {precision!r} (int8: --format onnx).")
    workdir, config, thresholds, model, teacher_vars, student_vars, step = _trained(
        workdir, category, image_threshold, pixel_threshold, "bfloat16" if precision == "bf16" else None)
    infer = make_infer_fn(model, MapSpec.from_config(config.maps), with_levels=False)
    require_map_statistics(config.maps, thresholds.get("map_statistics"))
    stats = stats_arrays(thresholds.get("map_statistics"))  # constants of the artifact

    def fn(images):
        out = infer(teacher_vars, student_vars, images, stats)
        return {"map": out["map"].astype(jnp.float32), "score": out["score"].astype(jnp.float32)}

    meta = artifact.base_meta(config, category, workdir, thresholds, precision, step)
    h, w = meta["image_size"]
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {h}, {w}, 3"), jnp.float32)
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(spec)
    meta = {"format": FORMAT, **meta, "compute_dtype": "bfloat16" if precision == "bf16" else "float32",
            "platforms": list(exported.platforms), "jax_version": jax.__version__,
            "calling_convention_version": int(exported.calling_convention_version)}
    return exported, meta


def export_category_onnx(workdir: str, category: str, output: str, image_threshold: float | None = None,
                         pixel_threshold: float | None = None, precision: str = "f32",
                         opset: int | None = None) -> dict:
    """Write the trained ``category`` as ONNX to ``output`` (with ``precision="int8"`` also its
    OpenVINO int8 model) and the sidecar; returns the sidecar."""
    from rstpm_jax.data import sources  # noqa: PLC0415
    from rstpm_jax.deploy import artifact  # noqa: PLC0415

    if precision not in ("f32", "bf16", "int8"):
        raise ValueError(f"--precision must be f32, bf16 or int8, got {precision!r}.")
    workdir, config, thresholds, _, teacher_vars, student_vars, step = _trained(
        workdir, category, image_threshold, pixel_threshold)
    calibration = None
    if precision == "int8":
        source, _ = sources.prepare(config, workdir)
        calibration = artifact.calibration_images(config, source.root, category, source.tfds_dir)
    meta = artifact.base_meta(config, category, workdir, thresholds, checkpoint_step=step)
    return artifact.export_onnx_artifact(config, teacher_vars, student_vars, output, meta, calibration, opset)


def save(exported: jax.export.Exported, meta: dict, path: str) -> None:
    """Write the serialised artifact to ``path`` and its metadata to ``path + ".json"``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(exported.serialize())
    _write_sidecar(path, meta)


def _mib(path: str) -> float:
    return os.path.getsize(path) / 2**20


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rstpm_jax.export",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="The training run's --workdir.")
    parser.add_argument("--category", required=True, help="A trained category in the workdir.")
    parser.add_argument("--output", required=True, help="Artifact path, e.g. model.jaxexport or model.onnx.")
    parser.add_argument("--format", choices=FORMATS, default="jax",
                        help="jax: a jax.export file (needs jax); onnx: ONNX for ONNX Runtime / OpenVINO.")
    parser.add_argument("--precision", choices=("f32", "bf16", "int8"), default="f32",
                        help="jax: f32 or bf16 (compute dtype). onnx: the graph is float32 (bf16 is "
                             "OpenVINO's load-time hint); int8 also writes an OpenVINO int8 model.")
    parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                        help=f"--format jax: comma-separated platforms to lower for ({', '.join(PLATFORMS)}).")
    parser.add_argument("--opset", type=int, default=None, help="--format onnx: ONNX opset (default 17).")
    parser.add_argument("--image_threshold", type=float, default=None,
                        help="Recorded in the sidecar (default: thresholds.json).")
    parser.add_argument("--pixel_threshold", type=float, default=None,
                        help="Recorded in the sidecar (default: thresholds.json).")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        if args.format == "onnx":
            meta = export_category_onnx(args.workdir, args.category, args.output, args.image_threshold,
                                        args.pixel_threshold, args.precision, args.opset)
        else:
            platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
            check_platforms(platforms)  # before jax, the model or the workdir is touched
            exported, meta = export_category(args.workdir, args.category, platforms, args.image_threshold,
                                             args.pixel_threshold, args.precision)
            save(exported, meta, args.output)
    except (FileNotFoundError, ValueError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"export: error: {e}; --format onnx needs the export extra: pip install '.[export]' and "
              "pip install --no-deps jax2onnx==0.17.1 (README).", file=sys.stderr)
        return 2
    h, w = meta["image_size"]
    what = f"input float32[b, {h}, {w}, 3]" + (
        f", tiles of {h} every {meta['tiling']['tile_stride']} px" if meta.get("tiling") else "")
    if args.format == "onnx":
        files = [os.path.join(os.path.dirname(os.path.abspath(args.output)), f) for f in meta["files"].values()]
        files += [f[:-4] + ".bin" for f in files if f.endswith(".xml")]
        sizes = ", ".join(f"{os.path.basename(f)} {_mib(f):.1f} MiB" for f in files)
        print(f"wrote {sizes} (opset {meta['opset']}, precisions {meta['precisions']}, {what}) and "
              f"{args.output}.json")
    else:
        print(f"wrote {args.output} ({_mib(args.output):.1f} MiB, {meta['precision']}, platforms "
              f"{','.join(meta['platforms'])}, {what}) and {args.output}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
