"""Max pooling (NHWC) whose gradient is a few elementwise passes instead of XLA's scatter.

JAX differentiates ``lax.reduce_window(max)`` into a select-and-scatter that XLA:CPU runs as
a variadic reduce-window over int32 index arrays of the padded input's size plus a scatter:
about 1.2 s for ResNet's stem pool at 256x256, batch 32, on 2 cores (a sixth of the STPM
train step). Here the gradient goes, per window tap, to the first position (row-major in
the window) that equals the window's maximum -- PyTorch's ``max_pool2d`` rule -- as
``kh * kw`` strided comparisons and pads that XLA fuses. Any platform; float inputs only.

The backward compares each tap with the maximum of the same tap slices, not with the forward's
``reduce_window`` output: under ``jit`` XLA:CPU's fused comparison against that output missed
the maximum in ~17% of windows for some producers of ``x`` (a masked batch mean before the
pool; the stem of a padded batch sharded over 4 devices), silently dropping their gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def max_pool(x: Array, window: Sequence[int] = (3, 3), strides: Sequence[int] = (2, 2),
             padding: Sequence[tuple[int, int]] = ((1, 1), (1, 1))) -> Array:
    """``flax.linen.max_pool`` on NHWC ``x`` (explicit padding, padded with -inf)."""
    if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"max_pool needs a float NHWC array, got {x.dtype} of shape {x.shape}.")
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _max_pool(x, tuple(int(k) for k in window), tuple(int(s) for s in strides), pads)


def _pad_config(pads, interior=(0, 0)):
    return ((0, 0, 0), (*pads[0], interior[0]), (*pads[1], interior[1]), (0, 0, 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: Array, window, strides, pads) -> Array:
    return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, *window, 1),
                             (1, *strides, 1), ((0, 0), *pads, (0, 0)))


def _max_pool_fwd(x, window, strides, pads):
    return _max_pool(x, window, strides, pads), (x,)


def _max_pool_bwd(window, strides, pads, res, g):
    (x,) = res
    xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype), _pad_config(pads))
    n, ho, wo, c = g.shape
    (kh, kw), (sh, sw) = window, strides
    taps = {(i, j): lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                              (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)}
    y = functools.reduce(jnp.maximum, taps.values())  # the window maxima, from the same taps
    # Per tap, the output gradient where that tap is the window's first maximum.
    taken = jnp.zeros(g.shape, bool)
    zero = jnp.zeros((), g.dtype)
    shares = {}
    for i in range(kh):
        for j in range(kw):
            tap = taps[i, j]
            hit = (tap == y) & ~taken
            taken = taken | hit
            shares[i, j] = jnp.where(hit, g, zero)
    # Tap (i, j) of output (a, b) is padded-input (a*sh + i, b*sw + j): gather by input phase
    # (i % sh, j % sw) on the coarse grid, shifted by (i // sh, j // sw); then interleave.
    bh, bw = -(-(xp.shape[1]) // sh), -(-(xp.shape[2]) // sw)
    phases = []
    for pi in range(sh):
        row = []
        for pj in range(sw):
            acc = jnp.zeros((n, bh, bw, c), g.dtype)
            for i in range(pi, kh, sh):
                for j in range(pj, kw, sw):
                    di, dj = i // sh, j // sw
                    acc = acc + lax.pad(shares[i, j], zero, _pad_config(
                        ((di, bh - di - ho), (dj, bw - dj - wo))))
            row.append(acc)
        phases.append(jnp.stack(row, 3))
    dxp = jnp.stack(phases, 2).reshape(n, bh * sh, bw * sw, c)
    (top, _), (left, _) = pads
    return (lax.slice(dxp, (0, top, left, 0), (n, top + x.shape[1], left + x.shape[2], c)),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
