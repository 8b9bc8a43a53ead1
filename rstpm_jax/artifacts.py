"""What an evaluation leaves in the workdir: per category ``thresholds.json``,
``test_scores.csv``, ``results.json`` and figures; across categories the summary tables.

Host 0 writes; every file is written whole (temporary file, then renamed).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from rstpm_jax import metrics, reports
from rstpm_jax.evaluate import Evaluation


def row(evaluation: Evaluation) -> dict[str, Any]:
    """The category's flat result (metrics, test-image count, thresholds, seconds, and the
    comparison with the float32 evaluation as ``vs_float32/<key>``)."""
    vs = evaluation.deployment.get(reports.VS_FLOAT32) or {}
    return {**evaluation.metrics, "num_test_images": evaluation.num_test_images,
            "thresholds": evaluation.thresholds, "eval_seconds": evaluation.seconds,
            **{f"{reports.VS_FLOAT32}/{k}": v for k, v in vs.items()}}


def compare_with_float32(workdir: str, evaluation: Evaluation) -> dict[str, float] | None:
    """An evaluation through another backend or precision against the float32 (jax) one of
    the same workdir (``WORKDIR/<category>/test_scores.csv`` and ``results.json``): the change
    of image and pixel AUROC and ``metrics.score_agreement`` (swapped normal/defect pairs, the
    AUROC of one pair, the largest relative score change). None where that evaluation is not
    there (host 0 only: the others hold no scores); a warning where it scored other images."""
    cat_dir = os.path.join(workdir, evaluation.category)
    paths = [os.path.join(cat_dir, f) for f in ("test_scores.csv", "results.json")]
    if not evaluation.scores or not all(os.path.isfile(p) for p in paths):
        return None
    with open(paths[0], newline="") as f:
        reference = {r["file"]: float(r["score"]) for r in csv.DictReader(f)}
    files = [p for p, _, _ in evaluation.scores]
    if sorted(files) != sorted(reference):
        logging.warning("%s scored other test images than this evaluation (%d against %d): no comparison "
                        "with float32; evaluate float32 again (eval.backend=jax, eval.precision=f32).",
                        paths[0], len(reference), len(files))
        return None
    f32 = reports.read_category_results(paths[1])
    out = {k: float(evaluation.metrics.get(k, float("nan"))) - float(f32.get(k, float("nan")))
           for k in ("image_auroc", "pixel_auroc")}
    return {**out, **metrics.score_agreement(np.array([lbl for _, lbl, _ in evaluation.scores]),
                                             np.array([reference[p] for p in files]),
                                             np.array([s for _, _, s in evaluation.scores]))}


def eval_subdir(config: ml_collections.ConfigDict) -> str:
    """Where an evaluation through ``eval.backend``/``eval.precision`` writes, below the
    category (and the summary below the workdir): ``""`` for jax/f32, else
    ``eval_<backend>_<precision>`` (the float32 thresholds and results stay as they are)."""
    backend, precision = str(config.eval.get("backend", "jax")), str(config.eval.get("precision", "f32"))
    return "" if (backend, precision) == ("jax", "f32") else f"eval_{backend}_{precision}"


def category_dir(workdir: str, category: str, config: ml_collections.ConfigDict) -> str:
    """``WORKDIR/<category>[/eval_<backend>_<precision>]``: where its evaluation is written."""
    return os.path.join(workdir, category, eval_subdir(config))


def write_category(workdir: str, evaluation: Evaluation, config: ml_collections.ConfigDict) -> None:
    """``WORKDIR/<category>/`` (or its ``eval_<backend>_<precision>/``): thresholds.json,
    test_scores.csv, results.json and figures."""
    if jax.process_index() != 0:
        return
    cat_dir = category_dir(workdir, evaluation.category, config)
    os.makedirs(cat_dir, exist_ok=True)
    _atomic_write(os.path.join(cat_dir, "thresholds.json"),
                  lambda f: json.dump(evaluation.thresholds, f, indent=2))
    _atomic_write(os.path.join(cat_dir, "test_scores.csv"),
                  lambda f: _write_scores(f, evaluation.scores), newline="")
    metrics = {**evaluation.metrics, "num_test_images": evaluation.num_test_images}
    reports.write_category_results(cat_dir, evaluation.category, metrics, config.to_dict(),
                                   {"model": str(config.name), "thresholds": evaluation.thresholds,
                                    "eval_seconds": evaluation.seconds, "selection": evaluation.selection,
                                    "deployment": evaluation.deployment})
    if config.eval.figures:
        write_figures(os.path.join(cat_dir, "figures"), evaluation)


def write_failure(directory: str, category: str, error: str, config: ml_collections.ConfigDict) -> None:
    """``results.json`` of a job that failed: its status and the error (host 0)."""
    if jax.process_index() != 0:
        return
    reports.write_category_results(directory, category, {}, config.to_dict(),
                                   {"status": reports.FAILED, "error": error, "model": str(config.name)})


def failed(error: BaseException | str) -> dict[str, Any]:
    """The row of a job that raised or reported ``error`` (``rows[name] = failed(e)``): the
    summary marks it failed, with the error, and leaves it out of the means."""
    row = reports.failed_row("", error)
    del row["category"]
    return row


def write_summary(workdir: str, rows: Mapping[str, Mapping[str, Any]],
                  config: ml_collections.ConfigDict | None = None) -> None:
    """``WORKDIR/results.md`` and ``results.csv`` across jobs (host 0; below
    ``eval_<backend>_<precision>/`` for an evaluation through an artifact); a row from
    :func:`failed` is shown as failed."""
    if jax.process_index() != 0 or not rows:
        return
    if config is not None and eval_subdir(config):
        workdir = os.path.join(workdir, eval_subdir(config))
        os.makedirs(workdir, exist_ok=True)
    reports.write_summary(workdir, [{"category": c, **r} for c, r in rows.items()])


def _atomic_write(path: str, write, newline: str | None = None) -> None:
    with open(path + ".tmp", "w", newline=newline) as f:
        write(f)
    os.replace(path + ".tmp", path)


def _write_scores(f, rows: list[tuple[str, int, float]]) -> None:
    """Per-image test scores (file, label, score) in test order, for predict's consistency check."""
    writer = csv.writer(f)
    writer.writerow(("file", "label", "score"))
    writer.writerows((p, lbl, repr(s)) for p, lbl, s in rows)


def write_figures(fig_dir: str, evaluation: Evaluation) -> None:
    """Example grids per defect type, per-level maps, attention maps (models with gates; paper
    Fig. 5) and the ROC curves."""
    from rstpm_jax import figures  # noqa: PLC0415 (matplotlib)

    flat = [(d, e) for d, es in sorted(evaluation.examples.items()) for e in es]
    if not flat:
        return
    os.makedirs(fig_dir, exist_ok=True)
    figures.example_grid(
        fig_dir,
        figures.denormalize(np.stack([e["image"] for _, e in flat])),
        np.stack([e["mask"] for _, e in flat]), np.stack([e["map"] for _, e in flat]),
        [d for d, _ in flat], [e["name"] for _, e in flat])
    for d, es in sorted(evaluation.examples.items()):
        e = es[0]
        image = figures.denormalize(e["image"][None])[0]
        if e["levels"]:  # not from an exported artifact (map and score only)
            figures.level_maps_figure(os.path.join(fig_dir, f"levels_{d}.png"), image, e["levels"], e["map"],
                                      e["mask"])
        with_attention = [x for x in es if x["attention"]]
        if with_attention:  # paper Fig. 5: every kept example of the defect type, a row each
            figures.attention_grid(os.path.join(fig_dir, f"attention_{d}.png"),
                                   np.stack([x["image"] for x in with_attention]),
                                   [x["attention"] for x in with_attention],
                                   np.stack([x["mask"] for x in with_attention]),
                                   [x["name"] for x in with_attention])
    if evaluation.metrics.get("curves"):
        figures.roc_figure(os.path.join(fig_dir, "roc.png"), figures.metric_curves(evaluation.metrics))
