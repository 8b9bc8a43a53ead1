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

A per-example ``mask`` (shape ``(B,)``, 1 = valid, 0 = padding) restricts the statistics to
the valid examples' rows (a padded last batch then normalises as the unpadded one); every
row is still normalised with them. The backward pass is then, with ``w`` the row's mask and
``N`` the number of valid rows (the sums stay over all rows: padded outputs depend on the
statistics too)::

    dx = scale / sqrt(var + eps) * (g - w * (sum(g) + xhat * sum(g * xhat)) / N)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float,
                     mask: Array | None = None) -> tuple[Array, Array, Array]:
    """``(y, mean, var)``: ``y = (x - mean) / sqrt(var + eps) * scale + bias`` in float32, with
    the batch's ``mean`` and biased ``var`` (two-pass) over all axes but the last.

    ``mask`` (``(B,)``, bool or 0/1 float): the statistics are over the rows of examples with
    mask 1 only (all examples when None); it receives no gradient.
    """
    if mask is not None:
        mask = jnp.asarray(mask).astype(jnp.float32).reshape(x.shape[0])
    return _bn(x.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32), mask,
               float(epsilon))


def valid_count(x: Array, mask: Array | None = None) -> Array:
    """Rows the statistics of ``batch_norm_train(x, ..., mask)`` run over (float32 scalar)."""
    rows = x.size // x.shape[-1]
    if mask is None:
        return jnp.asarray(rows, jnp.float32)
    per_example = rows // x.shape[0]
    return jnp.sum(jnp.asarray(mask).astype(jnp.float32)) * per_example


def _axes(x: Array) -> tuple[int, ...]:
    return tuple(range(x.ndim - 1))


# Rows per partial sum of :func:`channel_sum`: at most this many partial sums per channel.
_SUM_BLOCKS = 128


def channel_sum(x: Array, weights: Array | None = None) -> Array:
    """Sum over every axis but the last; with ``weights`` (``(B,)``), each example's rows
    weighted by its weight.

    On CPU, a float32 product of a ones (or weights) vector with ``x`` viewed as
    ``[rows / k, k * C]`` (``k`` partial sums per channel, then added; ``k`` divides an
    example's rows, so each vector entry belongs to one example): an Eigen GEMV, 4-8x faster
    than XLA:CPU's reduction for ResNet activations and as accurate (each partial sum runs over
    ``rows / k`` values). Elsewhere ``jnp.sum``.
    """
    if jax.default_backend() != "cpu" or x.ndim < 2:
        if weights is not None:
            x = x * weights.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sum(x, _axes(x), dtype=jnp.float32)
    c = x.shape[-1]
    rows = x.size // c
    group = rows if weights is None else rows // x.shape[0]  # rows one vector entry may span
    k = _SUM_BLOCKS
    while group % k:
        k //= 2
    if weights is None:
        vec = jnp.ones((rows // k,), x.dtype)
    else:
        vec = jnp.repeat(weights.astype(x.dtype), group // k, total_repeat_length=rows // k)
    part = lax.dot_general(vec, x.reshape(rows // k, k * c), (((0,), (0,)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return jnp.sum(part.reshape(k, c), 0)


def _stats(x: Array, mask: Array | None) -> tuple[Array, Array]:
    count = valid_count(x, mask)
    mean = channel_sum(x, mask) / count
    var = channel_sum(lax.square(x - mean), mask) / count
    return mean, var


def _row_weights(x: Array, mask: Array) -> Array:
    """``mask`` broadcastable against ``x`` (one weight per example)."""
    return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def normalize(x: Array, mean: Array, var: Array, scale: Array, bias: Array, epsilon: float) -> Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` in ``flax.linen.BatchNorm``'s order."""
    return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _bn(x: Array, scale: Array, bias: Array, mask: Array | None,
        epsilon: float) -> tuple[Array, Array, Array]:
    return _bn_fwd(x, scale, bias, mask, epsilon)[0]


def _bn_fwd(x, scale, bias, mask, epsilon):
    mean, var = _stats(x, mask)
    y = normalize(x, mean, var, scale, bias, epsilon)
    return (y, mean, var), (x, mean, lax.rsqrt(var + epsilon), scale, mask)


def _bn_bwd(epsilon, res, cotangents):
    x, mean, inv, scale, mask = res
    gy, gmean, gvar = cotangents
    count = valid_count(x, mask)
    centered = x - mean
    xhat = centered * inv
    dbias = channel_sum(gy)
    dscale = channel_sum(gy * xhat)
    through_stats = dbias / count + xhat * (dscale / count)
    own = gmean / count + centered * (2.0 * gvar / count)  # the statistics' own cotangents
    if mask is None:
        dx = (scale * inv) * (gy - through_stats) + own
        return dx, dscale, dbias, None
    w = _row_weights(x, mask)
    dx = (scale * inv) * (gy - w * through_stats) + w * own
    return dx, dscale, dbias, jnp.zeros_like(mask)


_bn.defvjp(_bn_fwd, _bn_bwd)
