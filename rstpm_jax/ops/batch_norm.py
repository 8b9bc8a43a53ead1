"""Training-mode batch normalisation with a closed-form backward pass.

Differentiating the two-pass statistics (``mean``, then ``mean((x - mean)**2)``)
automatically gives XLA a chain of reductions over the activation (the gradient also flows
through ``mean`` into the variance, where it sums to zero); on CPU those reductions are a
fifth of the STPM train step. The closed form needs two sums of the output gradient
(``sum g`` and ``sum g * xhat``) and one elementwise pass::

    dx = scale / sqrt(var + eps) * (g - mean(g) - xhat * mean(g * xhat))

Statistics are over every axis but the last, in float32 (as ``flax.linen.BatchNorm``). On
CPU their sums are matrix-vector products (:func:`channel_sum`): XLA:CPU's reductions over
a [32, 128, 128, 64] activation take ~40 ms, the product ~6 ms, and is as accurate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float) -> tuple[Array, Array, Array]:
    """``(y, mean, var)``: ``y = (x - mean) / sqrt(var + eps) * scale + bias`` in float32, with
    the batch's ``mean`` and biased ``var`` (two-pass) over all axes but the last."""
    return _bn(x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32),
               float(epsilon))


def _axes(x: Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


# Rows per partial sum of :func:`channel_sum`: at most this many partial sums per channel.
_SUM_BLOCKS = 128


def channel_sum(x: Array) -> Array:
    """Sum over every axis but the last.

    On CPU, a float32 product of a ones vector with ``x`` viewed as ``[rows / k, k * C]``
    (``k`` partial sums per channel, then added): an Eigen GEMV, 4-8x faster than XLA:CPU's
    reduction for ResNet activations and as accurate (each partial sum runs over ``rows / k``
    values). Elsewhere ``jnp.sum``.
    """
    if jax.default_backend() != "cpu" or x.ndim < 2:
        return jnp.sum(x, _axes(x), dtype=jnp.float32)
    c = x.shape[-1]
    rows = x.size // c
    k = _SUM_BLOCKS
    while rows % k:
        k //= 2
    ones = jnp.ones((rows // k,), x.dtype)
    part = lax.dot_general(ones, x.reshape(rows // k, k * c), (((0,), (0,)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return jnp.sum(part.reshape(k, c), 0)


def _mean(x: Array) -> Array:
    return channel_sum(x) / (x.size // x.shape[-1])


def _stats(x: Array) -> tuple[Array, Array]:
    mean = _mean(x)
    var = _mean(lax.square(x - mean))
    return mean, var


def normalize(x: Array, mean: Array, var: Array, scale: Array, bias: Array, epsilon: float) -> Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` in ``flax.linen.BatchNorm``'s order."""
    return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn(x: Array, scale: Array, bias: Array, epsilon: float) -> tuple[Array, Array, Array]:
    return _bn_fwd(x, scale, bias, epsilon)[0]


def _bn_fwd(x, scale, bias, epsilon):
    mean, var = _stats(x)
    y = normalize(x, mean, var, scale, bias, epsilon)
    return (y, mean, var), (x, mean, lax.rsqrt(var + epsilon), scale)


def _bn_bwd(epsilon, res, cotangents):
    x, mean, inv, scale = res
    gy, gmean, gvar = cotangents
    count = x.size // x.shape[-1]
    centered = x - mean
    xhat = centered * inv
    dbias = channel_sum(gy)
    dscale = channel_sum(gy * xhat)
    dx = (scale * inv) * (gy - dbias / count - xhat * (dscale / count))
    dx = dx + gmean / count + centered * (2.0 * gvar / count)  # the statistics' own cotangents
    return dx, dscale, dbias


_bn.defvjp(_bn_fwd, _bn_bwd)
