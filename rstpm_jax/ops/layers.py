"""Drop-in layers for the models on XLA:CPU: the same variables and forward numbers as flax's
own, with the faster gradients of :mod:`~rstpm_jax.ops.conv`, :mod:`~rstpm_jax.ops.pool` and
:mod:`~rstpm_jax.ops.batch_norm`. ``models.rstpm.build_model`` passes :data:`CPU_LAYERS` as
the models' layer fields on CPU (``model.fast_cpu_ops``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from rstpm_jax.models.layers import example_mask
from rstpm_jax.ops import batch_norm as batch_norm_ops
from rstpm_jax.ops import conv as conv_ops
from rstpm_jax.ops import pool

Array = jax.Array


class Conv(nn.Conv):
    """``flax.linen.Conv`` through :func:`rstpm_jax.ops.conv.conv_general_dilated`."""

    conv_general_dilated: Callable | None = conv_ops.conv_general_dilated


def ConvTranspose(features: int, kernel_size: Sequence[int], strides: Sequence[int],  # noqa: N802
                  padding: str = "SAME", **kwargs: Any) -> Conv:
    """``nn.ConvTranspose(features, kernel_size, strides, padding="SAME")`` as a :class:`Conv`
    over the ``strides``-dilated input: the same ``kernel`` variable (kh, kw, in, out) and
    numbers, with the weight gradient of the equivalent strided convolution."""
    if padding != "SAME":
        raise ValueError(f"ops.layers.ConvTranspose supports padding='SAME' only, got {padding!r}.")
    pads = []
    for k, s in zip(kernel_size, strides):  # lax.conv_transpose's "SAME" (_conv_transpose_padding)
        total = k + s - 2
        before = k - 1 if s > k - 1 else -(-total // 2)
        pads.append((before, total - before))
    return Conv(features, tuple(kernel_size), strides=1, padding=tuple(pads),
                input_dilation=tuple(strides), **kwargs)


class BatchNorm(nn.Module):
    """``models.layers.BatchNorm`` (flax's variables, two-pass variance, torch's unbiased
    running variance, padded examples out of the statistics) with a closed-form training
    gradient and, on CPU, channel sums as matrix products."""

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, features, jnp.float32)
        if self.use_running_average:
            y = batch_norm_ops.normalize(x.astype(jnp.float32), ra_mean.value, ra_var.value, scale,
                                         bias, self.epsilon)
        else:
            rows = example_mask(self, x, mask)
            y, mean, var = batch_norm_ops.batch_norm_train(x, scale, bias, self.epsilon, rows)
            if not self.is_initializing():
                n = batch_norm_ops.valid_count(x, rows)
                unbiased = var * (n / jnp.maximum(n - 1.0, 1.0))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        return y.astype(self.dtype or x.dtype)


CPU_LAYERS: dict[str, Any] = {"conv": Conv, "norm": BatchNorm, "conv_transpose": ConvTranspose,
                              "pool": pool.max_pool}
