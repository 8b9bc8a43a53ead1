"""Per-image preprocessing with PIL alone (no TensorFlow): RGB, resize, ImageNet normalisation.

The tf.data pipeline decodes and resizes every image with these same functions (through
``tf.numpy_function``), so training, evaluation and predict see identical uint8 pixels; the
constants are shared with the exported models' sidecars.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from rstpm_jax.data import mvtec

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# (x / 255 - mean) / std as one multiply-add, shared by the TF and PIL paths.
NORM_SCALE = (1.0 / (255.0 * IMAGENET_STD)).astype(np.float32)
NORM_OFFSET = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)


def hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``image_size`` (an int or (h, w)) as ``(h, w)``."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


def resize_rgb(rgb: np.ndarray, image_size: int | Sequence[int]) -> np.ndarray:
    """HxWx3 uint8 -> (h, w, 3) uint8, PIL's bilinear resize (antialiased when shrinking)."""
    h, w = hw(image_size)
    if rgb.shape[:2] != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
    return rgb


def normalize(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB -> float32 ``(x / 255 - mean) / std`` (one multiply-add, as the pipeline)."""
    return rgb.astype(np.float32) * NORM_SCALE + NORM_OFFSET


def preprocess_rgb(rgb: np.ndarray, image_size: int | Sequence[int]) -> np.ndarray:
    """HxWx3 uint8 -> (h, w, 3) float32: PIL bilinear resize and ImageNet normalisation."""
    return normalize(resize_rgb(rgb, image_size))


def load_rgb_file(path: str, image_size: int | Sequence[int]) -> np.ndarray:
    """One image file -> (h, w, 3) uint8 RGB at ``image_size``: the pixels the pipeline feeds."""
    return resize_rgb(mvtec.read_rgb(path), image_size)


def load_image_file(path: str, image_size: int | Sequence[int]) -> np.ndarray:
    """One image file -> (H, W, 3) float32, preprocessed as the pipeline does."""
    return normalize(load_rgb_file(path, image_size))
