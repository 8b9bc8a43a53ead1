"""tf.data input pipeline: decode, RGB, resize, ImageNet normalisation, shard per host, batch.

Images are read straight from the scanned files (``data_dir=None``) or, with ``data_dir``,
from the TFDS data prepared there (``tfds_mvtec``; the file list then comes from it too).
Either way the order is fixed in NumPy, so it does not depend on the number of hosts: global batch ``b`` holds positions
``order[b*G:(b+1)*G]`` and host ``p`` reads rows ``p*L:(p+1)*L`` of it (``L = G // P``),
which is how ``jax.make_array_from_process_local_data`` assembles the global batch.

- train: one epoch, a permutation drawn from ``(seed, epoch)`` only, remainder dropped.
- eval: every image once, in file order; the last batch is padded (``valid=False``,
  ``index=-1``) so every host yields the same number of batches.

Images are decoded (and resized) by ``preprocess`` (PIL, through ``tf.numpy_function``),
the code predict uses, so both see the same uint8 pixels.

With ``tiling`` (a ``tiling.TileSpec``, from ``data.tile_size``/``data.tile_stride``) images
keep their own resolution and the examples are their tiles: train yields tiles (each an
example, shuffled across images; ``index`` is the tile's position in :func:`tile_table`),
eval yields every tile of every image in order with the image's index, the tile's offset
and the image's size, for ``tiling.Stitcher`` to put the maps back together.

TensorFlow is imported lazily and never sees a GPU.
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
from rstpm_jax.data.tiling import TileSpec, grid

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
                 seed: int = 0, data_dir: str | None = None, tiling: TileSpec | None = None) -> int:
    """Images of ``split``; with ``tiling``, their tiles."""
    items = _items(root, category, split, holdout_fraction, seed, data_dir)
    if tiling is None:
        return len(items)
    return len(tile_table(image_sizes(items, root, category, split, data_dir), tiling)[0])


def image_sizes(items: Sequence[mvtec.TestItem], root: str, category: str, split: str,
                data_dir: str | None = None) -> np.ndarray:
    """(n, 2) int64 ``[height, width]`` of the items' images (read from the headers)."""
    if data_dir:
        from rstpm_jax.data import tfds_mvtec  # noqa: PLC0415 (TensorFlow)
        records = tfds_mvtec.read_split(root, category, "test" if split == "test" else "train", data_dir)

        def size(it):
            with Image.open(io.BytesIO(records[tfds_mvtec.record_name(root, category, it.path)].image)) as im:
                return im.size
    else:
        def size(it):
            return mvtec.image_size_of(it.path)
    return np.array([size(it)[::-1] for it in items], np.int64).reshape(-1, 2)


def tile_table(sizes: np.ndarray, tiling: TileSpec) -> tuple[np.ndarray, np.ndarray]:
    """Every tile of images of ``sizes`` ([h, w] rows), image by image, row-major: the image
    index (n,) and the ``[y, x]`` offset (n, 2) of each."""
    grids = [grid(h, w, tiling) for h, w in sizes]
    item = np.concatenate([np.full(len(g), i, np.int64) for i, g in enumerate(grids)] or [np.zeros(0, np.int64)])
    pos = np.concatenate(grids) if grids else np.zeros((0, 2), np.int64)
    return item, pos


# ---------------------------------------------------------------------------------------
# Decoding


def _pil_rgb(source: bytes, size: tuple[int, int] | None = None, encoded: bool = False) -> np.ndarray:
    """A path (or, ``encoded``, the file's bytes) -> uint8 RGB (at ``size`` unless None), as
    predict reads it."""
    rgb = mvtec.read_rgb(io.BytesIO(source) if encoded else source.decode())
    return rgb if size is None else preprocess.resize_rgb(rgb, size)


def _pil_mask(path: bytes) -> np.ndarray:
    with Image.open(path.decode()) as im:
        return np.asarray(im.convert("L"))[..., None]


def _binarize(tf, mask):
    m = tf.cast(mask, tf.int32)
    peak = tf.reduce_max(m)
    return tf.cast((m * 2 >= peak) & (peak > 0), tf.uint8)


def _decode(tf, data, channels: int):
    return tf.io.decode_image(data, channels=channels, dtype=tf.uint8, expand_animations=False)


def _readers(items: list[mvtec.TestItem], root: str, category: str, split: str, data_dir: str | None):
    """tf functions ``(item index, size) -> uint8 RGB image`` (decoded and, to ``size`` when not
    None, resized by PIL exactly as predict does) and ``item index -> uint8 mask (H, W, 1)``."""
    tf = _tf()
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

    def read_image(i, size: tuple[int, int] | None = None):
        read = functools.partial(_pil_rgb, size=size, encoded=encoded)
        img = tf.numpy_function(read, [image_source[i]], tf.uint8, stateful=False)
        return tf.ensure_shape(img, [*(size or (None, None)), 3])

    return read_image, read_mask


def _loader(items: list[mvtec.TestItem], root: str, category: str, split: str, size: tuple[int, int],
            data_dir: str | None, with_mask: bool):
    """A tf function: item index -> {"image" (uint8, resized), "index"[, "mask", "label", "valid"]}."""
    tf = _tf()
    labels = tf.constant([it.label for it in items] or [0], tf.int32)
    has_mask = tf.constant([it.mask_path is not None for it in items] or [False])
    read_image, read_mask = _readers(items, root, category, split, data_dir)

    def load(i):
        out = {"image": read_image(i, size), "index": i}
        if with_mask:
            out["mask"] = tf.cond(
                has_mask[i],
                lambda: tf.image.resize(_binarize(tf, read_mask(i)), size, method="nearest")[..., 0],
                lambda: tf.zeros(size, tf.uint8))
            out["label"] = labels[i]
            out["valid"] = tf.constant(True)
        return out

    return load


def _pad_edge(tf, x, t: int):
    """(H, W, C) -> (max(H, t), max(W, t), C), edge pixels repeated (``tiling.pad_to_tile``)."""
    h, w = tf.shape(x)[0], tf.shape(x)[1]
    rows = tf.minimum(tf.range(tf.maximum(h, t)), h - 1)
    cols = tf.minimum(tf.range(tf.maximum(w, t)), w - 1)
    return tf.gather(tf.gather(x, rows, axis=0), cols, axis=1)


def _crop(tf, x, yx, t: int, channels: int):
    return tf.ensure_shape(tf.slice(x, tf.stack([yx[0], yx[1], 0]), [t, t, -1]), [t, t, channels])


def _full_res(items: list[mvtec.TestItem], root: str, category: str, split: str, data_dir: str | None,
              tiling: TileSpec, with_mask: bool):
    """A tf function: item index -> the image (and 0/1 mask, resized (nearest) to the image if
    its size differs) at full resolution, edge-padded to at least one tile."""
    tf = _tf()
    has_mask = tf.constant([it.mask_path is not None for it in items] or [False])
    read_image, read_mask = _readers(items, root, category, split, data_dir)
    t = tiling.size

    def load(i):
        img = read_image(i)
        out = {"image": _pad_edge(tf, img, t)}
        if with_mask:
            hw_ = tf.shape(img)[:2]

            def mask():
                m = _binarize(tf, read_mask(i))
                return tf.cond(tf.reduce_all(tf.shape(m)[:2] == hw_), lambda: m,
                               lambda: tf.cast(tf.image.resize(m, hw_, method="nearest"), tf.uint8))

            m = tf.cond(has_mask[i], mask, lambda: tf.zeros(tf.concat([hw_, [1]], 0), tf.uint8))
            out["mask"] = _pad_edge(tf, m, t)
        return out

    return load


def _tile_loader(items: list[mvtec.TestItem], root: str, category: str, split: str,
                 data_dir: str | None, tiling: TileSpec, table: tuple[np.ndarray, np.ndarray]):
    """A tf function: tile index (into ``table``) -> {"image" (uint8 tile), "index"}; decodes
    the tile's image each time (the uncached path)."""
    tf = _tf()
    item, pos = (tf.constant(a.astype(np.int32)) for a in table)
    load_full = _full_res(items, root, category, split, data_dir, tiling, with_mask=False)

    def load(j):
        return {"image": _crop(tf, load_full(item[j])["image"], pos[j], tiling.size, 3), "index": j}

    return load


def _tile_stream(load_full, image_indices: np.ndarray, table: tuple[np.ndarray, np.ndarray],
                 tiling: TileSpec, fields):
    """Dataset of the tiles of ``image_indices`` (each decoded once), in ``table`` order:
    ``fields(i, full, yx, j) -> example`` per tile (``j``: its index in ``table``)."""
    tf = _tf()
    item, pos = table
    counts = np.bincount(item, minlength=int(image_indices.max(initial=-1)) + 1)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
    positions = tf.RaggedTensor.from_row_lengths(tf.constant(pos.astype(np.int32)),
                                                 tf.constant(counts.astype(np.int64)))
    first_t = tf.constant(first)

    def tiles_of(i):
        full = load_full(i)
        yx = positions[i]
        js = first_t[i] + tf.range(tf.shape(yx)[0], dtype=tf.int32)
        return tf.data.Dataset.from_tensor_slices((yx, js)).map(lambda p, j: fields(i, full, p, j))

    ds = tf.data.Dataset.from_tensor_slices(image_indices.astype(np.int32))
    return ds.interleave(tiles_of, cycle_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


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
    ds = tf.data.Dataset.from_tensor_slices(indices.astype(np.int32))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _finish(ds, local_batch, pad, size, normalize, with_mask)


def _finish(ds, local_batch: int, pad: int, size: tuple[int, int], normalize: bool = True,
            with_mask: bool = True, tiles: bool = False):
    """Normalise, append ``pad`` padding examples (``valid=False``, ``index=-1``), batch."""
    tf = _tf()
    scale, offset = tf.constant(NORM_SCALE), tf.constant(NORM_OFFSET)

    def norm(ex):
        return {**ex, "image": tf.cast(ex["image"], tf.float32) * scale + offset}

    if normalize:
        ds = ds.map(norm, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if pad:
        h, w = size
        filler = {"image": tf.zeros((h, w, 3), tf.float32 if normalize else tf.uint8),
                  "index": tf.constant(-1, tf.int32), "valid": tf.constant(False)}
        if with_mask:
            filler.update(mask=tf.zeros((h, w), tf.uint8), label=tf.constant(0, tf.int32))
        if tiles:
            filler.update(tile_yx=tf.zeros(2, tf.int32), image_hw=tf.zeros(2, tf.int32))
        ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(pad))
    ds = ds.batch(local_batch, drop_remainder=False)
    return ds.prefetch(tf.data.AUTOTUNE)


# The decoded, resized training images (or tiles) of the categories being trained (oldest
# dropped first past the byte budget of the latest call).
_PIXEL_CACHE: dict[tuple, Any] = {}


def _cached_loader(items: list[mvtec.TestItem], root: str, category: str, size: tuple[int, int],
                   data_dir: str | None, max_bytes: int, tiling: TileSpec | None = None,
                   table: tuple[np.ndarray, np.ndarray] | None = None):
    """Decodes and resizes every training image (with ``tiling``: cuts every tile of ``table``)
    once; later epochs gather from memory."""
    tf = _tf()
    stamp = (lambda p: 0) if data_dir else (lambda p: os.stat(p).st_mtime_ns)
    key = (tuple((it.path, stamp(it.path)) for it in items), size, data_dir,
           None if tiling is None else (tiling.size, tiling.stride))
    if key not in _PIXEL_CACHE:
        n = len(items) if tiling is None else len(table[0])
        need = n * size[0] * size[1] * 3
        while _PIXEL_CACHE and sum(int(v.shape.num_elements()) for v in _PIXEL_CACHE.values()) + need > max_bytes:
            _PIXEL_CACHE.pop(next(iter(_PIXEL_CACHE)))
        if tiling is None:
            load = _loader(items, root, category, "train", size, data_dir, with_mask=False)
            ds = _dataset(load, np.arange(len(items)), 64, 0, size, normalize=False)
        else:
            ds = _finish(_tile_stream(_full_res(items, root, category, "train", data_dir, tiling, False),
                                      np.arange(len(items)), table, tiling,
                                      lambda i, full, yx, j: {"image": _crop(tf, full["image"], yx, tiling.size, 3)}),
                         64, 0, size, normalize=False, with_mask=False)
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
                  cache_max_bytes: int = 4 * 2**30, tiling: TileSpec | None = None) -> Batches:
    """One epoch of {"image": (R,H,W,3) float32, "index": (R,) int32, "valid": (R,) bool}; the
    order comes from (seed, epoch) only.

    Each global batch holds ``global_batch_size`` positions of the epoch's order; this process
    reads rows ``rows = (lo, hi)`` of each (default: its share ``p*L:(p+1)*L`` by process). With
    ``drop_last=False`` the last partial batch is kept and filled with padding rows
    (``valid=False``, ``index=-1``, zero images) up to the batch size. When the resized uint8
    images fit in ``cache_max_bytes`` they are decoded once per process and kept in memory for
    later epochs (same values as decoding each time). With ``tiling`` the examples are the
    tiles of the full-resolution images (``image_size`` is not used; H = W = the tile size)
    and ``index`` a tile's position in :func:`tile_table`.
    """
    if rows is None:
        p, num_hosts = _host(process_index, process_count)
        local = _local_batch(global_batch_size, num_hosts)
        rows = (p * local, (p + 1) * local)
    lo, hi = rows
    if not 0 <= lo < hi <= global_batch_size:
        raise ValueError(f"rows {rows} not within a batch of {global_batch_size}.")
    items = _items(root, category, "train", holdout_fraction, seed, data_dir)
    table = None if tiling is None else tile_table(image_sizes(items, root, category, "train", data_dir),
                                                   tiling)
    n = len(items) if table is None else len(table[0])
    steps = train_steps(n, global_batch_size, drop_last)
    if steps == 0:
        what = "training images" if tiling is None else f"training tiles (of {len(items)} images)"
        raise ValueError(f"train.batch_size={global_batch_size} exceeds the {n} {what} "
                         f"of {category!r} (after the holdout); lower the batch size or set "
                         "train.drop_last=False.")
    order = np.full(steps * global_batch_size, -1, np.int64)
    used = min(n, steps * global_batch_size)
    order[:used] = np.random.default_rng([seed, epoch]).permutation(n)[:used]
    mine = order.reshape(steps, global_batch_size)[:, lo:hi].reshape(-1)
    real = mine[mine >= 0]  # padding is the end of the last batch: it comes last here too
    size = hw(image_size) if tiling is None else (tiling.size, tiling.size)
    if n * size[0] * size[1] * 3 <= cache_max_bytes:
        load = _cached_loader(items, root, category, size, data_dir, cache_max_bytes, tiling, table)
    elif tiling is None:
        load = _loader(items, root, category, "train", size, data_dir, with_mask=False)
    else:
        load = _tile_loader(items, root, category, "train", data_dir, tiling, table)

    tf = _tf()

    def load_valid(i):
        return {**load(i), "valid": tf.constant(True)}

    ds = _dataset(load_valid, real, hi - lo, len(mine) - len(real), size, with_mask=False)
    files = [items[i].path for i in (real if table is None else np.unique(table[0][real]))]
    return Batches(ds, steps, files)


def eval_dataset(root: str, category: str, *, split: str = "test", image_size: int | Sequence[int],
                 global_batch_size: int, process_index: int | None = None,
                 process_count: int | None = None, data_dir: str | None = None,
                 holdout_fraction: float = 0.1, seed: int = 0, tiling: TileSpec | None = None) -> Batches:
    """Every image of ``split`` once across hosts: {"image", "mask", "label", "valid", "index"}.

    With ``tiling``: every tile of every image once, image by image (each host the tiles of
    its contiguous share of the images, padded to one number of batches), with ``index`` the
    image's, ``tile_yx`` the tile's offset and ``image_hw`` the image's size (``tiling.Stitcher``).
    """
    p, num_hosts = _host(process_index, process_count)
    local = _local_batch(global_batch_size, num_hosts)
    items = _items(root, category, split, holdout_fraction, seed, data_dir)
    n = len(items)
    if tiling is not None:
        return _tiled_eval(items, root, category, split, data_dir, tiling, p, num_hosts, local)
    steps = math.ceil(n / global_batch_size)
    positions = np.arange(steps * global_batch_size).reshape(steps, num_hosts, local)[:, p].reshape(-1)
    mine = positions[positions < n]  # padding positions come last on every host
    size = hw(image_size)
    load = _loader(items, root, category, split, size, data_dir, with_mask=True)
    files = [items[i].path for i in mine] + [items[i].mask_path for i in mine if items[i].mask_path]
    return Batches(_dataset(load, mine, local, len(positions) - len(mine), size), steps, files)


def _tiled_eval(items, root, category, split, data_dir, tiling: TileSpec, p: int, num_hosts: int,
                local: int) -> Batches:
    tf = _tf()
    sizes = image_sizes(items, root, category, split, data_dir)
    table = tile_table(sizes, tiling)
    shares = np.array_split(np.arange(len(items)), num_hosts)
    per_host = [int(np.isin(table[0], share).sum()) for share in shares]
    steps = max(-(-k // local) for k in per_host) if items else 0
    mine = shares[p]
    labels = tf.constant([it.label for it in items] or [0], tf.int32)
    sizes_t = tf.constant(sizes.astype(np.int32).reshape(-1, 2) if len(items) else np.zeros((1, 2), np.int32))
    t = tiling.size

    def fields(i, full, yx, j):
        del j
        return {"image": _crop(tf, full["image"], yx, t, 3), "mask": _crop(tf, full["mask"], yx, t, 1)[..., 0],
                "label": labels[i], "valid": tf.constant(True), "index": i, "tile_yx": yx,
                "image_hw": sizes_t[i]}

    load_full = _full_res(items, root, category, split, data_dir, tiling, with_mask=True)
    ds = _tile_stream(load_full, mine, table, tiling, fields)
    files = [items[i].path for i in mine] + [items[i].mask_path for i in mine if items[i].mask_path]
    return Batches(_finish(ds, local, steps * local - per_host[p], (t, t), tiles=True), steps, files)


def load_images(root: str, category: str, split: str, *, image_size: int | Sequence[int],
                holdout_fraction: float, seed: int, process_index: int | None = None,
                process_count: int | None = None, data_dir: str | None = None,
                batch_size: int = 64, tiling: TileSpec | None = None) -> tuple[np.ndarray, np.ndarray]:
    """This host's contiguous shard of ``split``: (N, H, W, 3) float32 images and their int32
    indices; with ``tiling``, of the tiles of ``split`` (indices into :func:`tile_table`)."""
    p, num_hosts = _host(process_index, process_count)
    items = _items(root, category, split, holdout_fraction, seed, data_dir)
    size = hw(image_size) if tiling is None else (tiling.size, tiling.size)
    if tiling is not None:
        tf = _tf()
        table = tile_table(image_sizes(items, root, category, split, data_dir), tiling)
        mine = np.array_split(np.arange(len(items)), num_hosts)[p]
        if len(mine) == 0:
            return np.zeros((0, *size, 3), np.float32), np.zeros((0,), np.int32)
        ds = _tile_stream(_full_res(items, root, category, split, data_dir, tiling, False), mine, table,
                          tiling, lambda i, full, yx, j: {"image": _crop(tf, full["image"], yx, tiling.size, 3),
                                                          "index": j})
        batches = list(Batches(_finish(ds, batch_size, 0, size, with_mask=False), 0,
                               [items[i].path for i in mine]))
    else:
        mine = np.array_split(np.arange(len(items)), num_hosts)[p]
        if len(mine) == 0:
            return np.zeros((0, *size, 3), np.float32), np.zeros((0,), np.int32)
        load = _loader(items, root, category, split, size, data_dir, with_mask=False)
        batches = list(Batches(_dataset(load, mine, batch_size, 0, size), 0, [items[i].path for i in mine]))
    return (np.concatenate([b["image"] for b in batches]),
            np.concatenate([b["index"] for b in batches]).astype(np.int32))
