"""Result files: per-category results.json, the summary tables (results.md/.csv) and the
ablation table (ablation.md/.csv), with the paper's numbers beside ours.

A *row* is one category's flat metrics dict (as ``MetricsAccumulator.compute()`` returns it,
or as :func:`read_category_results` reads it back) with a ``"category"`` key; a category that
failed is ``{"category": c, "status": "failed", "error": "..."}`` (:func:`failed_row`): the
summary shows it as failed and leaves it out of the means.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rstpm_jax import paper_results as paper
from rstpm_jax.levels import COMPARED as LEVELS
from rstpm_jax.levels import FRACTIONS, SUM

MISSING = "–"


def to_jsonable(obj: Any) -> Any:
    """Nested dicts/lists/numpy/ConfigDict -> plain JSON types; NaN and inf -> None."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


HEADLINE = ("image_auroc", "pixel_auroc", "aupro")  # also at the top level of results.json


def write_category_results(out_dir: str | os.PathLike, category: str, metrics: Mapping[str, Any],
                           config: Any = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write OUT_DIR/results.json (metrics, num_test_images, config, ``extra``'s keys) and,
    when ``metrics`` has ``"curves"``, OUT_DIR/curves.json. Returns the results.json path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = dict(metrics)
    curves = metrics.pop("curves", None)
    record: dict[str, Any] = {
        "category": category,
        "num_test_images": metrics.get("num_images"),
        **{k: metrics.get(k) for k in HEADLINE},
        "metrics": metrics,
        "config": config,
    }
    for key, value in (extra or {}).items():
        if key in record:
            raise ValueError(f"extra key {key!r} would overwrite results.json's own {key!r}.")
        record[key] = value
    path = out / "results.json"
    _write_json(path, record)
    if curves is not None:
        _write_json(out / "curves.json", curves)
    return path


def read_category_results(path: str | os.PathLike) -> dict[str, Any]:
    """A row for :func:`write_summary` from a results.json (null metrics read back as NaN)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"Cannot read results file {path}: {e}") from e
    if "category" not in record or "metrics" not in record:
        raise ValueError(f"{path} is not a results.json from write_category_results "
                         "(needs 'category' and 'metrics').")
    row = {k: (float("nan") if v is None else v) for k, v in record["metrics"].items()}
    row["category"] = record["category"]
    return row


FAILED = "failed"
# Row keys ``vs_float32/<key>``: an evaluation through an artifact against the float32 one.
VS_FLOAT32 = "vs_float32"


def failed_row(category: str, error: BaseException | str) -> dict[str, Any]:
    """The summary row of a category whose training or evaluation raised ``error``."""
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    return {"category": category, "status": FAILED, "error": text}


def is_failed(row: Mapping[str, Any]) -> bool:
    return row.get("status") == FAILED


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ----------------------------------------------------------------------------- helpers

def _value(row: Mapping[str, Any], key: str) -> float:
    v = row.get(key)
    if v is None or isinstance(v, (bool, str)) or not isinstance(v, (int, float, np.number)):
        return float("nan")
    return float(v)


def _fmt(v: float | None, digits: int = 3, signed: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return MISSING
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _mean(values: Iterable[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _check_rows(rows: Sequence[Mapping[str, Any]], where: str) -> list[Mapping[str, Any]]:
    seen = set()
    for i, row in enumerate(rows):
        if "category" not in row:
            raise ValueError(f"{where}: row {i} has no 'category' key.")
        if row["category"] in seen:
            raise ValueError(f"{where}: category {row['category']!r} appears twice.")
        seen.add(row["category"])
    order = paper.sort_categories(seen)
    by_cat = {r["category"]: r for r in rows}
    return [by_cat[c] for c in order]


def _paper_pixel_mean(categories: Sequence[str], model: str) -> float | None:
    """The paper's mean pixel AUROC over these categories (published mean for all 15)."""
    if not categories or any(c not in paper.MVTEC_CATEGORIES for c in categories):
        return None
    if set(categories) == set(paper.MVTEC_CATEGORIES):
        return paper.PIXEL_AUROC_MEAN[model]
    return float(np.mean([paper.PIXEL_AUROC[model][c] for c in categories]))


def _paper_image_mean(categories: Sequence[str], model: str) -> float | None:
    return paper.IMAGE_AUROC_MEAN[model] if set(categories) == set(paper.MVTEC_CATEGORIES) else None


def _md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return lines


def _write_csv(path: Path, header: Sequence[str], body: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for r in body:
            writer.writerow(["" if (isinstance(v, float) and not math.isfinite(v)) or v is None else v
                             for v in r])


# ----------------------------------------------------------------------------- summary

def write_summary(workdir: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                  title: str = "Results") -> tuple[Path, Path]:
    """WORKDIR/results.md and results.csv: per-category rows (textures, objects, others) and
    their mean, laid out like the paper's Tables 1-3 with its numbers beside ours."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = _check_rows(rows, "write_summary")
    failed = [r for r in rows if is_failed(r)]
    ok_rows = [r for r in rows if not is_failed(r)]
    cats = [r["category"] for r in ok_rows]  # the means (ours and the paper's) cover these
    mean = {k: _mean(_value(r, k) for r in ok_rows)
            for k in sorted({k for r in rows for k in r if k not in ("category", "status", "error")})}
    mean_label = f"**mean ({len(ok_rows)})**" if not failed else f"**mean ({len(ok_rows)} of {len(rows)})**"
    notes = []

    # Tables 1-2: pixel AUROC, image AUROC (paper: mean only), AUPRO (not in the paper).
    header = ["group", "category", "pixel AUROC", "paper RSTPM", "paper STPM", "Δ vs RSTPM",
              "image AUROC", "paper RSTPM", "paper STPM", "AUPRO"]
    body = []
    for r in rows:
        c = r["category"]
        pr, ps = paper.PIXEL_AUROC["rstpm"].get(c), paper.PIXEL_AUROC["stpm"].get(c)
        if is_failed(r):
            body.append([paper.category_group(c), c, "**FAILED**", _fmt(pr), _fmt(ps), MISSING,
                         "**FAILED**", MISSING, MISSING, MISSING])
            continue
        pix = _value(r, "pixel_auroc")
        body.append([paper.category_group(c), c, _fmt(pix), _fmt(pr), _fmt(ps),
                     _fmt(pix - pr if pr is not None else None, signed=True),
                     _fmt(_value(r, "image_auroc")), MISSING, MISSING, _fmt(_value(r, "aupro"))])
    pr_m, ps_m = _paper_pixel_mean(cats, "rstpm"), _paper_pixel_mean(cats, "stpm")
    ir_m, is_m = _paper_image_mean(cats, "rstpm"), _paper_image_mean(cats, "stpm")
    pix_m = mean.get("pixel_auroc", float("nan"))
    body.append(["", mean_label, _fmt(pix_m), _fmt(pr_m), _fmt(ps_m),
                 _fmt(pix_m - pr_m if pr_m is not None else None, signed=True),
                 _fmt(mean.get("image_auroc")), _fmt(ir_m), _fmt(is_m), _fmt(mean.get("aupro"))])
    for r in failed:
        notes.append(f"**{r['category']} FAILED** (no results; left out of the means): "
                     f"{_one_line(r.get('error', 'unknown error'))}")
    if pr_m is not None and set(cats) != set(paper.MVTEC_CATEGORIES):
        notes.append("Paper pixel-AUROC means are over the same categories as ours; the paper's "
                     "image AUROC exists only as the mean over all 15 MVTec AD categories.")
    elif pr_m is None:
        notes.append("Paper means are shown only when every category is an MVTec AD one.")
    notes.append("Pixel and image AUROC: paper Tables 1-2 (\"Ours\" = RSTPM). "
                 "AUPRO up to FPR 0.3, normalised (not reported in the paper).")
    bound_keys = ("pixel_auroc_error_bound", "aupro_error_bound")
    worst = max((_value(r, k) for r in rows for k in bound_keys), default=float("nan"),
                key=lambda v: v if math.isfinite(v) else -1.0)
    if math.isfinite(worst) and worst > 0:
        notes.append(f"Pixel metrics were binned to stay in bounded memory; the largest "
                     f"binning error bound is {worst:.1e}.")

    # Table 3: per resolution, from the same-resolution fused maps ("sum" of the students).
    lvl_header = (["group", "category"] + [f"pixel {FRACTIONS[lvl]}" for lvl in LEVELS]
                  + ["pixel multi"] + [f"image {FRACTIONS[lvl]}" for lvl in LEVELS] + ["image multi"])
    lvl_keys = ([f"per_level/sum/{lvl}/pixel_auroc" for lvl in LEVELS] + ["pixel_auroc"]
                + [f"per_level/sum/{lvl}/image_auroc" for lvl in LEVELS] + ["image_auroc"])
    has_levels = any(k in r for r in rows for k in lvl_keys[:3])
    # Each student's own maps below the sum (which of the six maps carry the signal).
    students = sorted({k.split("/")[1] for r in rows for k in r
                       if k.startswith("per_level/") and k.count("/") == 3 and k.split("/")[1] != SUM})

    def student_keys(student: str) -> list[str]:
        return [k.replace(f"/{SUM}/", f"/{student}/") if k.startswith("per_level/") else "" for k in lvl_keys]

    lvl_body = []
    for r in rows:
        lvl_body.append([paper.category_group(r["category"]), r["category"]]
                        + (["**FAILED**"] * len(lvl_keys) if is_failed(r) else [_fmt(_value(r, k)) for k in lvl_keys]))
        if not is_failed(r):
            lvl_body += [["", f"↳ {s}"] + [_fmt(_value(r, k)) if k else MISSING for k in student_keys(s)]
                         for s in students if any(k in r for k in student_keys(s) if k)]
    lvl_body.append(["", mean_label] + [_fmt(mean.get(k)) for k in lvl_keys])
    lvl_body += [["", f"↳ {s}"] + [_fmt(mean.get(k)) if k else MISSING for k in student_keys(s)]
                 for s in students]
    for model, name in (("rstpm", "paper RSTPM (mean of 15)"), ("stpm", "paper STPM (mean of 15)")):
        vals = [paper.PER_RESOLUTION[m][model][lvl] for m in ("pixel_auroc", "image_auroc")
                for lvl in (*LEVELS, "final")]
        lvl_body.append(["", name] + [_fmt(v) for v in vals])

    md = [f"# {title}", ""]
    md += ["## Pixel AUROC, image AUROC, AUPRO (paper Tables 1-2)", ""] + _md_table(header, body) + [""]
    md += [f"- {n}" for n in notes] + [""]
    md += _vs_float32_section([r for r in ok_rows if f"{VS_FLOAT32}/pairs" in r])
    md += ["## AUROC at each resolution (paper Table 3)", ""]
    if has_levels:
        md += ["Each resolution's map is the students' maps at that resolution added; "
               "\"multi\" is the final (fused) map." + (" The \"↳\" rows below a category (and below the "
                                                         "mean) are each student's own maps." if students else ""),
               ""]
        md += _md_table(lvl_header, lvl_body) + [""]
    else:
        md += ["No per-level metrics in these results.", ""]
    md_path = workdir / "results.md"
    md_path.write_text("\n".join(md))

    metric_keys = [k for k in mean if any(isinstance(r.get(k), (int, float, np.number))
                                           and not isinstance(r.get(k), bool) for r in rows)]
    paper_cols = ["paper_rstpm_pixel_auroc", "paper_stpm_pixel_auroc",
                  "paper_rstpm_image_auroc", "paper_stpm_image_auroc"]
    csv_body = []
    for r in rows:
        c = r["category"]
        status = [FAILED, _one_line(r.get("error", ""), 2000)] if is_failed(r) else ["ok", ""]
        csv_body.append([paper.category_group(c), c] + [_value(r, k) for k in metric_keys]
                        + [paper.PIXEL_AUROC["rstpm"].get(c), paper.PIXEL_AUROC["stpm"].get(c), None, None]
                        + status)
    csv_body.append(["", "mean"] + [mean[k] for k in metric_keys] + [pr_m, ps_m, ir_m, is_m]
                    + ["", f"{len(failed)} failed" if failed else ""])
    csv_path = workdir / "results.csv"
    _write_csv(csv_path, ["group", "category"] + metric_keys + paper_cols + ["status", "error"], csv_body)
    return md_path, csv_path


def _vs_float32_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """results.md's lines comparing an evaluation through an artifact with the float32 one
    (none without such rows)."""
    if not rows:
        return []

    def v(r: Mapping[str, Any], k: str) -> float:
        return _value(r, f"{VS_FLOAT32}/{k}")

    body = [[r["category"], _fmt(v(r, "image_auroc"), signed=True),
             f"{v(r, 'swapped_pairs'):g} of {v(r, 'pairs'):g}", _fmt(v(r, "auroc_step")),
             _fmt(v(r, "pixel_auroc"), 4, signed=True), f"{v(r, 'max_rel_score_change'):.2%}",
             f"{v(r, 'closest_pair_gap'):.2%}"] for r in rows]
    return (["## Against the float32 evaluation", "",
             "The float32 (jax) evaluation of the same workdir (its test_scores.csv and results.json). A "
             "swapped pair is a normal and a defect test image that the two models order differently; "
             "one pair moves image AUROC by 1 / pairs. A score change larger than float32's closest "
             "normal/defect gap (relative) can swap a pair.", ""]
            + _md_table(["category", "image AUROC Δ", "normal/defect pairs swapped", "one pair",
                         "pixel AUROC Δ", "largest score change", "float32's closest pair gap"], body) + [""])


# ----------------------------------------------------------------------------- ablations

def write_ablation_table(workdir: str | os.PathLike,
                         rows_by_model: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[Path, Path]:
    """WORKDIR/ablation.md and ablation.csv: models as columns, pixel and image AUROC per
    category and their mean, with the paper's Tables 4-5 means for the models it reports
    (keyed by config name: stpm, rstpm, rstpm_r18_r18, rstpm_r50_r50, rstpm_no_attention)."""
    if not rows_by_model:
        raise ValueError("write_ablation_table: no models given.")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    models = list(rows_by_model)
    tables = {m: {r["category"]: r for r in _check_rows(rows, f"write_ablation_table[{m!r}]")}
              for m, rows in rows_by_model.items()}
    cats = paper.sort_categories({c for t in tables.values() for c in t})
    same_cats = len({frozenset(t) for t in tables.values()}) == 1

    md = ["# Ablations (paper Tables 4-5)", ""]
    csv_header = ["group", "category"] + [f"{m}/{k}" for m in models for k in ("pixel_auroc", "image_auroc")]
    csv_rows: list[list[Any]] = [[paper.category_group(c), c] + [
        _value(tables[m][c], k) if c in tables[m] else None for m in models
        for k in ("pixel_auroc", "image_auroc")] for c in cats]
    means = {(m, k): _mean(_value(r, k) for r in tables[m].values())
             for m in models for k in ("pixel_auroc", "image_auroc")}
    csv_rows.append(["", "mean"] + [means[(m, k)] for m in models for k in ("pixel_auroc", "image_auroc")])
    csv_rows.append(["", "paper mean (15)"] + [paper.ABLATIONS.get(m, {}).get(k) for m in models
                                               for k in ("pixel_auroc", "image_auroc")])
    for key, name in (("pixel_auroc", "Pixel AUROC"), ("image_auroc", "Image AUROC")):
        body = [[paper.category_group(c), c] + [_fmt(_value(tables[m][c], key)) if c in tables[m] else MISSING
                                                for m in models] for c in cats]
        body.append(["", "**mean**"] + [f"{_fmt(means[(m, key)])} ({len(tables[m])})" for m in models])
        body.append(["", "paper mean (15)"] + [_fmt(paper.ABLATIONS.get(m, {}).get(key)) for m in models])
        md += [f"## {name}", ""] + _md_table(["group", "category"] + models, body) + [""]
    md.append("- Mean rows give the number of categories in parentheses.")
    if not same_cats:
        md.append("- The models cover different categories: their means are not directly comparable.")
    md.append("- Paper means: Table 4 (ResNet18 = rstpm_r18_r18, ResNet50 = rstpm_r50_r50) and "
              "Table 5 (rstpm_no_attention); \"Ours\" = rstpm.")
    md_path = workdir / "ablation.md"
    md_path.write_text("\n".join(md) + "\n")
    csv_path = workdir / "ablation.csv"
    _write_csv(csv_path, csv_header, csv_rows)
    return md_path, csv_path
