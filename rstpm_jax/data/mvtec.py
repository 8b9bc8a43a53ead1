"""MVTec AD layout: category names, folder scan and validation (PIL only, no TensorFlow).

Layout (MVTec AD, and any product a user brings in the same shape)::

    ROOT/<category>/train/good/*.png
    ROOT/<category>/test/<defect>/*.png              (``good`` = defect-free)
    ROOT/<category>/ground_truth/<defect>/<name>_mask.png   (none for ``good``)

Images may also be .jpg/.jpeg/.bmp/.tif/.tiff, and may sit in subfolders of ``train/good``
and ``test/<defect>`` (a defect image's mask then sits in the same subfolder of
``ground_truth/<defect>``). Every other path (non-image files, broken symlinks, hidden files)
is named in one warning per folder. Every file is fully decoded when first scanned (PNG
chunk CRCs too; once per file and process), so a corrupt or truncated file, a missing mask or
an empty folder is reported by name before training starts.
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


_MAX_NAMED = 10


def _walk(folder: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Every file below ``folder`` (symlinked folders followed once) sorted by relative path,
    and the skipped entries as ``(path, why)``: hidden, broken symlinks, not regular files."""
    files, skipped, seen = [], [], set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:  # a symlink loop or a folder linked twice
            skipped.append((top, "a folder already read (symlink loop?)"))
            dirs[:] = []
            continue
        seen.add(real)
        for d in [d for d in dirs if d.startswith(".")]:
            skipped.append((os.path.join(top, d), "hidden folder"))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = os.path.join(top, name)
            if name.startswith("."):
                skipped.append((path, "hidden"))
            elif os.path.islink(path) and not os.path.exists(path):
                skipped.append((path, f"broken symlink to {os.readlink(path)}"))
            elif not os.path.isfile(path):
                skipped.append((path, "not a regular file"))
            else:
                files.append(path)
    key = lambda p: os.path.relpath(p, folder).replace(os.sep, "/")  # TFDS's record order
    return sorted(files, key=key), sorted(skipped)


def _list_images(folder: str) -> list[str]:
    """Image files below ``folder`` (subfolders included), sorted by relative path; ONE
    warning naming every other path skipped (non-image files, broken symlinks, hidden ones)."""
    files, skipped = _walk(folder)
    images = [p for p in files if p.lower().endswith(IMAGE_EXTENSIONS)]
    skipped += [(p, f"not an image ({'/'.join(IMAGE_EXTENSIONS)})") for p in files
                if not p.lower().endswith(IMAGE_EXTENSIONS)]
    if skipped:
        skipped.sort()
        named = [f"{os.path.relpath(p, folder)} ({why})" for p, why in skipped[:_MAX_NAMED]]
        more = f" and {len(skipped) - _MAX_NAMED} more" if len(skipped) > _MAX_NAMED else ""
        warnings.warn(f"Skipping {len(skipped)} path(s) under {folder}: {'; '.join(named)}{more}.",
                      stacklevel=3)
    return images


# (path, size, mtime_ns) -> (width, height): each file is decoded once per process.
_VERIFIED: dict[tuple[str, int, int], tuple[int, int]] = {}
DECODE_THREADS = 8


def image_size_of(path: str) -> tuple[int, int]:
    """(width, height) of an image after decoding it fully (PNG: chunk CRCs too); ValueError
    naming the file. Cached per (path, size, mtime), so each file is decoded once."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return _VERIFIED[key]
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # PNG: walks every chunk to IEND checking CRCs
        with Image.open(path) as im:
            im.load()  # every format: the whole image decodes (a truncated JPEG fails here)
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, SyntaxError, OSError)
        raise ValueError(f"Corrupt or truncated image file {path}: {type(e).__name__}: {e}. "
                         "Replace it (re-download or re-extract the dataset) or delete it.") from e
    _VERIFIED[key] = size
    return size


def decode_all(paths: list[str]) -> list[tuple[int, int]]:
    """``image_size_of`` of every path, decoded in threads (PIL releases the GIL); the first
    bad file in ``paths``' order raises."""
    todo = [p for p in paths if (p, *_stat_key(p)) not in _VERIFIED]
    if len(todo) > 1:
        from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 (only with work to do)
        with ThreadPoolExecutor(min(DECODE_THREADS, os.cpu_count() or 1)) as pool:
            list(pool.map(image_size_of, todo))
    return [image_size_of(p) for p in paths]


def _stat_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _masks_in(gt_dir: str) -> dict[str, str]:
    """``{image stem relative to gt_dir: mask path}`` for ``<stem>_mask.<ext>`` files below ``gt_dir``."""
    if not os.path.isdir(gt_dir):
        return {}
    out = {}
    for path in _walk(gt_dir)[0]:
        stem, ext = os.path.splitext(os.path.relpath(path, gt_dir))
        if stem.endswith("_mask") and ext.lower() in IMAGE_EXTENSIONS:
            out.setdefault(stem[:-len("_mask")], path)
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
    loose = sorted(d for d in os.listdir(test_dir) if d not in defects)
    if loose:
        warnings.warn(f"Skipping {len(loose)} path(s) in {test_dir} that are not defect folders "
                      f"(test images go in test/good/ or test/<defect>/): {loose[:_MAX_NAMED]}",
                      stacklevel=2)
    defects = sorted(defects, key=lambda d: d != GOOD)  # good first, then defects A-Z
    test: list[TestItem] = []
    for defect in defects:
        gt_dir = os.path.join(cdir, "ground_truth", defect)
        masks = _masks_in(gt_dir) if defect != GOOD else {}
        defect_dir = os.path.join(test_dir, defect)
        for path in _list_images(defect_dir):
            if defect == GOOD:
                test.append(TestItem(path, None, 0, defect))
                continue
            stem = os.path.splitext(os.path.relpath(path, defect_dir))[0]  # sub/folders kept
            mask = masks.get(stem)
            if mask is None:
                raise FileNotFoundError(
                    f"Defect image {path} has no mask: expected {os.path.join(gt_dir, stem)}_mask.png "
                    "(binary, same size as the image). Add the mask or move the image out of test/.")
            test.append(TestItem(path, mask, 1, defect))
    if not test:
        raise ValueError(f"No test images under {test_dir}/ (expected test/good/ and test/<defect>/).")
    if verify:
        masks = [t.mask_path for t in test if t.mask_path is not None]
        sizes = dict(zip(train + [t.path for t in test] + masks,
                         decode_all(train + [t.path for t in test] + masks)))
        for item in test:
            size = sizes[item.path]
            if item.mask_path is not None:
                msize = sizes[item.mask_path]
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
