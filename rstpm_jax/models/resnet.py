"""torchvision-layout ResNet18/50 feature pyramids in Flax Linen (NHWC).

Parameter names mirror torchvision's state-dict keys (``layer1.0.conv1.weight`` ->
``layer1_0/conv1/kernel``) so that conversion is a renaming plus a transpose.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rstpm_jax.ops import batch_norm as batch_norm_ops
from rstpm_jax.ops import pool

Array = jax.Array
ModuleDef = Any

# torchvision initialisation: kaiming-normal, fan_out, ReLU gain (untruncated normal).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

ARCHS: dict[str, tuple[str, tuple[int, ...]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)
LEVELS = ("layer1", "layer2", "layer3", "layer4")


def feature_widths(arch: str) -> dict[str, int]:
    """Channels of ``layer1..layer4`` for an architecture name."""
    block, _ = _arch(arch)
    expansion = 4 if block == "bottleneck" else 1
    return {lvl: w * expansion for lvl, w in zip(LEVELS, STAGE_WIDTHS)}


def _arch(arch: str) -> tuple[str, tuple[int, ...]]:
    if arch not in ARCHS:
        raise ValueError(f"Unknown ResNet architecture {arch!r}; known: {sorted(ARCHS)}.")
    return ARCHS[arch]


def conv_fn_kwargs(conv_fn: Callable | None) -> dict[str, Callable]:
    """``nn.Conv`` keyword arguments that route it through ``conv_fn`` (none: XLA's conv)."""
    return {} if conv_fn is None else {"conv_general_dilated": conv_fn}


def conv_layer(
    features: int,
    kernel: int,
    stride: int = 1,
    *,
    dtype: Any = jnp.float32,
    conv_fn: Callable | None = None,
    name: str | None = None,
) -> nn.Conv:
    """A bias-free conv with torchvision padding (k // 2) and init."""
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
        **conv_fn_kwargs(conv_fn),
    )


def conv_transpose_layer(
    features: int,
    kernel: int,
    stride: int,
    *,
    dtype: Any = jnp.float32,
    conv_fn: Callable | None = None,
    name: str | None = None,
) -> nn.Conv:
    """``nn.ConvTranspose(features, (k, k), (s, s), padding="SAME", use_bias=False)`` as an
    ``nn.Conv`` over the ``s``-dilated input: the same ``kernel`` variable (k, k, in, out)
    and numbers, but through ``conv_fn`` (on CPU, ``ops.conv``'s fast weight gradient)."""
    # lax.conv_transpose's "SAME" pads for the dilated input (its _conv_transpose_padding).
    total = kernel + stride - 2
    before = kernel - 1 if stride > kernel - 1 else -(-total // 2)
    pad = (before, total - before)
    return nn.Conv(features, (kernel, kernel), strides=(1, 1), padding=(pad, pad),
                   input_dilation=(stride, stride), use_bias=False, kernel_init=conv_init,
                   dtype=dtype, param_dtype=jnp.float32, name=name, **conv_fn_kwargs(conv_fn))


class BatchNorm(nn.Module):
    """``flax.linen.BatchNorm`` (two-pass variance, same variables and update rule) whose
    training-mode gradient is closed-form (``rstpm_jax.ops.batch_norm``)."""

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
            y = batch_norm_ops.normalize(x.astype(jnp.float32), mean, var, scale, bias, self.epsilon)
        else:
            y, mean, var = batch_norm_ops.batch_norm_train(x, scale, bias, self.epsilon)
            if not self.is_initializing():
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y.astype(self.dtype)


def batch_norm(train: bool, dtype: Any = jnp.float32, name: str | None = None) -> BatchNorm:
    """BatchNorm with torch's defaults (momentum 0.1 in torch = 0.9 here, eps 1e-5) and its
    two-pass variance (no E[x^2]-E[x]^2 cancellation)."""
    return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """torchvision BasicBlock (expansion 1)."""

    features: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    conv_fn: Callable | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        conv = functools.partial(conv_layer, dtype=self.dtype, conv_fn=self.conv_fn)
        bn = functools.partial(batch_norm, train, self.dtype)
        y = nn.relu(bn(name="bn1")(conv(self.features, 3, self.stride, name="conv1")(x)))
        y = bn(name="bn2")(conv(self.features, 3, name="conv2")(y))
        if self.downsample:
            x = bn(name="downsample_1")(conv(self.features, 1, self.stride, name="downsample_0")(x))
        return nn.relu(y + x)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (expansion 4, stride on the 3x3 conv)."""

    features: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    conv_fn: Callable | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        conv = functools.partial(conv_layer, dtype=self.dtype, conv_fn=self.conv_fn)
        bn = functools.partial(batch_norm, train, self.dtype)
        y = nn.relu(bn(name="bn1")(conv(self.features, 1, name="conv1")(x)))
        y = nn.relu(bn(name="bn2")(conv(self.features, 3, self.stride, name="conv2")(y)))
        y = bn(name="bn3")(conv(self.features * 4, 1, name="conv3")(y))
        if self.downsample:
            x = bn(name="downsample_1")(conv(self.features * 4, 1, self.stride, name="downsample_0")(x))
        return nn.relu(y + x)


def stem(x: Array, train: bool, *, dtype: Any = jnp.float32, conv_fn: Callable | None = None,
         parent_names: tuple[str, str] = ("conv1", "bn1")) -> tuple[Array, Array]:
    """7x7/2 conv, BN, ReLU (returned as ``stem``), then 3x3/2 max-pool. Call inside a compact module."""
    y = conv_layer(64, 7, 2, dtype=dtype, conv_fn=conv_fn, name=parent_names[0])(x)
    y = nn.relu(batch_norm(train, dtype, name=parent_names[1])(y))
    pooled = pool.max_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return y, pooled


def stage(x: Array, train: bool, arch: str, index: int, *, dtype: Any = jnp.float32,
          conv_fn: Callable | None = None) -> Array:
    """Run ``layer{index+1}`` of ``arch`` (blocks named ``layerN_i``). Call inside a compact module."""
    block_kind, sizes = _arch(arch)
    block_cls = Bottleneck if block_kind == "bottleneck" else BasicBlock
    expansion = 4 if block_kind == "bottleneck" else 1
    width = STAGE_WIDTHS[index]
    stride = 1 if index == 0 else 2
    for i in range(sizes[index]):
        s = stride if i == 0 else 1
        needs_down = i == 0 and (s != 1 or x.shape[-1] != width * expansion)
        x = block_cls(width, s, needs_down, dtype=dtype, conv_fn=conv_fn,
                      name=f"layer{index + 1}_{i}")(x, train)
    return x


class ResNet(nn.Module):
    """Feature pyramid of a torchvision ResNet.

    Returns ``{"stem": 1/2 (after conv1/bn1/relu), "layer1": 1/4, ..., "layer4": 1/32}``,
    computing stages only up to ``depth`` (1..4).
    """

    arch: str = "resnet18"
    depth: int = 4
    dtype: Any = jnp.float32
    conv_fn: Callable | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> dict[str, Array]:
        _check_input(x)
        feats: dict[str, Array] = {}
        feats["stem"], y = stem(x.astype(self.dtype), train, dtype=self.dtype, conv_fn=self.conv_fn)
        for i in range(self.depth):
            y = stage(y, train, self.arch, i, dtype=self.dtype, conv_fn=self.conv_fn)
            feats[LEVELS[i]] = y
        return feats


def _check_input(x: Array) -> None:
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"ResNet expects NHWC images with 3 channels, got shape {x.shape}.")
    if x.shape[1] % 32 or x.shape[2] % 32:
        raise ValueError(f"Image height and width must be divisible by 32, got {x.shape[1:3]}.")


def ResNet18(**kwargs) -> ResNet:  # noqa: N802 - torchvision naming
    return ResNet(arch="resnet18", **kwargs)


def ResNet50(**kwargs) -> ResNet:  # noqa: N802
    return ResNet(arch="resnet50", **kwargs)


def build(name: str, **kwargs) -> ResNet:
    """A ResNet by architecture name (``resnet18``, ``resnet34``, ``resnet50``)."""
    _arch(name)
    return ResNet(arch=name, **kwargs)


def expected_shapes(arch: str) -> dict[str, Any]:
    """``{"params", "batch_stats"}`` of ``ResNet(arch)`` as ShapeDtypeStructs (no compute)."""
    model = build(arch)
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))


def _check_variables(variables: dict[str, Any], arch: str, path: str) -> None:
    from flax import traverse_util

    want = {"/".join(k): tuple(v.shape)
            for k, v in traverse_util.flatten_dict(dict(expected_shapes(arch))).items()}
    got = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(variables).items()}
    problems = []
    for label, keys in (("missing", sorted(set(want) - set(got))), ("unexpected", sorted(set(got) - set(want)))):
        if keys:
            problems.append(f"{len(keys)} {label} variable(s): {', '.join(keys[:10])}"
                            + (" ..." if len(keys) > 10 else ""))
    wrong = [f"{k}: expected {want[k]}, got {got[k]}" for k in sorted(set(want) & set(got)) if want[k] != got[k]]
    if wrong:
        problems.append(f"{len(wrong)} wrong shape(s): {'; '.join(wrong[:10])}" + (" ..." if len(wrong) > 10 else ""))
    if problems:
        raise ValueError(f"{path} does not hold {arch} weights: {'. '.join(problems)}. "
                         f"Reconvert it with --arch {arch}.")


def load_pretrained(path: str | os.PathLike, arch: str | None = None) -> dict[str, Any]:
    """Load converted torchvision weights (``params`` + ``batch_stats``); no torch needed.

    With ``arch`` the tree is checked against ``ResNet(arch)`` (names and shapes), and against
    the arch in the metadata record ``<path>.json`` when there is one.
    """
    from flax import serialization
    from flax import traverse_util

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Converted teacher weights not found: {path}. Convert torchvision weights with "
            "`python -m pretrained_conversion.convert_torchvision --arch resnet18 --download "
            f"--output {path}` (needs the 'convert' extra and internet), or pass a state dict "
            "with --input.")
    if arch is not None:
        _arch(arch)
        meta = read_metadata(path)
        if meta and meta.get("arch") not in (None, arch):
            raise ValueError(f"{path} holds {meta['arch']} weights (per {path}.json), but {arch} was asked for.")
    with open(path, "rb") as f:
        data = f.read()
    try:
        variables = serialization.msgpack_restore(data)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path} is not a readable converted weight file (msgpack: {e}); "
                         "reconvert it with pretrained_conversion.convert_torchvision.") from e
    if not isinstance(variables, dict) or set(variables) != {"params", "batch_stats"}:
        raise ValueError(f"{path} does not hold 'params' and 'batch_stats'; reconvert it.")
    for key, leaf in traverse_util.flatten_dict(variables).items():
        if not (isinstance(leaf, np.ndarray) and np.issubdtype(leaf.dtype, np.floating)):
            raise ValueError(f"{path}: variable {'/'.join(key)} is not a float array; reconvert it.")
    if arch is not None:
        _check_variables(variables, arch, path)
    return jax.tree.map(jnp.asarray, variables)


def read_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata record written beside converted weights (``<path>.json``), if any."""
    meta = os.fspath(path) + ".json"
    if not os.path.isfile(meta):
        return None
    try:
        with open(meta) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"Weight metadata {meta} is unreadable ({e}); reconvert or delete it.") from e
    if not isinstance(record, dict):
        raise ValueError(f"Weight metadata {meta} is not a JSON object; reconvert or delete it.")
    return record


def truncate_variables(variables: dict[str, Any], depth: int) -> dict[str, Any]:
    """Drop stages deeper than ``depth`` (e.g. ``layer4`` of a teacher used to ``layer3``)."""
    drop = {f"layer{i}_" for i in range(depth + 1, 5)}
    return {
        col: {k: v for k, v in tree.items() if not any(k.startswith(d) for d in drop)}
        for col, tree in variables.items()
    }
