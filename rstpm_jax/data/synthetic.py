"""A small synthetic dataset in the MVTec AD layout, for the demo and the tests.

Three categories: ``fabric`` (colour texture), ``mesh`` (grayscale texture) and ``button``
(colour object). Defects are solid shapes drawn through a binary mask, so the written mask
is exactly the set of changed pixels and each defect's colour (``DEFECT_COLORS``) never
occurs in a defect-free image. Deterministic for a seed (same bytes).

    python -m rstpm_jax.data.synthetic --out DIR [--seed 0] [--image-size 128]
"""

from __future__ import annotations

import argparse
import os
import shutil

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES: tuple[str, ...] = ("fabric", "mesh", "button")
DEFECTS: dict[str, tuple[str, ...]] = {
    "fabric": ("color", "hole", "scratch"),
    "mesh": ("hole", "scratch"),
    "button": ("color", "scratch"),
}
# Solid defect colours (RGB; grayscale categories use the first channel).
DEFECT_COLORS: dict[str, dict[str, tuple[int, int, int]]] = {
    "fabric": {"color": (230, 30, 30), "hole": (5, 5, 5), "scratch": (250, 250, 250)},
    "mesh": {"hole": (0, 0, 0), "scratch": (255, 255, 255)},
    "button": {"color": (30, 200, 70), "scratch": (250, 250, 250)},
}
GRAYSCALE: frozenset[str] = frozenset({"mesh"})
NUM_TRAIN = 32
NUM_TEST_GOOD = 4
NUM_TEST_PER_DEFECT = 4
_MARKER = ".rstpm_synthetic"


def _fabric(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    period = n / 16
    px, py = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(2 * np.pi * xx / period + px) * np.sin(2 * np.pi * yy / period + py)
    base = np.array([70, 100, 165], np.float32) + rng.uniform(-6, 6, 3)
    img = base + 28 * weave[..., None] + rng.normal(0, 4, (n, n, 1))
    return np.clip(img, 40, 210).astype(np.uint8)


def _mesh(rng: np.random.Generator, n: int) -> np.ndarray:
    yy, xx = np.mgrid[0:n, 0:n]
    period = n // 8
    ox, oy = rng.integers(0, period, 2)
    lines = (((xx + ox) % period) < max(2, n // 40)) | (((yy + oy) % period) < max(2, n // 40))
    img = np.where(lines, 80.0, 160.0) + rng.uniform(-8, 8) + rng.normal(0, 4, (n, n))
    return np.clip(img, 50, 200).astype(np.uint8)


def _button(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A golden disc with four holes on a dark background; returns (image, disc-interior mask)."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    cx, cy = n / 2 + rng.uniform(-n / 32, n / 32, 2)
    r = n * (0.34 + rng.uniform(-0.01, 0.01))
    d = np.hypot(xx - cx, yy - cy)
    img = np.array([45, 45, 50], np.float32) + rng.normal(0, 3, (n, n, 1))
    disc = d <= r
    gold = np.array([200, 160, 60], np.float32) + rng.uniform(-8, 8, 3)
    img[disc] = gold + rng.normal(0, 3, (int(disc.sum()), 1))
    img[disc & (d > r - max(2, n / 40))] = gold * 0.8  # rim
    inside = d <= r - max(3, n / 20)
    angle = rng.uniform(0, np.pi / 2)
    for k in range(4):
        a = angle + k * np.pi / 2
        hx, hy = cx + 0.25 * r * np.cos(a), cy + 0.25 * r * np.sin(a)
        hole = np.hypot(xx - hx, yy - hy) <= 0.1 * r
        img[hole] = (45, 45, 50)
        inside &= ~hole
    return np.clip(img, 35, 215).astype(np.uint8), inside


def _defect_mask(kind: str, rng: np.random.Generator, n: int, region: np.ndarray) -> np.ndarray:
    """A binary defect mask inside ``region`` (never empty)."""
    ys, xs = np.nonzero(region)
    while True:
        canvas = Image.new("L", (n, n), 0)
        draw = ImageDraw.Draw(canvas)
        i = rng.integers(len(ys))
        cx, cy = float(xs[i]), float(ys[i])
        if kind == "scratch":
            length, a = rng.uniform(0.25, 0.5) * n, rng.uniform(0, np.pi)
            dx, dy = 0.5 * length * np.cos(a), 0.5 * length * np.sin(a)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=max(3, n // 32))
        else:  # "hole", "color": a blob made of two overlapping ellipses
            for _ in range(2):
                rx, ry = rng.uniform(0.05, 0.1, 2) * n
                ox, oy = rng.uniform(-0.04, 0.04, 2) * n
                draw.ellipse([cx + ox - rx, cy + oy - ry, cx + ox + rx, cy + oy + ry], fill=255)
        mask = (np.asarray(canvas) > 0) & region
        if mask.sum() >= max(12, n * n // 500):
            return mask


def render(category: str, defect: str, rng: np.random.Generator,
           image_size: int = 128) -> tuple[np.ndarray, np.ndarray | None]:
    """One image (HxWx3 uint8, or HxW for grayscale) and its defect mask (None for good)."""
    n = image_size
    if category == "button":
        img, region = _button(rng, n)
    else:
        img = _fabric(rng, n) if category == "fabric" else _mesh(rng, n)
        region = np.ones((n, n), bool)
    if defect == "good":
        return img, None
    mask = _defect_mask(defect, rng, n, region)
    color = DEFECT_COLORS[category][defect]
    img[mask] = color[0] if img.ndim == 2 else color
    return img, mask


def _save(array: np.ndarray, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, optimize=False, compress_level=6)


def generate(out_dir: str, seed: int = 0, *, image_size: int = 128,
             categories: tuple[str, ...] = CATEGORIES, num_train: int = NUM_TRAIN,
             overwrite: bool = False) -> dict[str, dict[str, int]]:
    """Writes the dataset under ``out_dir``; returns ``{category: {"train": n, "test/<defect>": n}}``.

    An existing category folder is replaced only when ``overwrite`` and it was written here
    (it holds the marker file); otherwise FileExistsError.
    """
    counts: dict[str, dict[str, int]] = {}
    for category in categories:
        if category not in DEFECTS:
            raise ValueError(f"Unknown synthetic category {category!r}; known: {CATEGORIES}.")
        c_index = CATEGORIES.index(category)  # a category's images do not depend on the others
        cdir = os.path.join(out_dir, category)
        if os.path.exists(cdir):
            if not (overwrite and os.path.isfile(os.path.join(cdir, _MARKER))):
                raise FileExistsError(f"{cdir} exists; pass overwrite=True (--overwrite) to replace "
                                      "a synthetic category, or choose another output folder.")
            shutil.rmtree(cdir)
        os.makedirs(cdir)
        open(os.path.join(cdir, _MARKER), "w").close()
        jobs = [("train", "good", i) for i in range(num_train)]
        jobs += [("test", "good", i) for i in range(NUM_TEST_GOOD)]
        jobs += [("test", d, i) for d in DEFECTS[category] for i in range(NUM_TEST_PER_DEFECT)]
        counts[category] = {}
        for split, defect, i in jobs:
            key = [seed, c_index, ("train", "test").index(split),
                   (("good",) + DEFECTS[category]).index(defect), i]
            rng = np.random.default_rng(key)
            img, mask = render(category, defect, rng, image_size)
            _save(img, os.path.join(cdir, split, defect, f"{i:03d}.png"))
            if mask is not None:
                _save(mask.astype(np.uint8) * 255,
                      os.path.join(cdir, "ground_truth", defect, f"{i:03d}_mask.png"))
            key = "train" if split == "train" else f"test/{defect}"
            counts[category][key] = counts[category].get(key, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output root (MVTec layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--overwrite", action="store_true", help="replace synthetic categories")
    args = parser.parse_args(argv)
    counts = generate(args.out, args.seed, image_size=args.image_size, overwrite=args.overwrite)
    for category, c in counts.items():
        print(f"{category}: " + ", ".join(f"{k}={v}" for k, v in c.items()))
    print(f"wrote {sum(sum(c.values()) for c in counts.values())} images to {args.out}")


if __name__ == "__main__":
    main()
