"""MVTec AD layout: category names, folder scan and validation (PIL only, no TensorFlow).

Layout (MVTec AD, and any product a user brings in the same shape)::

    ROOT/<category>/train/good/*.png
    ROOT/<category>/test/<defect>/*.png              (``good`` = defect-free)
    ROOT/<category>/ground_truth/<defect>/<name>_mask.png   (none for ``good``)

Images may also be .jpg/.jpeg/.bmp/.tif/.tiff. Every file is checked when scanned (PIL
header and, for PNG, chunk CRCs up to IEND), so a corrupt or truncated file, a missing
mask or an empty folder is reported by name before training starts.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
from PIL import Image

MVTEC_URL = "https://www.mvtec.com/company/research/datasets/mvtec-ad"

TEXTURES: tuple[str, ...] = ("carpet", "grid", "leather", "tile", "wood")
OBJECTS: tuple[str, ...] = ("bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill",
                            "screw", "toothbrush", "transistor", "zipper")
CATEGORIES: tuple[str, ...] = tuple(sorted(TEXTURES + OBJECTS))

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"


@dataclasses.dataclass(frozen=True)
class TestItem:
    """One test image: ``label`` 0 for ``good``, 1 for a defect; ``mask_path`` None for good."""
    __test__ = False  # not a pytest class

    path: str
    mask_path: str | None
    label: int
    defect: str


@dataclasses.dataclass(frozen=True)
class CategoryFiles:
    """A scanned category: sorted train/good paths and test items (good first, then defects A-Z)."""
    category: str
    root: str
    train: list[str]
    test: list[TestItem]


def _where_to_get() -> str:
    return (f"Download MVTec AD from {MVTEC_URL} and extract it so that "
            "ROOT/<category>/train/good/ exists, or generate the synthetic demo data with "
            "`python -m rstpm_jax.data.synthetic --out ROOT`.")


def is_category_dir(path: str) -> bool:
    """True when ``path`` has the MVTec layout (a ``train/good`` folder)."""
    return os.path.isdir(os.path.join(path, "train", GOOD))


def list_categories(root: str) -> list[str]:
    """Every folder under ``root`` with the MVTec layout, sorted."""
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root)
                  if not d.startswith(".") and is_category_dir(os.path.join(root, d)))


def _check_root(root: str) -> str:
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"MVTec AD root {root!r} does not exist. {_where_to_get()}")
    return root


def _describe(root: str) -> str:
    found = list_categories(root)
    if found:
        return f"Categories found under {root!r}: {', '.join(found)}."
    other = sorted(d for d in os.listdir(root) if not d.startswith("."))[:20]
    return (f"No category folder (with train/good/) under {root!r}; it holds: "
            f"{', '.join(other) if other else 'nothing'}.")


def resolve_categories(root: str, spec: str) -> list[str]:
    """``spec`` "all" -> every category folder under ``root`` (sorted); else comma-separated names."""
    root = _check_root(root)
    found = list_categories(root)
    if spec.strip().lower() == "all":
        if not found:
            raise ValueError(f"{_describe(root)} {_where_to_get()}")
        return found
    names = list(dict.fromkeys(s.strip() for s in spec.split(",") if s.strip()))
    if not names:
        raise ValueError(f"data.categories is empty ({spec!r}); use 'all' or names. {_describe(root)}")
    missing = [n for n in names if n not in found]
    if missing:
        raise ValueError(f"data.categories names {missing} not found under {root!r}. "
                         f"{_describe(root)} {_where_to_get()}")
    return names


def _list_images(folder: str) -> list[str]:
    """Sorted image files in ``folder``; warns about files with other extensions."""
    images, other = [], []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        (images if name.lower().endswith(IMAGE_EXTENSIONS) else other).append(path)
    if other:
        warnings.warn(f"Ignoring {len(other)} file(s) in {folder} that are not images "
                      f"({'/'.join(IMAGE_EXTENSIONS)}): {[os.path.basename(p) for p in other[:5]]}",
                      stacklevel=3)
    return images


# (path, size, mtime_ns) -> (width, height): each file is verified once per process.
_VERIFIED: dict[tuple[str, int, int], tuple[int, int]] = {}


def image_size_of(path: str) -> tuple[int, int]:
    """(width, height) of an image after checking it is readable; ValueError naming the file."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return _VERIFIED[key]
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # PNG: walks every chunk to IEND checking CRCs; catches truncation.
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, SyntaxError, OSError)
        raise ValueError(f"Corrupt or truncated image file {path}: {type(e).__name__}: {e}. "
                         "Replace it (re-download or re-extract the dataset) or delete it.") from e
    _VERIFIED[key] = size
    return size


def _masks_in(gt_dir: str) -> dict[str, str]:
    """``{image stem: mask path}`` for ``<stem>_mask.<ext>`` files in ``gt_dir``."""
    if not os.path.isdir(gt_dir):
        return {}
    out = {}
    for name in sorted(os.listdir(gt_dir)):
        stem, ext = os.path.splitext(name)
        if stem.endswith("_mask") and ext.lower() in IMAGE_EXTENSIONS:
            out.setdefault(stem[:-len("_mask")], os.path.join(gt_dir, name))
    return out


def scan_category(root: str, category: str, *, verify: bool = True) -> CategoryFiles:
    """Lists and validates one category's files (see the module docstring for the layout)."""
    root = _check_root(root)
    cdir = os.path.join(root, category)
    if not is_category_dir(cdir):
        raise FileNotFoundError(f"Category {category!r} not found: {cdir}/train/good/ does not exist. "
                                f"{_describe(root)} {_where_to_get()}")
    train = _list_images(os.path.join(cdir, "train", GOOD))
    if not train:
        raise ValueError(f"No training images in {cdir}/train/good/ (extensions "
                         f"{'/'.join(IMAGE_EXTENSIONS)}). Put the defect-free images there.")
    test_dir = os.path.join(cdir, "test")
    if not os.path.isdir(test_dir):
        raise FileNotFoundError(f"{test_dir}/ does not exist: category {category!r} needs "
                                "test/good/ and test/<defect>/ folders.")
    defects = sorted(d for d in os.listdir(test_dir)
                     if not d.startswith(".") and os.path.isdir(os.path.join(test_dir, d)))
    defects = sorted(defects, key=lambda d: d != GOOD)  # good first, then defects A-Z
    test: list[TestItem] = []
    for defect in defects:
        gt_dir = os.path.join(cdir, "ground_truth", defect)
        masks = _masks_in(gt_dir) if defect != GOOD else {}
        for path in _list_images(os.path.join(test_dir, defect)):
            if defect == GOOD:
                test.append(TestItem(path, None, 0, defect))
                continue
            stem = os.path.splitext(os.path.basename(path))[0]
            mask = masks.get(stem)
            if mask is None:
                raise FileNotFoundError(
                    f"Defect image {path} has no mask: expected {gt_dir}/{stem}_mask.png "
                    "(binary, same size as the image). Add the mask or move the image out of test/.")
            test.append(TestItem(path, mask, 1, defect))
    if not test:
        raise ValueError(f"No test images under {test_dir}/ (expected test/good/ and test/<defect>/).")
    if verify:
        for path in train:
            image_size_of(path)
        for item in test:
            size = image_size_of(item.path)
            if item.mask_path is not None:
                msize = image_size_of(item.mask_path)
                if msize != size:
                    warnings.warn(f"Mask {item.mask_path} is {msize[0]}x{msize[1]} but its image "
                                  f"{item.path} is {size[0]}x{size[1]}; the mask is resized "
                                  "(nearest) to the image.", stacklevel=2)
    return CategoryFiles(category=category, root=root, train=train, test=test)


def read_rgb(path: str) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB (grayscale replicated, alpha dropped); names the file on error."""
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale -> 8-bit
                im = Image.fromarray((np.asarray(im, np.float64) / 257).round().astype(np.uint8))
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise ValueError(f"Cannot decode image {path}: {type(e).__name__}: {e}") from e


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """0/1 uint8 mask: a pixel is set when >= half the mask's maximum (0/255 and 0/1 masks both work)."""
    mask = np.asarray(mask)
    peak = int(mask.max()) if mask.size else 0
    if peak == 0:
        return np.zeros(mask.shape, np.uint8)
    return (mask.astype(np.int32) * 2 >= peak).astype(np.uint8)


def read_mask(path: str, size: tuple[int, int]) -> np.ndarray:
    """A mask file as HxW 0/1 uint8, resized (nearest) to ``size`` = (width, height) if needed."""
    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:
        raise ValueError(f"Cannot decode mask {path}: {type(e).__name__}: {e}") from e
    if im.size != tuple(size):
        warnings.warn(f"Mask {path} is {im.size[0]}x{im.size[1]}, its image {size[0]}x{size[1]}; "
                      "resizing the mask (nearest).", stacklevel=2)
        im = im.resize(tuple(size), Image.NEAREST)
    if not im.mode.startswith("I"):  # 16/32-bit masks keep their values; binarize is relative
        im = im.convert("L")
    return binarize_mask(np.asarray(im))
