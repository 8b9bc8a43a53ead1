"""Evaluation: a trained category over its test split -> maps -> metrics -> reports.

Also runs alone on saved checkpoints (``--config.mode=eval``), without retraining.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from rstpm_jax import checkpoints, sharding
from rstpm_jax.inference import make_infer_fn
from rstpm_jax.models.rstpm import RSTPM
from rstpm_jax.ops import compile_options

NUM_FIGURE_EXAMPLES = 4  # per defect type


def prepare_data_root(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Resolve ``data.root`` (relative to the workdir when the demo generates it) and generate it if asked."""
    root = os.path.expanduser(str(config.data.root))
    if config.data.generate_synthetic:
        if not os.path.isabs(root):
            root = os.path.join(workdir, root)
        if not os.path.isdir(root):
            if jax.process_index() == 0:
                from rstpm_jax.data import synthetic  # noqa: PLC0415
                logging.info("Generating the synthetic demo dataset in %s", root)
                synthetic.generate(root, seed=int(config.seed))
            _sync("synthetic-data")
    return os.path.abspath(root)


def categories_of(config: ml_collections.ConfigDict, root: str) -> list[str]:
    from rstpm_jax.data import mvtec  # noqa: PLC0415
    return mvtec.resolve_categories(root, str(config.data.categories))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        multihost_utils.sync_global_devices(name)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a training run wrote to ``WORKDIR/config.json``."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        held = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else None
        where = f"it holds: {held or 'nothing'}" if held is not None else "the folder does not exist"
        raise FileNotFoundError(f"{path} not found ({where}). Point --workdir at the folder a "
                                "`python -m rstpm_jax.main` training run wrote.")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_trained(config: ml_collections.ConfigDict, workdir: str, category: str,
                 mesh: jax.sharding.Mesh) -> tuple[RSTPM, Any, dict]:
    """Model, teacher variables and the latest students' checkpoint of a trained category."""
    from rstpm_jax import train  # noqa: PLC0415

    ckpt_dir = os.path.join(workdir, category, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        held = sorted(d for d in os.listdir(workdir) if os.path.isdir(os.path.join(workdir, d, "checkpoints")))
        raise FileNotFoundError(f"No trained model for category {category!r} in {workdir} "
                                f"(trained categories there: {held or 'none'}). Train it first.")
    model = train.create_model(config)
    state, random_teachers = train.create_train_state(jax.random.key(config.seed), config, model,
                                                      int(config.data.image_size))
    teachers_dir = os.path.join(workdir, "teachers")
    if os.path.isdir(teachers_dir):
        teacher_vars = checkpoints.load_variables(teachers_dir, sharding.replicate(random_teachers, mesh))
    else:
        teacher_vars = sharding.replicate(
            checkpoints.teacher_variables(model, config.model, random_teachers), mesh)
    manager = checkpoints.checkpoint_manager(ckpt_dir, config.train.keep_checkpoints)
    latest = manager.latest_step()
    if latest is None:
        raise FileNotFoundError(f"{ckpt_dir} holds no complete checkpoint; train {category!r} first.")
    state, _ = checkpoints.restore(manager, latest, sharding.replicate(state, mesh))
    manager.close()
    return model, teacher_vars, {"params": state.params, "batch_stats": state.batch_stats}


@functools.lru_cache(maxsize=8)
def compiled_infer(model: RSTPM, fusion: str, sigma: float, mesh: jax.sharding.Mesh):
    """The inference function jitted over ``mesh`` (memoised across categories)."""
    repl, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    maps_cfg = ml_collections.ConfigDict({"fusion": fusion, "smoothing_sigma": sigma})
    return compile_options.jit(make_infer_fn(model, maps_cfg), in_shardings=(repl, repl, batch),
                               out_shardings=batch)


def run_split(config: ml_collections.ConfigDict, root: str, category: str, split: str, infer,
              teacher_vars: Any, student_vars: Any, mesh: jax.sharding.Mesh):
    """Yield global NumPy batches (valid rows only) of the inputs and the inference outputs."""
    from rstpm_jax.data import input_pipeline  # noqa: PLC0415 (TensorFlow)

    for batch in input_pipeline.eval_dataset(
            root, category, split=split, image_size=int(config.data.image_size),
            global_batch_size=int(config.eval.batch_size), process_index=jax.process_index(),
            process_count=jax.process_count(), seed=int(config.seed),
            holdout_fraction=float(config.data.holdout_fraction)):
        out = infer(teacher_vars, student_vars, sharding.to_global(batch["image"], mesh))
        out = sharding.gather_to_all(out)
        inputs = sharding.gather_to_all(sharding.to_global(batch, mesh))
        keep = inputs["valid"].astype(bool)
        yield (jax.tree.map(lambda x: x[keep], inputs), jax.tree.map(lambda x: x[keep], out))


def compute_thresholds(config, root, category, infer, teacher_vars, student_vars, mesh) -> dict:
    """Thresholds from held-out normal training images only: a high percentile of their
    image scores and of their pixel scores. Normalised scores divide by the image threshold."""
    q = float(config.eval.threshold_percentile)
    image_scores, pixels = [], []
    for _, out in run_split(config, root, category, "holdout", infer, teacher_vars, student_vars, mesh):
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


def evaluate_category(config: ml_collections.ConfigDict, workdir: str, root: str, category: str,
                      model: RSTPM, teacher_vars: Any, student_vars: Any,
                      mesh: jax.sharding.Mesh) -> dict:
    """Metrics, thresholds, results.json and figures for one trained category."""
    from rstpm_jax import metrics, reports  # noqa: PLC0415

    t0 = time.time()
    infer = compiled_infer(model, str(config.maps.fusion), float(config.maps.smoothing_sigma), mesh)
    thresholds = compute_thresholds(config, root, category, infer, teacher_vars, student_vars, mesh)
    acc = metrics.MetricsAccumulator(max_fpr=float(config.eval.pro_max_fpr))
    examples: dict[str, list] = {}
    n = 0
    per_image: list[tuple[str, int, float]] = []  # (file, label, score) -> test_scores.csv
    from rstpm_jax.data import input_pipeline  # noqa: PLC0415
    items = input_pipeline.test_items(root, category)
    for inputs, out in run_split(config, root, category, "test", infer, teacher_vars, student_vars, mesh):
        n += len(inputs["label"])
        if jax.process_index() == 0:
            acc.update(out["map"], inputs["mask"], inputs["label"], out["levels"])
            per_image.extend((items[int(i)].path, int(lbl), float(s))
                             for i, lbl, s in zip(inputs["index"], inputs["label"], out["score"]))
            _keep_examples(examples, items, inputs, out)
    if jax.process_index() != 0:
        return {"num_test_images": n, "thresholds": thresholds}
    result = acc.compute()
    result.update(num_test_images=n, thresholds=thresholds, eval_seconds=time.time() - t0)
    cat_dir = os.path.join(workdir, category)
    os.makedirs(cat_dir, exist_ok=True)
    with open(os.path.join(cat_dir, "thresholds.json"), "w") as f:
        json.dump(thresholds, f, indent=2)
    _write_test_scores(os.path.join(cat_dir, "test_scores.csv"), per_image)
    reports.write_category_results(
        cat_dir, category, {k: v for k, v in result.items() if k not in ("thresholds", "eval_seconds")},
        config.to_dict(), {"model": str(config.name), "thresholds": thresholds,
                           "eval_seconds": result["eval_seconds"]})
    if config.eval.figures:
        _write_figures(cat_dir, examples, result)
    logging.info("%s: image AUROC %.4f, pixel AUROC %.4f, AUPRO %.4f (%d test images)", category,
                 result.get("image_auroc", float("nan")), result.get("pixel_auroc", float("nan")),
                 result.get("aupro", float("nan")), n)
    return result


def _write_test_scores(path: str, rows: list[tuple[str, int, float]]) -> None:
    """Per-image test scores (file, label, score) in test order, for predict's consistency check."""
    import csv  # noqa: PLC0415
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("file", "label", "score"))
        writer.writerows((p, lbl, repr(s)) for p, lbl, s in rows)


def _keep_examples(examples: dict, items: list, inputs: dict, out: dict) -> None:
    for row, index in enumerate(inputs["index"]):
        defect = items[int(index)].defect
        if len(examples.setdefault(defect, [])) < NUM_FIGURE_EXAMPLES:
            examples[defect].append({
                "image": inputs["image"][row], "mask": inputs["mask"][row], "map": out["map"][row],
                "levels": jax.tree.map(lambda x: x[row], out["levels"]),
                "name": os.path.basename(items[int(index)].path)})


def _write_figures(cat_dir: str, examples: dict, result: dict) -> None:
    from rstpm_jax import figures  # noqa: PLC0415

    fig_dir = os.path.join(cat_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    flat = [(d, e) for d, es in sorted(examples.items()) for e in es]
    if not flat:
        return
    figures.example_grid(
        fig_dir,
        figures.denormalize(np.stack([e["image"] for _, e in flat])),
        np.stack([e["mask"] for _, e in flat]), np.stack([e["map"] for _, e in flat]),
        [d for d, _ in flat], [e["name"] for _, e in flat])
    for d, es in sorted(examples.items()):
        e = es[0]
        figures.level_maps_figure(os.path.join(fig_dir, f"levels_{d}.png"),
                                  figures.denormalize(e["image"][None])[0], e["levels"], e["map"])
    if result.get("curves"):
        figures.roc_figure(os.path.join(fig_dir, "roc.png"), figures.metric_curves(result))


def write_summary(config: ml_collections.ConfigDict, workdir: str, results: dict[str, dict]) -> None:
    """Cross-category tables (host 0)."""
    if jax.process_index() != 0 or not results:
        return
    from rstpm_jax import reports  # noqa: PLC0415
    rows = [{"category": c, **r} for c, r in results.items()]
    reports.write_summary(workdir, rows)
