"""``rstpm_jax.ops.conv``: forward and both gradients against ``lax.conv_general_dilated``."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from rstpm_jax.models import resnet
from rstpm_jax.ops import compile_options, conv, layers

DN = ("NHWC", "HWIO", "NHWC")

# (height, width, c_in, c_out, kernel, stride, padding): ResNet18/50's convolutions at toy
# sizes (7x7/2 stem, 3x3 and 3x3/2, 1x1 and 1x1/2), odd and non-square inputs, a 5x5/3,
# and padding given as a string or asymmetric pairs. Strided convs with c_in * stride**2 <=
# 32 take the space-to-depth weight gradient, wider ones the strided-view one: both occur.
CASES = [
    (16, 16, 3, 8, 7, 2, ((3, 3), (3, 3))),
    (8, 8, 4, 6, 3, 1, ((1, 1), (1, 1))),
    (8, 8, 4, 6, 3, 2, ((1, 1), (1, 1))),
    (8, 8, 4, 6, 1, 1, ((0, 0), (0, 0))),
    (8, 8, 4, 6, 1, 2, ((0, 0), (0, 0))),
    (9, 11, 3, 5, 3, 2, ((1, 1), (1, 1))),
    (9, 7, 4, 6, 1, 2, ((0, 0), (0, 0))),
    (15, 13, 3, 4, 7, 2, ((3, 3), (3, 3))),
    (11, 10, 2, 3, 5, 3, ((2, 2), (2, 2))),
    (10, 9, 3, 4, 3, 2, "SAME"),
    (9, 9, 3, 4, 3, 1, "VALID"),
    (8, 9, 3, 4, 3, 2, ((0, 1), (1, 0))),
    (6, 6, 3, 4, 1, 1, ((1, 1), (0, 1))),
    (9, 8, 12, 6, 3, 2, ((1, 1), (1, 1))),
    (11, 9, 9, 4, 7, 2, ((3, 3), (3, 3))),
]


@pytest.fixture(params=["xla", "taps"])
def weight_grad_path(request, monkeypatch):
    """Kernels > 1x1 take XLA's weight gradient (Eigen convolutions, the library's CPU default)
    or the per-tap products (YNNPACK fusions): run a test under each."""
    monkeypatch.setattr(compile_options, "eigen_convolutions", lambda: request.param == "xla")
    jax.clear_caches()  # traced custom-VJP backward passes are cached across jits
    yield request.param
    jax.clear_caches()


def _inputs(h, w, cin, cout, k, batch=2, seed=0):
    """numpy draws (no per-shape XLA compile of a random kernel)."""
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(batch, h, w, cin)), jnp.float32),
            jnp.asarray(rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32))


def _loss(conv_fn, stride, padding):
    """A non-linear scalar of the conv output, so the cotangent is not all ones."""
    def f(x, w):
        y = conv_fn(x, w, (stride, stride), padding, dimension_numbers=DN)
        return jnp.sum(jnp.sin(y) * jnp.cos(jnp.arange(y.size).reshape(y.shape)))
    return f


def _close(actual, expected, rtol=1e-5):
    expected = np.asarray(expected, np.float32)
    np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=rtol,
                               atol=rtol * float(np.max(np.abs(expected))))


@pytest.mark.parametrize("h,w,cin,cout,k,stride,padding", CASES)
def test_forward_and_grads_match_lax(h, w, cin, cout, k, stride, padding, weight_grad_path):
    x, kern = _inputs(h, w, cin, cout, k)

    @jax.jit  # one compile for both sides
    def run(x, w):
        out = {}
        for name, fn in (("ref", lax.conv_general_dilated), ("ours", conv.conv_general_dilated)):
            y = fn(x, w, (stride, stride), padding, dimension_numbers=DN)
            out[name] = (y, *jax.grad(_loss(fn, stride, padding), (0, 1))(x, w))
        return out

    out = run(x, kern)
    for ours, ref in zip(out["ours"], out["ref"]):  # forward, d/dx, d/dW
        assert ours.shape == ref.shape
        _close(ours, ref)


@pytest.mark.parametrize("cin", [2, 12])  # space-to-depth path, strided-view path
def test_weight_grad_matches_numpy_loop(cin, monkeypatch, weight_grad_path):
    """dW[i, j] = sum over outputs of x_pad[n, h*s+i, w*s+j]^T g[n, h, w], written out."""
    calls = []
    s2d = conv._weight_grad_s2d
    monkeypatch.setattr(conv, "_weight_grad_s2d", lambda *a: calls.append(1) or s2d(*a))
    x, kern = _inputs(7, 6, cin, 3, 3, seed=3)
    g = jnp.asarray(np.random.default_rng(4).normal(size=(2, 4, 3, 3)), jnp.float32)
    f = lambda w: conv.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)),  # noqa: E731
                                            dimension_numbers=DN)
    dw = jax.jit(lambda w, g: jax.vjp(f, w)[1](g)[0])(kern, g)
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    gn = np.asarray(g, np.float64)
    expected = np.zeros((3, 3, cin, 3))
    for i in range(3):
        for j in range(3):
            for n in range(2):
                for a in range(4):
                    for b in range(3):
                        expected[i, j] += np.outer(xp[n, 2 * a + i, 2 * b + j], gn[n, a, b])
    _close(dw, expected)
    assert bool(calls) == (weight_grad_path == "taps" and cin * 4 <= conv._S2D_MAX_CHANNELS)


def _rel_norm_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _uses_custom_vjp(fn, *args) -> bool:
    return "custom_vjp_call" in str(jax.make_jaxpr(fn)(*args))


def test_fast_path_taken_and_fallthrough_identical():
    x, kern = _inputs(8, 8, 4, 4, 3)
    fast = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),  # noqa: E731
                                                  dimension_numbers=DN)
    assert _uses_custom_vjp(fast, x, kern)
    # Unsupported: kernel dilation, input dilation with strides, feature groups, NCHW layout,
    # preferred_element_type -> plain lax.
    others = [
        dict(window_strides=(1, 1), padding="SAME", rhs_dilation=(2, 2), dimension_numbers=DN),
        dict(window_strides=(2, 2), padding=((1, 1), (1, 1)), lhs_dilation=(2, 2),
             dimension_numbers=DN),
        dict(window_strides=(1, 1), padding="SAME", feature_group_count=2, dimension_numbers=DN),
        dict(window_strides=(2, 2), padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")),
        dict(window_strides=(1, 1), padding="SAME", dimension_numbers=DN,
             preferred_element_type=jnp.float32),
    ]
    for kwargs in others:
        lhs, w = x, kern[:, :, :2] if kwargs.get("feature_group_count") == 2 else kern
        if kwargs["dimension_numbers"][0] == "NCHW":
            lhs, w = jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(kern, (3, 2, 0, 1))
        ours = lambda x, w, kw=kwargs: conv.conv_general_dilated(x, w, **kw)  # noqa: E731
        assert not _uses_custom_vjp(ours, lhs, w), kwargs
        ref = lax.conv_general_dilated(lhs, w, **kwargs)
        np.testing.assert_array_equal(np.asarray(ours(lhs, w)), np.asarray(ref))


class _Block(nn.Module):
    """Stem conv, a strided 3x3 and a strided 1x1 (ResNet's downsample), with ``conv``."""

    conv: object = nn.Conv
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        layer = resnet.torch_conv(self.conv, self.dtype)
        y = nn.relu(layer(8, (7, 7), 2, padding=3, name="stem")(x))
        return layer(16, (3, 3), 2, padding=1, name="c3")(y) + layer(16, (1, 1), 2, padding=0, name="down")(y)


@pytest.fixture(scope="module")
def block_setup():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    shapes = jax.eval_shape(_Block().init, jax.random.PRNGKey(0), x)["params"]
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype), shapes)
    return x, params


def _block_grads(conv_cls, dtype, x, params):
    def loss(p, x):
        y = _Block(conv_cls, dtype).apply({"params": p}, x)
        return jnp.mean(jnp.square(y.astype(jnp.float32) - 0.3))
    return jax.jit(jax.grad(loss, (0, 1)))(params, x)


@pytest.fixture(scope="module")
def f32_grads(block_setup):
    """Gradients of the block with XLA's float32 convolutions (the reference)."""
    return _block_grads(nn.Conv, jnp.float32, *block_setup)


def test_flax_conv_with_custom_fn_matches_default(block_setup, f32_grads, weight_grad_path):
    x, params = block_setup
    y_ref = jax.jit(_Block().apply)({"params": params}, x)
    y = jax.jit(_Block(layers.Conv).apply)({"params": params}, x)
    _close(y, y_ref)
    ours = _block_grads(layers.Conv, jnp.float32, x, params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(f32_grads)):
        _close(a, b)


def test_bfloat16(block_setup, f32_grads, weight_grad_path):
    """bf16 compute: gradients in f32 params' dtype, as close to f32 as XLA's own bf16 path."""
    x, params = block_setup
    ref = f32_grads
    xla_bf16 = _block_grads(nn.Conv, jnp.bfloat16, x, params)
    ours = _block_grads(layers.Conv, jnp.bfloat16, x, params)
    for a, b, c, p in zip(*(jax.tree.leaves(t) for t in (ours[0], ref[0], xla_bf16[0], params))):
        assert a.dtype == p.dtype == jnp.float32
        assert _rel_norm_err(a, b) < max(2e-2, 1.5 * _rel_norm_err(c, b))
    # Direct bf16 call: outputs and gradients keep bfloat16.
    xb, kb = (v.astype(jnp.bfloat16) for v in _inputs(8, 8, 4, 6, 3))
    f = _loss(conv.conv_general_dilated, 2, ((1, 1), (1, 1)))
    dx, dw = jax.jit(jax.grad(f, (0, 1)))(xb, kb)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    dx_ref, dw_ref = jax.jit(jax.grad(_loss(lax.conv_general_dilated, 2, ((1, 1), (1, 1))),
                                      (0, 1)))(xb.astype(jnp.float32), kb.astype(jnp.float32))
    assert _rel_norm_err(dx, dx_ref) < 2e-2
    assert _rel_norm_err(dw, dw_ref) < 2e-2


# (input shape, features, kernel, stride): RSTPM's 3x3/2 decoder layer at toy size, an even
# kernel, stride 3, a 1x1 and a 5x5; channel counts on both sides of the space-to-depth cut.
TRANSPOSE_CASES = [
    ((2, 5, 6, 8), 4, 3, 2),
    ((2, 4, 4, 3), 5, 3, 2),
    ((1, 5, 5, 4), 3, 4, 2),
    ((2, 3, 4, 2), 3, 2, 3),
    ((2, 4, 4, 3), 2, 1, 2),
    ((2, 4, 5, 3), 2, 5, 2),
]


@pytest.mark.parametrize("shape,features,k,stride", TRANSPOSE_CASES)
def test_conv_transpose_layer_matches_flax_conv_transpose(shape, features, k, stride,
                                                          weight_grad_path):
    """ops.layers.ConvTranspose (an input-dilated conv with a custom weight gradient) has
    nn.ConvTranspose's variables, output and gradients."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    ref = nn.ConvTranspose(features, (k, k), strides=(stride, stride), padding="SAME", use_bias=False)
    ours = layers.ConvTranspose(features, (k, k), (stride, stride), use_bias=False)
    variables = ref.init(jax.random.key(0), x)
    assert (jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x))
            == jax.tree.map(jnp.shape, variables))
    g = jnp.asarray(rng.normal(size=ref.apply(variables, x).shape), jnp.float32)

    @jax.jit
    def run(variables, x):
        out = {}
        for name, module in (("ref", ref), ("ours", ours)):
            y, vjp = jax.vjp(module.apply, variables, x)
            out[name] = (y, *vjp(g))
        return out

    out = run(variables, x)
    assert "custom_vjp_call" in str(jax.make_jaxpr(ours.apply)(variables, x))
    for a, b in zip(jax.tree.leaves(out["ours"]), jax.tree.leaves(out["ref"])):
        assert a.shape == b.shape
        _close(a, b)
