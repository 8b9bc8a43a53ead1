"""torchvision-layout ResNet18/34/50 feature pyramids in Flax Linen (NHWC).

Parameter names mirror torchvision's state-dict keys (``layer1.0.conv1.weight`` ->
``layer1_0/conv1/kernel``) so that conversion is a renaming plus a transpose. Padding is
torchvision's (``k // 2`` on every side), not flax's ``SAME``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rstpm_jax.models.layers import BatchNorm, ModuleDef, conv_init

Array = jax.Array

# torchvision's stage tables: block kind and blocks per stage.
ARCHS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)
LEVELS = ("layer1", "layer2", "layer3", "layer4")


def arch_spec(arch: str) -> tuple[str, tuple[int, ...]]:
    """``(block kind, blocks per stage)`` of a torchvision ResNet; ValueError naming the known ones."""
    if arch not in ARCHS:
        raise ValueError(f"Unknown ResNet architecture {arch!r}; known: {sorted(ARCHS)}.")
    return ARCHS[arch]


def expansion(arch: str) -> int:
    return 4 if arch_spec(arch)[0] == "bottleneck" else 1


def feature_widths(arch: str) -> dict[str, int]:
    """Channels of ``layer1..layer4`` for an architecture name."""
    return {lvl: w * expansion(arch) for lvl, w in zip(LEVELS, STAGE_WIDTHS)}


def torch_conv(conv: ModuleDef, dtype: Any) -> Callable[..., nn.Module]:
    """``conv`` as torchvision builds it: bias-free, kaiming fan-out init, float32 parameters."""
    return functools.partial(conv, use_bias=False, kernel_init=conv_init, dtype=dtype,
                             param_dtype=jnp.float32)


class BasicBlock(nn.Module):
    """torchvision BasicBlock (expansion 1)."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.relu(self.norm(name="bn1")(
            self.conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(x)))
        y = self.norm(name="bn2")(self.conv(self.features, (3, 3), padding=1, name="conv2")(y))
        if self.downsample:
            x = self.norm(name="downsample_1")(
                self.conv(self.features, (1, 1), self.strides, padding=0, name="downsample_0")(x))
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (expansion 4, stride on the 3x3 conv)."""

    features: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = nn.relu(self.norm(name="bn1")(self.conv(self.features, (1, 1), padding=0, name="conv1")(x)))
        y = nn.relu(self.norm(name="bn2")(
            self.conv(self.features, (3, 3), self.strides, padding=1, name="conv2")(y)))
        y = self.norm(name="bn3")(self.conv(self.features * 4, (1, 1), padding=0, name="conv3")(y))
        if self.downsample:
            x = self.norm(name="downsample_1")(
                self.conv(self.features * 4, (1, 1), self.strides, padding=0, name="downsample_0")(x))
        return nn.relu(y + x)


def stem(x: Array, *, conv: Callable, norm: Callable, pool: Callable) -> tuple[Array, Array]:
    """7x7/2 conv, BN, ReLU (returned first), then 3x3/2 max pool. Call inside a compact module."""
    y = nn.relu(norm(name="bn1")(conv(64, (7, 7), 2, padding=3, name="conv1")(x)))
    return y, pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def stage(x: Array, arch: str, index: int, *, conv: Callable, norm: Callable) -> Array:
    """``layer{index+1}`` of ``arch`` (blocks named ``layerN_i``). Call inside a compact module."""
    kind, sizes = arch_spec(arch)
    block = Bottleneck if kind == "bottleneck" else BasicBlock
    width = STAGE_WIDTHS[index]
    for i in range(sizes[index]):
        strides = 2 if i == 0 and index > 0 else 1
        down = i == 0 and (strides != 1 or x.shape[-1] != width * expansion(arch))
        x = block(width, conv=conv, norm=norm, strides=strides, downsample=down,
                  name=f"layer{index + 1}_{i}")(x)
    return x


class ResNet(nn.Module):
    """Feature pyramid of a torchvision ResNet.

    Returns ``{"stem": 1/2 (after conv1/bn1/relu), "layer1": 1/4, ..., "layer4": 1/32}``,
    computing stages only up to ``depth`` (1..4).
    """

    arch: str = "resnet18"
    depth: int = 4
    dtype: Any = jnp.float32
    conv: ModuleDef = nn.Conv
    norm: ModuleDef = BatchNorm
    pool: Callable = nn.max_pool

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
        check_input(x)
        conv = torch_conv(self.conv, self.dtype)
        norm = functools.partial(self.norm, use_running_average=not train, dtype=self.dtype)
        feats: dict[str, Array] = {}
        feats["stem"], y = stem(x.astype(self.dtype), conv=conv, norm=norm, pool=self.pool)
        for i in range(self.depth):
            y = stage(y, self.arch, i, conv=conv, norm=norm)
            feats[LEVELS[i]] = y
        return feats


def check_input(x: Array) -> None:
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"ResNet expects NHWC images with 3 channels, got shape {x.shape}.")
    if x.shape[1] % 32 or x.shape[2] % 32:
        raise ValueError(f"Image height and width must be divisible by 32, got {x.shape[1:3]} "
                         "(config.data.image_size).")


def build(arch: str, **kwargs: Any) -> ResNet:
    """A ResNet by architecture name (``resnet18``, ``resnet34``, ``resnet50``, ...)."""
    arch_spec(arch)
    return ResNet(arch=arch, **kwargs)
