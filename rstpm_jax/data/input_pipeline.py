"""tf.data input pipeline: decode, RGB, resize, ImageNet normalisation, shard per host, batch.

Images are read straight from the scanned files (``data_dir=None``) or, with ``data_dir``,
from the TFDS data prepared there (``tfds_mvtec``; the file list then comes from it too).
Either way the order is fixed in NumPy, so it does not depend on the number of hosts: global batch ``b`` holds positions
``order[b*G:(b+1)*G]`` and host ``p`` reads rows ``p*L:(p+1)*L`` of it (``L = G // P``),
which is how ``jax.make_array_from_process_local_data`` assembles the global batch.

- train: one epoch, a permutation drawn from ``(seed, epoch)`` only, remainder dropped.
- eval: every image once, in file order; the last batch is padded (``valid=False``,
  ``index=-1``) so every host yields the same number of batches.

Images are decoded and resized by ``preprocess`` (PIL, through ``tf.numpy_function``), the
code predict uses, so both see the same uint8 pixels. TensorFlow is imported lazily and never
sees a GPU.
"""

from __future__ import annotations

import functools
import io
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from rstpm_jax.data import mvtec, preprocess
from rstpm_jax.data.preprocess import NORM_OFFSET, NORM_SCALE, hw

SPLITS = ("train", "holdout", "test")
_PIL_ONLY = (".tif", ".tiff")  # formats tf.io.decode_image cannot read


def _tf():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    import tensorflow as tf  # noqa: PLC0415 (TensorFlow only when a pipeline is built)
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised
        pass
    return tf


def _host(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, process_count={process_count}).")
    return process_index, process_count


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"Batch size {global_batch_size} must be a positive multiple of the number "
                         f"of hosts ({process_count}); change train.batch_size / eval.batch_size.")
    return global_batch_size // process_count


def split_train_holdout(files: Sequence[str], holdout_fraction: float,
                        seed: int) -> tuple[list[str], list[str]]:
    """Deterministic split of train/good into (train, holdout); both keep the input order."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"data.holdout_fraction must be in [0, 1), got {holdout_fraction}.")
    n = len(files)
    n_hold = 0 if holdout_fraction == 0 else max(1, int(round(holdout_fraction * n)))
    if n_hold >= n:
        raise ValueError(f"data.holdout_fraction={holdout_fraction} leaves no training image out of {n}; "
                         "lower it or add images to train/good.")
    held = set(np.random.default_rng(seed).permutation(n)[:n_hold].tolist())
    return ([f for i, f in enumerate(files) if i not in held],
            [f for i, f in enumerate(files) if i in held])


def category_files(root: str, category: str, data_dir: str | None = None) -> mvtec.CategoryFiles:
    """A category's files: scanned under ``root``, or read from the TFDS data prepared in
    ``data_dir`` (prepared from ``root`` first when absent)."""
    if data_dir:
        from rstpm_jax.data import tfds_mvtec  # noqa: PLC0415 (TensorFlow)
        return tfds_mvtec.category_files(root, category, data_dir)
    return mvtec.scan_category(root, category)


def test_items(root: str, category: str, data_dir: str | None = None) -> list[mvtec.TestItem]:
    """Test items in the order of ``eval_dataset(split="test")``'s ``index``."""
    return list(category_files(root, category, data_dir).test)


def _items(root: str, category: str, split: str, holdout_fraction: float,
           seed: int, data_dir: str | None = None) -> list[mvtec.TestItem]:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
    files = category_files(root, category, data_dir)
    if split == "test":
        return list(files.test)
    train, holdout = split_train_holdout(files.train, holdout_fraction, seed)
    return [mvtec.TestItem(p, None, 0, mvtec.GOOD) for p in (train if split == "train" else holdout)]


def num_examples(root: str, category: str, split: str, holdout_fraction: float = 0.1,
                 seed: int = 0, data_dir: str | None = None) -> int:
    return len(_items(root, category, split, holdout_fraction, seed, data_dir))


# ---------------------------------------------------------------------------------------
# Decoding


def _pil_rgb(source: bytes, size: tuple[int, int], encoded: bool = False) -> np.ndarray:
    """A path (or, ``encoded``, the file's bytes) -> uint8 RGB at ``size``, as predict reads it."""
    rgb = mvtec.read_rgb(io.BytesIO(source) if encoded else source.decode())
    return preprocess.resize_rgb(rgb, size)


def _pil_mask(path: bytes) -> np.ndarray:
    with Image.open(path.decode()) as im:
        return np.asarray(im.convert("L"))[..., None]


def _binarize(tf, mask):
    m = tf.cast(mask, tf.int32)
    peak = tf.reduce_max(m)
    return tf.cast((m * 2 >= peak) & (peak > 0), tf.uint8)


def _decode(tf, data, channels: int):
    return tf.io.decode_image(data, channels=channels, dtype=tf.uint8, expand_animations=False)


def _loader(items: list[mvtec.TestItem], root: str, category: str, split: str, size: tuple[int, int],
            data_dir: str | None, with_mask: bool):
    """A tf function: item index -> {"image" (uint8, resized), "index"[, "mask", "label", "valid"]}.

    Images are decoded and resized by ``preprocess.resize_rgb`` (PIL), exactly as predict does.
    """
    tf = _tf()
    labels = tf.constant([it.label for it in items] or [0], tf.int32)
    has_mask = tf.constant([it.mask_path is not None for it in items] or [False])
    if data_dir is None:
        paths = tf.constant([it.path for it in items] or [""])
        mask_paths = tf.constant([it.mask_path or "" for it in items] or [""])
        pil_masks = any((it.mask_path or "").lower().endswith(_PIL_ONLY) for it in items)
        image_source, encoded = paths, False

        def read_mask(i):
            if pil_masks:
                m = tf.numpy_function(_pil_mask, [mask_paths[i]], tf.uint8, stateful=False)
                return tf.ensure_shape(m, [None, None, 1])
            return _decode(tf, tf.io.read_file(mask_paths[i]), 1)
    else:
        from rstpm_jax.data import tfds_mvtec  # noqa: PLC0415
        records = tfds_mvtec.read_split(root, category, "test" if split == "test" else "train", data_dir)
        names = [tfds_mvtec.record_name(root, category, it.path) for it in items]
        images = tf.constant([records[n].image for n in names] or [b""])
        masks = tf.constant([records[n].mask for n in names] or [b""])
        image_source, encoded = images, True

        def read_mask(i):
            return _decode(tf, masks[i], 1)

    read_rgb = functools.partial(_pil_rgb, size=size, encoded=encoded)

    def load(i):
        img = tf.numpy_function(read_rgb, [image_source[i]], tf.uint8, stateful=False)
        out = {"image": tf.ensure_shape(img, [*size, 3]), "index": i}
        if with_mask:
            out["mask"] = tf.cond(
                has_mask[i],
                lambda: tf.image.resize(_binarize(tf, read_mask(i)), size, method="nearest")[..., 0],
                lambda: tf.zeros(size, tf.uint8))
            out["label"] = labels[i]
            out["valid"] = tf.constant(True)
        return out

    return load


class Batches:
    """An iterator of NumPy batches with a known length; decode errors name the bad file."""

    def __init__(self, ds: Any, num_batches: int, files: list[str]):
        self._it = ds.as_numpy_iterator()
        self._n = num_batches
        self._files = files

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        tf = _tf()
        try:
            return next(self._it)
        except tf.errors.OpError as e:
            for path in self._files:  # find the culprit with a full PIL decode
                if not os.path.isfile(path):  # read from TFDS records
                    continue
                try:
                    with Image.open(path) as im:
                        im.load()
                except Exception as pil_error:
                    raise ValueError(f"Cannot decode image file {path}: {pil_error}. Replace or "
                                     "delete it.") from e
            raise


def _dataset(load, indices: np.ndarray, local_batch: int, pad: int, size: tuple[int, int],
             normalize: bool = True, with_mask: bool = True):
    tf = _tf()
    scale, offset = tf.constant(NORM_SCALE), tf.constant(NORM_OFFSET)

    def norm(ex):
        return {**ex, "image": tf.cast(ex["image"], tf.float32) * scale + offset}

    ds = tf.data.Dataset.from_tensor_slices(indices.astype(np.int32))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if normalize:
        ds = ds.map(norm, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if pad:
        h, w = size
        filler = {"image": tf.zeros((h, w, 3), tf.float32), "index": tf.constant(-1, tf.int32),
                  "valid": tf.constant(False)}
        if with_mask:
            filler.update(mask=tf.zeros((h, w), tf.uint8), label=tf.constant(0, tf.int32))
        ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(pad))
    ds = ds.batch(local_batch, drop_remainder=False)
    return ds.prefetch(tf.data.AUTOTUNE)


# The decoded, resized training images of the categories being trained (oldest dropped first
# past the byte budget of the latest call).
_PIXEL_CACHE: dict[tuple, Any] = {}


def _cached_loader(items: list[mvtec.TestItem], root: str, category: str, size: tuple[int, int],
                   data_dir: str | None, max_bytes: int):
    """Decodes and resizes every training image once; later epochs gather from memory."""
    tf = _tf()
    stamp = (lambda p: 0) if data_dir else (lambda p: os.stat(p).st_mtime_ns)
    key = (tuple((it.path, stamp(it.path)) for it in items), size, data_dir)
    if key not in _PIXEL_CACHE:
        need = len(items) * size[0] * size[1] * 3
        while _PIXEL_CACHE and sum(int(v.shape.num_elements()) for v in _PIXEL_CACHE.values()) + need > max_bytes:
            _PIXEL_CACHE.pop(next(iter(_PIXEL_CACHE)))
        load = _loader(items, root, category, "train", size, data_dir, with_mask=False)
        ds = _dataset(load, np.arange(len(items)), 64, 0, size, normalize=False)
        batches = list(Batches(ds, 0, [it.path for it in items]))
        _PIXEL_CACHE[key] = tf.constant(np.concatenate([b["image"] for b in batches]))
    pixels = _PIXEL_CACHE[key]
    return lambda i: {"image": tf.gather(pixels, i), "index": i}


def train_steps(num_images: int, global_batch_size: int, drop_last: bool) -> int:
    """Steps in an epoch: ``n // batch`` dropping the last partial batch, else ``ceil(n / batch)``."""
    return num_images // global_batch_size if drop_last else -(-num_images // global_batch_size)


def train_dataset(root: str, category: str, *, image_size: int | Sequence[int], global_batch_size: int,
                  seed: int, epoch: int, holdout_fraction: float, rows: tuple[int, int] | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  data_dir: str | None = None, drop_last: bool = True,
                  cache_max_bytes: int = 4 * 2**30) -> Batches:
    """One epoch of {"image": (R,H,W,3) float32, "index": (R,) int32, "valid": (R,) bool}; the
    order comes from (seed, epoch) only.

    Each global batch holds ``global_batch_size`` positions of the epoch's order; this process
    reads rows ``rows = (lo, hi)`` of each (default: its share ``p*L:(p+1)*L`` by process). With
    ``drop_last=False`` the last partial batch is kept and filled with padding rows
    (``valid=False``, ``index=-1``, zero images) up to the batch size. When the resized uint8
    images fit in ``cache_max_bytes`` they are decoded once per process and kept in memory for
    later epochs (same values as decoding each time).
    """
    if rows is None:
        p, num_hosts = _host(process_index, process_count)
        local = _local_batch(global_batch_size, num_hosts)
        rows = (p * local, (p + 1) * local)
    lo, hi = rows
    if not 0 <= lo < hi <= global_batch_size:
        raise ValueError(f"rows {rows} not within a batch of {global_batch_size}.")
    items = _items(root, category, "train", holdout_fraction, seed, data_dir)
    steps = train_steps(len(items), global_batch_size, drop_last)
    if steps == 0:
        raise ValueError(f"train.batch_size={global_batch_size} exceeds the {len(items)} training images "
                         f"of {category!r} (after the holdout); lower the batch size or set "
                         "train.drop_last=False.")
    order = np.full(steps * global_batch_size, -1, np.int64)
    used = min(len(items), steps * global_batch_size)
    order[:used] = np.random.default_rng([seed, epoch]).permutation(len(items))[:used]
    mine = order.reshape(steps, global_batch_size)[:, lo:hi].reshape(-1)
    real = mine[mine >= 0]  # padding is the end of the last batch: it comes last here too
    size = hw(image_size)
    if len(items) * size[0] * size[1] * 3 <= cache_max_bytes:
        load = _cached_loader(items, root, category, size, data_dir, cache_max_bytes)
    else:
        load = _loader(items, root, category, "train", size, data_dir, with_mask=False)

    tf = _tf()

    def load_valid(i):
        return {**load(i), "valid": tf.constant(True)}

    ds = _dataset(load_valid, real, hi - lo, len(mine) - len(real), size, with_mask=False)
    return Batches(ds, steps, [items[i].path for i in real])


def eval_dataset(root: str, category: str, *, split: str = "test", image_size: int | Sequence[int],
                 global_batch_size: int, process_index: int | None = None,
                 process_count: int | None = None, data_dir: str | None = None,
                 holdout_fraction: float = 0.1, seed: int = 0) -> Batches:
    """Every image of ``split`` once across hosts: {"image", "mask", "label", "valid", "index"}."""
    p, num_hosts = _host(process_index, process_count)
    local = _local_batch(global_batch_size, num_hosts)
    items = _items(root, category, split, holdout_fraction, seed, data_dir)
    n = len(items)
    steps = math.ceil(n / global_batch_size)
    positions = np.arange(steps * global_batch_size).reshape(steps, num_hosts, local)[:, p].reshape(-1)
    mine = positions[positions < n]  # padding positions come last on every host
    size = hw(image_size)
    load = _loader(items, root, category, split, size, data_dir, with_mask=True)
    files = [items[i].path for i in mine] + [items[i].mask_path for i in mine if items[i].mask_path]
    return Batches(_dataset(load, mine, local, len(positions) - len(mine), size), steps, files)


def load_images(root: str, category: str, split: str, *, image_size: int | Sequence[int],
                holdout_fraction: float, seed: int, process_index: int | None = None,
                process_count: int | None = None, data_dir: str | None = None,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """This host's contiguous shard of ``split``: (N, H, W, 3) float32 images and their int32 indices."""
    p, num_hosts = _host(process_index, process_count)
    items = _items(root, category, split, holdout_fraction, seed, data_dir)
    mine = np.array_split(np.arange(len(items)), num_hosts)[p]
    size = hw(image_size)
    if len(mine) == 0:
        return np.zeros((0, *size, 3), np.float32), np.zeros((0,), np.int32)
    load = _loader(items, root, category, split, size, data_dir, with_mask=False)
    batches = list(Batches(_dataset(load, mine, batch_size, 0, size), 0, [items[i].path for i in mine]))
    return (np.concatenate([b["image"] for b in batches]),
            np.concatenate([b["index"] for b in batches]).astype(np.int32))
