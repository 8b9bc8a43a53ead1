"""Result files and figures: written, readable, laid out with the paper's numbers beside ours."""

import csv
import json
import math

import numpy as np
import pytest

from rstpm_jax import figures, paper_results, reports
from rstpm_jax.metrics import MetricsAccumulator

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(category, seed):
    rng = np.random.default_rng(seed)
    row = {"category": category, "pixel_auroc": float(rng.uniform(0.9, 1)),
           "image_auroc": float(rng.uniform(0.8, 1)), "aupro": float(rng.uniform(0.7, 1)),
           "pixel_metrics_exact": True}
    for lvl in ("layer1", "layer2", "layer3"):
        row[f"per_level/sum/{lvl}/pixel_auroc"] = float(rng.uniform(0.8, 1))
        row[f"per_level/sum/{lvl}/image_auroc"] = float(rng.uniform(0.7, 1))
    return row


@pytest.fixture(scope="module")
def metrics():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), bool)
    masks[2:, 4:9, 4:9] = True
    maps = (rng.random((4, 16, 16)) + masks).astype(np.float32)
    acc = MetricsAccumulator()
    acc.update(maps, masks, [0, 0, 1, 1], {"student1": {"layer1": maps}, "student2": {"layer1": maps}})
    return acc.compute()


def test_paper_results_consistent():
    assert len(paper_results.MVTEC_CATEGORIES) == 15
    for model in ("stpm", "rstpm"):  # Table 1's mean row is the mean of its column (to rounding)
        assert np.mean(list(paper_results.PIXEL_AUROC[model].values())) == pytest.approx(
            paper_results.PIXEL_AUROC_MEAN[model], abs=1.5e-3)
        # Table 3's multi-scale column repeats Tables 1-2's means; Tables 4-5 repeat them too.
        assert paper_results.PER_RESOLUTION["pixel_auroc"][model]["final"] == paper_results.PIXEL_AUROC_MEAN[model]
        assert paper_results.PER_RESOLUTION["image_auroc"][model]["final"] == paper_results.IMAGE_AUROC_MEAN[model]
        assert paper_results.ABLATIONS[model] == {"pixel_auroc": paper_results.PIXEL_AUROC_MEAN[model],
                                                  "image_auroc": paper_results.IMAGE_AUROC_MEAN[model]}
    assert paper_results.PIXEL_AUROC["rstpm"]["transistor"] == 0.881  # "Ours" column
    assert paper_results.sort_categories(["zzz", "bottle", "wood", "carpet"]) == ["carpet", "wood", "bottle", "zzz"]


def test_category_results_json(tmp_path, metrics):
    path = reports.write_category_results(tmp_path / "cable", "cable", metrics,
                                          config={"eval": {"pro_max_fpr": 0.3}, "name": "rstpm"},
                                          extra={"checkpoint_step": np.int64(7), "bad": float("inf")})
    text = path.read_text()
    record = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert record["category"] == "cable" and record["num_test_images"] == 4
    assert record["config"]["eval"]["pro_max_fpr"] == 0.3
    assert record["checkpoint_step"] == 7 and record["bad"] is None
    assert record["metrics"]["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"])
    assert "curves" not in record["metrics"]
    curves = json.loads((tmp_path / "cable" / "curves.json").read_text())
    assert len(curves["pixel_roc"]["fpr"]) == len(curves["pixel_roc"]["tpr"]) > 2
    row = reports.read_category_results(path)
    assert row["category"] == "cable" and row["aupro"] == pytest.approx(metrics["aupro"])
    with pytest.raises(ValueError, match="overwrite"):
        reports.write_category_results(tmp_path / "x", "x", metrics, extra={"metrics": 1})


def test_nan_metric_becomes_null(tmp_path):
    path = reports.write_category_results(tmp_path, "good_only", {"image_auroc": float("nan"),
                                                                  "num_images": 3})
    assert json.loads(path.read_text())["metrics"]["image_auroc"] is None
    assert math.isnan(reports.read_category_results(path)["image_auroc"])


def test_summary_tables(tmp_path):
    cats = list(reversed(paper_results.MVTEC_CATEGORIES))  # order must be restored
    rows = [_row(c, i) for i, c in enumerate(cats)]
    md_path, csv_path = reports.write_summary(tmp_path, rows)
    md = md_path.read_text()
    assert "paper RSTPM" in md and "paper STPM" in md and "**mean (15)**" in md
    assert md.index("| texture | carpet") < md.index("| texture | wood") < md.index("| object | bottle")
    mean_line = next(lvl for lvl in md.splitlines() if "**mean (15)**" in lvl and "Δ" not in lvl)
    cells = [c.strip() for c in mean_line.strip("|").split("|")]
    pix_mean = np.mean([r["pixel_auroc"] for r in rows])
    assert cells[2] == f"{pix_mean:.3f}" and cells[3] == "0.977" and cells[4] == "0.970"
    assert cells[7] == "0.969" and cells[8] == "0.955"  # Table 2 means
    assert "0.935" in md and "0.808" in md  # Table 3 rows
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert [t["category"] for t in table] == list(paper_results.MVTEC_CATEGORIES) + ["mean"]
    assert float(table[-1]["pixel_auroc"]) == pytest.approx(pix_mean)
    assert float(table[0]["paper_rstpm_pixel_auroc"]) == 0.990  # carpet, Table 1
    assert "pixel_metrics_exact" not in table[0]


def test_summary_subset_and_unknown_categories(tmp_path):
    md_path, _ = reports.write_summary(tmp_path / "a", [_row("cable", 1), _row("transistor", 2)])
    md = md_path.read_text()
    mean_line = next(lvl for lvl in md.splitlines() if "**mean (2)**" in lvl)
    # Paper pixel mean over the same two categories; no image mean (the paper has only all 15).
    assert f"{(0.976 + 0.881) / 2:.3f}" in mean_line
    md2 = reports.write_summary(tmp_path / "b", [_row("synthetic_a", 1), _row("bottle", 2)])[0].read_text()
    assert md2.index("bottle") < md2.index("synthetic_a")
    with pytest.raises(ValueError, match="twice"):
        reports.write_summary(tmp_path / "c", [_row("cable", 1), _row("cable", 2)])


def test_ablation_table(tmp_path):
    cats = ["carpet", "cable"]
    rows_by_model = {m: [_row(c, k * 10 + i) for i, c in enumerate(cats)]
                     for k, m in enumerate(("stpm", "rstpm_no_attention", "rstpm"))}
    md_path, csv_path = reports.write_ablation_table(tmp_path, rows_by_model)
    md = md_path.read_text()
    assert "| group | category | stpm | rstpm_no_attention | rstpm |" in md
    assert "0.954" in md and "0.973" in md  # Table 5 "without attention"
    with open(csv_path) as f:
        table = list(csv.DictReader(f))
    assert [t["category"] for t in table] == ["carpet", "cable", "mean", "paper mean (15)"]
    expected = np.mean([r["image_auroc"] for r in rows_by_model["rstpm"]])
    assert float(table[2]["rstpm/image_auroc"]) == pytest.approx(expected)
    assert float(table[3]["stpm/pixel_auroc"]) == 0.970


def _check_png(path):
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_figures(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(5, 32, 32, 3)).astype(np.float32)  # ImageNet-normalised
    masks = np.zeros((5, 32, 32))
    masks[2:, 8:16, 8:16] = 1
    maps = rng.random((5, 32, 32)).astype(np.float32) + masks
    names = ["good", "good", "crack", "crack", "cut"]
    paths = figures.example_grid(tmp_path / "examples", images, masks, maps, names,
                                 titles=[f"img{i}" for i in range(5)])
    assert [p.name for p in paths] == ["examples_good.png", "examples_crack.png", "examples_cut.png"]
    for p in paths:
        _check_png(p)
    lv = {"student1": {lvl: rng.random((32, 32)) for lvl in ("layer1", "layer2", "layer3")},
          "student2": {lvl: rng.random((32, 32)) for lvl in ("layer1", "layer2", "layer3")}}
    _check_png(figures.level_maps_figure(tmp_path / "levels.png", images[2], lv, maps[2], masks[2]))
    _check_png(figures.roc_figure(tmp_path / "roc.png", {"pixel": ([0, 0.2, 1], [0, 0.9, 1], 0.91),
                                                         "image": ([0, 1], [0, 1], float("nan"))}))
    _check_png(figures.attention_figure(tmp_path / "att.png", images[0],
                                        {"student1": {"layer1": lv["student1"]["layer1"]}}))
    single = figures.example_grid(tmp_path / "figs" / "examples.png", images[:3], masks[:3], maps[:3],
                                  names[:3])
    assert [p.name for p in single] == ["examples_good.png", "examples_crack.png"]
    assert single[0].parent == tmp_path / "figs"
    with pytest.raises(ValueError, match="differ in length"):
        figures.example_grid(tmp_path, images, masks, maps, names[:2])


def test_metric_curves_figures(tmp_path, metrics):
    roc = figures.metric_curves(metrics)
    assert set(roc) == {"image", "pixel", "pixel layer1"}
    assert roc["pixel"][2] == metrics["pixel_auroc"]
    _check_png(figures.roc_figure(tmp_path / "roc.png", roc))
    pro = figures.metric_curves(metrics, "pro")
    _check_png(figures.roc_figure(tmp_path / "pro.png", pro, ylabel="PRO",
                                  max_fpr=metrics["aupro_max_fpr"]))


def test_denormalize_inverts_imagenet_normalisation():
    rng = np.random.default_rng(0)
    x = rng.random((2, 4, 4, 3)).astype(np.float32)
    normalised = (x - figures.IMAGENET_MEAN) / figures.IMAGENET_STD
    np.testing.assert_allclose(figures.denormalize(normalised), x, atol=1e-6)
    with pytest.raises(ValueError, match="channels-last"):
        figures.denormalize(np.zeros((3, 4, 4)))


def test_summary_marks_a_failed_category_and_keeps_the_others(tmp_path):
    """Issue 18: a failure in one category must not throw the others' results away."""
    from rstpm_jax import artifacts

    rows = {"carpet": {k: v for k, v in _row("carpet", 1).items() if k != "category"},
            "cable": artifacts.failed(ValueError("Corrupt or truncated image file /d/cable/test/good/003.png")),
            "wood": {k: v for k, v in _row("wood", 2).items() if k != "category"}}
    artifacts.write_summary(str(tmp_path), rows)
    md = (tmp_path / "results.md").read_text()
    cable = next(line for line in md.splitlines() if line.startswith("| object | cable"))
    assert cable.count("**FAILED**") == 2 and "0.976" in cable  # the paper's value is still shown
    assert "**cable FAILED** (no results; left out of the means): ValueError: Corrupt or truncated" in md
    assert "**mean (2 of 3)**" in md
    mean_line = next(line for line in md.splitlines() if "**mean (2 of 3)**" in line and "Δ" not in line)
    ours = np.mean([rows["carpet"]["pixel_auroc"], rows["wood"]["pixel_auroc"]])
    cells = [c.strip() for c in mean_line.strip("|").split("|")]
    assert cells[2] == f"{ours:.3f}"
    assert cells[3] == f"{(0.990 + 0.964) / 2:.3f}"  # the paper's mean over the same two categories
    with open(tmp_path / "results.csv") as f:
        table = {t["category"]: t for t in csv.DictReader(f)}
    assert table["cable"]["status"] == "failed" and "003.png" in table["cable"]["error"]
    assert table["cable"]["pixel_auroc"] == "" and table["carpet"]["status"] == "ok"
    assert float(table["mean"]["pixel_auroc"]) == pytest.approx(ours)
    assert table["mean"]["error"] == "1 failed"


def test_per_resolution_table_has_a_row_per_student(tmp_path):
    rows = [_row("fabric", 1), _row("mesh", 2)]
    for r, (a, b) in zip(rows, ((0.91, 0.31), (0.92, 0.32))):
        for lvl in ("layer1", "layer2", "layer3"):
            r[f"per_level/student1/{lvl}/pixel_auroc"], r[f"per_level/student2/{lvl}/pixel_auroc"] = a, b
            r[f"per_level/student1/{lvl}/image_auroc"], r[f"per_level/student2/{lvl}/image_auroc"] = a, b
    md = reports.write_summary(tmp_path, rows)[0].read_text()
    table3 = md[md.index("paper Table 3"):].splitlines()
    s2 = [line for line in table3 if "↳ student2" in line]
    assert len(s2) == 3 and len([line for line in table3 if "↳ student1" in line]) == 3  # 2 categories + mean
    assert s2[0].count("0.310") == 6 and "0.315" in s2[-1]  # per level pixel and image; the mean
    assert table3.index(next(line for line in table3 if "| fabric |" in line)) + 1 == table3.index(
        next(line for line in table3 if "↳ student1" in line))
    assert "↳" not in reports.write_summary(tmp_path / "sum_only", [_row("fabric", 1)])[0].read_text()


def test_attention_grid_a_row_per_image(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    att = [{s: {lvl: rng.random((32 // f, 32 // f)) for lvl, f in (("layer1", 4), ("layer2", 8), ("layer3", 16))}
            for s in ("student1", "student2")} for _ in range(3)]
    masks = np.zeros((3, 32, 32))
    masks[1, 4:12, 4:12] = 1
    _check_png(figures.attention_grid(tmp_path / "att.png", images, att, masks, ["a", "b", "c"]))
    with pytest.raises(ValueError, match="attention_grid"):
        figures.attention_grid(tmp_path / "bad.png", images, att[:2])
