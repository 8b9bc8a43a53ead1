"""A drop-in ``lax.conv_general_dilated`` with a fast weight gradient on XLA:CPU.

With YNNPACK fusions (XLA:CPU's default in jax 0.10), XLA computes a convolution's weight
gradient with a slow generic kernel (about 1.4 s for a 3x3 64->64 conv at 64x64, batch 32,
on 2 cores). Here the weight gradient is then ``kh * kw`` matrix products over strided,
shifted views of the padded input (0.25 s)::

    dW[i, j] = sum_{n,h,w} x_pad[n, h*s + i, w*s + j, :]^T  @  g[n, h, w, :]

run one tap at a time (``lax.scan``: XLA:CPU otherwise runs the independent products
concurrently and they fight over the cores), accumulated in float32. Strided convolutions
with few input channels (the 7x7/2 stem) regroup ``x_pad`` space-to-depth first: 16 taps
of 12 channels instead of 49 of 3. The library's own jits run Eigen convolutions instead
(``compile_options``), whose weight gradient beats the taps (0.13 s for that conv): there
kernels larger than 1x1 keep XLA's, chosen at trace time by
``compile_options.eigen_convolutions()``. 1x1 convolutions' gradients are plain matrix
products either way (4-5x faster than XLA's); forward passes and the input gradients of
larger kernels are XLA's own. Transposed convolutions (input dilation, unit strides,
explicit pads: ``ops.layers.ConvTranspose``) get the weight gradient of the equivalent
strided convolution (XLA:CPU's own for the dilated form took ~1 s per RSTPM decoder layer).
Only 2D NHWC/HWIO convolutions without kernel dilation or feature groups take these paths;
anything else goes to ``lax.conv_general_dilated`` as is. ``ops.layers.Conv`` is
``nn.Conv`` through it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from rstpm_jax.ops import compile_options

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    """``lax.conv_general_dilated`` with the shifted-matmul weight gradient where it applies."""
    plan = _plan(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                 dimension_numbers, feature_group_count, batch_group_count,
                 preferred_element_type)
    if plan is None:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, batch_group_count=batch_group_count,
            precision=precision, preferred_element_type=preferred_element_type)
    strides, pads, dilation = plan
    if dilation != (1, 1):
        return _dilated_conv(lhs, rhs, dilation, pads, _hashable(precision))
    return _conv(lhs, rhs, strides, pads, _hashable(precision))


def _hashable(precision: Any) -> Any:
    return tuple(precision) if isinstance(precision, list) else precision


def _all_ones(v: Sequence[int] | None) -> bool:
    return v is None or all(int(d) == 1 for d in v)


def _plan(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
          feature_group_count, batch_group_count,
          preferred_element_type) -> tuple[tuple[int, int], Pads, tuple[int, int]] | None:
    """``(strides, explicit pads, input dilation)`` when a fast path applies, else ``None``.

    Input (lhs) dilation -- a transposed convolution -- only with unit strides and explicit
    pads.
    """
    if getattr(lhs, "ndim", 0) != 4 or getattr(rhs, "ndim", 0) != 4 or len(window_strides) != 2:
        return None
    if dimension_numbers is None:  # lax's default is NCHW/OIHW: not ours.
        return None
    try:
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    except (TypeError, ValueError):
        return None
    if (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) != tuple(_NHWC):
        return None
    if not _all_ones(rhs_dilation):
        return None
    dilation = (1, 1) if lhs_dilation is None else tuple(int(d) for d in lhs_dilation)
    if len(dilation) != 2 or min(dilation) < 1:
        return None
    if dilation != (1, 1) and (isinstance(padding, str) or not _all_ones(window_strides)):
        return None
    if feature_group_count != 1 or batch_group_count != 1 or preferred_element_type is not None:
        return None
    if lhs.dtype != rhs.dtype or not jnp.issubdtype(lhs.dtype, jnp.floating):
        return None
    if lhs.shape[3] != rhs.shape[2]:
        return None  # let lax raise its own shape error
    strides = (int(window_strides[0]), int(window_strides[1]))
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if len(pads) != 2:
        return None
    for size, k, s, d, (lo, hi) in zip(lhs.shape[1:3], rhs.shape[:2], strides, dilation, pads):
        if s < 1 or (size - 1) * d + 1 + lo + hi < k or min(lo, hi) < 0:
            return None
    return strides, pads, dilation


def _lax_conv(x: Array, w: Array, strides, pads, precision) -> Array:
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                    precision=precision)


def _is_pointwise(w: Array, pads: Pads) -> bool:
    return w.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0))


def _subsample(x: Array, strides: tuple[int, int], out_hw: tuple[int, int]) -> Array:
    """``x[:, ::sh, ::sw][:, :ho, :wo]`` as a static strided slice."""
    (sh, sw), (ho, wo) = strides, out_hw
    n, _, _, c = x.shape
    return lax.slice(x, (0, 0, 0, 0), (n, (ho - 1) * sh + 1, (wo - 1) * sw + 1, c), (1, sh, sw, 1))


def _transpose(linear: Callable[[Array], Array], like: Any, ct: Array) -> Array:
    """The transpose of ``linear`` (a function of arrays shaped like ``like``) applied to ``ct``:
    XLA's own gradient of a convolution with respect to that argument."""
    return jax.linear_transpose(linear, jax.ShapeDtypeStruct(like.shape, like.dtype))(ct)[0]


def _matmul(a: Array, b: Array, contract: tuple[int, int], precision) -> Array:
    """2D product contracting ``a``'s axis ``contract[0]`` with ``b``'s, in float32."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: Array, w: Array, strides: tuple[int, int], pads: Pads, precision: Any) -> Array:
    # 1x1 too: a strided-slice + matmul forward made the 8-device train step compiled without
    # YNNPACK fusions drift 8.6e-3 from the 1-device one (cause not found; see compile_options).
    return _lax_conv(x, w, strides, pads, precision)


def _conv_fwd(x, w, strides, pads, precision):
    return _conv(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, res, g):
    x, w = res
    return _input_grad(g, x, w, strides, pads, precision), _weight_grad(g, x, w, strides, pads,
                                                                         precision)


_conv.defvjp(_conv_fwd, _conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dilated_conv(x: Array, w: Array, dilation: tuple[int, int], pads: Pads, precision: Any) -> Array:
    """Stride-1 convolution of the ``dilation``-dilated input (``lax.conv_transpose``'s form)."""
    return _lax_dilated_conv(x, w, dilation, pads, precision)


def _lax_dilated_conv(x: Array, w: Array, dilation, pads, precision) -> Array:
    return lax.conv_general_dilated(x, w, (1, 1), pads, lhs_dilation=dilation,
                                    dimension_numbers=_NHWC, precision=precision)


def _dilated_conv_fwd(x, w, dilation, pads, precision):
    return _dilated_conv(x, w, dilation, pads, precision), (x, w)


def _dilated_conv_bwd(dilation, pads, precision, res, g):
    """Input gradient: XLA's (a strided convolution). Weight gradient: that of the strided
    convolution of ``g`` whose output is ``x``'s shape, flipped and with in/out swapped.

    With ``d`` the dilation and ``lo`` the low pad, ``dW[i, j] = sum_{n,a,b} x[n, a, b]^T
    g[n, d*a + lo - i, d*b + lo - j]``: the strided weight gradient of ``g`` padded by
    ``k - 1 - lo`` below, at tap ``k - 1 - i``. XLA:CPU's own weight gradient of the dilated
    form is a generic dilated-kernel convolution: ~1 s for RSTPM's 3x3/2 decoder layers at
    256x256, batch 16.
    """
    x, w = res
    kh, kw, cin, cout = w.shape
    dx = _transpose(lambda v: _lax_dilated_conv(v, w, dilation, pads, precision), x, g)
    cfg = [(0, 0, 0)]
    for axis, (k, d, (lo, _)) in enumerate(zip((kh, kw), dilation, pads)):
        before = k - 1 - lo
        after = d * (x.shape[1 + axis] - 1) + k - g.shape[1 + axis] - before
        cfg.append((before, after, 0))  # negative: crop
    gp = lax.pad(g, jnp.zeros((), g.dtype), (*cfg, (0, 0, 0)))
    flipped = jax.ShapeDtypeStruct((kh, kw, cout, cin), w.dtype)
    dv = _weight_grad(x, gp, flipped, dilation, ((0, 0), (0, 0)), precision)
    return dx, jnp.flip(dv, (0, 1)).transpose(0, 1, 3, 2)


_dilated_conv.defvjp(_dilated_conv_fwd, _dilated_conv_bwd)


def _weight_grad(g: Array, x: Array, w: Array, strides, pads, precision) -> Array:
    """``dW[i, j] = sum x_pad[:, i::s, j::s]^T @ g``: one matrix product per kernel tap.

    Kernels larger than 1x1 use XLA's own weight gradient instead where the library's jits
    run Eigen convolutions (``compile_options``): there it is faster than the taps (layer1's
    3x3 at 256x256, batch 32: 134 vs 252 ms; the stem: 206 vs 358 ms), while with YNNPACK
    fusions it is 3-6x slower than them.
    """
    kh, kw, cin, cout = w.shape
    if (kh, kw) != (1, 1) and compile_options.eigen_convolutions():
        return _transpose(lambda v: _lax_conv(x, v, strides, pads, precision), w, g)
    n, ho, wo, _ = g.shape
    g2 = g.reshape(-1, cout)
    if (kh, kw) == (1, 1):
        xs = _subsample(lax.pad(x, jnp.zeros((), x.dtype),
                                ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0))),
                        strides, (ho, wo))
        return _matmul(xs.reshape(-1, cin), g2, (0, 0), precision).astype(w.dtype)[None, None]
    sh, sw = strides
    if (sh, sw) != (1, 1) and cin * sh * sw <= _S2D_MAX_CHANNELS:
        return _weight_grad_s2d(g, x, w, strides, pads, precision)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    window = (n, (ho - 1) * sh + 1, (wo - 1) * sw + 1, cin)

    def tap(_, ij):
        view = lax.dynamic_slice(xp, (0, ij[0], ij[1], 0), window)[:, ::sh, ::sw, :]
        return None, _matmul(view.reshape(-1, cin), g2, (0, 0), precision)

    taps = jnp.stack(jnp.meshgrid(jnp.arange(kh), jnp.arange(kw), indexing="ij"), -1)
    _, dw = lax.scan(tap, None, taps.reshape(kh * kw, 2))
    return dw.reshape(kh, kw, cin, cout).astype(w.dtype)


# Strided convolutions of at most this many space-to-depth channels (``cin * sh * sw``: the
# stem's 3 * 2 * 2) take the space-to-depth weight gradient.
_S2D_MAX_CHANNELS = 32


def _weight_grad_s2d(g: Array, x: Array, w: Array, strides, pads, precision) -> Array:
    """Weight gradient of a strided conv with few input channels, by space-to-depth.

    ``x_pad`` regrouped into ``sh x sw`` blocks (``cin * sh * sw`` channels) turns the
    strided conv into a stride-1 one with ``ceil(kh/sh) * ceil(kw/sw)`` taps: for the 7x7/2
    stem, 16 products with 12 rows instead of 49 with 3, each reading ``g`` once (they are
    bound by reading ``g``). Taps past the kernel's edge are computed and dropped.
    """
    kh, kw, cin, cout = w.shape
    n, ho, wo, _ = g.shape
    (sh, sw), (th, tw) = strides, (-(-kh // strides[0]), -(-kw // strides[1]))
    hs, ws = ho - 1 + th, wo - 1 + tw  # blocks covering every tap of every output
    cfg = ((0, 0, 0), (pads[0][0], hs * sh - x.shape[1] - pads[0][0], 0),
           (pads[1][0], ws * sw - x.shape[2] - pads[1][0], 0), (0, 0, 0))  # negative: crop
    xp = lax.pad(x, jnp.zeros((), x.dtype), cfg)
    xs = xp.reshape(n, hs, sh, ws, sw, cin).transpose(0, 1, 3, 2, 4, 5).reshape(n, hs, ws, -1)
    g2 = g.reshape(-1, cout)

    def tap(_, pq):
        view = lax.dynamic_slice(xs, (0, pq[0], pq[1], 0), (n, ho, wo, xs.shape[3]))
        return None, _matmul(view.reshape(-1, xs.shape[3]), g2, (0, 0), precision)

    taps = jnp.stack(jnp.meshgrid(jnp.arange(th), jnp.arange(tw), indexing="ij"), -1)
    _, dw = lax.scan(tap, None, taps.reshape(th * tw, 2))
    dw = dw.reshape(th, tw, sh, sw, cin, cout).transpose(0, 2, 1, 3, 4, 5)
    return dw.reshape(th * sh, tw * sw, cin, cout)[:kh, :kw].astype(w.dtype)


def _input_grad(g: Array, x: Array, w: Array, strides, pads, precision) -> Array:
    """XLA's transposed convolution (fast on CPU); for 1x1, a matrix product scattered back."""
    if _is_pointwise(w, pads):
        n, ho, wo, cout = g.shape
        dxs = _matmul(g.reshape(-1, cout), w[0, 0], (1, 1), precision).astype(x.dtype)
        dxs = dxs.reshape(n, ho, wo, x.shape[3])
        (sh, sw), (h, wd) = strides, x.shape[1:3]
        cfg = ((0, 0, 0), (0, h - (ho - 1) * sh - 1, sh - 1), (0, wd - (wo - 1) * sw - 1, sw - 1),
               (0, 0, 0))
        return lax.pad(dxs, jnp.zeros((), x.dtype), cfg)
    return _transpose(lambda v: _lax_conv(v, w, strides, pads, precision), x, g)
