"""Evaluation metrics in bounded memory: image/pixel AUROC, AUPRO, per-resolution AUROCs.

``MetricsAccumulator`` takes the test split batch by batch and computes everything at the end.

Pixel scores. Each map is reduced to float32 and each score to a 32-bit key whose integer
order is the float order (the IEEE bit pattern, sign-flipped). While a stream holds at most
``exact_max_pixels`` pixels the keys are kept, and the metrics are exact (each distinct
score is a threshold: the same numbers as sklearn's ``roc_auc_score`` and the MVTec AD
evaluation's ``compute_pro``). Beyond it the stream becomes a histogram over the keys'
top bits: ``mantissa_bits`` bits of mantissa (relative bin width 2**-mantissa_bits, 1.2e-4
by default) over only the key range seen, coarsened by whole bits (exactly, no re-binning
error) if the range would need more than ``max_bins`` bins. Memory per stream is then at most
``max_bins`` x 24 bytes, whatever the number of images.

Binning moves no curve point: each bin edge is a threshold of the exact curve, so the
binned curve is the exact curve sampled at fewer thresholds, and within a bin the exact
curve stays in the box spanned by its two ends. Hence the computed bounds
``|AUROC_binned - AUROC_exact| <= 1/2 sum_b fpr_b tpr_b`` (``fpr_b, tpr_b``: the bin's share
of normal and anomalous pixels) and the analogue for AUPRO, reported as
``pixel_auroc_error_bound`` and ``aupro_error_bound`` (0 when exact).

AUPRO follows the MVTec AD evaluation code: ground-truth regions are the 8-connected
components of each mask; at a threshold t, PRO is the mean over all regions of all images of
the fraction of the region's pixels scoring >= t, and FPR is the fraction of normal pixels
(of all images) scoring >= t. So PRO(t) = (1/R) sum over anomalous pixels scoring >= t of
1/|region of the pixel|: a weighted histogram, streamed like the others. The (FPR, PRO) curve
from (0, 0) is integrated with the trapezoid rule up to ``max_fpr`` (interpolated there)
and divided by ``max_fpr``.
"""

from __future__ import annotations

import warnings
from bisect import bisect
from collections.abc import Mapping

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from rstpm_jax.levels import SUM, sum_over_students

LevelMaps = Mapping[str, Mapping[str, np.ndarray]]

_SIGN = np.uint32(0x80000000)
_MANTISSA = 23  # float32 mantissa bits
_CONNECTIVITY = np.ones((3, 3), dtype=int)  # 8-connected regions, as MVTec AD's evaluation
MAX_CURVE_POINTS = 500


def monotone_keys(scores: np.ndarray) -> np.ndarray:
    """uint32 keys whose unsigned order is the float32 order of ``scores`` (flattened)."""
    u = (np.asarray(scores, dtype=np.float32).reshape(-1) + np.float32(0.0)).view(np.uint32)  # -0.0 -> +0.0
    flip = u >> np.uint32(31)  # 1 for negatives: flip all bits; else set the sign bit
    flip *= np.uint32(0x7FFFFFFF)
    flip |= _SIGN
    u ^= flip
    return u


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float | None = None) -> float:
    """Area under (x, y), x non-decreasing; with ``x_max``, up to x_max (y interpolated there).

    The rule of the MVTec AD evaluation code (``generic_util.trapezoid``).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            ins = bisect(x.tolist(), x_max)
            if not 0 < ins < len(x):
                raise ValueError(f"x_max={x_max} is outside the curve's x range [{x[0]}, {x[-1]}].")
            y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        keep = x <= x_max
        x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def downsample_curve(x: np.ndarray, y: np.ndarray, max_points: int = MAX_CURVE_POINTS
                     ) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of a monotone curve, spread over both its index and its x."""
    n = len(x)
    if n <= max_points:
        return np.asarray(x, np.float64), np.asarray(y, np.float64)
    half = max_points // 2
    by_index = np.linspace(0, n - 1, half).round().astype(np.int64)
    by_x = np.clip(np.searchsorted(x, np.linspace(x[0], x[-1], max_points - half)), 0, n - 1)
    idx = np.unique(np.concatenate([by_index, by_x, [0, n - 1]]))
    return np.asarray(x, np.float64)[idx], np.asarray(y, np.float64)[idx]


def region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel 1/|region| for the anomalous pixels of (B, H, W) bool masks (in mask order),
    and the number of regions (8-connected components, per image)."""
    weights, total = [], 0
    for m in masks:
        labeled, n = ndimage.label(m, structure=_CONNECTIVITY)
        total += n
        if n:
            sizes = np.bincount(labeled.ravel(), minlength=n + 1).astype(np.float64)
            weights.append(1.0 / sizes[labeled[m]])
    w = np.concatenate(weights) if weights else np.zeros(0, np.float64)
    return w, total


class ScoreHistogram:
    """Normal/anomalous pixel counts (and region weights) per score; exact, then binned.

    ``update(keys, labels, weights)``: ``keys`` from :func:`monotone_keys`, ``labels`` bool
    (anomalous), ``weights`` the 1/|region| of the anomalous pixels in order (or None).
    """

    def __init__(self, exact_max_pixels: int = 2**20, mantissa_bits: int = 13,
                 max_bins: int = 2**20, with_weights: bool = False):
        if not 0 <= mantissa_bits <= _MANTISSA:
            raise ValueError(f"mantissa_bits must be in [0, 23], got {mantissa_bits}.")
        if max_bins < 2:
            raise ValueError(f"max_bins must be >= 2, got {max_bins}.")
        self.exact_max_pixels = int(exact_max_pixels)
        self.max_bins = int(max_bins)
        self.with_weights = with_weights
        self.shift = 0  # key bits dropped; 0 while exact
        self._base_shift = _MANTISSA - mantissa_bits
        self._buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._buffered = 0
        self._lo = 0
        self._neg = self._pos = self._w = None  # dense per-bin arrays once binned

    @property
    def exact(self) -> bool:
        return self._neg is None

    def update(self, keys: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> None:
        if self.with_weights and weights is None:
            raise ValueError("This histogram tracks region weights: pass weights.")
        weights = weights if self.with_weights else None
        if self.exact:
            if self._buffered + keys.size <= self.exact_max_pixels:
                self._buffer.append((keys.copy(), labels.copy(), None if weights is None else weights.copy()))
                self._buffered += keys.size
                return
            self._to_binned()
        self._add(keys, labels, weights)

    def _to_binned(self) -> None:
        buffer, self._buffer, self._buffered = self._buffer, [], 0
        self.shift = self._base_shift
        for keys, labels, weights in buffer:
            self._add(keys, labels, weights)
        if self._neg is None:  # nothing buffered yet: start an empty histogram
            self._lo = 0
            self._neg = np.zeros(0, np.int64)
            self._pos = np.zeros(0, np.int64)
            self._w = np.zeros(0, np.float64) if self.with_weights else None

    def _add(self, keys: np.ndarray, labels: np.ndarray, weights: np.ndarray | None) -> None:
        if keys.size == 0:
            return
        bins = (keys >> np.uint32(self.shift)).astype(np.int64)
        lo, hi = int(bins.min()), int(bins.max())
        if self._neg is not None and self._neg.size:
            lo, hi = min(lo, self._lo), max(hi, self._lo + self._neg.size - 1)
        extra = 0
        while (hi >> extra) - (lo >> extra) + 1 > self.max_bins:
            extra += 1
        if extra:
            self._coarsen(extra)
            bins >>= extra
            lo, hi = lo >> extra, hi >> extra
        self._grow(lo, hi)
        bins -= self._lo
        size = self._neg.size
        if self._w is not None:
            self._w += np.bincount(bins[labels], weights=weights, minlength=size)
        bins *= 2
        bins += labels
        both = np.bincount(bins, minlength=2 * size).reshape(size, 2)
        self._neg += both[:, 0]
        self._pos += both[:, 1]

    def _coarsen(self, extra: int) -> None:
        self.shift += extra
        if self._neg is None or not self._neg.size:
            return
        old = self._lo + np.arange(self._neg.size, dtype=np.int64)
        new_lo = self._lo >> extra
        idx = (old >> extra) - new_lo
        size = int(idx[-1]) + 1
        self._neg = np.bincount(idx, weights=self._neg, minlength=size).astype(np.int64)
        self._pos = np.bincount(idx, weights=self._pos, minlength=size).astype(np.int64)
        if self._w is not None:
            self._w = np.bincount(idx, weights=self._w, minlength=size)
        self._lo = new_lo

    def _grow(self, lo: int, hi: int) -> None:
        if self._neg is None or not self._neg.size:
            self._lo = lo
            self._neg = np.zeros(hi - lo + 1, np.int64)
            self._pos = np.zeros(hi - lo + 1, np.int64)
            self._w = np.zeros(hi - lo + 1, np.float64) if self.with_weights else None
            return
        old_hi = self._lo + self._neg.size - 1
        if lo >= self._lo and hi <= old_hi:
            return
        before, after = self._lo - lo, hi - old_hi
        self._neg = np.pad(self._neg, (before, after))
        self._pos = np.pad(self._pos, (before, after))
        if self._w is not None:
            self._w = np.pad(self._w, (before, after))
        self._lo = lo

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(negatives, positives, weights) per occupied score bin, ascending scores."""
        if self.exact:
            if not self._buffer:
                empty = np.zeros(0, np.int64)
                return empty, empty, (np.zeros(0) if self.with_weights else None)
            keys = np.concatenate([b[0] for b in self._buffer])
            labels = np.concatenate([b[1] for b in self._buffer])
            uniq, inv = np.unique(keys, return_inverse=True)
            del keys
            neg = np.bincount(inv[~labels], minlength=uniq.size)
            pos_inv = inv[labels]
            pos = np.bincount(pos_inv, minlength=uniq.size)
            w = None
            if self.with_weights:
                w = np.bincount(pos_inv, weights=np.concatenate([b[2] for b in self._buffer]),
                                minlength=uniq.size)
            return neg, pos, w
        occupied = (self._neg + self._pos) > 0
        w = self._w[occupied] if self._w is not None else None
        return self._neg[occupied], self._pos[occupied], w


def _nan_metric(name: str, why: str, missing: list[str]) -> float:
    missing.append(f"{name} ({why})")
    return float("nan")


def pixel_roc(hist: ScoreHistogram, name: str, missing: list[str]) -> dict:
    """Pixel AUROC, its binning error bound and the ROC curve from a histogram."""
    neg, pos, _ = hist.counts()
    n, p = int(neg.sum()), int(pos.sum())
    if n == 0 or p == 0:
        why = "no anomalous pixels" if p == 0 else "no normal pixels"
        return {"auroc": _nan_metric(name, why, missing), "error_bound": float("nan"),
                "fpr": np.zeros(0), "tpr": np.zeros(0)}
    fpr = np.concatenate([[0.0], np.cumsum(neg[::-1]) / n])
    tpr = np.concatenate([[0.0], np.cumsum(pos[::-1]) / p])
    bound = 0.0 if hist.exact else 0.5 * float(np.sum((neg / n) * (pos / p)))
    return {"auroc": float(np.trapezoid(tpr, fpr)), "error_bound": bound, "fpr": fpr, "tpr": tpr}


def aupro(hist: ScoreHistogram, num_regions: int, max_fpr: float, missing: list[str]) -> dict:
    """Normalised area under the PRO curve up to ``max_fpr``, its binning error bound, and the curve."""
    neg, _, w = hist.counts()
    n = int(neg.sum())
    if n == 0 or num_regions == 0:
        why = "no anomalous regions" if num_regions == 0 else "no normal pixels"
        return {"aupro": _nan_metric("aupro", why, missing), "error_bound": float("nan"),
                "fpr": np.zeros(0), "pro": np.zeros(0)}
    fpr = np.concatenate([[0.0], np.cumsum(neg[::-1]) / n])
    pro = np.concatenate([[0.0], np.cumsum(w[::-1]) / num_regions])
    area = trapezoid(fpr, pro, x_max=max_fpr) / max_fpr
    bound = 0.0
    if not hist.exact:
        x0, dx, dy = fpr[:-1], np.diff(fpr), np.diff(pro)
        inside = np.clip(max_fpr - x0, 0.0, dx)  # part of each bin's FPR span below max_fpr
        bound = float(np.sum(np.where(inside >= dx, 0.5 * dx * dy, inside * dy))) / max_fpr
    return {"aupro": area, "error_bound": bound, "fpr": fpr, "pro": pro}


def image_metrics(scores: np.ndarray, labels: np.ndarray, name: str, missing: list[str]) -> dict:
    """Image AUROC and ROC curve; with anomalous images, the F1-optimal threshold (score >= t)."""
    out = {"auroc": float("nan"), "fpr": np.zeros(0), "tpr": np.zeros(0),
           "f1_threshold": float("nan"), "best_f1": float("nan")}
    if labels.size == 0:
        _nan_metric(name, "no images", missing)
        return out
    if labels.all() or not labels.any():
        _nan_metric(name, "only anomalous images" if labels.all() else "only normal images", missing)
    else:
        out["auroc"] = float(roc_auc_score(labels, scores))
        out["fpr"], out["tpr"], _ = roc_curve(labels, scores)
    if labels.any():
        precision, recall, thresholds = precision_recall_curve(labels, scores)
        f1 = np.divide(2 * precision * recall, precision + recall,
                       out=np.zeros_like(precision), where=(precision + recall) > 0)[:-1]
        best = int(np.argmax(f1))
        out["f1_threshold"], out["best_f1"] = float(thresholds[best]), float(f1[best])
    return out


def score_agreement(labels: np.ndarray, reference: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """How ``scores`` (one model's image scores) rank the test images against ``reference``
    (another model's, e.g. float32's, for the same images in the same order). A normal/defect
    pair is swapped where the two models order it differently (to or from a tie: half), and
    image AUROC can move by at most ``swapped_pairs * auroc_step``, ``auroc_step = 1 / pairs``
    being the smallest change the test set can show. ``max_rel_score_change``: the largest
    ``|score - reference| / |reference|``; ``closest_pair_gap``: the reference's smallest
    ``|defect - normal| / max(|defect|, |normal|)``, below which a score change can swap a pair."""
    labels = np.asarray(labels, bool)
    reference, scores = np.asarray(reference, np.float64), np.asarray(scores, np.float64)

    def pairwise(op, s: np.ndarray) -> np.ndarray:  # [normal, defect]
        return op(s[labels][None, :], s[~labels][:, None])

    tiny = np.finfo(np.float64).tiny
    pairs = int(labels.sum() * (~labels).sum())
    rel = np.abs(scores - reference) / np.maximum(np.abs(reference), tiny)
    ref_diff = pairwise(np.subtract, reference)  # > 0 where the defect scores higher
    swapped = np.abs(np.sign(pairwise(np.subtract, scores)) - np.sign(ref_diff)).sum() / 2
    gaps = np.abs(ref_diff) / np.maximum(pairwise(np.maximum, np.abs(reference)), tiny)
    return {"pairs": pairs, "swapped_pairs": float(swapped),
            "auroc_step": 1.0 / pairs if pairs else float("nan"),
            "max_rel_score_change": float(rel.max()) if rel.size else float("nan"),
            "closest_pair_gap": float(gaps.min()) if pairs else float("nan")}


class MetricsAccumulator:
    """Streams test batches; ``compute()`` returns image/pixel AUROC, AUPRO and per-level AUROCs.

    ``update(final_map, masks, labels=None, level_maps=None)``:
      final_map (B, H, W) float scores; masks (B, H, W) ground truth in [0, 1] (bool, 0/1, or
      (B, H, W, 1); anomalous where >= 0.5); labels (B,) image labels (1 = anomalous), or None
      to take an image as anomalous when its mask has an anomalous pixel; level_maps
      ``{student: {level: (B, H, W)}}`` at the final map's size (the per-resolution maps of
      paper Table 3), the same students and levels on every call. A ``"sum"`` entry per level,
      the students' maps added (the fused map at that resolution), is derived here.
    """

    def __init__(self, max_fpr: float = 0.3, exact_max_pixels: int = 2**20,
                 mantissa_bits: int = 13, max_bins: int = 2**20):
        if not 0.0 < max_fpr <= 1.0:
            raise ValueError(f"max_fpr (config eval.pro_max_fpr) must be in (0, 1], got {max_fpr}.")
        self.max_fpr = float(max_fpr)
        self._hist_kwargs = dict(exact_max_pixels=exact_max_pixels, mantissa_bits=mantissa_bits,
                                 max_bins=max_bins)
        self._final = ScoreHistogram(with_weights=True, **self._hist_kwargs)
        self._levels: dict[str, ScoreHistogram] | None = None
        self._image_scores: dict[str, list[np.ndarray]] = {"final": []}
        self._labels: list[np.ndarray] = []
        self._num_regions = 0
        self._num_pixels = 0
        self._num_anomalous_pixels = 0
        self._label_mask_conflicts = {"normal_with_mask": 0, "anomalous_without_mask": 0}

    def update(self, final_map, masks, labels=None, level_maps: LevelMaps | None = None) -> None:
        final_map = _as_maps(final_map, "final_map")
        masks = _as_masks(masks, final_map.shape)
        batch = final_map.shape[0]
        has_defect = masks.any(axis=(1, 2))
        if labels is None:
            labels = has_defect
        else:
            labels = np.asarray(labels).reshape(-1)
            if labels.shape != (batch,):
                raise ValueError(f"labels has shape {labels.shape}; expected ({batch},) to match final_map.")
            if not np.isin(labels, (0, 1)).all():
                raise ValueError("labels must be 0 (normal) or 1 (anomalous).")
            labels = labels.astype(bool)
        if level_maps is not None and self._levels is None and self._labels:
            raise ValueError("level_maps given after updates without them; pass it on every call or never.")
        level = None if level_maps is None and self._levels is None else \
            self._check_levels(level_maps, final_map.shape)  # validate all before changing state

        self._label_mask_conflicts["normal_with_mask"] += int(np.sum(~labels & has_defect))
        self._label_mask_conflicts["anomalous_without_mask"] += int(np.sum(labels & ~has_defect))
        flat_masks = masks.reshape(-1)
        weights, regions = region_weights(masks)
        self._num_regions += regions
        self._num_pixels += flat_masks.size
        self._num_anomalous_pixels += int(flat_masks.sum())
        self._final.update(monotone_keys(final_map), flat_masks, weights)
        self._image_scores["final"].append(final_map.max(axis=(1, 2)))
        self._labels.append(labels)
        if level is not None:
            if self._levels is None:
                self._levels = {k: ScoreHistogram(**self._hist_kwargs) for k in level}
                self._image_scores.update({k: [] for k in level})
            for key, m in level.items():
                self._levels[key].update(monotone_keys(m), flat_masks)
                self._image_scores[key].append(m.max(axis=(1, 2)))

    def _check_levels(self, level_maps: LevelMaps | None, shape) -> dict[str, np.ndarray]:
        """``{"student/level": map}`` plus the derived ``"sum/level"`` maps, validated."""
        if not level_maps:
            raise ValueError("level_maps was given on an earlier update(); pass it on every call.")
        checked: dict[str, dict[str, np.ndarray]] = {}
        for student, levels in level_maps.items():
            if student == SUM:
                raise ValueError(f"{SUM!r} is derived from the students' maps; do not pass it in level_maps.")
            for level, m in levels.items():
                m = _as_maps(m, f"level_maps[{student!r}][{level!r}]")
                if m.shape != shape:
                    raise ValueError(f"level_maps[{student!r}][{level!r}] has shape {m.shape}; expected "
                                     f"{shape} (resize the per-level maps to the final map's size).")
                checked.setdefault(student, {})[level] = m
        maps = {f"{student}/{level}": m for student, levels in checked.items() for level, m in levels.items()}
        maps.update({f"{SUM}/{level}": m for level, m in sum_over_students(checked).items()})
        if self._levels is not None and set(maps) != set(self._levels):
            raise ValueError(f"level_maps entries {sorted(maps)} differ from the first update's "
                             f"{sorted(self._levels)}.")
        return maps

    def compute(self) -> dict:
        """Flat metrics dict plus ``"curves"``: {name: {"fpr", "tpr"|"pro"}} (<= 500 points each).

        Metrics that need both normal and anomalous data are NaN, with one warning, when absent.
        """
        if not self._labels:
            raise ValueError("MetricsAccumulator.compute() before any update(): no test images.")
        labels = np.concatenate(self._labels)
        missing: list[str] = []
        curves: dict[str, dict[str, np.ndarray]] = {}
        img = image_metrics(np.concatenate(self._image_scores["final"]), labels, "image_auroc", missing)
        pix = pixel_roc(self._final, "pixel_auroc", missing)
        pro = aupro(self._final, self._num_regions, self.max_fpr, missing)
        out = {
            "image_auroc": img["auroc"],
            "pixel_auroc": pix["auroc"],
            "aupro": pro["aupro"],
            "image_f1_threshold": img["f1_threshold"],
            "image_best_f1": img["best_f1"],
            "pixel_auroc_error_bound": pix["error_bound"],
            "aupro_error_bound": pro["error_bound"],
            "pixel_metrics_exact": self._final.exact,
            "aupro_max_fpr": self.max_fpr,
            "num_images": int(labels.size),
            "num_anomalous_images": int(labels.sum()),
            "num_pixels": self._num_pixels,
            "num_anomalous_pixels": self._num_anomalous_pixels,
            "num_regions": self._num_regions,
        }
        curves["image_roc"] = _curve(img["fpr"], img["tpr"], "tpr")
        curves["pixel_roc"] = _curve(pix["fpr"], pix["tpr"], "tpr")
        curves["pro"] = _curve(pro["fpr"], pro["pro"], "pro")
        bounds = []
        for key, hist in (self._levels or {}).items():
            lp = pixel_roc(hist, f"per_level/{key}/pixel_auroc", missing)
            li = image_metrics(np.concatenate(self._image_scores[key]), labels,
                               f"per_level/{key}/image_auroc", missing)
            out[f"per_level/{key}/pixel_auroc"] = lp["auroc"]
            out[f"per_level/{key}/image_auroc"] = li["auroc"]
            bounds.append(lp["error_bound"])
            curves[f"pixel_roc/per_level/{key}"] = _curve(lp["fpr"], lp["tpr"], "tpr")
        if bounds:
            out["per_level_pixel_auroc_error_bound"] = float(np.max(bounds))
        conflicts = {k: v for k, v in self._label_mask_conflicts.items() if v}
        if conflicts:
            warnings.warn(f"Image labels disagree with masks: {conflicts} images "
                          "(labels drive image metrics, masks drive pixel metrics).", stacklevel=2)
        if missing:
            warnings.warn("Metrics set to NaN: " + "; ".join(missing), stacklevel=2)
        out["curves"] = curves
        return out


def _curve(x: np.ndarray, y: np.ndarray, y_name: str) -> dict[str, np.ndarray]:
    x, y = downsample_curve(np.asarray(x), np.asarray(y))
    return {"fpr": x, y_name: y}


def _as_maps(maps, name: str) -> np.ndarray:
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"{name} must be (B, H, W); got shape {maps.shape}.")
    if np.isnan(maps).any():
        raise ValueError(f"{name} contains NaN scores (a diverged model or broken maps); "
                         "fix the maps before evaluating.")
    return maps


def _as_masks(masks, shape) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if masks.shape != shape:
        raise ValueError(f"masks has shape {masks.shape}; expected {shape} to match final_map.")
    if masks.dtype == bool:
        return masks
    if masks.size and (masks.min() < 0 or masks.max() > 1):
        raise ValueError(f"masks must lie in [0, 1] (got range [{masks.min()}, {masks.max()}]); "
                         "scale 0/255 masks by 1/255.")
    return masks >= 0.5
