"""Figures (PNG, matplotlib's Agg canvas; no pyplot, no GUI, no global backend change).

- :func:`example_grid`: per defect type, rows of input | ground truth | final map | overlay.
- :func:`level_maps_figure`: one image's per-level maps per student and their sum, and the
  final map (paper Figs 2, 5, 6).
- :func:`roc_figure`: ROC (or PRO) curves with their areas; :func:`metric_curves` picks
  them from ``MetricsAccumulator.compute()``'s result.
- :func:`attention_figure`: one image's attention maps per student and level (paper Fig. 5);
  :func:`attention_grid`: a few images of one defect type, a row each.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rstpm_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
from rstpm_jax.levels import SUM, sum_over_students

CMAP = "jet"


def denormalize(images: np.ndarray) -> np.ndarray:
    """Invert ImageNet mean/std normalisation of (..., H, W, 3) images; result clipped to [0, 1]."""
    images = np.asarray(images, dtype=np.float32)
    if images.shape[-1] != 3:
        raise ValueError(f"denormalize expects channels-last RGB (..., 3); got shape {images.shape}.")
    return np.clip(images * IMAGENET_STD + IMAGENET_MEAN, 0.0, 1.0)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=fig.dpi, bbox_inches="tight")
    return path


def _as_display(image: np.ndarray) -> np.ndarray:
    """[0, 1] RGB for display; normalised (ImageNet) inputs are denormalised."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    if image.min() < -1e-3 or image.max() > 1.0 + 1e-3:
        image = denormalize(image)
    return image


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name)) or "unnamed"


def _defect_path(path: Path, defect: str) -> Path:
    if path.suffix.lower() == ".png":
        return path.with_name(f"{path.stem}_{_safe_name(defect)}.png")
    return path / f"examples_{_safe_name(defect)}.png"


def _axes_off(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def example_grid(path: str | os.PathLike, images: np.ndarray, masks: np.ndarray,
                 final_maps: np.ndarray, defect_names: Sequence[str],
                 titles: Sequence[str] | None = None, max_per_defect: int = 4,
                 vmax: float | None = None) -> list[Path]:
    """One PNG per defect type: a row per image (at most ``max_per_defect``), columns input,
    ground truth, final map, overlay. ``path`` ending in ``.png`` (``figs/examples.png``)
    gives ``figs/examples_<defect>.png``; any other ``path`` is a directory holding
    ``examples_<defect>.png``.

    images (N, H, W, 3) in [0, 1] or ImageNet-normalised; masks, final_maps (N, H, W).
    Maps share one colour scale (0 .. ``vmax``, default the 99.9th percentile of all
    ``final_maps``) so that defect types are comparable. Returns the written paths.
    """
    images, masks, final_maps = np.asarray(images), np.asarray(masks), np.asarray(final_maps)
    n = len(images)
    if not (len(masks) == len(final_maps) == len(defect_names) == n):
        raise ValueError(f"example_grid: images ({n}), masks ({len(masks)}), final_maps "
                         f"({len(final_maps)}) and defect_names ({len(defect_names)}) differ in length.")
    if titles is not None and len(titles) != n:
        raise ValueError(f"example_grid: {len(titles)} titles for {n} images.")
    if vmax is None:
        vmax = float(np.percentile(final_maps, 99.9)) if final_maps.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    out = []
    for defect in dict.fromkeys(defect_names):  # first-seen order
        idx = [i for i, d in enumerate(defect_names) if d == defect][:max_per_defect]
        fig = Figure(figsize=(10, 2.6 * len(idx)), dpi=80)
        axes = fig.subplots(len(idx), 4, squeeze=False)
        for row, i in enumerate(idx):
            img = _as_display(images[i])
            ax = axes[row]
            ax[0].imshow(img)
            ax[1].imshow(masks[i], cmap="gray", vmin=0, vmax=1)
            im = ax[2].imshow(final_maps[i], cmap=CMAP, vmin=0.0, vmax=vmax)
            ax[3].imshow(img)
            ax[3].imshow(final_maps[i], cmap=CMAP, vmin=0.0, vmax=vmax, alpha=0.45)
            if np.any(masks[i] >= 0.5):
                ax[3].contour(masks[i] >= 0.5, levels=[0.5], colors="white", linewidths=1)
            ax[0].set_ylabel(titles[i] if titles is not None else f"{defect} #{i}", fontsize=8)
            for a in ax:
                _axes_off(a)
            fig.colorbar(im, ax=ax[2], fraction=0.046, pad=0.02)
        for a, name in zip(axes[0], ("input", "ground truth", "anomaly map", "overlay")):
            a.set_title(name, fontsize=9)
        fig.suptitle(str(defect))
        out.append(_save(fig, _defect_path(Path(path), defect)))
    return out


def level_maps_figure(path: str | os.PathLike, image: np.ndarray,
                      level_maps: Mapping[str, Mapping[str, np.ndarray]], final: np.ndarray,
                      mask: np.ndarray | None = None) -> Path:
    """One image's per-level maps: a row per student (and their sum, when more than one),
    a column per level; the first column shows the input (with the mask outline), the last
    the final map. In each level's column the students share one colour scale (the smallest
    to the largest value of their maps there), so that the rows show which student's map
    carries the signal; the sum and the final map have their own."""
    rows = {s: dict(levels) for s, levels in level_maps.items()}
    if not rows:
        raise ValueError("level_maps_figure: level_maps is empty.")
    levels = list(dict.fromkeys(lvl for lv in rows.values() for lvl in lv))
    if len(rows) > 1:
        rows[SUM] = {lvl: np.asarray(m, np.float32) for lvl, m in sum_over_students(level_maps).items()}
    scale = {lvl: (min(float(np.min(np.asarray(lv[lvl]))) for lv in level_maps.values() if lvl in lv),
                   max(float(np.max(np.asarray(lv[lvl]))) for lv in level_maps.values() if lvl in lv))
             for lvl in levels}
    fig = Figure(figsize=(2.4 * (len(levels) + 2), 2.4 * len(rows)), dpi=80)
    axes = fig.subplots(len(rows), len(levels) + 2, squeeze=False)
    img = _as_display(image)
    for r, (student, maps) in enumerate(rows.items()):
        shared = student != SUM
        ax = axes[r]
        ax[0].imshow(img)
        if mask is not None and np.any(np.asarray(mask) >= 0.5):
            ax[0].contour(np.asarray(mask) >= 0.5, levels=[0.5], colors="red", linewidths=1)
        ax[0].set_ylabel(student, fontsize=9)
        for c, level in enumerate(levels, start=1):
            if level in maps:
                ax[c].imshow(np.asarray(maps[level]), cmap=CMAP,
                             **({"vmin": scale[level][0], "vmax": max(scale[level][1], scale[level][0] + 1e-12)}
                                if shared else {}))
            ax[c].set_title(level if r == 0 else "", fontsize=9)
        if r == 0:
            ax[-1].imshow(np.asarray(final), cmap=CMAP)
            ax[-1].set_title("final", fontsize=9)
        else:
            ax[-1].set_visible(False)
        for a in ax:
            _axes_off(a)
    return _save(fig, path)


def roc_figure(path: str | os.PathLike, curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
               title: str = "ROC", xlabel: str = "false positive rate",
               ylabel: str = "true positive rate", max_fpr: float | None = None) -> Path:
    """Curves ``name -> (fpr, tpr, area)`` on one plot; ``max_fpr`` limits the x axis (PRO)."""
    if not curves:
        raise ValueError("roc_figure: no curves given.")
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.subplots()
    for name, (fpr, tpr, area) in curves.items():
        area_txt = f"{area:.3f}" if area is not None and np.isfinite(area) else "n/a"
        ax.plot(np.asarray(fpr), np.asarray(tpr), label=f"{name} ({area_txt})", linewidth=1.5)
    if max_fpr is None:
        ax.plot([0, 1], [0, 1], color="gray", linestyle=":", linewidth=1)
    ax.set_xlim(0, max_fpr or 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def metric_curves(result: Mapping, kind: str = "roc") -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Curves for :func:`roc_figure` from ``MetricsAccumulator.compute()``'s result.

    ``kind="roc"``: image and pixel ROC, and the pixel ROC of each resolution's summed map;
    ``kind="pro"``: the PRO curve (plot it with ``max_fpr=result["aupro_max_fpr"]``).
    """
    curves = result.get("curves", {})
    if kind == "pro":
        c = curves.get("pro")
        return {"PRO": (c["fpr"], c["pro"], result.get("aupro"))} if c is not None and len(c["fpr"]) else {}
    if kind != "roc":
        raise ValueError(f"metric_curves: kind must be 'roc' or 'pro', got {kind!r}.")
    out = {}
    for name, key, area in (("image", "image_roc", "image_auroc"), ("pixel", "pixel_roc", "pixel_auroc")):
        if key in curves and len(curves[key]["fpr"]):
            out[name] = (curves[key]["fpr"], curves[key]["tpr"], result.get(area))
    prefix = "pixel_roc/per_level/sum/"
    for key in sorted(k for k in curves if k.startswith(prefix)):
        level = key[len(prefix):]
        if len(curves[key]["fpr"]):
            out[f"pixel {level}"] = (curves[key]["fpr"], curves[key]["tpr"],
                                     result.get(f"per_level/sum/{level}/pixel_auroc"))
    return out


def attention_figure(path: str | os.PathLike, image: np.ndarray,
                     attention: Mapping[str, Mapping[str, np.ndarray]]) -> Path:
    """One image's attention maps (values in [0, 1]): a row per student, a column per level."""
    if not attention:
        raise ValueError("attention_figure: no attention maps given.")
    levels = list(dict.fromkeys(lvl for lv in attention.values() for lvl in lv))
    fig = Figure(figsize=(2.4 * (len(levels) + 1), 2.4 * len(attention)), dpi=80)
    axes = fig.subplots(len(attention), len(levels) + 1, squeeze=False)
    img = _as_display(image)
    for r, (student, maps) in enumerate(attention.items()):
        axes[r][0].imshow(img)
        axes[r][0].set_ylabel(student, fontsize=9)
        for c, level in enumerate(levels, start=1):
            if level in maps:
                axes[r][c].imshow(np.asarray(maps[level]), cmap="viridis", vmin=0, vmax=1)
            axes[r][c].set_title(level if r == 0 else "", fontsize=9)
        for a in axes[r]:
            _axes_off(a)
    return _save(fig, path)


def attention_grid(path: str | os.PathLike, images: np.ndarray,
                   attention: Sequence[Mapping[str, Mapping[str, np.ndarray]]],
                   masks: np.ndarray | None = None, titles: Sequence[str] | None = None) -> Path:
    """Paper Fig. 5 for a few images (of one defect type): a row per image, its input (mask
    outlined) then each gate's attention map (values in [0, 1]), a column per student and level."""
    if not len(images) or len(attention) != len(images):
        raise ValueError(f"attention_grid: {len(images)} images, {len(attention)} attention maps.")
    columns = list(dict.fromkeys((s, lvl) for att in attention for s, lv in att.items() for lvl in lv))
    if not columns:
        raise ValueError("attention_grid: no attention maps given.")
    fig = Figure(figsize=(2.0 * (len(columns) + 1), 2.1 * len(images)), dpi=80)
    axes = fig.subplots(len(images), len(columns) + 1, squeeze=False)
    for r, (image, att) in enumerate(zip(images, attention)):
        ax = axes[r]
        ax[0].imshow(_as_display(image))
        if masks is not None and np.any(np.asarray(masks[r]) >= 0.5):
            ax[0].contour(np.asarray(masks[r]) >= 0.5, levels=[0.5], colors="red", linewidths=1)
        ax[0].set_ylabel(titles[r] if titles is not None else f"#{r}", fontsize=8)
        for c, (student, level) in enumerate(columns, start=1):
            if level in att.get(student, {}):
                ax[c].imshow(np.asarray(att[student][level]), cmap="viridis", vmin=0, vmax=1)
            if r == 0:
                ax[c].set_title(f"{student}\n{level}", fontsize=8)
        for a in ax:
            _axes_off(a)
    return _save(fig, path)
