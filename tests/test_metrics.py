"""Metrics against independent references: sklearn for AUROC, a direct loop for AUPRO."""

import tracemalloc
import warnings

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from rstpm_jax.metrics import MetricsAccumulator, ScoreHistogram, monotone_keys, score_agreement, trapezoid


def _rect_masks(shape, regions):
    """(B, H, W) bool masks and the explicit region list [(image, y0, y1, x0, x1), ...]."""
    masks = np.zeros(shape, bool)
    for i, y0, y1, x0, x1 in regions:
        masks[i, y0:y1, x0:x1] = True
    return masks


def reference_aupro(maps, regions, masks, max_fpr=0.3):
    """Loop over every distinct score as threshold; PRO = mean over the given regions of the
    fraction of region pixels >= t; FPR over normal pixels; area up to max_fpr / max_fpr."""
    normal = maps[~masks]
    region_scores = [maps[i, y0:y1, x0:x1].ravel() for i, y0, y1, x0, x1 in regions]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(r >= t) for r in region_scores]))
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x1 <= max_fpr:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            if x0 < max_fpr:
                y_at = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
                area += 0.5 * (y0 + y_at) * (max_fpr - x0)
            break
    return area / max_fpr


REGIONS = [(0, 2, 6, 3, 9), (0, 12, 20, 12, 15), (1, 0, 3, 0, 24), (2, 5, 15, 5, 15),
           (2, 18, 21, 2, 4), (4, 8, 9, 8, 20)]  # separated by >= 1 pixel: 6 regions
SHAPE = (6, 24, 24)


@pytest.fixture(scope="module")
def case():
    rng = np.random.default_rng(0)
    masks = _rect_masks(SHAPE, REGIONS)
    # Quantised scores: many ties, which the exact curve must treat as one threshold.
    maps = np.round(rng.random(SHAPE) * 50 + masks * rng.random(SHAPE) * 30).astype(np.float32) / 10
    labels = masks.any(axis=(1, 2)).astype(int)
    return maps, masks, labels


def _run(maps, masks, labels, batch, level_maps=None, **kw):
    acc = MetricsAccumulator(**kw)
    for i in range(0, len(maps), batch):
        lm = None if level_maps is None else {s: {lvl: m[i:i + batch] for lvl, m in lv.items()}
                                               for s, lv in level_maps.items()}
        acc.update(maps[i:i + batch], masks[i:i + batch], labels[i:i + batch], lm)
    return acc.compute()


def test_auroc_equals_sklearn(case):
    maps, masks, labels = case
    r = _run(maps, masks, labels, batch=4)
    assert r["pixel_metrics_exact"] and r["pixel_auroc_error_bound"] == 0.0
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert r["image_auroc"] == pytest.approx(roc_auc_score(labels, maps.max(axis=(1, 2))), abs=1e-12)
    assert r["num_regions"] == len(REGIONS)
    for seed in range(3):  # continuous random scores, random masks
        rng = np.random.default_rng(seed + 10)
        m = rng.random((5, 16, 16)).astype(np.float32)
        lab = np.array([0, 1, 1, 0, 1])
        gt = (rng.random((5, 16, 16)) < 0.2) & (lab[:, None, None] == 1)
        out = _run(m, gt, lab, batch=2)
        assert out["pixel_auroc"] == pytest.approx(roc_auc_score(gt.ravel(), m.ravel()), abs=1e-12)
        assert out["image_auroc"] == pytest.approx(roc_auc_score(lab, m.max(axis=(1, 2))), abs=1e-12)


def test_aupro_equals_reference(case):
    maps, masks, labels = case
    r = _run(maps, masks, labels, batch=4)
    assert r["aupro"] == pytest.approx(reference_aupro(maps, REGIONS, masks), abs=1e-9)
    r2 = _run(maps, masks, labels, batch=4, max_fpr=0.05)
    assert r2["aupro"] == pytest.approx(reference_aupro(maps, REGIONS, masks, max_fpr=0.05), abs=1e-9)
    rng = np.random.default_rng(3)
    cont = (rng.random(SHAPE) + masks * 0.3).astype(np.float32)  # no ties
    assert _run(cont, masks, labels, batch=6)["aupro"] == pytest.approx(
        reference_aupro(cont, REGIONS, masks), abs=1e-9)


def test_aupro_perfect_and_inverted(case):
    _, masks, labels = case
    perfect = masks.astype(np.float32) + 0.01 * np.random.default_rng(1).random(SHAPE).astype(np.float32)
    assert _run(perfect, masks, labels, batch=3)["aupro"] == pytest.approx(1.0)
    inverted = _run(-perfect, masks, labels, batch=3)
    assert inverted["aupro"] < 0.01 and inverted["pixel_auroc"] < 0.01


def test_regions_are_8_connected():
    masks = np.zeros((1, 10, 10), bool)
    masks[0, 1:3, 1:3] = True
    masks[0, 3:5, 3:5] = True  # touches the first square at one corner: one region
    masks[0, 7:9, 7:9] = True
    maps = np.random.default_rng(0).random((1, 10, 10)).astype(np.float32)
    maps = np.concatenate([maps, maps])
    masks = np.concatenate([masks, np.zeros_like(masks)])
    assert _run(maps, masks, np.array([1, 0]), batch=2)["num_regions"] == 2


def test_streaming_equals_single_call(case):
    maps, masks, labels = case
    levels = {"student1": {"layer1": maps * 0.5, "layer2": maps ** 2},
              "student2": {"layer1": maps + 1, "layer2": np.sqrt(maps)}}
    one = _run(maps, masks, labels, batch=len(maps), level_maps=levels)
    many = _run(maps, masks, labels, batch=1, level_maps=levels)
    for k, v in one.items():
        if k != "curves":
            assert many[k] == pytest.approx(v, abs=1e-12, nan_ok=True), k
    # Binned: identical histograms whatever the batching.
    b_one = _run(maps, masks, labels, batch=len(maps), exact_max_pixels=0, mantissa_bits=4)
    b_many = _run(maps, masks, labels, batch=2, exact_max_pixels=0, mantissa_bits=4)
    assert not b_one["pixel_metrics_exact"]
    for k in ("pixel_auroc", "aupro", "pixel_auroc_error_bound", "aupro_error_bound"):
        assert b_many[k] == pytest.approx(b_one[k], abs=1e-12), k


def test_binned_within_reported_bound():
    rng = np.random.default_rng(5)
    shape = (12, 32, 32)
    regions = [(i, 4 + i, 12 + i, 5, 15) for i in range(6, 12)] + [(7, 20, 30, 20, 28)]
    masks = _rect_masks(shape, regions)
    maps = np.exp(rng.normal(size=shape) + masks * 1.5).astype(np.float32)  # heavy tail
    labels = masks.any(axis=(1, 2)).astype(int)
    exact = _run(maps, masks, labels, batch=4)
    for kw in (dict(mantissa_bits=13), dict(mantissa_bits=3), dict(mantissa_bits=13, max_bins=64)):
        # The switch happens mid-stream (after 4096 pixels), then bins (and coarsens for max_bins).
        b = _run(maps, masks, labels, batch=4, exact_max_pixels=4096, **kw)
        assert not b["pixel_metrics_exact"]
        assert abs(b["pixel_auroc"] - exact["pixel_auroc"]) <= b["pixel_auroc_error_bound"] + 1e-12
        assert abs(b["aupro"] - exact["aupro"]) <= b["aupro_error_bound"] + 1e-12
        assert b["image_auroc"] == exact["image_auroc"]  # image scores are never binned
    fine = _run(maps, masks, labels, batch=4, exact_max_pixels=4096)
    assert fine["pixel_auroc_error_bound"] < 1e-3 and fine["aupro_error_bound"] < 1e-3
    coarse = _run(maps, masks, labels, batch=4, exact_max_pixels=4096, mantissa_bits=13, max_bins=64)
    assert coarse["pixel_auroc_error_bound"] > fine["pixel_auroc_error_bound"]


def test_histogram_coarsening_keeps_counts():
    rng = np.random.default_rng(2)
    h = ScoreHistogram(exact_max_pixels=0, mantissa_bits=10, max_bins=32, with_weights=True)
    total_w = 0.0
    for scale in (1e-3, 1.0, 1e3, -5.0):  # the range keeps growing: forces coarsening
        s = (rng.random(500) * scale).astype(np.float32)
        lab = rng.random(500) < 0.3
        w = rng.random(int(lab.sum()))
        total_w += w.sum()
        h.update(monotone_keys(s), lab, w)
    neg, pos, w = h.counts()
    assert neg.sum() + pos.sum() == 2000 and len(neg) <= 32
    assert w.sum() == pytest.approx(total_w)


def test_monotone_keys_order():
    x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-40, 2.0, 2.0000002, np.inf], np.float32)
    k = monotone_keys(x)
    assert np.all(np.diff(k.astype(np.int64)) >= 0)
    assert k[3] == k[4]  # -0.0 == +0.0


def test_trapezoid_interpolates_at_x_max():
    x, y = np.array([0.0, 0.2, 0.4]), np.array([0.0, 0.5, 1.0])
    assert trapezoid(x, y, x_max=0.3) == pytest.approx(0.5 * 0.2 * 0.5 + 0.5 * (0.5 + 0.75) * 0.1)
    assert trapezoid(x, y) == pytest.approx(0.2)


def test_per_level_sum_consistent(case):
    maps, masks, labels = case
    rng = np.random.default_rng(7)
    s1 = {lvl: rng.random(SHAPE).astype(np.float32) + masks * k for k, lvl in enumerate(("layer1", "layer2"))}
    s2 = {lvl: rng.random(SHAPE).astype(np.float32) for lvl in ("layer1", "layer2")}
    r = _run(maps, masks, labels, batch=4, level_maps={"student1": s1, "student2": s2})
    for lvl in ("layer1", "layer2"):
        total = s1[lvl] + s2[lvl]
        assert r[f"per_level/sum/{lvl}/pixel_auroc"] == pytest.approx(
            roc_auc_score(masks.ravel(), total.ravel()), abs=1e-12)
        assert r[f"per_level/sum/{lvl}/image_auroc"] == pytest.approx(
            roc_auc_score(labels, total.max(axis=(1, 2))), abs=1e-12)
        for name, lv in (("student1", s1), ("student2", s2)):
            assert r[f"per_level/{name}/{lvl}/pixel_auroc"] == pytest.approx(
                roc_auc_score(masks.ravel(), lv[lvl].ravel()), abs=1e-12)
    single = _run(maps, masks, labels, batch=4, level_maps={"student1": s1})
    for lvl in ("layer1", "layer2"):  # one student: its sum is itself
        assert single[f"per_level/sum/{lvl}/pixel_auroc"] == single[f"per_level/student1/{lvl}/pixel_auroc"]
    assert "pixel_roc/per_level/sum/layer1" in r["curves"]


def test_f1_threshold_and_curves(case):
    maps, masks, labels = case
    r = _run(maps, masks, labels, batch=6)
    scores = maps.max(axis=(1, 2))
    best = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert r["image_best_f1"] == pytest.approx(best)
    assert f1_score(labels, scores >= r["image_f1_threshold"]) == pytest.approx(best)
    for name, c in r["curves"].items():
        assert len(c["fpr"]) <= 500, name
        assert np.all(np.diff(c["fpr"]) >= 0), name
    cont = (np.random.default_rng(4).random(SHAPE) + masks * 0.2).astype(np.float32)
    r = _run(cont, masks, labels, batch=6)  # 3456 distinct scores: the curve is downsampled
    pix = r["curves"]["pixel_roc"]
    assert 250 <= len(pix["fpr"]) <= 500 and pix["fpr"][0] == 0 and pix["tpr"][-1] == 1.0
    assert np.trapezoid(pix["tpr"], pix["fpr"]) == pytest.approx(r["pixel_auroc"], abs=5e-3)


def test_only_normal_images_gives_nan_with_warning():
    maps = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    acc = MetricsAccumulator()
    acc.update(maps, np.zeros((3, 8, 8)), np.zeros(3, int), {"student1": {"layer1": maps}})
    with pytest.warns(UserWarning, match="NaN"):
        r = acc.compute()
    for k in ("image_auroc", "pixel_auroc", "aupro", "image_best_f1",
              "per_level/student1/layer1/pixel_auroc", "per_level/sum/layer1/image_auroc"):
        assert np.isnan(r[k]), k
    assert r["num_images"] == 3 and r["num_regions"] == 0


def test_bad_input_is_rejected():
    acc = MetricsAccumulator()
    maps = np.zeros((2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.full((2, 4, 4), np.nan), np.zeros((2, 4, 4)), [0, 0])
    with pytest.raises(ValueError, match="255"):
        acc.update(maps, np.full((2, 4, 4), 255), [1, 1])
    with pytest.raises(ValueError, match="masks has shape"):
        acc.update(maps, np.zeros((2, 4, 5)), [0, 0])
    with pytest.raises(ValueError, match="labels"):
        acc.update(maps, np.zeros((2, 4, 4)), [0, 0, 1])
    with pytest.raises(ValueError, match="resize"):
        acc.update(maps, np.zeros((2, 4, 4)), [0, 0], {"student1": {"layer1": np.zeros((2, 2, 2))}})
    with pytest.raises(ValueError, match="no test images"):
        acc.compute()  # the rejected updates left no trace
    acc.update(maps, np.zeros((2, 4, 4)), [0, 0])
    with pytest.raises(ValueError, match="every call"):
        acc.update(maps, np.zeros((2, 4, 4)), [0, 0], {"student1": {"layer1": maps}})
    with_levels = MetricsAccumulator()
    with_levels.update(maps, np.zeros((2, 4, 4)), [0, 0], {"student1": {"layer1": maps}})
    with pytest.raises(ValueError, match="every call"):
        with_levels.update(maps, np.zeros((2, 4, 4)), [0, 0])
    with pytest.raises(ValueError, match="differ from the first"):
        with_levels.update(maps, np.zeros((2, 4, 4)), [0, 0], {"student2": {"layer1": maps}})
    with pytest.raises(ValueError, match="pro_max_fpr"):
        MetricsAccumulator(max_fpr=0.0)


def test_pixel_metrics_memory_bounded():
    """300 images of 256x256 with two students' three level maps, in batches of 32: the
    accumulator's peak allocation (traced, batches included) stays far below all-pixel storage."""
    n, size, batch = 300, 256, 32
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    acc = MetricsAccumulator()
    tracemalloc.start()
    try:
        for start in range(0, n, batch):
            b = min(batch, n - start)
            centres = rng.integers(40, size - 40, size=(b, 2))
            masks = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) < 15 ** 2
            masks[: b // 2] = False  # half normal images
            base = rng.random((b, size, size), dtype=np.float32) + masks
            levels = {s: {lvl: base * (k + 1) + j for k, lvl in enumerate(("layer1", "layer2", "layer3"))}
                      for j, s in enumerate(("student1", "student2"))}
            acc.update(base ** 3, masks, masks.any(axis=(1, 2)), levels)
            del masks, base, levels
        retained, _ = tracemalloc.get_traced_memory()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            r = acc.compute()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    all_pixels = n * size * size
    assert r["num_pixels"] == all_pixels and not r["pixel_metrics_exact"]
    # Storing float32 scores of 10 maps would take 10 * 4 * 19.7M = 786 MB.
    print(f"peak {peak / 2**20:.0f} MiB, retained {retained / 2**20:.0f} MiB")
    assert retained < 120 * 2**20, f"retained {retained / 2**20:.0f} MiB"
    assert peak < 300 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert 0.5 < r["pixel_auroc"] <= 1.0 and r["pixel_auroc_error_bound"] < 1e-3
    assert r["per_level/sum/layer3/pixel_auroc"] == pytest.approx(r["per_level/student1/layer1/pixel_auroc"],
                                                                  abs=1e-3)


def test_label_mask_conflict_warns():
    maps = np.random.default_rng(0).random((2, 6, 6)).astype(np.float32)
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 1:3, 1:3] = True
    acc = MetricsAccumulator()
    acc.update(maps, masks, [0, 1])  # image 0 has a defect mask but is labelled normal
    with pytest.warns(UserWarning, match="disagree"):
        acc.compute()


def test_score_agreement_counts_the_pairs_two_models_order_differently():
    """Against sklearn: the AUROC change is the swapped pairs' net effect, one pair 1 / pairs."""
    labels = np.array([0, 0, 0, 1, 1])
    ref = np.array([1.0, 2.0, 3.0, 2.5, 4.0])       # one pair wrong already: (3.0, 2.5)
    got = np.array([1.0, 2.6, 3.0, 2.5, 4.0 * 1.1])  # (2.0 -> 2.6, 2.5) swapped too
    out = score_agreement(labels, ref, got)
    assert out["pairs"] == 6 and out["swapped_pairs"] == 1 and out["auroc_step"] == 1 / 6
    assert roc_auc_score(labels, got) - roc_auc_score(labels, ref) == pytest.approx(-1 / 6)
    assert out["max_rel_score_change"] == pytest.approx(0.3)
    assert out["closest_pair_gap"] == pytest.approx(0.5 / 3.0)  # normal 3.0, defect 2.5
    tie = score_agreement(labels, ref, np.array([1.0, 2.5, 3.0, 2.5, 4.0]))  # (2.5, 2.5): a tie
    assert tie["swapped_pairs"] == 0.5
    assert score_agreement(labels, ref, ref)["swapped_pairs"] == 0
