"""``rstpm_jax.ops.pool.max_pool``: forward and gradient against flax/XLA and a NumPy loop."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rstpm_jax.ops import pool

# (height, width, channels, window, strides, padding): ResNet's 3x3/2 pad-1 stem pool at odd,
# even and non-square sizes, a 2x2/2, an overlapping 3x3/1 and an asymmetric pad.
CASES = [
    (8, 8, 3, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (9, 7, 2, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (6, 10, 2, (2, 2), (2, 2), ((0, 0), (0, 0))),
    (5, 5, 2, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (7, 6, 1, (3, 2), (2, 3), ((0, 1), (1, 0))),
]


def _numpy_pool(x, window, strides, pads, g):
    """Forward max and the gradient to each window's first maximum (PyTorch's rule), looped."""
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=-np.inf)
    ho = (xp.shape[1] - window[0]) // strides[0] + 1
    wo = (xp.shape[2] - window[1]) // strides[1] + 1
    y = np.empty((n, ho, wo, c), x.dtype)
    dxp = np.zeros_like(xp)
    for b in range(n):
        for i in range(ho):
            for j in range(wo):
                for ch in range(c):
                    r0, c0 = i * strides[0], j * strides[1]
                    win = xp[b, r0:r0 + window[0], c0:c0 + window[1], ch]
                    k = int(np.argmax(win))  # first maximum, row-major
                    y[b, i, j, ch] = win.flat[k]
                    dxp[b, r0 + k // window[1], c0 + k % window[1], ch] += g[b, i, j, ch]
    return y, dxp[:, pads[0][0]:pads[0][0] + h, pads[1][0]:pads[1][0] + w]


@pytest.mark.parametrize("h,w,c,window,strides,pads", CASES)
def test_matches_flax_and_numpy(h, w, c, window, strides, pads):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, h, w, c)).astype(np.float32)
    y = pool.max_pool(jnp.asarray(x), window, strides, pads)
    ref = nn.max_pool(jnp.asarray(x), window, strides=strides, padding=pads)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))
    g = rng.normal(size=y.shape).astype(np.float32)
    dx = jax.grad(lambda v: jnp.vdot(pool.max_pool(v, window, strides, pads), g))(jnp.asarray(x))
    dx_xla = jax.grad(lambda v: jnp.vdot(nn.max_pool(v, window, strides=strides, padding=pads), g))(
        jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_xla), rtol=1e-6, atol=1e-6)
    y_np, dx_np = _numpy_pool(x, window, strides, pads, g)
    np.testing.assert_array_equal(np.asarray(y), y_np)
    np.testing.assert_allclose(np.asarray(dx), dx_np, rtol=1e-6, atol=1e-6)


def test_ties_go_to_the_first_maximum():
    """ReLU outputs are full of equal values: each window's gradient goes to one position only."""
    rng = np.random.default_rng(1)
    x = np.maximum(rng.normal(size=(2, 9, 9, 3)), 0).round(0).astype(np.float32)  # many ties
    window, strides, pads = (3, 3), (2, 2), ((1, 1), (1, 1))
    g = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
    dx = jax.jit(jax.grad(lambda v: jnp.vdot(pool.max_pool(v, window, strides, pads), g)))(
        jnp.asarray(x))
    _, dx_np = _numpy_pool(x, window, strides, pads, g)
    np.testing.assert_allclose(np.asarray(dx), dx_np, rtol=1e-6, atol=1e-6)
    assert np.isclose(float(dx.sum()), float(g.sum()), rtol=1e-5, atol=1e-4)  # nothing lost or doubled


def test_rejects_non_float_or_non_nhwc():
    with pytest.raises(ValueError, match="float NHWC"):
        pool.max_pool(jnp.zeros((2, 4, 4, 3), jnp.int32))
    with pytest.raises(ValueError, match="float NHWC"):
        pool.max_pool(jnp.zeros((4, 4, 3)))


def test_every_window_routes_its_gradient_under_jit_after_a_masked_mean():
    """Regression: comparing taps with the forward's ``reduce_window`` output inside the
    jitted backward missed ~17% of the maxima when the pool's input was ``x - masked mean``
    (a padded batch's BatchNorm); each window must pass on exactly its output's gradient."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(1, 2, size=(8, 16, 16, 32)), jnp.float32)
    m = jnp.asarray(np.arange(8) < 5, jnp.float32)[:, None, None, None]

    def routed(x):
        mu = jnp.sum(x * m, (0, 1, 2)) / (jnp.sum(m) * 256)
        return jax.grad(lambda z: jnp.sum(pool.max_pool(z - mu)))(x)

    g = np.asarray(jax.jit(routed)(x))
    assert g.sum() == 8 * 8 * 8 * 32 and set(np.unique(g)) <= {0.0, 1.0, 2.0, 3.0, 4.0}
