"""Evaluation: a trained category over its held-out and test images -> thresholds and metrics.

The model runs in process (``eval.backend=jax``) or as an exported artifact (``onnxruntime``,
``openvino``; ``eval.precision`` f32, bf16 or int8). With tiling the maps are stitched back
to each image's own size before any metric.

Writing the results (``results.json``, figures, the summary) is ``artifacts``' job.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from rstpm_jax import anomaly_maps, metrics, sharding
from rstpm_jax import workdir as workdir_lib
from rstpm_jax.anomaly_maps import MapSpec
from rstpm_jax.data.sources import Source
from rstpm_jax.data.tiling import Stitcher, TileSpec
from rstpm_jax.deploy.runtime import Artifact
from rstpm_jax.inference import bind_stats, compiled_infer
from rstpm_jax.models.rstpm import RSTPM

NUM_FIGURE_EXAMPLES = 4  # per defect type


@dataclasses.dataclass
class Evaluation:
    """One category's evaluation. ``metrics``, ``scores`` and ``examples`` are host 0's only."""

    category: str
    thresholds: dict
    num_test_images: int
    metrics: dict = dataclasses.field(default_factory=dict)
    scores: list[tuple[str, int, float]] = dataclasses.field(default_factory=list)  # file, label, score
    examples: dict[str, list[dict]] = dataclasses.field(default_factory=dict)  # per defect type
    seconds: float = 0.0
    selection: dict = dataclasses.field(default_factory=dict)  # which epoch (train.select_epoch)
    deployment: dict = dataclasses.field(default_factory=dict)  # eval.backend, precision, artifact


def eval_batch_size(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
    """``eval.batch_size`` rounded up to a multiple of the mesh's devices (padding is dropped)."""
    n = mesh.devices.size
    return -(-max(1, int(config.eval.batch_size)) // n) * n


def eval_backend(config: ml_collections.ConfigDict) -> tuple[str, str]:
    """``(eval.backend, eval.precision)``: ``("jax", "f32")`` is the in-process model."""
    return str(config.eval.get("backend", "jax")), str(config.eval.get("precision", "f32"))


def run_split(config: ml_collections.ConfigDict, source: Source, category: str, split: str, infer,
              teacher_vars: Any, student_vars: Any, mesh: jax.sharding.Mesh
              ) -> Iterator[tuple[dict, dict]]:
    """Yield global NumPy batches (valid rows only) of the inputs and the inference outputs.

    ``infer``: a compiled ``infer(teacher_vars, student_vars, images)`` (``compiled_infer``) or
    an exported artifact (``deploy.runtime.Artifact``, run on each host's rows; the variables
    are then unused). With tiling (``data.tile_size``) the model sees tiles; each image is
    yielded alone (a batch of one) once its tiles are stitched back: image, mask, map and
    per-level maps at the image's own size, overlaps averaged, the score the stitched map's
    maximum.
    """
    from rstpm_jax.data import input_pipeline  # noqa: PLC0415 (TensorFlow)

    tiling = TileSpec.from_config(config.data)
    stitcher = Stitcher(tiling) if tiling else None
    on_host = isinstance(infer, Artifact)
    for batch in input_pipeline.eval_dataset(
            source.root, category, split=split, image_size=int(config.data.image_size),
            global_batch_size=eval_batch_size(config, mesh), process_index=jax.process_index(),
            process_count=jax.process_count(), seed=int(config.seed),
            holdout_fraction=float(config.data.holdout_fraction), data_dir=source.tfds_dir,
            tiling=tiling):
        if on_host:
            out = sharding.to_global(infer(batch["image"]), mesh)
        else:
            out = infer(teacher_vars, student_vars, sharding.to_global(batch["image"], mesh))
        out = sharding.gather_to_all(out)
        inputs = sharding.gather_to_all(sharding.to_global(batch, mesh))
        keep = inputs["valid"].astype(bool)
        inputs, out = jax.tree.map(lambda x, k=keep: x[k], (inputs, out))
        if stitcher is None:
            yield inputs, out
            continue
        for row in range(len(inputs["index"])):
            tile = {"image": inputs["image"][row], "mask": inputs["mask"][row], "map": out["map"][row]}
            if "levels" in out:
                tile["levels"] = jax.tree.map(lambda x, r=row: x[r], out["levels"])
            whole = stitcher.add(int(inputs["index"][row]), *(int(v) for v in inputs["tile_yx"][row]),
                                 *(int(v) for v in inputs["image_hw"][row]), tile)
            if whole is not None:
                one = jax.tree.map(lambda x: x[None], whole)
                yield ({"image": one["image"], "mask": one["mask"], "label": inputs["label"][row:row + 1],
                        "index": inputs["index"][row:row + 1], "valid": np.ones(1, bool)},
                       {"map": one["map"], "score": one["map"].max(axis=(1, 2)),
                        **({"levels": one["levels"]} if "levels" in one else {})})


def holdout_score(config: ml_collections.ConfigDict, source: Source, category: str, infer,
                  teacher_vars: Any, student_vars: Any, mesh: jax.sharding.Mesh) -> float:
    """The mean of the final map over the held-out normal images (lower: better students), the
    reference STPM code's epoch-selection criterion."""
    total, count = 0.0, 0
    for _, out in run_split(config, source, category, "holdout", infer, teacher_vars, student_vars, mesh):
        total += float(np.sum(out["map"], dtype=np.float64))
        count += out["map"].size
    if not count:
        raise ValueError(f"{category}: train.select_epoch=best_holdout needs held-out normal images; "
                         "set data.holdout_fraction > 0 or train.select_epoch=last.")
    return total / count


def compute_thresholds(config: ml_collections.ConfigDict, source: Source, category: str, infer,
                       teacher_vars: Any, student_vars: Any, mesh: jax.sharding.Mesh) -> dict:
    """Thresholds from held-out normal training images only: a high percentile of their
    image scores and of their pixel scores. Normalised scores divide by the image threshold."""
    q = float(config.eval.threshold_percentile)
    image_scores, pixels = [], []
    for _, out in run_split(config, source, category, "holdout", infer, teacher_vars, student_vars, mesh):
        image_scores.append(out["score"])
        pixels.append(out["map"].reshape(-1)[:: max(1, out["map"][0].size // 4096)])
    if not image_scores:
        logging.warning("%s: no held-out normal images (data.holdout_fraction=0): no default "
                        "threshold; predict needs --image_threshold.", category)
        return {}
    image_scores = np.concatenate(image_scores)
    image_threshold = float(np.percentile(image_scores, q))
    return {"percentile": q, "num_images": int(image_scores.size),
            "image_threshold": image_threshold,
            "pixel_threshold": float(np.percentile(np.concatenate(pixels), q)),
            "normal_image_score_median": float(np.median(image_scores)),
            # One threshold across categories: normalized_score = score / scale (1.0 = threshold).
            "normalization": {"normalized_score": "score / scale",
                              "scale": image_threshold}}


def compute_map_statistics(config: ml_collections.ConfigDict, source: Source, category: str, infer,
                           teacher_vars: Any, student_vars: Any, mesh: jax.sharding.Mesh) -> dict | None:
    """The ``"map_statistics"`` record of ``thresholds.json`` when ``maps.fusion`` needs it (else
    None): per student and level the ``maps.kwargs`` ``q_low``/``q_high`` quantiles of that map
    over the held-out normal images only (an extra pass; ``infer`` a compiled one with levels)."""
    spec = MapSpec.from_config(config.maps)
    if not anomaly_maps.needs_map_statistics(spec.fusion):
        return None
    kwargs = dict(spec.fusion.kwargs)
    q = (float(kwargs.get("q_low", 0.9)), float(kwargs.get("q_high", 0.995)))
    levels = (out["levels"] for _, out in run_split(config, source, category, "holdout", infer,
                                                    teacher_vars, student_vars, mesh))
    try:
        maps = anomaly_maps.map_statistics(levels, *q)
    except ValueError as e:
        raise ValueError(f"{category}: maps.fusion={spec.fusion.name!r}: {e}") from e
    return {"fusion": spec.fusion.name, "quantiles": list(q), "split": "holdout", "maps": maps}


def evaluated_infer(config: ml_collections.ConfigDict, source: Source, category: str, model: RSTPM,
                    teacher_vars: Any, student_vars: Any, mesh: jax.sharding.Mesh,
                    artifact_dir: str | None = None) -> tuple[Any, dict, dict | None]:
    """What ``eval.backend``/``eval.precision`` evaluates (``run_split``'s ``infer``), a
    record of it and the held-out map statistics (:func:`compute_map_statistics`, already
    bound into ``infer``): the in-process model (jax; bf16 = ``model.dtype`` bfloat16) or an
    exported artifact (exported into ``artifact_dir``, the statistics baked in, unless
    ``eval.artifact`` names one)."""
    backend, precision = eval_backend(config)
    if backend == "jax":
        if precision not in ("f32", "bf16"):
            raise ValueError(f"eval.backend=jax runs f32 or bf16, not eval.precision={precision!r}.")
        if precision == "bf16":
            cfg = config.copy_and_resolve_references()
            with cfg.unlocked():
                cfg.model.dtype = "bfloat16"
            model = workdir_lib.create_model(cfg)
        tiled = TileSpec.from_config(config.data) is not None
        with_attention = bool(config.eval.figures) and model.has_attention and not tiled
        infer = compiled_infer(model, MapSpec.from_config(config.maps), mesh, with_attention=with_attention)
        stats = compute_map_statistics(config, source, category, infer, teacher_vars, student_vars, mesh)
        return (bind_stats(infer, anomaly_maps.stats_arrays(stats)), {"backend": backend, "precision": precision},
                stats)
    from rstpm_jax.deploy import artifact  # noqa: PLC0415 (onnx, onnxruntime / openvino)

    stats = compute_map_statistics(config, source, category, compiled_infer(model, MapSpec.from_config(
        config.maps), mesh), teacher_vars, student_vars, mesh)
    exported = artifact.evaluation_artifact(config, source.root, source.tfds_dir, category, teacher_vars,
                                            student_vars, backend, precision, artifact_dir, stats)
    if stats is not None and exported.meta.get("map_statistics") != stats:
        raise ValueError(f"eval.artifact {config.eval.get('artifact')!r} was exported with other map statistics than "
                         f"{category}'s held-out images give; export it again from this workdir.")
    return exported, {"backend": backend, "precision": precision, "float32_ops": exported.float32_ops,
                      "artifact": {k: exported.meta.get(k) for k in ("format", "opset", "files", "sha256",
                                                                     "int8", "versions")}}, stats


def evaluate_category(config: ml_collections.ConfigDict, source: Source, category: str,
                      model: RSTPM, teacher_vars: Any, student_vars: Any,
                      mesh: jax.sharding.Mesh, artifact_dir: str | None = None) -> Evaluation:
    """Thresholds (held-out normal images), metrics and examples of one trained category,
    through ``eval.backend`` in ``eval.precision`` (an exported artifact, written to
    ``artifact_dir``, unless jax)."""
    from rstpm_jax.data import input_pipeline  # noqa: PLC0415 (TensorFlow)

    t0 = time.time()
    figures = bool(config.eval.figures)
    # One compiled function (or artifact) for both splits; the gates' maps are kept for the figures.
    infer, deployment, stats = evaluated_infer(config, source, category, model, teacher_vars, student_vars,
                                               mesh, artifact_dir)
    thresholds = compute_thresholds(config, source, category, infer, teacher_vars, student_vars, mesh)
    if stats is not None:
        thresholds["map_statistics"] = stats  # predict and export apply the same maps
    acc = metrics.MetricsAccumulator(max_fpr=float(config.eval.pro_max_fpr))
    result = Evaluation(category, thresholds, 0, deployment=deployment)
    items = input_pipeline.test_items(source.root, category, source.tfds_dir)
    host0 = jax.process_index() == 0
    for inputs, out in run_split(config, source, category, "test", infer, teacher_vars,
                                 student_vars, mesh):
        result.num_test_images += len(inputs["label"])
        if host0:
            acc.update(out["map"], inputs["mask"], inputs["label"], out.get("levels"))
            result.scores.extend((items[int(i)].path, int(lbl), float(s))
                                 for i, lbl, s in zip(inputs["index"], inputs["label"], out["score"]))
            if figures:
                _keep_examples(result.examples, items, inputs, out)
    if host0:
        result.metrics = acc.compute()
        logging.info("%s (%s %s): image AUROC %.4f, pixel AUROC %.4f, AUPRO %.4f (%d test images)", category,
                     deployment["backend"], deployment["precision"],
                     result.metrics.get("image_auroc", float("nan")),
                     result.metrics.get("pixel_auroc", float("nan")),
                     result.metrics.get("aupro", float("nan")), result.num_test_images)
    result.seconds = time.time() - t0
    return result


def _keep_examples(examples: dict, items: list, inputs: dict, out: dict) -> None:
    for row, index in enumerate(inputs["index"]):
        defect = items[int(index)].defect
        if len(examples.setdefault(defect, [])) < NUM_FIGURE_EXAMPLES:
            examples[defect].append({
                "image": inputs["image"][row], "mask": inputs["mask"][row], "map": out["map"][row],
                "levels": jax.tree.map(lambda x, r=row: x[r], out.get("levels", {})),
                "attention": jax.tree.map(lambda x, r=row: x[r], out.get("attention", {})),
                "name": os.path.basename(items[int(index)].path)})
