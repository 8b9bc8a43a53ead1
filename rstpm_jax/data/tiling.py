"""Tiling of large images and stitching of the tiles' maps back (pure NumPy; anomalib's Tiler
is the anchor).

With ``data.tile_size = t > 0`` an image is used at its own resolution (not resized to
``data.image_size``) and cut into ``t x t`` tiles every ``data.tile_stride = s`` pixels
(``0``: ``s = t``, no overlap) along each axis. The last tile of a row or column is aligned
with the image's far edge, so every pixel is covered and no tile leaves the image; an image
smaller than a tile is first padded by repeating its edge pixels (``np.pad`` mode ``edge``).
A map is stitched back by averaging, per pixel, the tiles that cover it (overlaps averaged),
then cropped to the image. The model sees tiles only: its input is ``t x t``.

    spec = TileSpec(256, 128)
    for tiles, positions in tile_batches(image, spec, 32):   # (n, t, t, 3), (n, 2) [y, x]
        acc.add(model(tiles)["map"], positions)              # acc = TileAccumulator(h, w, spec)
    full_map = acc.result()                                  # (h, w)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class TileSpec:
    """Tiles of ``size x size`` pixels every ``stride`` pixels (``stride`` 0: ``size``)."""

    size: int
    stride: int = 0

    def __post_init__(self):
        if self.size <= 0:
            raise ValueError(f"data.tile_size must be positive when tiling, got {self.size}.")
        if self.size % 32:
            raise ValueError(f"data.tile_size must be a multiple of 32 (the ResNets' total stride), "
                             f"got {self.size}.")
        stride = self.stride or self.size
        if not 0 < stride <= self.size:
            raise ValueError(f"data.tile_stride must be in [1, data.tile_size={self.size}] (0 = no "
                             f"overlap), got {self.stride}: a larger stride would leave gaps.")
        object.__setattr__(self, "stride", int(stride))

    @classmethod
    def from_config(cls, data_cfg: Any) -> TileSpec | None:
        """The ``data`` section's tiling, or None when ``data.tile_size`` is 0 (off)."""
        size = int(data_cfg.get("tile_size", 0) or 0)
        return cls(size, int(data_cfg.get("tile_stride", 0) or 0)) if size else None

    def to_dict(self) -> dict[str, int]:
        return {"tile_size": self.size, "tile_stride": self.stride}


def model_input_size(data_cfg: Any) -> int:
    """The model's input edge: ``data.tile_size`` when tiling, else ``data.image_size``."""
    spec = TileSpec.from_config(data_cfg)
    return spec.size if spec else int(data_cfg.image_size)


def starts(length: int, size: int, stride: int) -> list[int]:
    """Tile offsets along an axis of ``length`` pixels (``max(length, size)`` after padding):
    ``0, stride, 2 stride, ...`` and a last one at ``length - size`` so the far edge is covered."""
    length = max(int(length), size)
    out = list(range(0, length - size + 1, stride))
    if out[-1] != length - size:
        out.append(length - size)
    return out


def padded_size(height: int, width: int, spec: TileSpec) -> tuple[int, int]:
    """The image's size after edge padding up to one tile (unchanged when it is larger)."""
    return max(int(height), spec.size), max(int(width), spec.size)


def grid(height: int, width: int, spec: TileSpec) -> np.ndarray:
    """(n, 2) int64 ``[y, x]`` tile offsets of an image, row-major."""
    ys, xs = starts(height, spec.size, spec.stride), starts(width, spec.size, spec.stride)
    return np.array([(y, x) for y in ys for x in xs], np.int64).reshape(-1, 2)


def num_tiles(height: int, width: int, spec: TileSpec) -> int:
    return len(starts(height, spec.size, spec.stride)) * len(starts(width, spec.size, spec.stride))


def pad_to_tile(image: np.ndarray, spec: TileSpec) -> np.ndarray:
    """(H, W, ...) -> at least (t, t, ...) by repeating the edge pixels (a view when no pad is needed)."""
    h, w = image.shape[:2]
    ph, pw = padded_size(h, w, spec)
    if (ph, pw) == (h, w):
        return image
    return np.pad(image, ((0, ph - h), (0, pw - w)) + ((0, 0),) * (image.ndim - 2), mode="edge")


def extract(image: np.ndarray, positions: np.ndarray, spec: TileSpec) -> np.ndarray:
    """(n, t, t, ...) tiles of an already padded image at ``positions`` ([y, x] rows)."""
    t = spec.size
    return np.stack([image[y:y + t, x:x + t] for y, x in np.asarray(positions)])


def tile_image(image: np.ndarray, spec: TileSpec) -> tuple[np.ndarray, np.ndarray]:
    """All tiles of an (H, W, ...) image and their ``[y, x]`` offsets."""
    positions = grid(*image.shape[:2], spec)
    return extract(pad_to_tile(image, spec), positions, spec), positions


def tile_batches(image: np.ndarray, spec: TileSpec, batch_size: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The tiles of ``image`` ``batch_size`` at a time (cut when yielded: memory of one batch)."""
    padded = pad_to_tile(image, spec)
    positions = grid(*image.shape[:2], spec)
    for lo in range(0, len(positions), max(1, int(batch_size))):
        pos = positions[lo:lo + batch_size]
        yield extract(padded, pos, spec), pos


class TileAccumulator:
    """Sums tiles of one (H, W, ...) array and counts the tiles per pixel; ``result()`` is the
    average over the tiles covering each pixel, cropped to (H, W)."""

    def __init__(self, height: int, width: int, spec: TileSpec, trailing: tuple[int, ...] = ()):
        self.height, self.width, self.spec = int(height), int(width), spec
        ph, pw = padded_size(height, width, spec)
        self.sum = np.zeros((ph, pw, *trailing), np.float32)
        self.count = np.zeros((ph, pw), np.float32)
        self.expected = num_tiles(height, width, spec)
        self.added = 0

    def add(self, tiles: np.ndarray, positions: np.ndarray) -> None:
        t = self.spec.size
        for tile, (y, x) in zip(np.asarray(tiles), np.asarray(positions)):
            self.sum[y:y + t, x:x + t] += tile
            self.count[y:y + t, x:x + t] += 1
        self.added += len(positions)

    @property
    def complete(self) -> bool:
        return self.added >= self.expected

    def result(self) -> np.ndarray:
        if not self.complete:
            raise ValueError(f"{self.added} of the image's {self.expected} tiles were added.")
        h, w = self.height, self.width
        count = self.count[:h, :w].reshape(h, w, *([1] * (self.sum.ndim - 2)))
        return (self.sum[:h, :w] / count).astype(np.float32)


def stitch(tiles: np.ndarray, positions: np.ndarray, height: int, width: int,
           spec: TileSpec) -> np.ndarray:
    """(n, t, t, ...) tiles at ``positions`` -> the (H, W, ...) array, overlaps averaged."""
    acc = TileAccumulator(height, width, spec, tuple(np.shape(tiles)[3:]))
    acc.add(tiles, positions)
    return acc.result()


class Stitcher:
    """Tiles of many images, in any order and interleaving (e.g. a tiled evaluation stream);
    ``add`` returns an image's stitched arrays once its last tile has arrived.

    ``add(key, y, x, height, width, arrays)``: one tile of image ``key`` (of ``height x width``
    pixels) at offset ``(y, x)``; ``arrays`` a dict of per-tile arrays whose first two axes are
    the tile's (``t, t``), nested dicts allowed. Returns ``{name: (H, W, ...)}`` or None.
    """

    def __init__(self, spec: TileSpec):
        self.spec = spec
        self._open: dict[Any, tuple[Any, dict[str, TileAccumulator]]] = {}

    def add(self, key: Any, y: int, x: int, height: int, width: int, arrays: dict) -> dict | None:
        flat = _flatten(arrays)
        if key not in self._open:
            self._open[key] = (arrays, {k: TileAccumulator(height, width, self.spec, np.shape(v)[2:])
                                        for k, v in flat.items()})
        like, accs = self._open[key]
        pos = np.array([[y, x]])
        for k, v in flat.items():
            accs[k].add(np.asarray(v)[None], pos)
        if not next(iter(accs.values())).complete:
            return None
        del self._open[key]
        return _unflatten(like, {k: a.result() for k, a in accs.items()})

    @property
    def pending(self) -> int:
        """Images with some but not all of their tiles."""
        return len(self._open)


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(like: dict, flat: dict[tuple, Any], prefix: tuple = ()) -> dict:
    return {k: _unflatten(v, flat, prefix + (k,)) if isinstance(v, dict) else flat[prefix + (k,)]
            for k, v in like.items()}
