"""The paper's reported numbers (Yamada & Hotta, RSTPM), transcribed from its Tables 1-5.

"STPM" is the original student-teacher pyramid matching baseline; "RSTPM" is the paper's
method (the "Ours" columns). The paper reports pixel AUROC per category (Table 1) but
image AUROC only as the mean over the 15 MVTec AD categories (Table 2), and no AUPRO.
"""

from __future__ import annotations

from rstpm_jax.data.mvtec import OBJECTS, TEXTURES

MVTEC_CATEGORIES: tuple[str, ...] = TEXTURES + OBJECTS  # the paper's order

# Table 1: pixel-level AUROC per category, (STPM, Ours).
_TABLE1 = {
    "carpet": (0.988, 0.990),
    "grid": (0.990, 0.993),
    "leather": (0.993, 0.990),
    "tile": (0.974, 0.968),
    "wood": (0.972, 0.964),
    "bottle": (0.988, 0.989),
    "cable": (0.955, 0.976),
    "capsule": (0.983, 0.989),
    "hazelnut": (0.985, 0.991),
    "metal_nut": (0.976, 0.986),
    "pill": (0.978, 0.971),
    "screw": (0.983, 0.994),
    "toothbrush": (0.989, 0.990),
    "transistor": (0.825, 0.881),
    "zipper": (0.985, 0.985),
}
PIXEL_AUROC: dict[str, dict[str, float]] = {
    "stpm": {c: v[0] for c, v in _TABLE1.items()},
    "rstpm": {c: v[1] for c, v in _TABLE1.items()},
}
PIXEL_AUROC_MEAN: dict[str, float] = {"stpm": 0.970, "rstpm": 0.977}  # Table 1, "Mean" row

# Table 2: image-level AUROC, mean over the 15 categories only.
IMAGE_AUROC_MEAN: dict[str, float] = {"stpm": 0.955, "rstpm": 0.969}

# Table 3: mean AUROC at each resolution (1/4 = layer1, 1/8 = layer2, 1/16 = layer3) and the
# multi-scale (final) map. Each level's map is the students' maps at that resolution added.
PER_RESOLUTION: dict[str, dict[str, dict[str, float]]] = {
    "pixel_auroc": {
        "stpm": {"layer1": 0.915, "layer2": 0.953, "layer3": 0.957, "final": 0.970},
        "rstpm": {"layer1": 0.935, "layer2": 0.966, "layer3": 0.967, "final": 0.977},
    },
    "image_auroc": {
        "stpm": {"layer1": 0.808, "layer2": 0.917, "layer3": 0.934, "final": 0.955},
        "rstpm": {"layer1": 0.858, "layer2": 0.951, "layer3": 0.953, "final": 0.969},
    },
}
# Tables 4 (teachers) and 5 (attention): mean (pixel AUROC, image AUROC), keyed by the
# config name (configs/*.py `config.name`) of the model the column describes.
ABLATIONS: dict[str, dict[str, float]] = {
    "stpm": {"pixel_auroc": 0.970, "image_auroc": 0.955},
    "rstpm_r18_r18": {"pixel_auroc": 0.973, "image_auroc": 0.972},  # Table 4 "ResNet18"
    "rstpm_r50_r50": {"pixel_auroc": 0.976, "image_auroc": 0.961},  # Table 4 "ResNet50"
    "rstpm_no_attention": {"pixel_auroc": 0.973, "image_auroc": 0.954},  # Table 5
    "rstpm": {"pixel_auroc": 0.977, "image_auroc": 0.969},  # Tables 4-5 "Ours"
}


def category_group(category: str) -> str:
    """``"texture"``, ``"object"`` (MVTec AD's split) or ``"other"``."""
    if category in TEXTURES:
        return "texture"
    if category in OBJECTS:
        return "object"
    return "other"


def sort_categories(categories) -> list[str]:
    """Textures first, then objects, in the paper's order; unknown categories after, sorted."""
    order = {c: i for i, c in enumerate(MVTEC_CATEGORIES)}
    return sorted(categories, key=lambda c: (order.get(c, len(order)), c))
